"""The public op ``project``: validation, order drawing, dispatch, custom op, autograd."""
from __future__ import annotations

import torch

from . import backends
from ._args import (check_grads, check_order, check_order_values, check_reduction, draw_orders,
                    segments_for)
from .result import ProjectionResult


@torch.library.custom_op("ortholora::project", mutates_args=())
def _project_op(grads: torch.Tensor, offsets: list[int], order: torch.Tensor, reduction: str,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = segments_for(offsets, grads.shape[1])
    out, gram, coeffs, nproj = backends.get(backend).forward(grads.contiguous(), seg, order, reduction)
    return out, gram, coeffs, nproj


@_project_op.register_fake
def _(grads, offsets, order, reduction, backend):
    t, n = grads.shape
    s = len(offsets) - 1
    out = grads.new_empty((t, n) if reduction == "none" else (n,))
    gram = grads.new_empty((s, t, t), dtype=torch.float64)
    return out, gram, torch.empty_like(gram), grads.new_empty((s,), dtype=torch.int32)


@torch.library.custom_op("ortholora::project_backward", mutates_args=())
def _project_backward_op(grads: torch.Tensor, dout: torch.Tensor, gram: torch.Tensor, order: torch.Tensor,
                         offsets: list[int], reduction: str, backend: str) -> torch.Tensor:
    seg = segments_for(offsets, grads.shape[1])
    impl = backends.get(backend)
    if not hasattr(impl, "backward"):
        impl = backends.get("torch")
    return impl.backward(grads.contiguous(), dout.contiguous(), gram, order, seg, reduction)


@_project_backward_op.register_fake
def _(grads, dout, gram, order, offsets, reduction, backend):
    return torch.empty_like(grads)


def _setup_context(ctx, inputs, output):
    grads, offsets, order, reduction, backend = inputs
    _, gram, coeffs, nproj = output
    ctx.save_for_backward(grads, gram, order)
    ctx.offsets, ctx.reduction, ctx.backend = offsets, reduction, backend
    ctx.mark_non_differentiable(gram, coeffs, nproj)


def _backward(ctx, dout, *_):
    grads, gram, order = ctx.saved_tensors
    dx = _project_backward_op(grads, dout, gram, order, ctx.offsets, ctx.reduction, ctx.backend)
    return dx, None, None, None, None


_project_op.register_autograd(_backward, setup_context=_setup_context)


def project(grads, segments=None, *, order=None, generator=None, reduction="sum", backend=None,
            return_stats=False, check_finite=False):
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
            device from ``generator``.
        generator: a ``torch.Generator`` on the device of ``grads`` for drawn orders.
        reduction: "sum" (the paper), "mean", or "none" (projected ``[T, N]``).
        backend: "torch", "triton", "native", "auto" or None (``$ORTHOLORA_BACKEND``, else
            automatic: native if built for the device (on CUDA for T <= 32), triton on GPUs,
            else torch).
        return_stats: return a :class:`ProjectionResult` (output, Gram, coefficients,
            projection counts, lazy cosine/conflict statistics) instead of the tensor.
        check_finite: raise ``FloatingPointError`` if ``grads`` holds NaN/Inf (a host
            sync). By default NaN/Inf propagate to the output, so AMP's GradScaler sees
            them and skips the step; they are never zeroed.

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
    out, gram, coeffs, nproj = _project_op(x, list(seg.offsets), order, reduction, name)
    if not return_stats:
        return out
    return ProjectionResult(out, gram, coeffs, nproj, order, seg.offsets, reduction)
