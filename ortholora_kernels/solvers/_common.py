"""Option checks, presence masks and preference vectors shared by the solve modules."""
from __future__ import annotations

import torch


def check_nonneg(name: str, value, method: str) -> float:
    """A finite float >= 0, else a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{method}: option {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_iters(value, method: str, name: str = "iters") -> int | None:
    """None (the method's default) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method}: option {name} must be an int >= 1 or None, got {value!r}")
    return value


def check_present(present, gram: torch.Tensor) -> torch.Tensor | None:
    """None (every task present) or a bool ``[S, T]`` mask on the device of ``gram``.

    Shape and dtype are checked (no values are read: no host sync).
    """
    if present is None:
        return None
    shape = tuple(gram.shape[:-1])
    if not isinstance(present, torch.Tensor) or present.dtype != torch.bool or tuple(present.shape) != shape:
        got = (f"{present.dtype} tensor of shape {tuple(present.shape)}" if isinstance(present, torch.Tensor)
               else type(present).__name__)
        raise ValueError(f"present: expected None or a bool tensor of shape [S, T] = {list(shape)}, got {got}")
    return present.to(gram.device)


def count(mask: torch.Tensor | None, gram: torch.Tensor) -> torch.Tensor | float:
    """``[S, 1]`` number of present tasks per segment (float64), or T when ``mask`` is None."""
    if mask is None:
        return float(gram.shape[-1])
    return mask.to(gram.dtype).sum(-1, keepdim=True)


def masked(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``w`` with exact zeros where ``mask`` is False."""
    return w if mask is None else torch.where(mask, w, torch.zeros_like(w))


def pref(pref_vector, gram: torch.Tensor, default: str, method: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The preference vector ``u`` (float64, on the device of ``gram``): ``[T]``, or
    ``[S, T]`` with zeros on absent tasks when ``mask`` is given.

    ``default`` is "mean" (1 / the number of present tasks) or "sum" (ones), TorchJD's
    defaults per method; a given ``pref_vector [T]`` is restricted to the present tasks
    (what the method gets on the present rows alone).
    """
    t = gram.shape[-1]
    if pref_vector is None:
        if mask is None:
            fill = 1.0 / t if default == "mean" else 1.0
            return torch.full((t,), fill, dtype=gram.dtype, device=gram.device)
        m = mask.to(gram.dtype)
        return m / m.sum(-1, keepdim=True).clamp_min(1) if default == "mean" else m
    if not isinstance(pref_vector, torch.Tensor) or pref_vector.shape != (t,):
        shape = tuple(pref_vector.shape) if isinstance(pref_vector, torch.Tensor) else type(pref_vector).__name__
        raise ValueError(f"{method}: option pref_vector must be a tensor of shape [T] = [{t}], got {shape}")
    u = pref_vector.to(device=gram.device, dtype=gram.dtype)
    return u if mask is None else masked(u.expand(mask.shape), mask)


def nonzero(gram: torch.Tensor, mask: torch.Tensor | None, rel: float = 1e-24) -> torch.Tensor:
    """``[S, T]`` bool: present tasks whose squared norm exceeds ``rel`` times the trace
    (a gradient 1e-12 times smaller than the others still counts as nonzero)."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    tr = d.sum(-1, keepdim=True) if mask is None else torch.where(mask, d, torch.zeros_like(d)).sum(-1, keepdim=True)
    nz = d > rel * tr
    return nz if mask is None else nz & mask
