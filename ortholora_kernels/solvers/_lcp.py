"""Shared pieces of the solve stage: Gram normalisation and the iterative kernels.

Every function takes float64 Gram matrices ``[S, T, T]`` (any leading batch shape) and
runs a FIXED amount of work: no ``.item()``, no data-dependent Python control flow, no
host synchronisation (linear solves use ``torch.linalg.solve_ex``, which does not check
its info on the host).

The four iterative kernels (:func:`box_qp`, :func:`simplex_qp`, :func:`cagrad_kkt`,
:func:`power_root`) have a compiled twin in the native extension (``csrc/weights.h``):
on a CPU tensor, outside ``torch.compile``, with the extension built, one call runs
every problem of the batch (the torch version costs ~6 small ops per iteration, the
compiled one a single call whose cost does not grow with the op count). The compiled
active-set loops stop when the active set repeats, which gives exactly what the fixed
number of iterations gives (the next iterate would solve the same system again).
:data:`NATIVE` = False forces the torch version (tests compare the two).
"""
from __future__ import annotations

import torch

#: Use the compiled kernels on CPU when the native extension is built.
NATIVE = True


_HAS_KERNELS: list = []


def _native_ops(t: torch.Tensor):
    """``torch.ops.ortholora_C`` when the compiled kernels can run on ``t``, else None
    (also None with an extension built before these kernels existed)."""
    if not NATIVE or t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if not _HAS_KERNELS:
        from ..backends import native_impl
        ok = native_impl._load() is not None and all(
            hasattr(torch.ops.ortholora_C, name) for name in ("box_qp", "simplex_qp", "cagrad_kkt", "power_root",
                                                             "spectral"))
        _HAS_KERNELS.append(ok)
    return torch.ops.ortholora_C if _HAS_KERNELS[0] else None


_HAS_OP: dict = {}


def native_op(t: torch.Tensor, name: str):
    """The compiled op ``torch.ops.ortholora_C.<name>`` when it can run on ``t`` (as
    :func:`_native_ops`), else None: also None with an extension built before that op."""
    ops = _native_ops(t)
    if ops is None:
        return None
    if name not in _HAS_OP:
        _HAS_OP[name] = hasattr(ops, name)
    return getattr(ops, name) if _HAS_OP[name] else None


def trace(gram: torch.Tensor) -> torch.Tensor:
    """``[..., 1, 1]`` traces of the Gram matrices."""
    return torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[..., None, None]


def normalize(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """``G / trace(G)``, or zeros where ``trace(G) < eps`` or ``trace(G) <= 0``.

    ``eps`` is an ABSOLUTE threshold on the squared Frobenius norm of the gradients (as
    TorchJD's ``normalize``); 0 gives a purely scale-invariant solve (zeros only where
    every gradient is zero). NaN/Inf propagate. A new tensor (callers may write into it).
    """
    tr = trace(gram)
    if eps == 0:   # a Gram's trace is >= 0: G / max(tr, tiny) is 0 where tr = 0, NaN stays NaN
        return gram / tr.clamp_min(torch.finfo(gram.dtype).tiny)
    live = (tr > 0) & (tr >= eps)
    return gram / torch.where(live, tr, float("inf"))                       # x / inf = 0


def regularize(gram: torch.Tensor, eps: float, dead_eye: bool = False) -> torch.Tensor:
    """``G + eps I`` (TorchJD's ``regularize``: makes the normalised Gram positive definite),
    in place on ``gram`` (a fresh tensor from :func:`normalize`). ``dead_eye``: also add
    ``I`` where the whole matrix is 0 (every gradient zero; needed when ``eps`` is 0)."""
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    if dead_eye:
        diag.add_((diag.sum(-1, keepdim=True) == 0).to(gram.dtype))
    if eps:
        diag.add_(eps)
    return gram


def eye_like(gram: torch.Tensor) -> torch.Tensor:
    """The ``T x T`` identity in the dtype and on the device of ``gram``."""
    return torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def ridge(gram: torch.Tensor, rel: float = 1e-13, floor: float = 1e-30) -> torch.Tensor:
    """``G + diag(rel * G_ii + floor)``: each task's own scale times ``rel`` (duplicate
    rows become a distinct, well-posed tie: equal weights), ``floor`` keeps zero rows from
    a zero pivot. Changes the solution by about ``rel`` relative at any mix of scales."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    return gram + torch.diag_embed(rel * d.clamp_min(0) + floor)


def split_finite(gram: torch.Tensor):
    """``(G with NaN/Inf replaced by 0, [S, 1] zeros or NaN)``: an eigendecomposition
    raises on NaN/Inf, so those methods solve on the cleaned copy and add the second value
    back to their weights (:func:`nan_where`): NaN/Inf input propagates, never raises,
    never vanishes. (A non-finite gradient makes the Gram's trace non-finite.)"""
    flag = trace(gram).squeeze(-1) * 0.0                                     # 0, or NaN
    return torch.nan_to_num(gram, nan=0.0, posinf=0.0, neginf=0.0), flag


def nan_where(w: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """``w`` with NaN on the segments whose Gram was not finite (``flag`` from :func:`split_finite`)."""
    return w + flag


def pinv_apply(g: torch.Tensor, b: torch.Tensor, rtol) -> torch.Tensor:
    """``pinv(G) b`` for symmetric ``g [S, T, T]``, ``b [S, T]``: as
    ``torch.linalg.pinv(g, rtol=rtol, hermitian=True) @ b`` (eigenvalues with
    ``|lam| <= rtol max|lam|`` dropped; ``rtol`` a float or ``[S, 1]``), in a third of its
    ops (one ``eigh``, no pseudo-inverse matrix)."""
    lam, vec = torch.linalg.eigh(g)
    mag = lam.abs()
    inv = torch.where(mag > rtol * mag.amax(-1, keepdim=True), lam.reciprocal(), 0.0)
    return (vec @ ((vec.mT @ b.unsqueeze(-1)) * inv.unsqueeze(-1))).squeeze(-1)


SPECTRAL_MODES = {"imtlg": 0, "alignedmtl": 1, "config": 2}
SCALE_CODES = {"min": 0, "median": 1, "rmse": 2}


def spectral(method: str, g: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor | None,
             scale_mode: str = "min") -> torch.Tensor | None:
    """The compiled weights of an eigendecomposition-based method (imtlg, alignedmtl,
    config) on the unit-trace Gram ``g [S, T, T]`` (absent rows zeroed), or None where the
    compiled kernel cannot run (the module then runs its torch formulas). One call for all
    segments (a Jacobi eigensolver per segment, csrc/weights.h ``spectral``); NaN/Inf
    give NaN weights."""
    ops = _native_ops(g)
    if ops is None or g.dim() != 3:
        return None
    if mask is None:
        mask = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device)
    u = torch.zeros(g.shape[:-1], dtype=g.dtype, device=g.device) if u is None else u.expand(g.shape[:-1])
    return ops.spectral(g, mask, u, SPECTRAL_MODES[method], SCALE_CODES[scale_mode])


def mask_gram(gram: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``G`` with the rows and columns of absent tasks (``mask`` False) zeroed."""
    if mask is None:
        return gram
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return torch.where(both, gram, torch.zeros_like(gram))       # an absent row is never read


def decouple(gram: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``G`` (absent rows and columns zero) with 1 added on the absent diagonal entries:
    an absent coordinate is then its own 1 x 1 block, so a linear solve on it neither
    fails nor touches the present ones."""
    if mask is None:
        return gram
    return gram + torch.diag_embed((~mask).to(gram.dtype))


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

    Shapes: ``h [S, T, T]``, ``q`` and ``lower`` ``[S, P, T]`` (P problems per matrix)
    or ``[S, T]`` (one).

    Written as the linear complementarity problem ``s = v - lower >= 0``,
    ``z = H s + q' >= 0``, ``s . z = 0`` (``q' = q + H lower``) and solved by the
    primal-dual active-set method (semismooth Newton on ``min(s, z) = 0``, Hintermueller,
    Ito & Kunisch 2002): each iteration fixes ``s_i = 0`` where ``z_i > s_i`` and solves the
    remaining equalities exactly, one batched ``T x T`` linear solve. Once the active set
    is right the iterate is the exact solution (to rounding) and a fixed point of the
    iteration, so a fixed ``iters`` needs no convergence test. See :func:`default_iters`.
    """
    single = q.dim() == h.dim() - 1
    if single:
        q, lower = q.unsqueeze(-2), lower.unsqueeze(-2)
    q, lower = torch.broadcast_tensors(q, lower)
    ops = _native_ops(h)
    if ops is not None and h.dim() == 3:
        out = ops.box_qp(h, q, lower, iters)
    else:
        hh = h.unsqueeze(-3)
        q2 = q + (hh @ lower.unsqueeze(-1)).squeeze(-1)
        hh = hh.expand(*q2.shape[:-1], *h.shape[-2:])
        eye = eye_like(h)
        zeros = torch.zeros_like(q2)
        s, z = zeros, q2
        for _ in range(iters):
            active = z > s                                                 # s_i = 0 there
            k = torch.where(active.unsqueeze(-1), eye, hh)
            s, _ = torch.linalg.solve_ex(k, torch.where(active, zeros, -q2))
            z = (hh @ s.unsqueeze(-1)).squeeze(-1) + q2
        out = s.clamp_min(0) + lower
    return out.squeeze(-2) if single else out


def simplex_iters(t: int) -> int:
    """Steps of :func:`simplex_qp` for T tasks: ``2 T + 4`` (each step adds or drops one
    task; the compiled kernel stops at the optimum)."""
    return 2 * t + 4


def simplex_qp(g: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """``argmin_w w^T G w  s.t.  w >= 0, sum(w) = 1, w_i = 0 where not mask_i`` (``[S, T]``).

    A primal active-set method (as Lawson-Hanson's NNLS, on the simplex): from the vertex
    of the smallest ``G_ii``, each step solves the bordered system
    ``[G_FF 1; 1^T 0] [z_F; -lam] = [0; 1]`` on the free set F; if ``z_F > 0`` it moves to z
    and frees the task of the most negative multiplier ``(G w)_i - lam`` (below
    ``-1e-15 max G_ii``; none: optimal, every later step is a no-op), else it steps towards
    z until a weight reaches 0 and drops that task. Exact at any mix of scales and when 0
    lies in the hull; never cycles (the objective decreases). ``g`` must be positive
    definite on the free sets' affine hulls (callers add a tiny ridge).
    """
    mask = mask.expand(g.shape[:-1])
    ops = _native_ops(g)
    if ops is not None and g.dim() == 3:
        return ops.simplex_qp(g, mask, iters)
    t = g.shape[-1]
    d = torch.diagonal(g, dim1=-2, dim2=-1)
    inf = torch.full_like(d, float("inf"))
    dm = torch.where(mask, d, inf)
    k0 = dm.argmin(-1, keepdim=True)
    any_present = mask.any(-1, keepdim=True)
    free = torch.zeros_like(mask).scatter(-1, k0, True) & any_present
    w = free.to(g.dtype)
    tol = 1e-15 * torch.where(mask, d, torch.zeros_like(d)).amax(-1, keepdim=True)
    eye = eye_like(g)
    rhs = torch.cat([torch.zeros_like(w), torch.ones_like(w[..., :1])], -1)
    corner = torch.zeros_like(w[..., :1, None])
    done = ~any_present
    zeros = torch.zeros_like(w)
    for _ in range(iters):
        ff = free.to(g.dtype)
        top = torch.cat([torch.where(free.unsqueeze(-1), g, eye), ff.unsqueeze(-1)], -1)
        k = torch.cat([top, torch.cat([ff.unsqueeze(-2), corner], -1)], -2)
        sol, _ = torch.linalg.solve_ex(k, rhs)
        z = torch.where(free, sol[..., :t], zeros)
        feasible = (~free | (z > 0)).all(-1, keepdim=True)
        # Feasible: move to z, free the most negative multiplier (or stop).
        mu = (g @ z.unsqueeze(-1)).squeeze(-1) + sol[..., t:]
        cand = torch.where(mask & ~free, mu, inf)
        j = cand.argmin(-1, keepdim=True)
        add = cand.gather(-1, j) < -tol
        # Infeasible: step towards z until the first free weight reaches 0, drop it.
        neg = free & (z <= 0)
        gap = w - z
        ratio = torch.where(neg, torch.where(gap > 0, w / torch.where(gap > 0, gap, torch.ones_like(w)), zeros), inf)
        alpha = ratio.amin(-1, keepdim=True)
        drop = ratio.argmin(-1, keepdim=True)
        w_step = torch.where(free, w + alpha * (z - w), zeros).scatter(-1, drop, 0.0)
        go = ~done
        w = torch.where(go, torch.where(feasible, z, w_step), w)
        free_add = free | (torch.zeros_like(free).scatter(-1, j, True) & add)
        free_drop = free & ~torch.zeros_like(free).scatter(-1, drop, True)
        free = torch.where(go, torch.where(feasible, free_add, free_drop), free)
        done = done | (feasible & ~add)
    return torch.where(free, w.clamp_min(0), zeros)


def cagrad_kkt(g: torch.Tensor, b: torch.Tensor, phi2: torch.Tensor, mask: torch.Tensor, iters: int,
               norm_eps: float = 0.0) -> torch.Tensor:
    """CAGrad's correction ``s >= 0`` (``[S, T]``; see :mod:`.cagrad`): ``G (ubar + s) = lam 1 + mu``,
    ``mu >= 0`` complementary to ``s``, ``s^T G s = phi^2``, ``s_i = 0`` where not ``mask_i``.

    ``b = G ubar``, ``phi2 [S, 1]``. Each iteration takes one active-set step and solves
    the quadratic in ``lam`` exactly (one solve, two right-hand sides). Starts with only
    the task(s) of the smallest ``b_i`` free (the vertex the correction leans to first), so
    that a singular block (colinear gradients) is never solved before the active set is
    right. ``g`` must be positive definite on the free sets. A non-finite iterate (0 in
    the hull of the free tasks: the correction's direction is undefined) gives ``s = 0``,
    and so does ``||g_w|| < norm_eps`` for ``w = s / sum(s)``.
    """
    mask = mask.expand(g.shape[:-1])
    ops = _native_ops(g)
    if ops is not None and g.dim() == 3:
        return ops.cagrad_kkt(g, b, phi2, mask, iters, float(norm_eps))
    eye = eye_like(g)
    bmin = torch.where(mask, b, torch.full_like(b, float("inf"))).amin(-1, keepdim=True)
    s = torch.zeros_like(b)
    z = b - bmin
    lam = torch.zeros_like(bmin)
    zeros, ones = torch.zeros_like(b), torch.ones_like(b)

    def quad(u, v):
        return (u * (g @ v.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)

    for _ in range(iters):
        active = ~mask | (z > s)
        k = torch.where(active.unsqueeze(-1), eye, g)
        rhs = torch.stack([torch.where(active, zeros, -b), torch.where(active, zeros, ones)], dim=-1)
        sol, _ = torch.linalg.solve_ex(k, rhs)
        sb, p = sol[..., 0], sol[..., 1]
        a, bb, c0 = quad(p, p), quad(p, sb), quad(sb, sb)
        disc = (bb * bb - a * (c0 - phi2)).clamp_min(0)
        ok = a > 1e-300
        lam = torch.where(ok, (disc.sqrt() - bb) / torch.where(ok, a, torch.ones_like(a)), lam)
        s = sb + lam * p
        z = (g @ s.unsqueeze(-1)).squeeze(-1) + b - lam
    # A blow-up (0 in the hull of the free tasks: the correction's direction is undefined)
    # drops the correction, as the compiled kernel does.
    s = torch.where(torch.isfinite(s).all(-1, keepdim=True), s, zeros)
    s = torch.where(mask, s.clamp_min(0), zeros)
    total = s.sum(-1, keepdim=True)
    rho = quad(s, s).clamp_min(0).sqrt() / torch.where(total > 0, total, 1.0)   # ||g_w|| of w = s / sum(s)
    return torch.where(rho < norm_eps, zeros, s)


def power_root(gram: torch.Tensor, alpha: float, iters: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The positive root ``x`` of ``G x = x^(-1/alpha)`` (FairGrad; Nash-MTL is alpha = 1),
    on the coordinates where ``mask`` is True (0 elsewhere; None: all).

    It is the minimiser of the strictly convex ``1/2 x^T G x - sum_i h(x_i)`` with
    ``h' = x^(-1/alpha)`` (a barrier at 0), found by Newton's method with a
    fraction-to-the-boundary step (x stays positive) from ``x_i = G_ii^(-alpha/(1+alpha))``,
    the root when the gradients are orthogonal (right scale for any gradient magnitude).
    Fixed ``iters``; quadratic convergence near the root. Where no positive root exists
    (no direction improves every task: antiparallel or colinear opposed gradients) the
    iterate grows along the null direction of G (about doubling per step, finite) while
    the other coordinates converge.
    """
    if mask is None:
        mask = torch.ones(gram.shape[:-1], dtype=torch.bool, device=gram.device)
    mask = mask.expand(gram.shape[:-1])
    ops = _native_ops(gram)
    if ops is not None and gram.dim() == 3:
        return ops.power_root(gram, mask, float(alpha), iters)
    p = -1.0 / alpha
    mf = mask.to(gram.dtype)
    mm = mf.unsqueeze(-1) * mf.unsqueeze(-2)
    gm = gram * mm
    eye = eye_like(gram)
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    tiny = torch.finfo(gram.dtype).tiny
    x = d.clamp_min(tiny).pow(-alpha / (1 + alpha))
    zeros = torch.zeros_like(x)
    for _ in range(iters):
        xp = x.pow(p)
        f = torch.where(mask, (gm @ x.unsqueeze(-1)).squeeze(-1) - xp, zeros)
        jac = torch.where(mm > 0, gm, eye) - p * torch.diag_embed(torch.where(mask, xp / x, zeros))
        step, _ = torch.linalg.solve_ex(jac, -f)
        # Largest step in (0, 1] keeping x >= x / 10 (x positive).
        ratio = torch.where(step < 0, -0.9 * x / torch.where(step < 0, step, -torch.ones_like(step)),
                            torch.full_like(x, float("inf")))
        t = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        x = x + t * step
    return torch.where(mask, x, zeros)
