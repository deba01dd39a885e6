"""The literal Ortho-LoRA / PCGrad projection, in float64, looping over pairs.

This is the oracle every backend is tested against; it is written to be obviously
correct by reading, not to be fast. It takes the same arguments as
:func:`ortholora_kernels.project` and draws the same random orders from the same
generator, but always computes and returns float64.
"""
from __future__ import annotations

import torch

from ._args import check_grads, check_order, check_order_values, check_reduction, draw_orders, segments_for
from .result import ProjectionResult


def project(grads, segments=None, *, order=None, generator=None, reduction="sum", backend=None,
            return_stats=False, check_finite=False):
    """Reference projection. ``backend`` is accepted for signature parity and ignored.

    For every segment and every task i: ``g_i' = g_i``; for j != i in ``order[s, i]``:
    if ``g_i' . g_j < 0`` (g_j the ORIGINAL gradient) and ``g_j != 0``, subtract
    ``(g_i' . g_j / ||g_j||^2) g_j``. Then reduce over tasks.
    """
    x = check_grads(grads)
    reduction = check_reduction(reduction)
    t, n = x.shape
    seg = segments_for(segments, n)
    s_count = seg.num_segments
    if order is None:
        order = draw_orders(s_count, t, x.device, generator)
    else:
        order = check_order(order, t, s_count, x.device)
        check_order_values(order)
    if check_finite and not torch.isfinite(x).all():
        raise FloatingPointError("grads: contains NaN or Inf (check_finite=True)")

    x = x.detach().to(torch.float64).cpu()
    order = order.cpu()
    projected = x.clone()
    gram = torch.zeros(s_count, t, t, dtype=torch.float64)
    coeffs = torch.zeros(s_count, t, t, dtype=torch.float64)
    nproj = torch.zeros(s_count, dtype=torch.int32)   # the backends' contract: int32

    for s in range(s_count):
        lo, hi = seg.offsets[s], seg.offsets[s + 1]
        g = [x[k, lo:hi] for k in range(t)]          # original gradients of this segment
        for i in range(t):
            for k in range(t):
                gram[s, i, k] = torch.dot(g[i], g[k])
        for i in range(t):
            gi = g[i].clone()
            coeffs[s, i, i] = 1.0                      # gi = sum_k coeffs[s, i, k] * g[k]
            for j in order[s, i].tolist():
                if j == i:
                    continue
                norm2 = torch.dot(g[j], g[j])
                if norm2 == 0:                         # a zero gradient is never divided by
                    continue
                inner = torch.dot(gi, g[j])
                if inner < 0:
                    coef = inner / norm2
                    gi = gi - coef * g[j]
                    coeffs[s, i, j] -= coef
                    nproj[s] += 1
            projected[i, lo:hi] = gi

    if reduction == "sum":
        out = projected.sum(dim=0)
    elif reduction == "mean":
        out = projected.mean(dim=0)
    else:
        out = projected
    out = out.to(grads.device)
    if not return_stats:
        return out
    dev = grads.device
    return ProjectionResult(out, gram.to(dev), coeffs.to(dev), nproj.to(dev), order.to(dev), seg.offsets, reduction)
