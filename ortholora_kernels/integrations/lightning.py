"""PyTorch Lightning integration: a ``Callback`` that runs Ortho-LoRA inside ``Trainer.fit``.

    ortho = OrthoLoRA(peft_model, num_tasks=3, seed=0)         # built once, before fit
    # any method: OrthoLoRA(peft_model, 3, seed=0, aggregator=Aggregator("upgrad", ema=0.9))
    trainer = lightning.Trainer(callbacks=[OrthoLoRACallback(ortho)], ...)
    trainer.fit(module)     # training_step returns sum_t mean-loss_t; batches carry "task_ids"

Automatic optimisation is kept: the callback enters ``ortho.record(batch["task_ids"])`` when
a training batch starts and leaves it after the backward (every micro-batch of
``accumulate_grad_batches``), and projects in ``on_before_optimizer_step``: after the
backward of the last micro-batch, before Lightning's gradient clipping and the optimizer
step. The projection state (orders, step count, layout signature) is saved in Lightning
checkpoints as the callback's state. For manual optimisation, call ``record``/``project_``
yourself around ``self.manual_backward(loss)`` and ``opt.step()``.
"""
from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from ..projector import OrthoLoRA

__all__ = ["OrthoLoRACallback"]


class OrthoLoRACallback(Callback):
    """Collect per-task LoRA gradients during ``fit`` and project them once per optimizer step.

    Args:
        ortho: the :class:`OrthoLoRA` (``collect="grouped"``) over the module's peft model.
        task_ids_key: the batch key of the task ids (``[batch]``, or ``[batch, seq]`` per-token).
        log_stats: log ``ortho.stats_dict(per_task=False)`` through the module every
            ``trainer.log_every_n_steps`` optimizer steps (one host sync each time).
    """

    def __init__(self, ortho: OrthoLoRA, task_ids_key: str = "task_ids", log_stats: bool = False):
        if not isinstance(ortho, OrthoLoRA):
            raise TypeError(f"ortho: expected an OrthoLoRA, got {type(ortho).__name__}")
        if ortho.collect != "grouped":
            raise ValueError("ortho: the Lightning callback needs collect='grouped' (one backward per batch)")
        self.ortho = ortho
        self.task_ids_key = task_ids_key
        self.log_stats = log_stats
        self._ctx = None

    def _task_ids(self, batch):
        try:
            return batch[self.task_ids_key]
        except (KeyError, TypeError, IndexError):
            raise KeyError(f"task_ids_key: the training batch has no {self.task_ids_key!r} entry") from None

    def _leave(self, exc=None):
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(type(exc) if exc else None, exc, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Enter ``ortho.record`` with the batch's task ids."""
        self._leave()
        ctx = self.ortho.record(self._task_ids(batch))
        ctx.__enter__()
        self._ctx = ctx

    def on_after_backward(self, trainer, pl_module):
        """Leave ``record``: this micro-batch's per-task gradients are in the buffer."""
        self._leave()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """Project the accumulated per-task gradients into the LoRA ``.grad``."""
        self._leave()
        if self.ortho.pending:
            self.ortho.project_()
            if self.log_stats and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                for k, v in self.ortho.stats_dict(per_task=False).items():
                    pl_module.log(k, v, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Leave ``record`` if the step had no backward (``training_step`` returned None)."""
        self._leave()

    def on_exception(self, trainer, pl_module, exception):
        """Leave ``record`` so that the model is usable after a failed ``fit``."""
        self._leave()

    def state_dict(self):
        """The projection state (saved in Lightning checkpoints)."""
        return self.ortho.state_dict()

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict` (refused if the layout differs)."""
        self.ortho.load_state_dict(state_dict)
