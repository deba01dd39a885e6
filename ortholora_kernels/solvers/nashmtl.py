"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", 2022).

The Nash bargaining solution: ``w > 0`` with ``G w = 1 / w`` (``w_i g_i . d = 1`` for the update
``d = X^T w``), then scaled down so that ``||X^T w|| <= max_norm`` (``max_norm = 0`` disables it), as TorchJD
0.18's NashMTL with ``update_weights_every=1``. TorchJD approximates the root by up to
``optim_niter=20`` convex programs (cvxpy + ECOS, on G scaled by its Frobenius norm for
conditioning) that stop at a residual of 1e-3;
here Newton's method on the device solves the same equation to rounding
(:func:`._lcp.power_root` with alpha = 1; FairGrad with alpha = 1 up to the scaling).
Stateless: TorchJD's warm start only changes where its solver starts, not the root.
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg
from ._lcp import newton_iters, power_root


def weights(gram: torch.Tensor, *, max_norm: float = 1.0, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` Nash-MTL weights from float64 Gram matrices ``[S, T, T]``."""
    max_norm = check_nonneg("max_norm", max_norm, "nashmtl")
    iters = check_iters(iters, "nashmtl") or newton_iters(gram.shape[-1])
    w = power_root(gram, 1.0, iters)
    if max_norm > 0:
        norm = (w * (gram @ w.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True).clamp_min(0).sqrt()
        w = torch.where(norm > max_norm, w * (max_norm / torch.where(norm > 0, norm, torch.ones_like(norm))), w)
    return w
