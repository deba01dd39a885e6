"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", 2023).

The task gradients are replaced by an orthogonal set of the same span whose singular values
all equal a scale (the smallest kept one, the median or the mean, ``scale_mode``), then
combined with the preference vector (default 1/T): ``w = sqrt(scale) V S^{-1/2} V^T u`` over
the eigenpairs of G above ``max(eig) * T * eps``, as TorchJD 0.18's AlignedMTLWeighting
(identity when the rank is 0; "median" is the lower median, as ``torch.median``). Closed
form: one batched ``eigh`` of G scaled to unit trace (the weights are scale invariant); the
rank cut is a mask, not a slice, so it is sync-free.
"""
from __future__ import annotations

import torch

from ._common import count, masked, pref
from ._lcp import mask_gram, nan_where, normalize, spectral, split_finite

SCALE_MODES = ("min", "median", "rmse")


def weights(gram: torch.Tensor, present=None, *, pref_vector=None, scale_mode: str = "min") -> torch.Tensor:
    """``[S, T]`` Aligned-MTL weights from float64 Gram matrices ``[S, T, T]``."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"alignedmtl: option scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    t = gram.shape[-1]
    u = pref(pref_vector, gram, "mean", "alignedmtl", present)
    g = normalize(mask_gram(gram, present), 0.0)
    w = spectral("alignedmtl", g, present, u, scale_mode)
    if w is not None:
        return w
    g, finite = split_finite(g)
    lam, vec = torch.linalg.eigh(g)                                     # ascending
    tol = lam[..., -1:] * count(present, g) * torch.finfo(gram.dtype).eps
    keep = lam > tol
    rank = keep.sum(-1, keepdim=True)
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    if scale_mode == "min":
        scale = torch.where(keep, lam, float("inf")).amin(-1, keepdim=True)
    elif scale_mode == "rmse":
        scale = torch.where(keep, lam, 0.0).sum(-1, keepdim=True) / rank.clamp_min(1)
    else:  # lower median of the kept eigenvalues: ascending, kept ones are the last `rank`
        idx = (t - rank) + (rank - 1).clamp_min(0) // 2
        scale = lam.gather(-1, idx)
    coef = inv_sqrt * scale.clamp_min(0).sqrt()                          # V diag(coef) V^T u
    uu = u.expand(*gram.shape[:-1])
    w = (vec @ ((vec.mT @ uu.unsqueeze(-1)) * coef.unsqueeze(-1))).squeeze(-1)
    return nan_where(masked(torch.where(rank > 0, w, uu), present), finite)
