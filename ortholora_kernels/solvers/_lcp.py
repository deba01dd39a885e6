"""Shared pieces of the solve stage: Gram normalisation and a batched box-constrained QP.

Every function takes float64 Gram matrices ``[S, T, T]`` (any leading batch shape) and
runs a FIXED amount of work: no ``.item()``, no data-dependent Python control flow, no
host synchronisation (linear solves use ``torch.linalg.solve_ex``, which does not check
its info on the host).
"""
from __future__ import annotations

import torch


def normalize(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """``G / trace(G)``, or zeros where ``trace(G) < eps`` (TorchJD's ``normalize``).

    ``eps`` is an ABSOLUTE threshold on the squared Frobenius norm of the gradients, as
    in TorchJD; pass 0 for a purely scale-invariant solve (zeros only where the trace is 0).
    """
    tr = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    small = (tr < eps) | (tr <= 0)
    return torch.where(small, torch.zeros_like(gram), gram / torch.where(small, torch.ones_like(tr), tr))


def regularize(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """``G + eps I`` (TorchJD's ``regularize``: makes the normalised Gram positive definite)."""
    t = gram.shape[-1]
    return gram + eps * torch.eye(t, dtype=gram.dtype, device=gram.device)


def eye_like(gram: torch.Tensor) -> torch.Tensor:
    """The ``T x T`` identity in the dtype and on the device of ``gram``."""
    return torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def newton_iters(t: int) -> int:
    """Newton steps of :func:`power_root` for T tasks: ``T // 4 + 6``.

    Measured: from its start, 4, 5 and 8 steps reached the root to 1e-12 relative on every
    one of 200 random conflicting problems per T = 2, 8, 16 (gradient scales 1e-3..10,
    alpha 0.5 and 1); the default adds 2 to 5 steps (quadratic convergence near the root).
    """
    return t // 4 + 6


def default_iters(t: int) -> int:
    """Active-set iterations of :func:`box_qp` for T tasks: ``T // 4 + 4``.

    Measured: the exact active set (answer to 1e-12 relative of a 30-iteration run) was
    reached within 1, 3 and 4 iterations on every one of 200 random conflicting problems
    per T = 2, 8, 16 (upgrad, dualproj, mgda; cagrad within 2, 4, 4): the default is about
    twice that. tests/test_aggregate.py checks the KKT conditions at the defaults.
    """
    return t // 4 + 4


def box_qp(h: torch.Tensor, q: torch.Tensor, lower: torch.Tensor, iters: int) -> torch.Tensor:
    """``argmin_v 1/2 v^T H v + q^T v  s.t.  v >= lower`` for positive definite ``H``.

    Shapes: ``h [..., T, T]``, ``q`` and ``lower`` ``[..., T]`` (broadcast against each
    other; ``h`` broadcasts over the extra leading problem dimensions of ``q``).

    Written as the linear complementarity problem ``s = v - lower >= 0``,
    ``z = H s + q' >= 0``, ``s . z = 0`` (``q' = q + H lower``) and solved by the
    primal-dual active-set method (semismooth Newton on ``min(s, z) = 0``, Hintermueller,
    Ito & Kunisch 2002): each iteration fixes ``s_i = 0`` where ``z_i > s_i`` and solves the
    remaining equalities exactly, one batched ``T x T`` linear solve. Once the active set
    is right the iterate is the exact solution (to rounding) and a fixed point of the
    iteration, so a fixed ``iters`` needs no convergence test. See :func:`default_iters`.
    """
    q = q + (h @ lower.unsqueeze(-1)).squeeze(-1)
    h = h.expand(*q.shape[:-1], *h.shape[-2:])
    eye = eye_like(h)
    zeros = torch.zeros_like(q)
    s, z = zeros, q
    for _ in range(iters):
        active = z > s                                                 # s_i = 0 there
        k = torch.where(active.unsqueeze(-1), eye, h)
        s, _ = torch.linalg.solve_ex(k, torch.where(active, zeros, -q))
        z = (h @ s.unsqueeze(-1)).squeeze(-1) + q
    return s.clamp_min(0) + lower


def power_root(gram: torch.Tensor, alpha: float, iters: int) -> torch.Tensor:
    """The positive root ``x`` of ``G x = x^(-1/alpha)`` (FairGrad; Nash-MTL is alpha = 1).

    It is the minimiser of the strictly convex ``1/2 x^T G x - sum_i h(x_i)`` with
    ``h' = x^(-1/alpha)`` (a barrier at 0), found by Newton's method with a
    fraction-to-the-boundary step (x stays positive) from ``x_i = G_ii^(-alpha/(1+alpha))``,
    the root when the gradients are orthogonal (right scale for any gradient magnitude).
    Fixed ``iters``; quadratic convergence near the root.
    """
    p = -1.0 / alpha
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    tiny = torch.finfo(gram.dtype).tiny
    x = d.clamp_min(tiny).pow(-alpha / (1 + alpha))
    for _ in range(iters):
        xp = x.pow(p)
        f = (gram @ x.unsqueeze(-1)).squeeze(-1) - xp
        jac = gram - p * torch.diag_embed(xp / x)
        step, _ = torch.linalg.solve_ex(jac, -f)
        # Largest step in (0, 1] keeping x >= x / 10 (x positive).
        ratio = torch.where(step < 0, -0.9 * x / torch.where(step < 0, step, -torch.ones_like(step)),
                            torch.full_like(x, float("inf")))
        t = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        x = x + t * step
    return x
