"""PCGrad / Ortho-LoRA (Yu et al. 2020): the sequential projection of :mod:`ortholora_kernels.solve`.

Returns coefficients ``C [S, T, T]`` (``g_i' = sum_k C[s, i, k] g_k``), not weights: the
reduction ("sum", "mean", "none") is applied by the caller. ``aggregate(method="pcgrad")``
is :func:`ortholora_kernels.project` itself (the fused kernels, differentiable).
"""
from __future__ import annotations

import torch

from ..solve import solve


def coeffs(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``[S, T, T]`` PCGrad coefficients for the visiting orders ``order [S, T, T]``."""
    return solve(gram, order)[0]
