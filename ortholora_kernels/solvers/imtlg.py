"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", 2021), in TorchJD's form.

``v = pinv(G) d`` with ``d_i = ||g_i||``, ``w = v / sum(v)`` (zeros where ``|sum(v)| < 1e-12``),
as TorchJD 0.18's IMTLGWeighting (which generalises the paper to linearly dependent rows).
Closed form: one batched symmetric eigendecomposition (pinv of a symmetric matrix). Here G
is scaled to unit trace first (the weights are scale invariant; TorchJD's absolute 1e-12
would zero them for gradients of norm ~1e12 and more).
"""
from __future__ import annotations

import torch

from ._common import count, masked
from ._lcp import mask_gram, nan_where, normalize, split_finite


def weights(gram: torch.Tensor, present=None) -> torch.Tensor:
    """``[S, T]`` IMTL-G weights from float64 Gram matrices ``[S, T, T]``."""
    g, finite = split_finite(normalize(mask_gram(gram, present), 0.0))
    d = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    rtol = torch.finfo(g.dtype).eps * count(present, g)
    rtol = rtol.squeeze(-1) if isinstance(rtol, torch.Tensor) else rtol
    v = (torch.linalg.pinv(g, rtol=rtol, hermitian=True) @ d.unsqueeze(-1)).squeeze(-1)
    total = v.sum(-1, keepdim=True)
    small = total.abs() < 1e-12
    w = torch.where(small, torch.zeros_like(v), v / torch.where(small, torch.ones_like(total), total))
    return nan_where(masked(w, present), finite)
