"""``aggregate``: the Gramian family of multi-task aggregators on the projection engine.

Stage 1 (Gram per segment, float64) and stage 3 (combine ``W_s X_s``) are the backends'
memory-bound passes, exactly as for ``project``; stage 2 is the method's solve
(:mod:`ortholora_kernels.solvers`), tiny, batched over segments, on the device, with no
host sync. ``method="pcgrad"`` without smoothing is :func:`ortholora_kernels.project`.

:class:`Aggregator` adds state across steps: EMA-smoothed Gram entries (``ema=beta``) for
conflict detection, a schedule (aggregate every ``every`` steps, from step ``start`` on;
plain sum in between) and GradVac's cosine targets (:class:`GradVac`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends, solvers
from ._args import check_grads, check_order, check_reduction, draw_orders, segments_for
from .ops import _project_op, project
from .result import ProjectionResult
from .solve import Solve, register_solve, solve, weighting_solution, weights as reduce_weights


@dataclass
class AggregationResult(ProjectionResult):
    """:class:`ProjectionResult` of ``aggregate`` / :class:`Aggregator` (same lazy statistics).

    For weighting methods ``coeffs`` is ``diag(w)`` (task i contributes ``w_i g_i``), so the
    reductions mean the same as for pcgrad; ``num_projections`` counts projections
    (pcgrad), modified pairs (gradvac) and is 0 for the other methods; ``order`` is None
    when the method draws none.

    Extra attributes:
        method: the method that ran ("sum" on a step the schedule skips).
        weights: ``[S, T]`` float64 combine weights (``coeffs`` summed over tasks).
        detected: ``[S, T, T]`` bool, the pairs flagged as conflicting by the smoothed Gram
            (``ema`` set), else None.
        smoothed_gram: ``[S, T, T]`` the EMA of the Gram after this step (``ema`` set), else None.
    """

    method: str = "pcgrad"
    weights: torch.Tensor | None = None
    detected: torch.Tensor | None = None
    smoothed_gram: torch.Tensor | None = None


# ---- the backends' two memory passes (Gram, combine) --------------------------------------

def _gram(name: str, x: torch.Tensor, seg) -> torch.Tensor:
    """``[S, T, T]`` float64 Gram matrices: the backend's stage 1."""
    return backends.get(name).gram(x, seg)


def _combine(name: str, w: torch.Tensor, x: torch.Tensor, seg) -> torch.Tensor:
    """``[R, N]`` = per segment ``W_s X_s`` for ``w [S, R, T]``: the backend's stage 3."""
    return backends.get(name).combine(seg, x, w)


class WeightingSolve(Solve):
    """A weighting method of :mod:`ortholora_kernels.solvers` as a :class:`~ortholora_kernels.solve.Solve`.

    Options are attributes of the instance (the contract); :func:`weighting_solve` registers
    one instance per (method, options). Not differentiable (as in TorchJD): ``vjp`` raises.
    """

    def __init__(self, method: str, options: dict):
        self.name = method
        self.method, self.options = method, dict(options)

    def forward(self, gram, order, reduction):
        return weighting_solution(solvers.weights(self.method, gram, **self.options), reduction)

    def vjp(self, gram, order, reduction, weights_grad):
        raise NotImplementedError(f"method={self.method!r} is not differentiable (only pcgrad is)")


_REGISTERED: dict = {}


def _option_key(value):
    # Tensors (pref_vector) by identity: the registered instance keeps them alive.
    return ("tensor", id(value)) if isinstance(value, torch.Tensor) else value


def weighting_solve(method: str, options: dict) -> str:
    """The registered solve name of ``method`` with ``options`` (registered on first use)."""
    key = (method, tuple(sorted((k, _option_key(v)) for k, v in options.items())))
    name = _REGISTERED.get(key)
    if name is None:
        name = _REGISTERED[key] = f"{method}#{len(_REGISTERED)}"
        register_solve(WeightingSolve(method, options), name)
    return name


def _unused_order(s: int, t: int, device) -> torch.Tensor:
    # The op's order argument; weighting solves ignore it (no draw, no allocation per call).
    return torch.zeros((), dtype=torch.int64, device=device).expand(s, t, t)


# ---- the public function --------------------------------------------------------------------

def _prepare(grads, segments, reduction, backend, check_finite, method, differentiable=False):
    x = check_grads(grads)
    reduction = check_reduction(reduction)
    t, n = x.shape
    seg = segments_for(segments, n)
    name = backends.select(backend, x.device, t)
    if not differentiable and x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"grads: method={method!r} is not differentiable (only pcgrad is); pass grads.detach() "
            "or call it under torch.no_grad()")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise FloatingPointError("grads: contains NaN or Inf (check_finite=True)")
    return x.contiguous(), reduction, seg, name


def _finish(name, x, seg, gram, coeffs, nproj, order, reduction, method, return_stats, **extra):
    w_red = reduce_weights(coeffs, reduction)                    # [S, R, T]
    out = _combine(name, w_red, x, seg)
    if reduction != "none":
        out = out[0]
    if not return_stats:
        return out
    return AggregationResult(out, gram, coeffs, nproj, order, seg.offsets, reduction, method=method,
                             weights=coeffs.sum(-2), **extra)


def aggregate(grads, segments=None, *, method="pcgrad", reduction="sum", order=None, generator=None,
              backend=None, return_stats=False, check_finite=False, **options):
    """Aggregate per-task gradients with a Gram-based multi-task method, per segment.

    Every method computes combine weights from the float64 Gram ``G_s = X_s X_s^T`` of
    each segment (e.g. LoRA A and B apart) and returns ``sum_i w_i g_i`` per segment; the
    Gram and combine passes are the backends' (``backend``, as for :func:`project`), the
    solve runs on the device, batched over segments, with no host sync.

    Args:
        grads: ``[T, N]`` float tensor, one task's flattened gradient per row.
        segments: None or column offsets ``[0, ..., N]`` (as :func:`project`).
        method: "pcgrad" (:func:`project`, the default), "upgrad", "dualproj", "mgda",
            "cagrad", "imtlg", "alignedmtl", "config", "nashmtl", "fairgrad", "sum", "mean".
            ("gradvac" needs state across steps: use :class:`GradVac`.)
        reduction: "sum" (``w X``, TorchJD's aggregate), "mean" (``w X / T``) or "none"
            (``[T, N]`` rows ``w_i g_i``; pcgrad: the projected gradients).
        order, generator: pcgrad's visiting orders (see :func:`project`); ignored otherwise.
        backend: "torch", "triton", "native", "auto" or None (as :func:`project`).
        return_stats: return an :class:`AggregationResult`.
        check_finite: raise ``FloatingPointError`` on NaN/Inf (one host sync); by default
            they propagate to the output, never dropped.
        **options: the method's options (TorchJD's names and defaults), e.g. ``c`` for
            cagrad, ``alpha`` for fairgrad, ``pref_vector``, ``scale_mode``, ``max_norm``,
            ``norm_eps``/``reg_eps`` and ``iters`` (solver iterations). An unknown option
            raises a TypeError naming it.

    Returns:
        ``[N]`` (sum/mean) or ``[T, N]`` (none) in the dtype of ``grads``, or an
        :class:`AggregationResult`. Differentiable only for pcgrad; other methods raise if
        ``grads`` requires grad under grad mode (they are non-differentiable in TorchJD too).
    """
    method = solvers.check_method(method)
    if method == "gradvac":
        raise ValueError("method='gradvac' keeps cosine targets across steps: use "
                         "ortholora_kernels.GradVac(beta=..., eps=...) (a stateful aggregator)")
    solvers.check_options(method, options)
    if method == "pcgrad":
        return project(grads, segments, order=order, generator=generator, reduction=reduction,
                       backend=backend, return_stats=return_stats, check_finite=check_finite)
    x, reduction, seg, name = _prepare(grads, segments, reduction, backend, check_finite, method)
    if method in ("sum", "mean") and not return_stats:
        # Fixed weights: no Gram pass (one pass over grads, like a plain sum).
        t = x.shape[0]
        w = torch.full((seg.num_segments, 1, t), 1.0 if method == "sum" else 1.0 / t,
                       dtype=torch.float64, device=x.device)
        w = reduce_weights(torch.diag_embed(w[:, 0]), reduction)
        out = _combine(name, w, x, seg)
        return out if reduction == "none" else out[0]
    # The op of `project` with this method's solve: the same custom op, dispatch and
    # backend passes; the solve runs between the backend's Gram and combine passes.
    out, gram, coeffs, nproj = _project_op(x, list(seg.offsets), _unused_order(seg.num_segments, x.shape[0], x.device),
                                           reduction, name, weighting_solve(method, options))
    if not return_stats:
        return out
    return AggregationResult(out, gram, coeffs, nproj, None, seg.offsets, reduction, method=method,
                             weights=coeffs.sum(-2))


class Aggregator:
    """A stateful ``aggregate``: EMA-smoothed conflict detection, a schedule, GradVac's state.

    Args:
        method: any of :data:`ortholora_kernels.solvers.METHODS` (gradvac included).
        ema: None, or ``beta`` in [0, 1): keep ``E <- beta E + (1 - beta) G`` per segment
            (bias-corrected like Adam's moments, so step 1 uses G itself). pcgrad then
            projects ``g_i`` on ``g_j`` only where the SMOOTHED entry ``E[i, j] < 0`` (and the
            current ``g_i' . g_j < 0``, as always): conflicts that persist across steps are
            projected, sign flips of the sampling noise are not. Other methods compute their
            weights from the smoothed Gram (combined with the current gradients).
        every, start: aggregate on steps ``start, start + every, ...`` (steps count from 0,
            one per call); on other steps the plain sum (or mean, or the rows unchanged, by
            ``reduction``) is returned. The EMA is updated on every step.
        reduction, backend, generator: as :func:`aggregate`.
        **options: the method's options (gradvac: ``beta`` = 0.5, ``eps`` = 1e-8).

    Call it like ``aggregate`` (``agg(grads, segments)``); the state follows one segment
    layout and number of tasks, and is reset when they change. ``reset()`` clears it.
    """

    def __init__(self, method="pcgrad", *, ema=None, every=1, start=0, reduction="sum", backend=None,
                 generator=None, **options):
        self.method = solvers.check_method(method)
        self.options = dict(solvers.check_options(self.method, options))
        if self.method == "gradvac":
            self.options.setdefault("beta", 0.5)
            self.options.setdefault("eps", 1e-8)
            beta = self.options["beta"]
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
                raise ValueError(f"gradvac: option beta must be in [0, 1], got {beta!r}")
        if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1):
            raise ValueError(f"ema: expected None or a number in [0, 1), got {ema!r}")
        for arg, value, low in (("every", every, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
        self.ema, self.every, self.start = ema, every, start
        self.reduction = check_reduction(reduction)
        self.backend, self.generator = backend, generator
        self.reset()

    def reset(self) -> None:
        """Forget the smoothed Gram, GradVac's targets and the step count."""
        self.step = 0
        self._key = None
        self._ema_gram = None
        self._phi_hat = None

    def state_dict(self) -> dict:
        """Step count, smoothed Gram and GradVac targets (tensors; plain types otherwise)."""
        return {"step": self.step, "ema_gram": self._ema_gram, "phi_hat": self._phi_hat,
                "offsets": None if self._key is None else list(self._key[0]),
                "tasks": None if self._key is None else self._key[1]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the tensors stay on the device they were saved from)."""
        self.step = int(state["step"])
        self._ema_gram, self._phi_hat = state.get("ema_gram"), state.get("phi_hat")
        self._key = None
        if state.get("offsets") is not None:
            ref = self._ema_gram if self._ema_gram is not None else self._phi_hat
            device = ref.device if ref is not None else torch.device("cpu")
            self._key = (tuple(state["offsets"]), int(state["tasks"]), device)

    def active(self, step: int | None = None) -> bool:
        """Whether the schedule aggregates on ``step`` (default: the next call's step)."""
        step = self.step if step is None else step
        return step >= self.start and (step - self.start) % self.every == 0

    def __call__(self, grads, segments=None, *, order=None, return_stats=False, check_finite=False):
        """Aggregate ``grads [T, N]`` for this step (see :func:`aggregate`)."""
        x, reduction, seg, name = _prepare(grads, segments, self.reduction, self.backend, check_finite,
                                           self.method, differentiable=self.method == "pcgrad" and self.ema is None)
        t = x.shape[0]
        key = (seg.offsets, t, x.device)
        if key != self._key:
            self._key, self._ema_gram, self._phi_hat = key, None, None
        step, active = self.step, self.active()
        self.step += 1
        method = self.method if active else "sum"
        plain_pcgrad = method == "pcgrad" and self.ema is None
        if plain_pcgrad or (method == "sum" and self.ema is None):
            # No state to update: the fused op (pcgrad) or a plain sum.
            if method == "pcgrad":
                out = project(x, seg, order=order, generator=self.generator, reduction=reduction,
                              backend=self.backend, return_stats=return_stats)
                if not return_stats:
                    return out
                return AggregationResult(*(getattr(out, f) for f in ProjectionResult.__dataclass_fields__),
                                         method="pcgrad", weights=out.coeffs.sum(-2))
            gram = _gram(name, x, seg)
            w = solvers.weights("sum", gram)
            nproj = torch.zeros(seg.num_segments, dtype=torch.int32, device=x.device)
            return _finish(name, x, seg, gram, torch.diag_embed(w), nproj, None, reduction, "sum", return_stats)

        gram = _gram(name, x, seg)
        smoothed = detected = None
        decide = gram
        if self.ema is not None:
            beta = float(self.ema)
            prev = self._ema_gram if self._ema_gram is not None else torch.zeros_like(gram)
            self._ema_gram = beta * prev + (1 - beta) * gram
            smoothed = self._ema_gram
            decide = smoothed / (1 - beta ** (step + 1))          # bias correction
            detected = decide < 0
        s = seg.num_segments
        nproj = torch.zeros(s, dtype=torch.int32, device=x.device)
        if method in ("pcgrad", "gradvac"):
            if order is None:
                order = draw_orders(s, t, x.device, self.generator)
            else:
                order = check_order(order, t, s, x.device)
        else:
            order = None
        if method == "pcgrad":
            coeffs, nproj = solve(gram, order, allowed=detected)
        elif method == "gradvac":
            if self._phi_hat is None:
                self._phi_hat = torch.zeros_like(gram)
            w, self._phi_hat = solvers.module("gradvac").step(gram, order, self._phi_hat,
                                                              beta=float(self.options["beta"]),
                                                              eps=float(self.options["eps"]))
            coeffs = torch.diag_embed(w)
        else:
            opts = self.options if method == self.method else {}
            coeffs = torch.diag_embed(solvers.weights(method, decide, **opts))
        return _finish(name, x, seg, gram, coeffs, nproj, order, reduction, method, return_stats,
                       detected=detected, smoothed_gram=smoothed)


class GradVac(Aggregator):
    """GradVac (Wang et al. 2021) as a stateful aggregator: ``GradVac(beta=0.5, eps=1e-8)``.

    Keeps the EMA cosine targets per segment and task pair across calls (TorchJD 0.18's
    GradVac, batched over segments on the device). Other arguments as :class:`Aggregator`.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, **kwargs):
        super().__init__("gradvac", beta=beta, eps=eps, **kwargs)
