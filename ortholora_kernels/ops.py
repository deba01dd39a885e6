"""The public op ``project``: validation, order drawing, dispatch, custom op, autograd.

The op's forward and backward are :func:`ortholora_kernels.pipeline.forward` /
:func:`~ortholora_kernels.pipeline.backward` (the one composition of Gram, solve and
combine); ``forward``/``backward`` are re-exported here under their old names.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from . import backends
from ._args import (check_grads, check_order, check_order_values, check_reduction, draw_orders,
                    segments_for)
from .backends.base import empty_outputs
from .pipeline import backward, forward
from .result import ProjectionResult
from .solve import get_solve


@torch.library.custom_op("ortholora::project", mutates_args=())
def _project_op(grads: torch.Tensor, offsets: list[int], order: torch.Tensor, reduction: str,
                backend: str, solve: str = "pcgrad") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = segments_for(offsets, grads.shape[1])
    return forward(grads.contiguous(), seg, order, reduction, backend, solve)


@_project_op.register_fake
def _(grads, offsets, order, reduction, backend, solve="pcgrad"):
    return empty_outputs(grads, len(offsets) - 1, reduction)


@torch.library.custom_op("ortholora::project_backward", mutates_args=())
def _project_backward_op(grads: torch.Tensor, dout: torch.Tensor, gram: torch.Tensor, order: torch.Tensor,
                         offsets: list[int], reduction: str, backend: str, solve: str = "pcgrad") -> torch.Tensor:
    seg = segments_for(offsets, grads.shape[1])
    return backward(grads.contiguous(), dout.contiguous(), gram, order, seg, reduction, backend, solve)


@_project_backward_op.register_fake
def _(grads, dout, gram, order, offsets, reduction, backend, solve="pcgrad"):
    return torch.empty_like(grads)


def _setup_context(ctx, inputs, output):
    grads, offsets, order, reduction, backend, solve = inputs
    _, gram, coeffs, nproj = output
    ctx.save_for_backward(grads, gram, order)
    ctx.offsets, ctx.reduction, ctx.backend, ctx.solve = offsets, reduction, backend, solve
    ctx.mark_non_differentiable(gram, coeffs, nproj)


def _backward(ctx, dout, *_):
    grads, gram, order = ctx.saved_tensors
    dx = _project_backward_op(grads, dout, gram, order, ctx.offsets, ctx.reduction, ctx.backend, ctx.solve)
    return dx, None, None, None, None, None


_project_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerProject(torch.autograd.Function):
    """The custom op's eager fast path: the same forward, backward and saved tensors,
    without the op's dispatch layers (custom op -> autograd wrapper -> redispatch ->
    Python kernel; tens of us of host time per call, figures in
    benchmarks/RESULTS.md). Used only where it cannot differ: plain CPU/CUDA tensors,
    eager mode, no dispatch mode or functorch transform active (:func:`_eager_fast_path`).
    """

    @staticmethod
    def forward(ctx, grads, seg, order, reduction, backend, solve):
        out, gram, coeffs, nproj = forward(grads.contiguous(), seg, order, reduction, backend, solve)
        ctx.save_for_backward(grads, gram, order)
        ctx.seg, ctx.reduction, ctx.backend, ctx.solve = seg, reduction, backend, solve
        ctx.mark_non_differentiable(gram, coeffs, nproj)
        return out, gram, coeffs, nproj

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the custom op: a second derivative raises, never silently 0
    def backward(ctx, dout, *_):
        grads, gram, order = ctx.saved_tensors
        dx = backward(grads.contiguous(), dout.contiguous(), gram, order, ctx.seg, ctx.reduction, ctx.backend,
                      ctx.solve)
        return dx, None, None, None, None, None


_EAGER_FAST_PATH = True   # False: every call goes through the custom op (the benchmark's baseline)


def _eager_fast_path(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may skip the custom op's dispatch (see :class:`_EagerProject`)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if torch.compiler.is_compiling():   # first: dynamo never traces the checks below
        return False
    return (_EAGER_FAST_PATH and type(x) is torch.Tensor and x.device.type in ("cpu", "cuda")
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active())


def project(grads: torch.Tensor, segments: Sequence[int] | torch.Tensor | None = None, *,
            order: torch.Tensor | None = None, generator: torch.Generator | None = None,
            reduction: Literal["sum", "mean", "none"] = "sum", backend: str | None = None,
            return_stats: bool = False, check_finite: bool = False,
            solve: str = "pcgrad") -> torch.Tensor | ProjectionResult:
    """Project conflicting task gradients (Ortho-LoRA / PCGrad) and reduce them.

    For each segment and each task i, ``g_i`` is projected, in the order ``order[s, i]``,
    onto the normal plane of every ORIGINAL ``g_j`` (j != i) it conflicts with
    (``g_i' . g_j < 0``); then the projected gradients are summed (or averaged, or
    returned). Computed through the Gram matrix: two passes over ``grads``, no host sync.

    Args:
        grads: ``[T, N]`` float64/float32/float16/bfloat16 tensor on any device; row t is
            task t's flattened gradient. Non-contiguous input is copied.
        segments: None (one segment) or column offsets ``[0, s1, ..., N]`` (list of ints or
            int64 tensor; a CUDA tensor costs one host sync, pass a list to avoid it).
            Each segment is projected on its own (e.g. LoRA A and B apart).
        order: int64 ``[T, T]`` or ``[S, T, T]``; row i is the order in which task i visits
            the others (entry i is skipped). None draws fresh random orders on the
            device from ``generator``. A CPU order in eager mode must hold permutations
            (ValueError otherwise); a device order (or one under torch.compile) is not
            read on the host: every backend skips an entry outside ``[0, T)`` like a
            self-visit and computes in-range repeats as written.
        generator: a ``torch.Generator`` on the device of ``grads`` for drawn orders, or an
            :class:`~ortholora_kernels.OrderGenerator` (the kind that ``torch.compile``
            traces and CUDA graphs replay; a torch.Generator cannot be traced).
        reduction: "sum" (the paper), "mean", or "none" (projected ``[T, N]``).
        backend: "torch", "triton", "native", "auto" or None (``$ORTHOLORA_BACKEND``, else
            automatic: native if built for the device (on CUDA for T <= 32), triton on GPUs,
            else torch).
        return_stats: return a :class:`ProjectionResult` (output, Gram, coefficients,
            projection counts, lazy cosine/conflict statistics) instead of the tensor.
        check_finite: raise ``FloatingPointError`` if ``grads`` holds NaN/Inf (a host
            sync). By default NaN/Inf propagate to the output, so AMP's GradScaler sees
            them and skips the step; they are never zeroed.
        solve: the name of a registered :class:`~ortholora_kernels.solve.Solve` (stage 2;
            default the built-in PCGrad). A custom solve: subclass ``Solve`` (``forward``
            and ``vjp``, batched over segments, no host sync), ``register_solve(MySolve(),
            "mine")``, then ``project(grads, segs, solve="mine")``: the same op, backends,
            autograd and torch.compile support (docs/pipeline.md).

    Returns:
        ``[N]`` (sum/mean) or ``[T, N]`` (none) in the dtype of ``grads``, or a
        :class:`ProjectionResult`. Differentiable with respect to ``grads``.
    """
    x = check_grads(grads)
    reduction = check_reduction(reduction)
    t, n = x.shape
    seg = segments_for(segments, n)
    name = backends.select(backend, x.device, t)
    if order is None:
        order = draw_orders(seg.num_segments, t, x.device, generator)
    else:
        order = check_order(order, t, seg.num_segments, x.device)
        # Values are checked where that costs no device sync (CPU tensors, eager mode).
        if order.device.type == "cpu" and not torch.compiler.is_compiling():
            check_order_values(order)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise FloatingPointError("grads: contains NaN or Inf (check_finite=True)")
    get_solve(solve)   # a clear error for an unknown name, before dispatch
    if _eager_fast_path(x):
        out, gram, coeffs, nproj = _EagerProject.apply(x, seg, order, reduction, name, solve)
    else:
        out, gram, coeffs, nproj = _project_op(x, list(seg.offsets), order, reduction, name, solve)
    if not return_stats:
        return out
    return ProjectionResult(out, gram, coeffs, nproj, order, seg.offsets, reduction)
