"""MGDA (Desideri 2012; Sener & Koltun 2018): the minimum-norm point of the convex hull.

``w = argmin w^T G w  s.t.  w >= 0, sum(w) = 1``, solved EXACTLY (to rounding), not by
TorchJD's Frank-Wolfe loop (epsilon=1e-3, at most 100 iterations), whose answer only
approximates this point. Through the equivalent box QP ``y = argmin 1/2 y^T G y - 1^T y
s.t. y >= 0`` and ``w = y / sum(y)`` (the KKT conditions coincide), with G scaled to unit
trace and ``reg_eps`` (relative) added to its diagonal so that the QP stays bounded when 0
lies in the hull (then ``w`` is the point of the hull nearest 0 in the regularised metric).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg
from ._lcp import box_qp, default_iters, normalize, regularize


def weights(gram: torch.Tensor, *, reg_eps: float = 1e-12, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` MGDA weights (on the simplex) from float64 Gram matrices ``[S, T, T]``."""
    reg_eps = check_nonneg("reg_eps", reg_eps, "mgda")
    iters = check_iters(iters, "mgda") or default_iters(gram.shape[-1])
    g = regularize(normalize(gram, 0.0), max(reg_eps, 1e-300))
    ones = torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    y = box_qp(g, -ones, torch.zeros_like(ones), iters)
    return y / y.sum(-1, keepdim=True)
