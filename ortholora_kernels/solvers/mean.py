"""Mean: every task gradient with weight 1/T."""
from __future__ import annotations

import torch


def weights(gram: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` filled with 1/T."""
    return torch.full(gram.shape[:-1], 1.0 / gram.shape[-1], dtype=gram.dtype, device=gram.device)
