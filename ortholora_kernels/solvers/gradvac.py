"""GradVac (Wang et al., "Gradient Vaccine", ICLR 2021): PCGrad towards EMA cosine targets.

Task i visits the others in a random order; when the cosine ``phi`` between its current
(modified) gradient and ``g_j`` falls below the running target ``phi_hat[i, j]``, it adds
``w g_j`` with ``w = ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
(||g_j|| sqrt(1 - phi_hat^2) + eps)``; every visit updates the target,
``phi_hat <- (1 - beta) phi_hat + beta phi``. As TorchJD 0.18's GradVacWeighting, batched:
every (segment, task) advances one visit per step, like :func:`ortholora_kernels.solve.solve`,
with its own targets per segment. The state is the ``[S, T, T]`` target tensor.

Absent tasks (``present`` False): weight 0, never visited and never visiting (their
targets, and every target of a pair with an absent task, are unchanged); the present
tasks get what the method gives on the present rows alone with the orders restricted to
them.

On a float64 CPU Gram, outside ``torch.compile``, with the native extension built, the
whole step (every segment, every task, the T visits) is one compiled call
(``ortholora_C::gradvac``, csrc/weights.h ``gradvac_step``); elsewhere (CUDA, compile,
``_lcp.NATIVE`` False, an extension built before that op) the torch loop below, its
twin: the same arithmetic in the same order of updates.
"""
from __future__ import annotations

import torch


def _native(gram: torch.Tensor, phi_hat: torch.Tensor):
    """The compiled step ``ortholora_C::gradvac`` where it applies to these inputs, else None."""
    from . import _lcp
    if gram.dim() != 3 or gram.dtype != torch.float64 or phi_hat.dtype != torch.float64:
        return None
    return _lcp.native_op(gram, "gradvac")


def step(gram: torch.Tensor, order: torch.Tensor, phi_hat: torch.Tensor, present=None, *, beta: float, eps: float):
    """``(weights [S, T], new phi_hat [S, T, T])`` for Gram ``[S, T, T]`` and orders ``[S, T, T]``
    (``present``: None or bool ``[S, T]``)."""
    from ._common import check_present
    present = check_present(present, gram)
    op = _native(gram, phi_hat)
    if op is not None:
        mask = present if present is not None else torch.ones(gram.shape[:-1], dtype=torch.bool)
        return op(gram, order, phi_hat, mask, beta, eps)
    s, t, _ = gram.shape
    coeffs = torch.eye(t, dtype=gram.dtype, device=gram.device).expand(s, t, t)
    if present is not None:
        coeffs = coeffs * present.to(gram.dtype).unsqueeze(-1)
    cg = gram.clone()                                                    # rows C[i] @ G
    norm_j_all = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    tasks = torch.arange(t, device=gram.device)
    phi_hat = phi_hat.clone()
    for k in range(t):
        j = order[:, :, k]                                               # [S, T]
        other = j != tasks
        if present is not None:                                          # both ends present
            other = other & present & present.gather(-1, j)
        dot = cg.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        norm_i = (cg * coeffs).sum(-1).clamp_min(0).sqrt()
        norm_j = norm_j_all.gather(-1, j)
        phi = dot / (norm_i * norm_j + eps)
        hat = phi_hat.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        act = other & (phi < hat)
        sq_phi = (1 - phi * phi).clamp_min(0).sqrt()
        sq_hat = (1 - hat * hat).clamp_min(0).sqrt()
        w = norm_i * (hat * sq_phi - phi * sq_hat) / (norm_j * sq_hat + eps)
        w = torch.where(act, w, torch.zeros_like(w))
        coeffs = coeffs.scatter_add(-1, j.unsqueeze(-1), w.unsqueeze(-1))
        cg = cg + w.unsqueeze(-1) * gram.gather(1, j.unsqueeze(-1).expand(s, t, t))
        new_hat = torch.where(other, (1 - beta) * hat + beta * phi, hat)
        phi_hat = phi_hat.scatter(-1, j.unsqueeze(-1), new_hat.unsqueeze(-1))
    return coeffs.sum(-2), phi_hat
