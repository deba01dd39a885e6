"""The result object of ``project(..., return_stats=True)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(repr=False)
class ProjectionResult:
    """Output of a projection plus the small per-segment matrices behind it.

    The tensors live on the device of the input; ``offsets`` (a tuple of ints) and
    ``reduction`` (a str) are host values. Nothing here forces a host sync until you
    convert a value to a Python number (``.item()``, ``float(...)``, printing).
    The statistics are plain properties computed on each access (no cache, no lock:
    they trace under ``torch.compile(fullgraph=True)``).

    Attributes:
        output: ``[N]`` for reductions "sum"/"mean", ``[T, N]`` for "none"; input dtype.
        gram: ``[S, T, T]`` float64 Gram matrices ``G[s] = X_s X_s^T``.
        coeffs: ``[S, T, T]`` float64 coefficients ``C``: projected ``g_i' = sum_k C[s, i, k] g_k``.
        num_projections: ``[S]`` int32, projections performed per segment.
        order: ``[S, T, T]`` int64, the visiting orders used.
        offsets: the segment column offsets ``(0, ..., N)``.
        reduction: the reduction applied.
        task_present: ``[S, T]`` bool, the tasks that took part in the step as the caller
            said (``OrthoLoRA``'s task counts, ``aggregate(present=...)``), or None: then a
            task whose gradient is all zeros counts as absent in the statistics.
    """

    output: torch.Tensor
    gram: torch.Tensor
    coeffs: torch.Tensor
    num_projections: torch.Tensor
    order: torch.Tensor
    offsets: tuple
    reduction: str
    task_present: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.gram.shape[-1]

    def _nonfinite(self) -> torch.Tensor:
        """``[S]`` float64: NaN where the segment's Gram holds NaN/Inf, else 0 (added to the
        statistics so that a NaN gradient shows as NaN, never as a number)."""
        bad = ~torch.isfinite(self.gram).all(dim=-1).all(dim=-1)
        return torch.where(bad, torch.full_like(bad, float("nan"), dtype=torch.float64),
                           torch.zeros_like(bad, dtype=torch.float64))

    @property
    def cosine(self) -> torch.Tensor:
        """``[S, T, T]`` cosine similarities of the original task gradients (0 where a norm is 0,
        NaN where the Gram is NaN)."""
        g = self.gram.to(torch.float64)
        d = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        denom = d.unsqueeze(-1) * d.unsqueeze(-2)
        zero = denom == 0
        return torch.where(zero, torch.zeros_like(g), g / torch.where(zero, torch.ones_like(denom), denom))

    @property
    def present(self) -> torch.Tensor:
        """``[S, T]`` bool: the task took part in the step (:attr:`task_present` when given, else
        its gradient is not all zeros in the segment; a NaN gradient is present). The pair
        statistics below count only pairs of present tasks."""
        if self.task_present is not None:
            return self.task_present.to(torch.bool).expand(self.gram.shape[:-1])
        return torch.diagonal(self.gram, dim1=-2, dim2=-1) != 0

    @property
    def grad_norm(self) -> torch.Tensor:
        """``[S, T]`` norm of each task's original (unprojected) gradient per segment."""
        return torch.diagonal(self.gram.to(torch.float64), dim1=-2, dim2=-1).clamp_min(0).sqrt()

    def _pair_mask(self) -> torch.Tensor:
        p = self.present
        t = self.num_tasks
        upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=self.gram.device), diagonal=1)
        return upper & p.unsqueeze(-1) & p.unsqueeze(-2)

    def _pairs(self, ordered: bool) -> torch.Tensor:
        k = self.present.sum(-1).to(torch.float32)
        n = k * (k - 1) / (1 if ordered else 2)
        return n.clamp_min(1)

    @property
    def conflicts(self) -> torch.Tensor:
        """``[S]`` number of unordered pairs of present tasks whose original gradients conflict (dot < 0)."""
        return ((self.gram < 0) & self._pair_mask()).sum(dim=(-2, -1))

    @property
    def conflict_fraction(self) -> torch.Tensor:
        """``[S]`` fraction of unordered pairs of present tasks in conflict (0 when fewer than 2
        tasks are present; NaN when the Gram holds NaN/Inf)."""
        return (self.conflicts.to(torch.float64) / self._pairs(False).to(torch.float64) + self._nonfinite()).float()

    @property
    def projection_fraction(self) -> torch.Tensor:
        """``[S]`` projections performed over the ordered pairs of present tasks (0 when fewer
        than 2 tasks are present; NaN when the Gram holds NaN/Inf)."""
        frac = self.num_projections.to(torch.float64) / self._pairs(True).to(torch.float64)
        return (frac + self._nonfinite()).float()

    @property
    def mean_cosine(self) -> torch.Tensor:
        """``[S]`` mean cosine similarity over unordered pairs of present tasks (0 when fewer
        than 2 tasks are present; NaN when the Gram holds NaN/Inf)."""
        cos = torch.where(self._pair_mask(), self.cosine, torch.zeros_like(self.cosine))
        return cos.sum(dim=(-2, -1)) / self._pairs(False).to(torch.float64) + self._nonfinite()

    def __repr__(self) -> str:
        return _short_repr(self)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        dev = "" if v.device.type == "cpu" else f", {v.device}"
        return f"tensor({list(v.shape)}, {dt}{dev})"
    if isinstance(v, tuple) and len(v) > 6:
        return f"({v[0]}, {v[1]}, ..., {v[-1]}) ({len(v) - 1} segments)"
    return repr(v)


def _short_repr(r) -> str:
    """Shapes and dtypes of the tensors and a few host scalars, never the tensors' values
    (printing one must not copy a GPU tensor or fill a log)."""
    from dataclasses import fields
    parts = [f"{f.name}={_describe(getattr(r, f.name))}" for f in fields(r) if getattr(r, f.name) is not None]
    return f"{type(r).__name__}(num_tasks={r.num_tasks}, " + ", ".join(parts) + ")"
