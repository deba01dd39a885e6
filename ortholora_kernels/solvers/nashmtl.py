"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", 2022).

The Nash bargaining solution: ``w > 0`` with ``G w = 1 / w`` (``w_i g_i . d = 1`` for the update
``d = X^T w``), then scaled down so that ``||X^T w|| <= max_norm`` (``max_norm = 0`` disables it), as TorchJD
0.18's NashMTL with ``update_weights_every=1``. TorchJD approximates the root by up to
``optim_niter=20`` convex programs (cvxpy + ECOS, on G scaled by its Frobenius norm for
conditioning) that stop at a residual of 1e-3;
here Newton's method on the device solves the same equation to rounding
(:func:`._lcp.power_root` with alpha = 1, on G scaled to unit trace; the root scales as
``trace^-1/2``). Stateless: TorchJD's warm start only changes where its solver starts, not the root.

Degenerate cases (the rules chosen here; the bargaining problem has no solution there):

* a zero gradient (squared norm <= 1e-24 of the trace) cannot satisfy ``w_i g_i . d = 1``
  for any ``w_i``: it gets weight 0 and the others the Nash weights among themselves
  (as if it were absent; its contribution is zero whatever its weight);
* no direction improves every task (e.g. antiparallel or opposed colinear gradients): no
  positive root exists; the fixed Newton steps return finite weights: those of the
  opposed tasks grow (about 2x per step) while their contributions cancel, so the update
  tends to the Nash update of the other tasks (0 when all are opposed, ``[v, v, -v/2]``);
* every gradient zero: zero weights.
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg, nonzero
from ._lcp import mask_gram, newton_iters, power_root, trace


def weights(gram: torch.Tensor, present=None, *, max_norm: float = 1.0, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` Nash-MTL weights from float64 Gram matrices ``[S, T, T]``."""
    max_norm = check_nonneg("max_norm", max_norm, "nashmtl")
    iters = check_iters(iters, "nashmtl") or newton_iters(gram.shape[-1])
    gm = mask_gram(gram, present)
    tr = trace(gm).squeeze(-1)
    safe = torch.where(tr > 0, tr, torch.ones_like(tr))
    w = power_root(gm / safe.unsqueeze(-1), 1.0, iters, nonzero(gm, present)) / safe.sqrt()
    if max_norm > 0:
        norm = (w * (gm @ w.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True).clamp_min(0).sqrt()
        w = torch.where(norm > max_norm, w * (max_norm / torch.where(norm > 0, norm, torch.ones_like(norm))), w)
    return w
