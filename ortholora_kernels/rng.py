"""A counter-based generator of visiting orders that compiles and captures.

``torch.Generator`` cannot be traced: Dynamo graph-breaks on every use by design (its state
lives on the host), and a CUDA graph replays the offsets it saw at capture. An
:class:`OrderGenerator` keeps its whole state in a 2-element int64 device tensor
``(seed, counter)`` and draws each order from an integer hash of (seed, counter, position):
pure tensor ops, no host sync, identical numbers eager, compiled and replayed, and the
counter advances in place on the device, so every replay of a captured step draws fresh
orders.
"""
from __future__ import annotations

import torch

__all__ = ["OrderGenerator"]

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B          # < 2**27: products of 32-bit values stay below 2**59 (no int64 overflow)
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


class OrderGenerator:
    """Random visiting orders for ``project(..., generator=OrderGenerator(seed, device))``.

    Args:
        seed: an int (its low 32 bits are used).
        device: where the state lives; must be the device of the gradients.

    Each :meth:`draw` returns independent uniformly random permutations and advances the
    counter by one, in place on the device. ``get_state``/``set_state`` (a CPU int64
    tensor) resume a run exactly, like ``torch.Generator``'s.
    """

    def __init__(self, seed: int = 0, device="cpu"):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.state = torch.tensor([seed & _M32, 0], dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        """The device of the state (and of the orders drawn)."""
        return self.state.device

    def manual_seed(self, seed: int) -> "OrderGenerator":
        """Restart from ``seed`` (counter 0)."""
        self.state.copy_(torch.tensor([seed & _M32, 0], dtype=torch.int64))
        return self

    def get_state(self) -> torch.Tensor:
        """A CPU copy of ``(seed, counter)``."""
        return self.state.detach().to("cpu", copy=True)

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a :meth:`get_state` value."""
        if not isinstance(state, torch.Tensor) or state.shape != (2,) or state.dtype != torch.int64:
            raise ValueError(f"state: expected an int64 tensor of shape [2] from get_state(), got {state!r}")
        self.state.copy_(state)

    def draw(self, s: int, t: int) -> torch.Tensor:
        """``[s, t, t]`` int64: an independent random permutation of ``0..t-1`` per row."""
        n = s * t * t
        key = _mix32(self.state[0] ^ _mix32(self.state[1] & _M32))
        pos = torch.arange(n, device=self.state.device, dtype=torch.int64)
        h = _mix32(_mix32((key + pos * _GOLDEN) & _M32) ^ key)
        # Unique sort keys (hash, then position in the row): ties cannot make eager and
        # compiled sorts disagree.
        keys = h.view(s, t, t) * t + torch.arange(t, device=self.state.device)
        self.state[1:].add_(1)
        return keys.argsort(dim=-1)

    def __repr__(self) -> str:
        return f"OrderGenerator(device={self.device})"
