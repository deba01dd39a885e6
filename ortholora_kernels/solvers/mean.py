"""Mean: every task gradient with weight 1/T (1 / the number of present tasks)."""
from __future__ import annotations

import torch

from ._common import count


def weights(gram: torch.Tensor, present=None) -> torch.Tensor:
    """``[S, T]`` filled with 1/T (zeros on absent tasks)."""
    if present is not None:
        return present.to(gram.dtype) / count(present, gram).clamp_min(1)
    return torch.full(gram.shape[:-1], 1.0 / gram.shape[-1], dtype=gram.dtype, device=gram.device)
