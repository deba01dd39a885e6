"""The torch backend: Gram by matmul per segment (float64), ``W X`` by matmul.

Runs on any device torch supports, with no host synchronisation. The Gram matrix is
accumulated in float64 so gradients scaled by 1e-30 or 1e30 neither underflow nor
overflow and fp32 inputs get a Gram accurate to ~1e-15 relative.
"""
from __future__ import annotations

import torch

from .._args import Segments, accum_dtype
from .base import Backend

NAME = "torch"


def _split(x: torch.Tensor, seg: Segments):
    return torch.split(x, seg.sizes, dim=-1)


# On CPU the float64 copies are made a cache-sized chunk at a time (~35% faster than one
# big conversion at N=295k); on accelerators one conversion per segment saves launches.
_CPU_CHUNK = 8192


def _product64(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y x^T`` accumulated in float64 (``y [R, L]``, ``x [T, L]``)."""
    if x.device.type != "cpu" or x.shape[1] <= _CPU_CHUNK:
        return y.to(torch.float64) @ x.to(torch.float64).T
    acc = torch.zeros(y.shape[0], x.shape[0], dtype=torch.float64)
    same = y is x
    for yc, xc in zip(torch.split(y, _CPU_CHUNK, dim=1), torch.split(x, _CPU_CHUNK, dim=1)):
        xc64 = xc.to(torch.float64)
        acc.addmm_(xc64 if same else yc.to(torch.float64), xc64.T)
    return acc


class TorchBackend(Backend):
    """Gram and cross by float64 matmuls per segment, combine by fp32/fp64 matmuls."""

    name = NAME

    def availability(self, device: torch.device) -> str | None:
        """Always usable."""
        return None

    def gram(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``[S, T, T]`` float64 Gram matrices of the column segments of ``x [T, N]``."""
        return torch.stack([_product64(p, p) for p in _split(x, seg)])

    def cross(self, y: torch.Tensor, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``[S, R, T]`` float64 products ``Y_s X_s^T`` for ``y [R, N]``, ``x [T, N]``."""
        return torch.stack([_product64(ys, xs) for ys, xs in zip(_split(y, seg), _split(x, seg))])

    def combine(self, seg, x, a, y=None, b=None, out_dtype=None):
        """``[R, N]`` = per segment ``A_s X_s (+ B_s Y_s)``, accumulated in fp32 or better."""
        acc = accum_dtype(x.dtype)
        a = a.to(acc)
        if y is None:
            parts = [a[s] @ xs.to(acc) for s, xs in enumerate(_split(x, seg))]
        else:
            b = b.to(acc)
            parts = [b[s] @ ys.to(acc) + a[s] @ xs.to(acc)
                     for s, (ys, xs) in enumerate(zip(_split(y, seg), _split(x, seg)))]
        return torch.cat(parts, dim=1).to(out_dtype or x.dtype)


BACKEND = TorchBackend()
