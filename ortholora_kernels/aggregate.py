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

from . import backends, pipeline, solvers
from ._args import check_grads, check_order, check_order_values, check_reduction, draw_orders, segments_for
from .ops import _project_op, project
from .result import ProjectionResult
from .solve import Solve, register_solve, weighting_solution


@dataclass(repr=False)
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
        why = ("is differentiable only as the plain projection (no ema/every/start, no present=)"
               if method == "pcgrad" else "is not differentiable (only pcgrad is)")
        raise RuntimeError(f"grads: method={method!r} {why}; pass grads.detach() or call it under torch.no_grad()")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise FloatingPointError("grads: contains NaN or Inf (check_finite=True)")
    return x.contiguous(), reduction, seg, name


def aggregate(grads, segments=None, *, method="pcgrad", reduction="sum", order=None, generator=None,
              backend=None, return_stats=False, check_finite=False, present=None, **options):
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
        present: None (every row takes part) or a bool ``[T]`` / ``[S, T]`` tensor (or a list
            of T bools): the
            tasks absent from the step (False) get weight 0 and the others exactly what the
            method gives on the present rows alone. A zero row is NOT absent by default: it
            is a task whose gradient is zero (``mean`` still divides by T, as TorchJD);
            pass ``present=grads.ne(0).any(1)`` to leave zero rows out. pcgrad needs
            no flag: a zero row changes nothing in it.
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
    if method == "pcgrad" and present is None:
        return project(grads, segments, order=order, generator=generator, reduction=reduction,
                       backend=backend, return_stats=return_stats, check_finite=check_finite)
    if present is not None or method in ("sum", "mean"):
        # No state, but the pipeline's Gram stage (presence) or fixed weights (no Gram pass).
        agg = Aggregator(method, reduction=reduction, backend=backend, generator=generator, **options)
        return agg(grads, segments, order=order, present=present, return_stats=return_stats,
                   check_finite=check_finite)
    x, reduction, seg, name = _prepare(grads, segments, reduction, backend, check_finite, method)
    # The op of `project` with this method's solve: the same custom op, dispatch and
    # composition (pipeline.forward); the solve runs between the backend's Gram and combine passes.
    out, gram, coeffs, nproj = _project_op(x, list(seg.offsets), _unused_order(seg.num_segments, x.shape[0], x.device),
                                           reduction, name, weighting_solve(method, options))
    if not return_stats:
        return out
    return AggregationResult(out, gram, coeffs, nproj, None, seg.offsets, reduction, method=method,
                             weights=coeffs.sum(-2))


class Aggregator:
    """A method, its options and its state: what ``OrthoLoRA(aggregator=...)`` takes.

    ``Aggregator("upgrad")``, ``Aggregator("pcgrad", ema=0.9)``, ``Aggregator("cagrad", c=0.5,
    every=2)``, :class:`GradVac` (``Aggregator("gradvac", beta=..., eps=...)``). Called like
    :func:`aggregate` (``agg(grads, segments)``), or given to :class:`~ortholora_kernels.OrthoLoRA`,
    whose every mode (one process, DDP, ``comm="sharded"``, FSDP2) runs its :meth:`step_`.
    Every call is one step of the composition in :mod:`ortholora_kernels.pipeline`.

    Args:
        method: any of :data:`ortholora_kernels.solvers.METHODS` (gradvac included).
        ema: None, or ``beta`` in [0, 1): keep ``E <- beta E + (1 - beta) G`` per segment
            (bias-corrected like Adam's moments, so step 1 uses G itself). pcgrad then
            projects ``g_i`` on ``g_j`` only where the SMOOTHED entry ``E[i, j] < 0`` (and the
            current ``g_i' . g_j < 0``, as always): conflicts that persist across steps are
            projected, sign flips of the sampling noise are not. Other methods compute their
            weights from the smoothed Gram (combined with the current gradients). A segment
            whose Gram holds NaN/Inf, and a pair with a task absent from the step, leave their
            smoothed entries (and their bias correction) as they were
            (:func:`ortholora_kernels.pipeline.ema`).
        every, start: aggregate on steps ``start, start + every, ...`` (steps count from 0,
            one per call); on other steps the plain sum (or mean, or the rows unchanged, by
            ``reduction``) is returned, without a Gram pass unless the EMA or the statistics
            need one. The EMA is updated on every step.
        reduction, backend, generator: as :func:`aggregate` (used by direct calls; OrthoLoRA
            passes its own).
        **options: the method's options (gradvac: ``beta`` = 0.5, ``eps`` = 1e-8).

    The state follows one segment layout and number of tasks, and is reset when they change.
    ``reset()`` clears it; ``state_dict()``/``load_state_dict()`` save and restore it.
    (There is no class per method, as in TorchJD, because ``ortholora_kernels.PCGrad`` is
    already Pytorch-PCGrad's optimizer wrapper; the method is the first argument.)
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

    @property
    def plain(self) -> bool:
        """True for the paper's stateless projection (pcgrad, no EMA, every step): the fused,
        differentiable op of :func:`~ortholora_kernels.project`."""
        return (self.method, self.ema, self.every, self.start) == ("pcgrad", None, 1, 0)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("ema", self.ema), ("every", self.every), ("start", self.start))
                        if v != {"ema": None, "every": 1, "start": 0}[k])
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Aggregator({self.method!r}{opts}{extra})"

    def reset(self) -> None:
        """Forget the smoothed Gram, GradVac's targets and the step count."""
        self.step = 0
        self._key = None
        self._ema_gram = None
        self._ema_norm = None
        self._phi_hat = None

    def state_dict(self) -> dict:
        """Step count, smoothed Gram (and its bias correction ``1 - beta^k``) and GradVac targets
        (tensors; plain types otherwise)."""
        return {"step": self.step, "ema_gram": self._ema_gram, "ema_norm": self._ema_norm, "phi_hat": self._phi_hat,
                "offsets": None if self._key is None else list(self._key[0]),
                "tasks": None if self._key is None else self._key[1]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the tensors move to the device of the next step's
        gradients; a state saved before ``ema_norm`` existed gets ``1 - beta^step``)."""
        self.step = int(state["step"])
        self._ema_gram, self._phi_hat = state.get("ema_gram"), state.get("phi_hat")
        self._ema_norm = state.get("ema_norm")
        if self._ema_gram is not None and self._ema_norm is None:
            # the old format: the EMA ran from step 0 on every step
            beta = float(self.ema) if self.ema is not None else 0.0
            self._ema_norm = torch.full_like(self._ema_gram, 1 - beta ** self.step, dtype=torch.float64)
        self._key = None
        if state.get("offsets") is not None:
            self._key = (tuple(state["offsets"]), int(state["tasks"]))

    def active(self, step: int | None = None) -> bool:
        """Whether the schedule aggregates on ``step`` (default: the next call's step)."""
        step = self.step if step is None else step
        return step >= self.start and (step - self.start) % self.every == 0

    def _orders(self, order, s, t, device, generator):
        if order is None:
            return draw_orders(s, t, device, generator)
        order = check_order(order, t, s, device)
        if order.device.type == "cpu" and not torch.compiler.is_compiling():
            check_order_values(order)   # as project(): a CPU order must hold permutations
        return order

    def __call__(self, grads, segments=None, *, order=None, present=None, return_stats=False, check_finite=False):
        """Aggregate ``grads [T, N]`` for this step (see :func:`aggregate`; ``present`` as there)."""
        x, reduction, seg, name = _prepare(grads, segments, self.reduction, self.backend, check_finite,
                                           self.method, differentiable=self.plain and present is None)
        return self.step_(x, seg.offsets, reduction=reduction, backend=name, generator=self.generator, order=order,
                          present=present, return_stats=return_stats)

    def step_(self, x, offsets, *, reduction, backend, generator=None, order=None, present=None, hooks=(),
              result_offsets=None, return_stats=True):
        """One step on the checked, contiguous ``x [T, N]`` (advances the state).

        ``offsets``: the segment offsets of ``x`` (a rank's shard may have empty segments);
        ``backend``: a selected backend name; ``hooks``: Gram-stage hooks that run first
        (:func:`ortholora_kernels.pipeline.sum_over_ranks`); ``present``: as :func:`aggregate`;
        ``result_offsets``: the offsets the result reports and the state is keyed on
        (default ``offsets``). Returns the output ``[N]``/``[T, N]``, or the
        :class:`AggregationResult` with ``return_stats``.
        """
        offsets = tuple(offsets)
        key_offsets = tuple(result_offsets) if result_offsets is not None else offsets
        t, s = x.shape[0], len(offsets) - 1
        if present is not None:
            present = pipeline.check_present(present, s, t, x.device)
        key = (key_offsets, t)
        if key != self._key:
            self._key, self._ema_gram, self._ema_norm, self._phi_hat = key, None, None, None
        elif any(v is not None and v.device != x.device for v in (self._ema_gram, self._phi_hat)):
            # the same layout on another device (a checkpoint loaded with map_location="cpu"): keep the state
            self._ema_gram, self._ema_norm, self._phi_hat = (
                None if v is None else v.to(x.device) for v in (self._ema_gram, self._ema_norm, self._phi_hat))
        active = self.active()
        self.step += 1
        method = self.method if active else "sum"
        if method == "pcgrad" and self.ema is None and not hooks and present is None:
            # The plain projection: the op. (OrthoLoRA passes no presence for pcgrad: an absent
            # task's row is zero there, which changes nothing in it.)
            res = project(x, offsets, order=order, generator=generator, reduction=reduction, backend=backend,
                          return_stats=return_stats)
            if not return_stats:
                return res
            return AggregationResult(*(getattr(res, f) for f in ProjectionResult.__dataclass_fields__),
                                     method="pcgrad", weights=res.coeffs.sum(-2))
        hooks = list(hooks)
        if present is not None:
            hooks.append(pipeline.presence(present))
        if self.ema is not None:
            hooks.append(pipeline.ema(float(self.ema), self._ema_gram, self._ema_norm))
        ordered = method in ("pcgrad", "gradvac")
        if method in _FIXED and not return_stats and self.ema is None:
            # Fixed weights (sum, mean; a step the schedule skips): no Gram pass.
            w = _fixed(method, s, t, x.device, present)
            out = pipeline.fixed_weights(x, offsets, w, reduction, backend)
            return out if reduction == "none" else out[0]
        order = self._orders(order, s, t, x.device, generator) if ordered else None
        out, st, sol, phi_hat = pipeline.run(x, offsets, method=method, options=self.options if active else {},
                                             reduction=reduction, backend=backend, order=order, hooks=hooks,
                                             phi_hat=self._phi_hat)
        if method == "gradvac":
            self._phi_hat = phi_hat
        if self.ema is not None:
            self._ema_gram, self._ema_norm = st.smoothed, st.smoothed_norm
        if reduction != "none":
            out = out[0]
        if not return_stats:
            return out
        return AggregationResult(out, st.gram, sol.coeffs, sol.num_projections, order, key_offsets, reduction,
                                 method=method, weights=sol.coeffs.sum(-2), detected=st.detected,
                                 smoothed_gram=st.smoothed, task_present=st.present)


_FIXED = ("sum", "mean")


def _fixed(method, s, t, device, present):
    """``[S, T]`` weights of sum/mean (mean over the present tasks when ``present`` is given)."""
    if present is None:
        return torch.full((s, t), 1.0 if method == "sum" else 1.0 / t, dtype=torch.float64, device=device)
    p = present.to(torch.float64)
    return p if method == "sum" else p / p.sum(-1, keepdim=True).clamp_min(1)


class GradVac(Aggregator):
    """GradVac (Wang et al. 2021) as a stateful aggregator: ``GradVac(beta=0.5, eps=1e-8)``.

    Keeps the EMA cosine targets per segment and task pair across calls (TorchJD 0.18's
    GradVac, batched over segments on the device). Other arguments as :class:`Aggregator`.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, **kwargs):
        super().__init__("gradvac", beta=beta, eps=eps, **kwargs)
