"""The one composition of every method, mode and backend: Gram -> Gram stage -> solve -> combine.

1. **Gram**: the backend's pass ``G_s = X_s X_s^T`` (float64, per segment; a segment that
   is empty in ``X``, as on a rank's shard, keeps a zero Gram).
2. **Gram stage**: hooks ``GramStage -> GramStage`` applied in order. The built-in ones:
   :func:`sum_over_ranks` (the partial Grams of column shards summed by a collective: the
   sharded mode and FSDP2), :func:`presence` (which tasks took part in the step) and
   :func:`ema` (smoothed Gram entries for the decision, with its state).
3. **Solve**: a pure function of the Gram stage, the orders and explicit state (GradVac's
   targets): :func:`solve_method` for the methods of :mod:`ortholora_kernels.solvers`, or a
   registered :class:`~ortholora_kernels.solve.Solve` (:func:`forward`).
4. **Combine**: the backend's pass ``out_s = W_s X_s``.

:func:`forward` / :func:`backward` are the bodies of the differentiable op behind
:func:`ortholora_kernels.project` (any registered solve; backends may fuse the built-in
PCGrad solve there: triton's ``gram_solve``, native's ``fused_forward``, ``solve_vjp``);
:func:`run` is the same composition with Gram-stage hooks and a stateful solve (used by
:class:`ortholora_kernels.Aggregator`, hence ``aggregate``, and by
:class:`ortholora_kernels.OrthoLoRA` in every mode). This module is the only caller of a
backend's ``gram``/``cross``/``combine`` and its fusions (``tests/test_layering.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from . import backends, solvers
from ._args import Segments, segments_for
from .solve import Solution, get_solve, solve as pcgrad_solve, weighting_solution, weights as reduce_weights

__all__ = ["GramStage", "forward", "backward", "run", "gram", "combine", "sum_over_ranks", "presence", "check_present", "ema",
           "solve_method", "method_weights", "fixed_weights"]


# ---- stages 1 and 3: the backend's passes over memory ---------------------------------------

def _tables(offsets, n: int):
    """``(seg, keep)``: the backend's segment table over the non-empty segments of
    ``offsets`` and their indices (``keep`` None when none is empty; ``seg`` None when all are)."""
    if isinstance(offsets, Segments):
        return offsets, None
    offs = tuple(int(v) for v in offsets)
    if all(b > a for a, b in zip(offs, offs[1:])):
        return segments_for(offs, n), None
    keep = [k for k in range(len(offs) - 1) if offs[k + 1] > offs[k]]
    return (segments_for(sorted(set(offs)), n) if keep else None), keep


def gram(x: torch.Tensor, offsets, backend: str) -> torch.Tensor:
    """Stage 1: ``[S, T, T]`` float64 Gram matrices of ``x [T, N]`` per segment of ``offsets``
    (a :class:`Segments` or column offsets, where an empty segment gets a zero Gram)."""
    impl = backends.get(backend)
    seg, keep = _tables(offsets, x.shape[1])
    if keep is None:
        return impl.gram(x, seg)
    t = x.shape[0]
    g = torch.zeros(len(tuple(offsets)) - 1, t, t, dtype=torch.float64, device=x.device)
    if keep:
        g[keep] = impl.gram(x, seg)
    return g


def combine(x: torch.Tensor, offsets, w: torch.Tensor, backend: str) -> torch.Tensor:
    """Stage 3: ``[R, N]`` = ``W_s X_s`` per segment for ``w [S, R, T]`` (dtype of ``x``)."""
    impl = backends.get(backend)
    seg, keep = _tables(offsets, x.shape[1])
    if keep is None:
        return impl.combine(seg, x, w)
    out = torch.zeros(w.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    if keep:
        out.copy_(impl.combine(seg, x, w[keep]))
    return out


# ---- stage 2: the Gram stage --------------------------------------------------------------------

@dataclass
class GramStage:
    """What the Gram stage hands to the solve (all ``[S, ...]`` device tensors).

    Attributes:
        gram: ``[S, T, T]`` float64, this step's Gram (summed over ranks where sharded).
        decide: the Gram the method decides on (``gram``, or the bias-corrected EMA).
        present: ``[S, T]`` bool, the tasks that took part in the step (None: all).
        smoothed: the EMA of the Gram after this step (the new state), or None.
        smoothed_norm: ``[S, T, T]`` float64, ``1 - beta^k`` of ``smoothed`` (its bias correction), or None.
        detected: ``[S, T, T]`` bool, the pairs the smoothed Gram flags as conflicting, or None.
    """

    gram: torch.Tensor
    decide: torch.Tensor
    present: torch.Tensor | None = None
    smoothed: torch.Tensor | None = None
    smoothed_norm: torch.Tensor | None = None
    detected: torch.Tensor | None = None


Hook = Callable[[GramStage], GramStage]


def sum_over_ranks(all_reduce: Callable[[torch.Tensor], None]) -> Hook:
    """Gram-stage hook: the partial Grams of column shards summed in place by ``all_reduce``
    (a column-sharded buffer's Gram is the sum of its shards')."""
    def hook(st: GramStage) -> GramStage:
        g = st.gram.contiguous()
        all_reduce(g)
        return replace(st, gram=g, decide=g if st.decide is st.gram else st.decide)
    return hook


def presence(present: torch.Tensor | None) -> Hook:
    """Gram-stage hook: ``present`` (bool ``[T]`` or ``[S, T]``) marks the tasks with an example
    in the step; the solve leaves the others out (weight 0)."""
    def hook(st: GramStage) -> GramStage:
        if present is None:
            return st
        s, t, _ = st.gram.shape
        return replace(st, present=check_present(present, s, t, st.gram.device))
    return hook


def check_present(present, s: int, t: int, device) -> torch.Tensor:
    """``present`` (a bool tensor ``[T]`` or ``[S, T]``, or a sequence of bools ``[T]``) as a bool
    ``[S, T]`` tensor on ``device``; a TypeError/ValueError naming ``present`` otherwise."""
    if not isinstance(present, torch.Tensor):
        if not isinstance(present, (list, tuple)) or not all(isinstance(v, bool) for v in present):
            raise TypeError(f"present: expected a bool tensor [T] or [S, T] (or a list of bools), "
                            f"got {type(present).__name__}")
        present = torch.tensor(present, dtype=torch.bool)
    if present.dtype != torch.bool:
        raise TypeError(f"present: expected a bool tensor, got {present.dtype} (e.g. counts > 0)")
    if tuple(present.shape) not in ((t,), (s, t)):
        raise ValueError(f"present: expected a bool tensor of shape [T] = [{t}] or [S, T] = [{s}, {t}], "
                         f"got {tuple(present.shape)}")
    return present.to(device).expand(s, t)


def ema(beta: float, previous: torch.Tensor | None, norm: torch.Tensor | None = None) -> Hook:
    """Gram-stage hook: ``E <- beta E + (1 - beta) G`` from ``previous`` (None: zeros); the method
    decides on ``E / (1 - beta^k)`` (Adam's bias correction, k the steps in each entry of ``E``)
    and ``detected = decide < 0``.

    ``norm``: ``[S, T, T]`` float64, ``1 - beta^k`` of each entry of ``previous`` (None: 0, no
    step yet). The new ``E`` and ``1 - beta^k`` are ``GramStage.smoothed`` /
    ``GramStage.smoothed_norm`` (the caller keeps them). Entries that get no evidence in the
    step keep their ``E`` and ``k``, on the device: a pair with a task absent from the step
    (``GramStage.present``, so :func:`presence` runs first), and every entry of a segment whose
    Gram holds NaN/Inf (which still decides on it: the NaN reaches the output, but one bad step,
    an AMP overflow that GradScaler skips, does not turn every later step's weights into NaN).
    """
    if norm is not None and not isinstance(norm, torch.Tensor):
        raise TypeError(f"norm: expected None or the [S, T, T] tensor 1 - beta^k of previous "
                        f"(GramStage.smoothed_norm), got {type(norm).__name__}")

    def hook(st: GramStage) -> GramStage:
        s = st.gram.shape[0]
        prev = previous if previous is not None else torch.zeros_like(st.gram)
        prev_norm = norm if norm is not None else torch.zeros_like(st.gram)
        cand = beta * prev + (1 - beta) * st.gram
        cand_norm = beta * prev_norm + (1 - beta)
        finite = torch.isfinite(st.gram).flatten(1).all(1).view(s, 1, 1)
        keep = finite
        if st.present is not None:
            keep = keep & st.present.unsqueeze(-1) & st.present.unsqueeze(-2)
        smoothed = torch.where(keep, cand, prev)
        new_norm = torch.where(keep, cand_norm, prev_norm)
        # a NaN segment decides on its NaN; an absent pair on its kept EMA (the current Gram
        # where it was never observed; the solve leaves it out anyway)
        kept = torch.where(new_norm > 0, smoothed / new_norm.clamp_min(1e-300), st.gram)
        decide = torch.where(keep | ~finite, cand / cand_norm, kept)
        return replace(st, smoothed=smoothed, smoothed_norm=new_norm, decide=decide, detected=decide < 0)
    return hook


# ---- stage 2: the solve ---------------------------------------------------------------------------

def method_weights(method: str, gram: torch.Tensor, present: torch.Tensor | None, options: dict) -> torch.Tensor:
    """``[S, T]`` weights of a weighting ``method``; with ``present`` (bool ``[S, T]``), 0 for the
    absent tasks and, for the others, the method on the present rows alone
    (``solvers.weights(method, gram, present=...)``: on the device, no host read)."""
    return solvers.weights(method, gram, present=present, **options)


def _gradvac_step(st: GramStage, order, phi_hat, options):
    # An absent task's row is zero and gives no evidence: its pairs keep their targets.
    return solvers.module("gradvac").step(st.gram, order, phi_hat, present=st.present,
                                          beta=float(options["beta"]), eps=float(options["eps"]))


def solve_method(method: str, options: dict, st: GramStage, order: torch.Tensor | None, reduction: str,
                 phi_hat: torch.Tensor | None = None) -> tuple[Solution, torch.Tensor | None]:
    """The solve of ``method`` (any of :data:`ortholora_kernels.solvers.METHODS`) on the Gram
    stage ``st``: ``(Solution, GradVac's new targets or None)``. A pure function of its arguments.

    pcgrad projects on the current Gram, only where ``st.detected`` allows (EMA); an absent
    task's Gram row and column are taken as zero, which pcgrad skips exactly. The weighting methods decide on
    ``st.decide`` and leave absent tasks out (:func:`method_weights`).
    """
    if method == "pcgrad":
        g = st.gram
        if st.present is not None:
            # An absent task's Gram row and column as zeros: pcgrad then skips it exactly as a
            # zero gradient (its row need not be zero: aggregate(present=) takes any rows).
            pair = st.present.unsqueeze(-1) & st.present.unsqueeze(-2)
            g = torch.where(pair, g, torch.zeros_like(g))
        coeffs, nproj = pcgrad_solve(g, order, allowed=st.detected)
        if st.present is not None:   # weight 0 for absent tasks
            p = st.present.to(coeffs.dtype)
            coeffs = coeffs * p.unsqueeze(-1) * p.unsqueeze(-2)
        return Solution(reduce_weights(coeffs, reduction), coeffs, nproj), None
    if method == "gradvac":
        if phi_hat is None:
            phi_hat = torch.zeros_like(st.gram)
        w, phi_hat = _gradvac_step(st, order, phi_hat, options)
        if st.present is not None:
            w = torch.where(st.present, w, torch.zeros_like(w))
        return weighting_solution(w, reduction), phi_hat
    return weighting_solution(method_weights(method, st.decide, st.present, options), reduction), None


# ---- the composition ----------------------------------------------------------------------------

def _compose(backend: str, x: torch.Tensor, offsets, order, reduction: str, solve_fn, fusable: bool,
             hooks: Sequence[Hook] = ()):
    """``(out [R, N] or [N], gram, Solution, GramStage or None)``: stages 1-4. The backend's
    fusions of the built-in PCGrad solve replace stages 1-4 (``fused_forward``) or 1-3
    (``gram_solve``) when nothing stands between the Gram and the solve (no hook)."""
    impl = backends.get(backend)
    if fusable and not hooks:
        fused = impl.fused_forward(x, offsets, order, reduction)
        if fused is not None:
            out, g, coeffs, nproj = fused
            return out, g, Solution(None, coeffs, nproj), None
        staged = impl.gram_solve(x, offsets, order, reduction)
        if staged is not None:
            g, coeffs, w, nproj = staged
            return impl.combine(offsets, x, w), g, Solution(w, coeffs, nproj), None
    g = gram(x, offsets, backend)
    st = GramStage(g, g)
    for hook in hooks:
        st = hook(st)
    sol = solve_fn(st)
    return combine(x, offsets, sol.weights, backend), st.gram, sol, st


def forward(x: torch.Tensor, seg: Segments, order: torch.Tensor, reduction: str, backend: str,
            solve: str = "pcgrad"):
    """The differentiable op's forward: ``(out, G, C, nproj)`` for the registered ``solve``.

    ``x`` must be contiguous. Backends may fuse the built-in PCGrad solve (``fused_forward``:
    the whole forward in one call; ``gram_solve``: Gram and solve in one launch).
    """
    sol = get_solve(solve)
    out, g, res, _ = _compose(backend, x, seg, order, reduction, lambda st: sol.forward(st.gram, order, reduction),
                              sol.fusable)
    if reduction != "none" and out.dim() == 2:
        out = out.view(-1)
    return out, g, res.coeffs, res.num_projections


def backward(x: torch.Tensor, dout: torch.Tensor, gram: torch.Tensor, order: torch.Tensor, seg: Segments,
             reduction: str, backend: str, solve: str = "pcgrad") -> torch.Tensor:
    """The op's backward: ``dX = W^T dY + (Gbar + Gbar^T) X``.

    ``v = dY X^T`` (the backend's cross product) is ``dL/dW``; the solve's reverse mode
    turns it into ``Gbar = dL/dG`` (fused with the solve's replay by ``solve_vjp`` where the
    backend has it); one combine pass with two operands gives ``dX``.
    """
    impl = backends.get(backend)
    sol = get_solve(solve)
    dy = dout if reduction == "none" else dout.reshape(1, -1)
    g64 = gram.to(torch.float64)
    v = impl.cross(dy, x, seg)                                       # dL/dW, [S, R, T]
    fused = impl.solve_vjp(g64, order, reduction, v, seg) if sol.fusable else None
    if fused is None:
        w = sol.forward(g64, order, reduction).weights              # [S, R, T]
        gbar = sol.vjp(g64, order, reduction, v)
        m = gbar + gbar.transpose(-1, -2)
    else:  # the backend runs the solve and its reverse mode in one launch
        m, w = fused
    # out[t] = sum_k M[s, t, k] X[k] + sum_r W[s, r, t] dY[r]: W^T as a strided view.
    return impl.combine(seg, x, m, dy, w.transpose(-1, -2), out_dtype=x.dtype)


def run(x: torch.Tensor, offsets, *, method: str, options: dict, reduction: str, backend: str,
        order: torch.Tensor | None = None, hooks: Sequence[Hook] = (), phi_hat: torch.Tensor | None = None):
    """One step of ``method`` on ``x [T, N]`` (not differentiable): ``(out [R, N], GramStage,
    Solution, new GradVac targets or None)``.

    ``offsets``: a :class:`Segments` or column offsets (empty segments allowed: a rank's
    shard); ``hooks``: the Gram stage (:func:`sum_over_ranks`, :func:`presence`, :func:`ema`);
    ``order``: pcgrad's and gradvac's visiting orders ``[S, T, T]``.
    """
    state: dict = {}

    def solve_fn(st):
        sol, state["phi_hat"] = solve_method(method, options, st, order, reduction, phi_hat)
        return sol

    out, _, sol, st = _compose(backend, x, offsets, order, reduction, solve_fn, False, hooks)
    return out, st, sol, state.get("phi_hat")


def fixed_weights(x: torch.Tensor, offsets, w: torch.Tensor, reduction: str, backend: str) -> torch.Tensor:
    """Stage 3 alone, for weights that need no Gram (``sum``/``mean``, a step the schedule
    skips): ``w [S, T]`` -> ``[R, N]``."""
    return combine(x, offsets, reduce_weights(torch.diag_embed(w), reduction), backend)
