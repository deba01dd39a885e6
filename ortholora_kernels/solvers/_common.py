"""Option checks and preference vectors shared by the solve modules."""
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


def pref(pref_vector, gram: torch.Tensor, default: str, method: str) -> torch.Tensor:
    """The preference vector ``u [T]`` (float64, on the device of ``gram``).

    ``default`` is "mean" (1/T) or "sum" (ones), TorchJD's defaults per method.
    """
    t = gram.shape[-1]
    if pref_vector is None:
        fill = 1.0 / t if default == "mean" else 1.0
        return torch.full((t,), fill, dtype=gram.dtype, device=gram.device)
    if not isinstance(pref_vector, torch.Tensor) or pref_vector.shape != (t,):
        shape = tuple(pref_vector.shape) if isinstance(pref_vector, torch.Tensor) else type(pref_vector).__name__
        raise ValueError(f"{method}: option pref_vector must be a tensor of shape [T] = [{t}], got {shape}")
    return pref_vector.to(device=gram.device, dtype=gram.dtype)
