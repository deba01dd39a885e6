"""DualProj (Lopez-Paz & Ranzato, "Gradient Episodic Memory", 2017, eq. 11).

The preference-weighted average of the task gradients (default 1/T each) is projected onto
the dual cone of the task gradients: ``w = argmin v^T G' v  s.t.  v >= u`` with
``G' = G / trace(G) + reg_eps I`` (TorchJD 0.18's DualProjWeighting with its
QuadprogProjector(reg_eps=1e-4)). Solved by :func:`._lcp.box_qp` (exact active set).
``norm_eps`` defaults to 0 (scale invariant), not TorchJD's absolute 1e-4: see
:mod:`.upgrad`.
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg, pref
from ._lcp import box_qp, decouple, default_iters, mask_gram, normalize, regularize


def weights(gram: torch.Tensor, present=None, *, pref_vector=None, norm_eps: float = 0.0, reg_eps: float = 1e-4,
            iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` DualProj weights from float64 Gram matrices ``[S, T, T]``."""
    norm_eps = check_nonneg("norm_eps", norm_eps, "dualproj")
    reg_eps = check_nonneg("reg_eps", reg_eps, "dualproj")
    iters = check_iters(iters, "dualproj") or default_iters(gram.shape[-1])
    u = pref(pref_vector, gram, "mean", "dualproj", present).expand(*gram.shape[:-1])
    g = normalize(mask_gram(gram, present), norm_eps)
    g = decouple(regularize(g, reg_eps, dead_eye=reg_eps == 0), present)
    return box_qp(g, torch.zeros_like(u), u, iters)
