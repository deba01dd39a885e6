"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", 2021), option c.

``d = g0 + phi g_w / ||g_w||`` with ``g0`` the mean gradient, ``phi = c ||g0||`` and ``w`` the
minimiser over the simplex of ``g_w . g0 + phi ||g_w||``, on G scaled to unit trace
(TorchJD 0.18's CAGradWeighting, which solves that problem with cvxpy + Clarabel).

Solved here without a conic solver. The weights ``v = 1/T + phi w / ||g_w||`` satisfy the KKT
system ``G v = lam 1 + mu``, ``mu >= 0``, ``v >= 1/T`` (complementary to ``mu``) and
``(v - 1/T)^T G (v - 1/T) = phi^2``, solved by :func:`._lcp.cagrad_kkt` (active set, exact
once the active set is right; colinear and duplicate gradients included, e.g.
``[v, v, -0.5 v]`` with c = 0.5 gives ``0.25 v``, as TorchJD).

Degenerate cases (the rules chosen here):

* a zero gradient (squared norm <= 1e-24 of the trace) takes no part in the correction
  (``w_i = 0``: it constrains no direction) but still counts in the mean ``g0``;
* where the minimiser has ``||g_w|| < norm_eps`` (relative: on the unit-trace G) the
  correction's direction is undefined and dropped: ``d = g0`` (TorchJD returns 0, which is
  not a CAGrad direction: 0 lies outside the ball ``||d - g0|| <= phi`` for c < 1);
* every gradient zero: the weights 1/T (the output is 0).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg, count, masked, nonzero
from ._lcp import cagrad_kkt, default_iters, eye_like, mask_gram, normalize


def weights(gram: torch.Tensor, present=None, *, c: float = 0.5, norm_eps: float = 1e-4,
            iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` CAGrad weights from float64 Gram matrices ``[S, T, T]``."""
    c = check_nonneg("c", c, "cagrad")
    norm_eps = check_nonneg("norm_eps", norm_eps, "cagrad")
    t = gram.shape[-1]
    iters = check_iters(iters, "cagrad") or default_iters(t) + 2
    g = normalize(mask_gram(gram, present), 0.0)
    if present is None:
        ubar = torch.full(gram.shape[:-1], 1.0 / t, dtype=gram.dtype, device=gram.device)
    else:
        ubar = present.to(gram.dtype) / count(present, gram).clamp_min(1)
    if c == 0:
        return ubar
    live = nonzero(g, present)
    # Zero and absent tasks are 1 x 1 blocks of their own; the ridge (1e-13 of each task's
    # own scale) makes duplicate rows a well-posed tie instead of a zero pivot.
    gk = torch.where(live.unsqueeze(-1) & live.unsqueeze(-2), g, eye_like(g))
    torch.diagonal(gk, dim1=-2, dim2=-1).mul_(1 + 1e-13).add_(1e-30)
    b = (g @ ubar.unsqueeze(-1)).squeeze(-1)          # G ubar (zero on zero and absent tasks)
    phi2 = c * c * (ubar * b).sum(-1, keepdim=True)
    s = cagrad_kkt(gk, b, phi2, live, iters, norm_eps)
    return masked(ubar + s, present)
