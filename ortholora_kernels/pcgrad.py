"""The API of Pytorch-PCGrad as a thin layer over :class:`~ortholora_kernels.OrthoLoRA`.

The compatibility path for code written against Pytorch-PCGrad (``PCGrad(optimizer)``,
``pc_backward(losses)``, ``step()``, ``zero_grad()``)::

    optimizer = PCGrad(torch.optim.Adam(model.parameters()), model)   # model: peft, or None
    for batch in loader:
        losses = [loss_fn(model, batch, t) for t in range(T)]          # T scalar losses
        optimizer.zero_grad()
        optimizer.pc_backward(losses)     # T backward passes, then the projection
        optimizer.step()

It runs one backward per task (``collect="loop"``). The fast path is ``OrthoLoRA(...,
collect="grouped")`` with ``record(task_ids)``: one backward for all tasks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layout import LoRALayout
from .projector import OrthoLoRA

__all__ = ["PCGrad"]


class PCGrad:
    """Wrap an optimizer; ``pc_backward(task_losses)`` projects the conflicting task gradients.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        model: a peft model (its LoRA matrices are projected; other trainable parameters such
            as heads get the ordinary summed gradient), a :class:`LoRALayout`, or None: every
            parameter of ``optimizer`` that requires grad is projected as one vector (what
            Pytorch-PCGrad does).
        reduction: "mean" (Pytorch-PCGrad's default) or "sum" (the Ortho-LoRA paper) of the
            projected task gradients.
        granularity: "global" (one vector, as in PCGrad) or, with a peft model, "ab" /
            "layer" / "matrix" (Ortho-LoRA).
        seed: seed of the projection orders (PCGrad shuffles the tasks every step).
        backend: the projection backend.

    Attributes:
        ortho: the :class:`OrthoLoRA` (built at the first :meth:`pc_backward`, when the number
            of tasks is known); ``ortho.last_stats`` holds the last step's statistics.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model=None, *, reduction: str = "mean",
                 granularity: str = "global", seed: int | None = 0, backend: str | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            if granularity != "global":
                raise ValueError(f"granularity: {granularity!r} needs a peft model (model=None projects one vector)")
            model = LoRALayout.from_params([("params", "A", f"param{i}", p) for i, p in enumerate(params)])
        self._optim = optimizer
        self._model = model
        self._kw = dict(reduction=reduction, granularity=granularity, seed=seed, backend=backend)
        self.ortho: OrthoLoRA | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._optim

    @property
    def param_groups(self):
        """The wrapped optimizer's parameter groups (for schedulers and logging)."""
        return self._optim.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``."""
        self._optim.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """``optimizer.step``."""
        return self._optim.step(closure)

    def pc_backward(self, objectives: Sequence[torch.Tensor]):
        """One backward per task loss (sharing one forward), then the projection into ``.grad``.

        Returns the step's :class:`~ortholora_kernels.ProjectionResult`.
        """
        losses = list(objectives)
        if self.ortho is None:
            if len(losses) < 1:
                raise ValueError("objectives: expected one scalar loss per task, got none")
            self.ortho = OrthoLoRA(self._model, len(losses), collect="loop", **self._kw)
        elif len(losses) != self.ortho.num_tasks:
            raise ValueError(f"objectives: expected {self.ortho.num_tasks} losses (as in the first call), "
                             f"got {len(losses)}")
        self.ortho.backward(losses)
        return self.ortho.project_()

    def state_dict(self) -> dict:
        """The optimizer's state and the projection state (tensors and plain types)."""
        return {"optimizer": self._optim.state_dict(),
                "ortho": self.ortho.state_dict() if self.ortho is not None else None}

    def load_state_dict(self, state: dict, num_tasks: int | None = None) -> None:
        """Restore :meth:`state_dict` (the projection state needs ``num_tasks`` if no
        ``pc_backward`` ran yet; it is read from the state's signature otherwise)."""
        self._optim.load_state_dict(state["optimizer"])
        if state.get("ortho") is not None:
            if self.ortho is None:
                t = num_tasks or state["ortho"]["signature"]["num_tasks"]
                self.ortho = OrthoLoRA(self._model, t, collect="loop", **self._kw)
            self.ortho.load_state_dict(state["ortho"])
