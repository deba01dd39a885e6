"""ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", 2024).

The direction ``pinv(U) u`` (U: the unit task gradients, u: the preference vector, default
ones) is normalised and scaled by the sum of the task gradients' projections on it, as
TorchJD 0.18's ConFIG. Through the Gram matrix: with ``D = diag(||g_i||)`` and the cosine
matrix ``K = D^-1 G D^-1``, ``pinv(U) = U^T pinv(K)``, so the direction is ``X^T a`` with
``a = D^-1 pinv(K) u`` and the weights are ``a (1^T G a) / max(||X^T a||, 1e-12)^2``.
Zero gradients get a zero unit vector (TorchJD's ``nan_to_num``). ``pinv`` of K uses the
symmetric eigendecomposition with cut ``T * eps`` relative (TorchJD cuts the singular values
of U at ``max(T, N) * eps`` relative: the two agree except on numerically rank-deficient U).
The Gram is scaled to unit trace first (the weights are scale invariant: the 1e-12 floor
then never meets gradients of norm 1e-12 and less).
"""
from __future__ import annotations

import torch

from ._common import count, masked, pref
from ._lcp import mask_gram, nan_where, normalize, pinv_apply, spectral, split_finite


def weights(gram: torch.Tensor, present=None, *, pref_vector=None) -> torch.Tensor:
    """``[S, T]`` ConFIG weights from float64 Gram matrices ``[S, T, T]``."""
    u = pref(pref_vector, gram, "sum", "config", present)
    g = normalize(mask_gram(gram, present), 0.0)
    w = spectral("config", g, present, u)
    if w is not None:
        return w
    g, finite = split_finite(g)
    norm = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    inv = torch.where(norm > 0, norm.reciprocal(), 0.0)
    k = g * (inv.unsqueeze(-1) * inv.unsqueeze(-2))
    a = inv * pinv_apply(k, u.expand_as(inv), torch.finfo(g.dtype).eps * count(present, g))
    ga = (g @ a.unsqueeze(-1)).squeeze(-1)
    norm2 = (a * ga).sum(-1, keepdim=True).clamp_min(1e-24)            # max(||X^T a||, 1e-12)^2
    return nan_where(masked(a * ga.sum(-1, keepdim=True) / norm2, present), finite)
