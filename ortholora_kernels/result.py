"""The result object of ``project(..., return_stats=True)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
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
    """

    output: torch.Tensor
    gram: torch.Tensor
    coeffs: torch.Tensor
    num_projections: torch.Tensor
    order: torch.Tensor
    offsets: tuple
    reduction: str

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.gram.shape[-1]

    @property
    def cosine(self) -> torch.Tensor:
        """``[S, T, T]`` cosine similarities of the original task gradients (0 where a norm is 0)."""
        g = self.gram.to(torch.float64)
        d = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        denom = d.unsqueeze(-1) * d.unsqueeze(-2)
        return torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))

    @property
    def present(self) -> torch.Tensor:
        """``[S, T]`` bool: the task's gradient is not all zeros in the segment (the task took
        part in the step). The pair statistics below count only pairs of present tasks."""
        return torch.diagonal(self.gram, dim1=-2, dim2=-1) > 0

    @property
    def grad_norm(self) -> torch.Tensor:
        """``[S, T]`` norm of each task's original (unprojected) gradient per segment."""
        return torch.diagonal(self.gram.to(torch.float64), dim1=-2, dim2=-1).clamp_min(0).sqrt()

    def _pairs(self, ordered: bool) -> torch.Tensor:
        k = self.present.sum(-1).to(torch.float32)
        n = k * (k - 1) / (1 if ordered else 2)
        return n.clamp_min(1)

    @property
    def conflicts(self) -> torch.Tensor:
        """``[S]`` number of unordered task pairs whose original gradients conflict (dot < 0)."""
        t = self.num_tasks
        upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=self.gram.device), diagonal=1)
        return ((self.gram < 0) & upper).sum(dim=(-2, -1))

    @property
    def conflict_fraction(self) -> torch.Tensor:
        """``[S]`` fraction of unordered pairs of present tasks in conflict (0 when fewer than 2
        tasks are present)."""
        return self.conflicts.to(torch.float32) / self._pairs(False)

    @property
    def projection_fraction(self) -> torch.Tensor:
        """``[S]`` projections performed over the ordered pairs of present tasks (0 when fewer
        than 2 tasks are present)."""
        return self.num_projections.to(torch.float32) / self._pairs(True)

    @property
    def mean_cosine(self) -> torch.Tensor:
        """``[S]`` mean cosine similarity over unordered pairs of present tasks (0 when fewer
        than 2 tasks are present)."""
        t = self.num_tasks
        upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=self.gram.device), diagonal=1)
        return (self.cosine * upper).sum(dim=(-2, -1)) / self._pairs(False).to(torch.float64)
