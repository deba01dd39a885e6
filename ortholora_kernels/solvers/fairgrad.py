"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", 2024), option alpha.

The weights solve ``G w = w^(-1/alpha)`` with ``w > 0`` (alpha-fair utility maximisation), as
TorchJD 0.18's FairGradWeighting, which finds the root with scipy's ``least_squares`` from the
uniform vector; here a fixed number of Newton steps on the device (:func:`._lcp.power_root`).
``alpha = 0`` gives the uniform weights 1/T, as in TorchJD.
"""
from __future__ import annotations

import torch

from ._common import check_iters
from ._lcp import newton_iters, power_root


def weights(gram: torch.Tensor, *, alpha: float = 1.0, iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` FairGrad weights from float64 Gram matrices ``[S, T, T]``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise ValueError(f"fairgrad: option alpha must be a finite number >= 0, got {alpha!r}")
    iters = check_iters(iters, "fairgrad") or newton_iters(gram.shape[-1])
    if alpha == 0:
        return torch.full(gram.shape[:-1], 1.0 / gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return power_root(gram, float(alpha), iters)
