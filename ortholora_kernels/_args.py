"""Argument checking, segment tables and order drawing shared by every backend.

Everything here runs on the host and never reads a device tensor, so the public op
stays free of host synchronisation (except where documented: a CUDA `segments`
tensor and `check_finite=True`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

REDUCTIONS = ("sum", "mean", "none")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Segments:
    """A validated, immutable segment layout: column offsets ``[0, s1, ..., N]``.

    Instances are cached per layout (see :func:`segments_for`), so per-device tables
    that backends derive from them (offsets tensors, block tables) are built once.
    """

    offsets: tuple[int, ...]
    _device_cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_segments(self) -> int:
        """S, the number of segments."""
        return len(self.offsets) - 1

    @property
    def numel(self) -> int:
        """N, the total number of columns."""
        return self.offsets[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Columns per segment."""
        o = self.offsets
        return tuple(o[i + 1] - o[i] for i in range(len(o) - 1))

    def cached(self, key, build):
        """Return ``build()`` memoised under ``key`` (e.g. a device and a block size)."""
        try:
            return self._device_cache[key]
        except KeyError:
            value = self._device_cache[key] = build()
            return value

    def offsets_tensor(self, device) -> torch.Tensor:
        """int64 offsets on ``device``, built once per device."""
        device = torch.device(device)
        return self.cached(("offsets", device), lambda: torch.tensor(self.offsets, dtype=torch.int64, device=device))


_SEGMENTS_CACHE: dict[tuple[int, ...], Segments] = {}
_MAX_CACHED_LAYOUTS = 256


def _segments_from_tuple(offsets: tuple[int, ...]) -> Segments:
    seg = _SEGMENTS_CACHE.get(offsets)
    if seg is None:
        if len(_SEGMENTS_CACHE) >= _MAX_CACHED_LAYOUTS:  # layouts are few; bound the cache anyway
            # Only layouts without device tables are dropped: a captured CUDA graph keeps
            # the raw addresses of a layout's tables, and freeing them under it would let
            # the allocator hand that memory to other tensors while the graph still reads it.
            for key in [k for k, v in _SEGMENTS_CACHE.items() if not v._device_cache]:
                del _SEGMENTS_CACHE[key]
        seg = _SEGMENTS_CACHE[offsets] = Segments(offsets)
    return seg


def segments_for(segments, n: int) -> Segments:
    """Validate ``segments`` (None, a sequence of ints or an int64 tensor) for ``N = n``."""
    if isinstance(segments, Segments):
        offs = segments.offsets
    elif segments is None:
        offs = (0, n)
    elif isinstance(segments, torch.Tensor):
        if segments.dtype not in (torch.int64, torch.int32) or segments.dim() != 1:
            raise TypeError(
                f"segments: expected a 1-D int64 tensor or a list of ints, got a {segments.dim()}-D "
                f"{segments.dtype} tensor"
            )
        # A CUDA tensor costs one host sync here; pass a list or a CPU tensor to avoid it.
        offs = tuple(int(v) for v in segments.tolist())
    elif isinstance(segments, Sequence) and not isinstance(segments, (str, bytes)):
        try:
            offs = tuple(_as_int(v) for v in segments)
        except TypeError:
            raise TypeError(f"segments: expected a sequence of ints, got {segments!r}") from None
    else:
        raise TypeError(f"segments: expected None, a list of ints or an int64 tensor, got {type(segments).__name__}")
    if len(offs) < 2:
        raise ValueError(f"segments: expected at least two offsets [0, ..., N], got {list(offs)}")
    if offs[0] != 0:
        raise ValueError(f"segments: the first offset must be 0, got {offs[0]}")
    if offs[-1] != n:
        raise ValueError(f"segments: the last offset must equal N = grads.shape[1] = {n}, got {offs[-1]}")
    if any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"segments: offsets must be strictly increasing, got {list(offs)[:16]}{'...' if len(offs) > 16 else ''}")
    return _segments_from_tuple(offs)


def _as_int(v) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError
    return int(v.__index__())


def check_grads(grads) -> torch.Tensor:
    """Validate ``grads`` (a 2-D float tensor, T >= 1, N >= 1) and return it unchanged."""
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads: expected a torch.Tensor of shape [T, N], got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads: expected a 2-D tensor [T, N] (one row per task), got shape {tuple(grads.shape)}")
    if grads.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grads: expected a float64/float32/float16/bfloat16 tensor, got {grads.dtype}")
    if grads.shape[0] < 1 or grads.shape[1] < 1:
        raise ValueError(f"grads: expected T >= 1 tasks and N >= 1 columns, got shape {tuple(grads.shape)}")
    return grads


def check_reduction(reduction) -> str:
    """Validate ``reduction`` ("sum", "mean" or "none") and return it."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_order(order, t: int, s: int, device) -> torch.Tensor:
    """Validate a user order (int64 or int32) and expand it to ``[S, T, T]`` int64 (no host sync).

    Values are not read here (that would be a host sync on a device): see
    :func:`check_order_values`, and ARCHITECTURE.md for what backends do with an
    out-of-range value (skip it).
    """
    if not isinstance(order, torch.Tensor):
        raise TypeError(f"order: expected an int64 tensor of shape [T, T] or [S, T, T], got {type(order).__name__}")
    if order.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"order: expected an int64 (or int32) tensor, got {order.dtype}")
    if order.device != torch.device(device):
        raise ValueError(f"order: expected a tensor on the device of grads ({device}), got {order.device}")
    if order.dim() not in (2, 3) or (order.dim() == 3 and order.shape[0] != s):
        raise ValueError(f"order: expected shape [T, T] = [{t}, {t}] or [S, T, T] = [{s}, {t}, {t}], got {tuple(order.shape)}")
    if tuple(order.shape[-2:]) != (t, t):
        raise ValueError(f"order: grads has T = {t} tasks but order has shape {tuple(order.shape)}; expected [..., {t}, {t}]")
    if order.dim() == 2:
        order = order.unsqueeze(0).expand(s, t, t)
    return order.to(torch.int64).contiguous()


def check_order_values(order: torch.Tensor) -> None:
    """Raise if a row of ``order`` is not a permutation of 0..T-1 (reads the tensor: host sync)."""
    t = order.shape[-1]
    ok = torch.equal(order.sort(dim=-1).values, torch.arange(t, device=order.device).expand_as(order))
    if not ok:
        raise ValueError(f"order: every row must be a permutation of 0..{t - 1}")


def draw_orders(s: int, t: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh random visiting orders ``[S, T, T]`` (one permutation per segment and task).

    Drawn on ``device`` with ``generator`` and no host sync: argsort of uniform noise. An
    :class:`~ortholora_kernels.rng.OrderGenerator` draws its own (counter-based) orders: the
    only kind that torch.compile can trace and a CUDA graph can replay.
    """
    from .rng import OrderGenerator
    if isinstance(generator, OrderGenerator):
        if generator.device != torch.device(device):
            raise ValueError(f"generator: an OrderGenerator on {generator.device}, but grads are on {device}")
        return generator.draw(s, t)
    if generator is not None and torch.compiler.is_compiling():
        raise TypeError("generator: torch.compile cannot trace a torch.Generator (its state lives on the host); "
                        "pass an ortholora_kernels.OrderGenerator(seed, device) instead")
    noise = torch.rand((s, t, t), device=device, generator=generator)
    return noise.argsort(dim=-1)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype combine passes accumulate in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
