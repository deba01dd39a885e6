"""Stage 2: the solve, a map from the small Gram matrices to combine weights.

:class:`Solve` is the interface (forward and reverse mode); :class:`PCGradSolve` is the
built-in one (Ortho-LoRA's sequential projection); :func:`register_solve` and
:func:`get_solve` name them for the custom op. Gram and combine, the memory-bound
passes, belong to the backends (:mod:`ortholora_kernels.backends.base`).

PCGrad works on all segments and all tasks at once: task i's projected gradient is tracked as
a row of coefficients ``C[s, i, :]`` over the original gradients, and step k of the
loop visits ``j = order[s, i, k]`` for every (s, i) in parallel. No host sync: the
``if inner < 0`` of the literal algorithm becomes ``min(inner, 0)`` and a mask.
Differentiable with autograd (used by every backend's backward).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch


def _visit(order: torch.Tensor, k: int, t: int):
    """``(j, in_range)`` of step ``k``: out-of-range entries point at task 0 and are skipped.

    Orders on a device are never validated (that would be a host sync); every backend
    skips an entry outside ``[0, T)`` and never reads memory through it.
    """
    j = order[:, :, k]
    in_range = (j >= 0) & (j < t)
    return torch.where(in_range, j, torch.zeros_like(j)), in_range


def _step(gram, diag, coeffs, j, in_range, tasks):
    """One visit of every (s, i) to ``j = order[:, :, k]``: the quantities of the step."""
    s, t, _ = gram.shape
    g_j = gram.gather(1, j.unsqueeze(-1).expand(s, t, t))        # rows G[s, j, :]
    inner = (coeffs * g_j).sum(dim=-1)                           # g_i' . g_j
    norm2 = diag.gather(1, j)                                    # ||g_j||^2
    valid = in_range & (j != tasks) & (norm2 > 0)                # skip self, never divide by 0
    safe = torch.where(valid, norm2, torch.ones_like(norm2))
    coef = torch.where(valid, torch.clamp(inner, max=0) / safe, torch.zeros_like(inner))
    return g_j, inner, safe, valid, coef


def solve(gram: torch.Tensor, order: torch.Tensor, *, history: list | None = None,
          allowed: torch.Tensor | None = None):
    """Return ``(C [S, T, T], num_projections [S] int32)`` for Gram ``[S, T, T]``.

    ``history``, when a list, receives the coefficient matrix before every step (for
    :func:`solve_vjp`). ``allowed``, a bool ``[S, T, T]``, restricts the projections to the
    pairs ``(i, j)`` where it is True (conflict detection on smoothed Gram entries).
    """
    s, t, _ = gram.shape
    coeffs = torch.eye(t, dtype=gram.dtype, device=gram.device).expand(s, t, t)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    tasks = torch.arange(t, device=gram.device)
    nproj = torch.zeros(s, dtype=torch.int32, device=gram.device)
    for k in range(t):
        j, in_range = _visit(order, k, t)                        # [S, T]: task i visits j
        if history is not None:
            history.append(coeffs)
        _, inner, _, valid, coef = _step(gram, diag, coeffs, j, in_range, tasks)
        if allowed is not None:
            valid = valid & allowed.gather(-1, j.unsqueeze(-1)).squeeze(-1)
            coef = torch.where(valid, coef, torch.zeros_like(coef))
        coeffs = coeffs.scatter_add(-1, j.unsqueeze(-1), -coef.unsqueeze(-1))
        nproj = nproj + (valid & (inner < 0)).sum(dim=-1, dtype=torch.int32)
    return coeffs, nproj


def solve_vjp(gram: torch.Tensor, order: torch.Tensor, coeffs_grad: torch.Tensor) -> torch.Tensor:
    """Reverse mode of :func:`solve`: ``dL/dG`` given ``dL/dC`` (both ``[S, T, T]``).

    Written by hand (not autograd) so it runs inside the custom op's backward, where the
    dispatcher has autograd switched off, and under torch.compile.
    """
    s, t, _ = gram.shape
    history: list = []
    solve(gram, order, history=history)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    tasks = torch.arange(t, device=gram.device)
    cbar = coeffs_grad.to(gram.dtype)
    gbar = torch.zeros_like(gram)
    for k in reversed(range(t)):
        j, in_range = _visit(order, k, t)
        coeffs = history[k]
        g_j, inner, safe, valid, _ = _step(gram, diag, coeffs, j, in_range, tasks)
        active = valid & (inner < 0)                             # where coef = inner / norm2
        coef_bar = -cbar.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        inner_bar = torch.where(active, coef_bar / safe, torch.zeros_like(coef_bar))
        norm2_bar = torch.where(active, -coef_bar * inner / (safe * safe), torch.zeros_like(coef_bar))
        cbar = cbar + inner_bar.unsqueeze(-1) * g_j
        rows = j.unsqueeze(-1).expand(s, t, t)
        gbar = gbar.scatter_add(1, rows, inner_bar.unsqueeze(-1) * coeffs)
        # d norm2 / d G[s, j, j]: flat index j * T + j in the [S, T*T] view.
        gbar = gbar.reshape(s, t * t).scatter_add(1, j * (t + 1), norm2_bar).reshape(s, t, t)
    return gbar


def weights(coeffs: torch.Tensor, reduction: str) -> torch.Tensor:
    """Combine weights ``W [S, R, T]``: ``out_s = W_s X_s`` (R = 1 for sum/mean, T for none)."""
    if reduction == "none":
        return coeffs
    w = coeffs.sum(dim=1, keepdim=True)
    return w / coeffs.shape[-1] if reduction == "mean" else w


def weights_vjp(weights_grad: torch.Tensor, t: int, reduction: str) -> torch.Tensor:
    """``dL/dC [S, T, T]`` from ``dL/dW [S, R, T]`` (the adjoint of :func:`weights`)."""
    if reduction == "none":
        return weights_grad
    cbar = weights_grad.expand(-1, t, -1)
    return cbar / t if reduction == "mean" else cbar


class Solution(NamedTuple):
    """What a solve returns for Gram matrices ``[S, T, T]``.

    Attributes:
        weights: ``[S, R, T]`` float64 combine weights, ``out_s = W_s X_s`` (R = 1 for the
            reductions "sum"/"mean", R = T for "none").
        coeffs: ``[S, T, T]`` float64 per-task coefficients (``g_i' = sum_k C[s, i, k] g_k``).
            A solve that only weights the tasks (UPGrad, MGDA, ...) returns ``diag(w)``
            (see :func:`weighting_solution`), so "none" gives ``w_i g_i`` per task.
        num_projections: ``[S]`` int32, a per-segment count (projections for PCGrad;
            zeros where a solve has nothing to count).
    """

    weights: torch.Tensor
    coeffs: torch.Tensor
    num_projections: torch.Tensor


class Solve(ABC):
    """Stage 2: float64 Gram ``[S, T, T]`` (+ orders) -> :class:`Solution`, and its reverse mode.

    Both methods run on the device of the Gram matrix, batched over segments, with no
    host synchronisation. Options of a solve (a CAGrad ``c``, an iteration count) are
    attributes of the instance; register each configured instance under its own name.
    """

    name: ClassVar[str]
    #: Backends may fuse this solve into their kernels (``Backend.gram_solve`` /
    #: ``fused_forward`` / ``solve_vjp``); only the built-in PCGrad is fused.
    fusable: ClassVar[bool] = False

    @abstractmethod
    def forward(self, gram: torch.Tensor, order: torch.Tensor, reduction: str) -> Solution:
        """The solution for ``gram`` float64 ``[S, T, T]`` and ``order`` int64 ``[S, T, T]``."""

    @abstractmethod
    def vjp(self, gram: torch.Tensor, order: torch.Tensor, reduction: str,
            weights_grad: torch.Tensor) -> torch.Tensor:
        """``dL/dG [S, T, T]`` given ``dL/dW [S, R, T]`` (the reverse mode of ``forward().weights``).

        Runs inside the custom op's backward, where autograd is off: write it by hand,
        or wrap a differentiable ``forward`` in ``torch.enable_grad()`` + ``torch.autograd.grad``.
        """


class PCGradSolve(Solve):
    """Ortho-LoRA / PCGrad: the sequential projection in random orders (the default)."""

    name = "pcgrad"
    fusable = True

    def forward(self, gram, order, reduction):
        coeffs, nproj = solve(gram, order)
        return Solution(weights(coeffs, reduction), coeffs, nproj)

    def vjp(self, gram, order, reduction, weights_grad):
        return solve_vjp(gram, order, weights_vjp(weights_grad, gram.shape[-1], reduction))


def weighting_solution(w: torch.Tensor, reduction: str, num_projections: torch.Tensor | None = None) -> Solution:
    """The :class:`Solution` of a solve that only weights tasks, from ``w [S, T]`` float64.

    ``C = diag(w_s)``: "sum" combines with ``w``, "mean" with ``w / T``, "none" returns
    ``w_i g_i`` per task. ``num_projections`` defaults to zeros.
    """
    coeffs = torch.diag_embed(w)
    if num_projections is None:
        num_projections = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return Solution(weights(coeffs, reduction), coeffs, num_projections)


_SOLVES: dict[str, Solve] = {}


def register_solve(solve_: Solve, name: str | None = None) -> Solve:
    """Make ``solve_`` usable by the op under ``name`` (default ``solve_.name``); returns it."""
    if not isinstance(solve_, Solve):
        raise TypeError(f"solve: expected a Solve instance, got {type(solve_).__name__}")
    _SOLVES[name or solve_.name] = solve_
    return solve_


def get_solve(name: str) -> Solve:
    """The solve registered as ``name``."""
    try:
        return _SOLVES[name]
    except KeyError:
        raise ValueError(f"solve: expected one of {sorted(_SOLVES)}, got {name!r}") from None


register_solve(PCGradSolve())
