"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", 2021), in TorchJD's form.

``v = pinv(G) d`` with ``d_i = ||g_i||``, ``w = v / sum(v)`` (zeros where ``|sum(v)| < 1e-12``),
as TorchJD 0.18's IMTLGWeighting (which generalises the paper to linearly dependent rows).
Closed form: one batched symmetric eigendecomposition (pinv of a symmetric matrix, cut
at ``T * eps`` relative, torch's default). Here G
is scaled to unit trace first (the weights are scale invariant; TorchJD's absolute 1e-12
would zero them for gradients of norm ~1e12 and more).
"""
from __future__ import annotations

import torch

from ._common import count, masked
from ._lcp import mask_gram, nan_where, normalize, pinv_apply, spectral, split_finite


def weights(gram: torch.Tensor, present=None) -> torch.Tensor:
    """``[S, T]`` IMTL-G weights from float64 Gram matrices ``[S, T, T]``."""
    g = normalize(mask_gram(gram, present), 0.0)
    w = spectral("imtlg", g, present, None)
    if w is not None:
        return w
    g, finite = split_finite(g)
    d = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    v = pinv_apply(g, d, torch.finfo(g.dtype).eps * count(present, g))
    total = v.sum(-1, keepdim=True)
    w = torch.where(total.abs() < 1e-12, 0.0, v / total)
    return nan_where(masked(w, present), finite)
