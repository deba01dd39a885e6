"""DualProj (Lopez-Paz & Ranzato, "Gradient Episodic Memory", 2017, eq. 11).

The preference-weighted average of the task gradients (default 1/T each) is projected onto
the dual cone of the task gradients: ``w = argmin v^T G' v  s.t.  v >= u`` with
``G' = G / trace(G) + reg_eps I`` (TorchJD 0.18's DualProjWeighting with its default
QuadprogProjector). Solved by :func:`._lcp.box_qp` (exact active set; fixed iterations).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg, pref
from ._lcp import box_qp, default_iters, normalize, regularize


def weights(gram: torch.Tensor, *, pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
            iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` DualProj weights from float64 Gram matrices ``[S, T, T]``."""
    norm_eps = check_nonneg("norm_eps", norm_eps, "dualproj")
    reg_eps = check_nonneg("reg_eps", reg_eps, "dualproj")
    iters = check_iters(iters, "dualproj") or default_iters(gram.shape[-1])
    u = pref(pref_vector, gram, "mean", "dualproj").expand(*gram.shape[:-1])
    g = regularize(normalize(gram, norm_eps), reg_eps)
    return box_qp(g, torch.zeros_like(u), u, iters)
