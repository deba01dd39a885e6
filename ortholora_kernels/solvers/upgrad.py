"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

Each task gradient, weighted by ``u_i`` (the preference vector, default 1/T), is projected
onto the dual cone of all task gradients, and the projections are summed. In weights:
``w = sum_i v_i`` with ``v_i = argmin v^T G' v  s.t.  v >= u_i e_i`` and
``G' = G / trace(G) + reg_eps I`` (TorchJD 0.18's UPGradWeighting with its
QuadprogProjector(reg_eps=1e-4)). The T quadratic programs of every segment are solved at
once by :func:`._lcp.box_qp` (exact active set).

Difference from TorchJD: ``norm_eps`` defaults to 0 (TorchJD: 1e-4, an ABSOLUTE threshold
on ``trace(G)`` below which the weights are zero: LoRA gradients with entries ~1e-5 over
3e5 parameters fall below it and would get no update). With 0 the weights are scale
invariant; pass ``norm_eps=1e-4`` for TorchJD's rule. Where every gradient is zero the
weights are ``u`` (the output is 0 either way).
"""
from __future__ import annotations

import torch

from ._common import check_iters, check_nonneg, pref
from ._lcp import box_qp, decouple, default_iters, mask_gram, normalize, regularize


def weights(gram: torch.Tensor, present=None, *, pref_vector=None, norm_eps: float = 0.0, reg_eps: float = 1e-4,
            iters: int | None = None) -> torch.Tensor:
    """``[S, T]`` UPGrad weights from float64 Gram matrices ``[S, T, T]`` (``present``: see
    :func:`ortholora_kernels.solvers.weights`)."""
    norm_eps = check_nonneg("norm_eps", norm_eps, "upgrad")
    reg_eps = check_nonneg("reg_eps", reg_eps, "upgrad")
    iters = check_iters(iters, "upgrad") or default_iters(gram.shape[-1])
    u = pref(pref_vector, gram, "mean", "upgrad", present)
    g = normalize(mask_gram(gram, present), norm_eps)
    g = decouple(regularize(g, reg_eps, dead_eye=reg_eps == 0), present)
    lower = torch.diag_embed(u.expand(*gram.shape[:-1]))    # problem i: u_i e_i
    v = box_qp(g, torch.zeros_like(lower), lower, iters)    # [S, T, T]
    return v.sum(-2)
