"""The torch backend: Gram by matmul per segment (float64), batched solve, ``W X``.

Runs on any device torch supports, with no host synchronisation. The Gram matrix is
accumulated in float64 so gradients scaled by 1e-30 or 1e30 neither underflow nor
overflow and fp32 inputs get a Gram accurate to ~1e-15 relative.
"""
from __future__ import annotations

import torch

from .._args import Segments, accum_dtype
from ..solve import solve, solve_vjp, weights, weights_vjp

NAME = "torch"


def availability(device: torch.device) -> str | None:
    """Always usable."""
    return None


def _split(x: torch.Tensor, seg: Segments):
    return torch.split(x, seg.sizes, dim=-1)


def gram(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``[S, T, T]`` float64 Gram matrices of the column segments of ``x [T, N]``."""
    parts = [p.to(torch.float64) for p in _split(x, seg)]
    return torch.stack([p @ p.T for p in parts])


def cross(y: torch.Tensor, x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``[S, R, T]`` float64 products ``Y_s X_s^T`` for ``y [R, N]``, ``x [T, N]``."""
    return torch.stack([ys.to(torch.float64) @ xs.to(torch.float64).T for ys, xs in zip(_split(y, seg), _split(x, seg))])


def combine(w: torch.Tensor, x: torch.Tensor, seg: Segments, out_dtype=None) -> torch.Tensor:
    """``[R, N]`` = per segment ``W_s X_s`` for ``w [S, R, T]``, accumulated in fp32 or better."""
    acc = accum_dtype(x.dtype)
    w = w.to(acc)
    out = torch.cat([w[s] @ xs.to(acc) for s, xs in enumerate(_split(x, seg))], dim=1)
    return out.to(out_dtype or x.dtype)


def forward(x: torch.Tensor, seg: Segments, order: torch.Tensor, reduction: str):
    g = gram(x, seg)
    c, nproj = solve(g, order)
    out = combine(weights(c, reduction), x, seg)
    return (out if reduction == "none" else out[0]), g, c, nproj


def backward(x, dout, g, order, seg: Segments, reduction: str):
    """``dX = W^T dY + (Gbar + Gbar^T) X`` with ``Gbar`` the reverse mode of the solve."""
    dy = dout if reduction == "none" else dout.unsqueeze(0)
    m, w = backward_matrices(x, dy, g, order, seg, reduction)
    acc = accum_dtype(x.dtype)
    parts = [w[s].to(acc).T @ ys.to(acc) + m[s].to(acc) @ xs.to(acc)
             for s, (ys, xs) in enumerate(zip(_split(dy, seg), _split(x, seg)))]
    return torch.cat(parts, dim=1).to(x.dtype)


def backward_matrices(x, dy, g, order, seg: Segments, reduction: str):
    """``(M = Gbar + Gbar^T, W)`` for the backward, from ``v = dY X^T`` (a Gram-like pass).

    Shared by every backend: only the two passes over memory differ between them.
    """
    g64 = g.to(torch.float64)
    c, _ = solve(g64, order)
    v = cross(dy, x, seg)                                        # dL/dW, [S, R, T]
    gbar = solve_vjp(g64, order, weights_vjp(v, g.shape[-1], reduction))
    return gbar + gbar.transpose(-1, -2), weights(c, reduction)
