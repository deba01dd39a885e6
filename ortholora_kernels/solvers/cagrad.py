"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", 2021), option c.

``d = g0 + phi g_w / ||g_w||`` with ``g0`` the mean gradient, ``phi = c ||g0||`` and ``w`` the
minimiser over the simplex of ``g_w . g0 + phi ||g_w||``, on G scaled to unit trace
(TorchJD 0.18's CAGradWeighting, which solves that problem with cvxpy + Clarabel; zeros where
``trace(G) < norm_eps`` or ``||g_w|| < norm_eps``).

Solved here without a conic solver. The weights ``v = 1/T + phi w / ||g_w||`` satisfy the KKT
system ``G v = lam 1 + mu``, ``mu >= 0``, ``v >= 1/T`` (complementary to ``mu``) and
``(v - 1/T)^T G (v - 1/T) = phi^2``. For a fixed active set (``v_i = 1/T``) the free part is
affine in ``lam``, so each iteration takes one active-set step (as :func:`._lcp.box_qp`) and
solves the quadratic in ``lam`` exactly: one batched ``T x T`` solve with two right-hand sides.
Once the active set is right the answer is exact (to rounding) and a fixed point; fixed
``iters`` (default ``T // 4 + 5``).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg
from ._lcp import default_iters, eye_like, normalize


def weights(gram: torch.Tensor, *, c: float = 0.5, norm_eps: float = 1e-4, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` CAGrad weights from float64 Gram matrices ``[S, T, T]``."""
    c = check_nonneg("c", c, "cagrad")
    norm_eps = check_nonneg("norm_eps", norm_eps, "cagrad")
    t = gram.shape[-1]
    iters = check_iters(iters, "cagrad") or default_iters(t) + 1
    g = normalize(gram, norm_eps)
    dead = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1, keepdim=True) <= 0      # TorchJD: zero weights
    ubar = torch.full(gram.shape[:-1], 1.0 / t, dtype=gram.dtype, device=gram.device)
    if c == 0:
        return torch.where(dead, torch.zeros_like(ubar), ubar)
    eye = eye_like(g)
    g_solve = g + 1e-12 * eye                       # keeps the free block solvable when G is singular
    b = (g @ ubar.unsqueeze(-1)).squeeze(-1)        # G ubar
    phi2 = c * c * (ubar * b).sum(-1, keepdim=True)
    lam = b.amax(-1, keepdim=True)                  # every constraint free at s = 0
    s = torch.zeros_like(b)
    z = b - lam

    def quad(u, v):
        return (u * (g @ v.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)

    for _ in range(iters):
        active = z > s
        k = torch.where(active.unsqueeze(-1), eye, g_solve)
        rhs = torch.stack([torch.where(active, torch.zeros_like(b), -b),
                           torch.where(active, torch.zeros_like(b), torch.ones_like(b))], dim=-1)
        sol, _ = torch.linalg.solve_ex(k, rhs)
        sb, p = sol[..., 0], sol[..., 1]
        a, bb, c0 = quad(p, p), quad(p, sb), quad(sb, sb)
        disc = (bb * bb - a * (c0 - phi2)).clamp_min(0)
        ok = a > 1e-300
        lam = torch.where(ok, (disc.sqrt() - bb) / torch.where(ok, a, torch.ones_like(a)), lam)
        s = sb + lam * p
        z = (g @ s.unsqueeze(-1)).squeeze(-1) + b - lam
    s = s.clamp_min(0)
    total = s.sum(-1, keepdim=True)
    rho = quad(s, s).clamp_min(0).sqrt() / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(dead | (rho < norm_eps), torch.zeros_like(s), ubar + s)
