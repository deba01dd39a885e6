"""Sum: every task gradient with weight 1 (plain multi-task training)."""
from __future__ import annotations

import torch


def weights(gram: torch.Tensor, present=None) -> torch.Tensor:
    """``[S, T]`` ones (zeros on absent tasks)."""
    if present is not None:
        return present.to(gram.dtype)
    return torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
