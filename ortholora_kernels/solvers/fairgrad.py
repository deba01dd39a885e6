"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", 2024), option alpha.

The weights solve ``G w = w^(-1/alpha)`` with ``w > 0`` (alpha-fair utility maximisation), as
TorchJD 0.18's FairGradWeighting, which finds the root with scipy's ``least_squares`` from the
uniform vector; here a fixed number of Newton steps on the device (:func:`._lcp.power_root`,
on G scaled to unit trace; the root scales as ``trace^(-alpha / (1 + alpha))``).
``alpha = 0`` gives the uniform weights 1/T, as in TorchJD. Degenerate cases as Nash-MTL
(:mod:`.nashmtl`): a zero gradient gets weight 0, no positive root gives finite weights
(the opposed tasks' weights grow while their contributions cancel), every gradient zero
gives zero weights.
"""
from __future__ import annotations

import torch

from ._common import check_iters, count, nonzero
from ._lcp import mask_gram, newton_iters, power_root, trace


def weights(gram: torch.Tensor, present=None, *, alpha: float = 1.0, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` FairGrad weights from float64 Gram matrices ``[S, T, T]``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise ValueError(f"fairgrad: option alpha must be a finite number >= 0, got {alpha!r}")
    iters = check_iters(iters, "fairgrad") or newton_iters(gram.shape[-1])
    if alpha == 0:
        if present is None:
            return torch.full(gram.shape[:-1], 1.0 / gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return present.to(gram.dtype) / count(present, gram).clamp_min(1)
    gm = mask_gram(gram, present)
    tr = trace(gm).squeeze(-1)
    safe = torch.where(tr > 0, tr, torch.ones_like(tr))
    x = power_root(gm / safe.unsqueeze(-1), float(alpha), iters, nonzero(gm, present))
    return x * safe.pow(-alpha / (1 + alpha))
