"""MGDA (Desideri 2012; Sener & Koltun 2018): the minimum-norm point of the convex hull.

``w = argmin w^T G w  s.t.  w >= 0, sum(w) = 1``, solved EXACTLY (to rounding), not by
TorchJD's Frank-Wolfe loop (epsilon=1e-3, at most 100 iterations), whose answer only
approximates this point: a primal active-set method with the simplex constraint kept as
an equation (:func:`._lcp.simplex_qp`), on G scaled to unit trace with
``1e-13 G_ii + 1e-30`` added to each diagonal entry (:func:`._lcp.ridge`: duplicate rows
get equal weights instead of a zero pivot; the norm changes by ~1e-13 relative) and
``reg_eps`` (absolute, on the unit-trace G; default 0). Exact at any mix of scales (rows ``[1e3 v, w / 1e3, -v]``: the
min-norm point is 0), also when 0 lies in the hull. A zero gradient among the present
tasks puts 0 in the hull, so the min-norm point is then 0 by definition (a task absent
from the step must be passed as absent, ``present``). Every gradient zero: the uniform
weights (the output is 0).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg
from ._lcp import decouple, mask_gram, normalize, regularize, ridge, simplex_iters, simplex_qp


def weights(gram: torch.Tensor, present=None, *, reg_eps: float = 0.0, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` MGDA weights (on the simplex of the present tasks) from float64 Gram matrices ``[S, T, T]``."""
    reg_eps = check_nonneg("reg_eps", reg_eps, "mgda")
    iters = check_iters(iters, "mgda") or simplex_iters(gram.shape[-1])
    g = decouple(regularize(ridge(normalize(mask_gram(gram, present), 0.0)), reg_eps), present)
    mask = present if present is not None else torch.ones(gram.shape[:-1], dtype=torch.bool, device=gram.device)
    w = simplex_qp(g, mask, iters)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))
