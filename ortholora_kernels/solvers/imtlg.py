"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", 2021), in TorchJD's form.

``v = pinv(G) d`` with ``d_i = ||g_i||``, ``w = v / sum(v)`` (zeros where ``|sum(v)| < 1e-12``),
as TorchJD 0.18's IMTLGWeighting (which generalises the paper to linearly dependent rows).
Closed form: one batched symmetric eigendecomposition (pinv of a symmetric matrix).
"""
from __future__ import annotations

import torch


def weights(gram: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` IMTL-G weights from float64 Gram matrices ``[S, T, T]``."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    v = (torch.linalg.pinv(gram, hermitian=True) @ d.unsqueeze(-1)).squeeze(-1)
    total = v.sum(-1, keepdim=True)
    small = total.abs() < 1e-12
    return torch.where(small, torch.zeros_like(v), v / torch.where(small, torch.ones_like(total), total))
