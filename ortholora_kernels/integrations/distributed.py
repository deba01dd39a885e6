"""``torch.distributed`` support: reduce the per-task buffer so every rank projects the same.

Each rank records its local per-task gradients ``g_t^(r)`` (of its local loss
``sum_t mean_{i in rank r, task t} loss_i``). :func:`all_reduce_task_grads` sums them over the
ranks and divides by the world size W, exactly as DDP averages ordinary gradients, so every
rank projects ``(1/W) sum_r g_t^(r)`` and applies the same update.

Normalisation: ``(1/W) sum_r mean_{rank r, task t}`` equals the per-task mean over the union
batch only when every rank holds the same number of examples of task t (for every t). With
unequal per-rank counts (or a task missing on some rank) the reduced gradient weights
examples of small per-rank groups more; to match the union exactly then, make each rank's
per-task loss ``sum_{i in rank r, task t} loss_i * W / n_t^global``: that is
``per_task_mean_loss(per_example_loss, task_ids, T, counts=global_task_counts(task_ids, T))``
(one small all-reduce of the ``[T]`` counts per micro-batch).

With DDP, the LoRA parameters must be left to OrthoLoRA (the grouped collector produces no
``.grad`` for them, and the loop collector would otherwise reduce them twice):
``OrthoLoRA(model, ...)`` calls :func:`exclude_from_ddp` on the model, so build it BEFORE
wrapping the model in ``DistributedDataParallel``. With a plain process group (no DDP),
reduce the other trainable parameters (heads) yourself with :func:`all_reduce_grads`.

Collection modes under DDP: "grouped" (one forward, one backward) and the loop with a
separate forward and backward per task both work. ``OrthoLoRA.backward(task_losses)`` (T
backward passes over ONE forward, ``retain_graph``) does not: DDP allows one backward per
forward. Gradient accumulation needs no ``no_sync`` for the LoRA part: the buffer is
reduced once, in ``project_``. The orders are drawn from ``seed`` on every rank (an int
seed is required), so the projections agree without communication.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_task_grads(buffer: torch.Tensor, group=None, average: bool = True) -> torch.Tensor:
    """All-reduce the ``[T, N]`` per-task buffer in place (sum, then ``/ world`` if ``average``).

    NaN/Inf on any rank reach every rank (and so every rank's GradScaler). Returns ``buffer``.
    """
    w = _world(group)
    if w > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if average:
            buffer.div_(w)
    return buffer


def global_task_counts(task_ids: torch.Tensor, num_tasks: int, group=None, device=None) -> torch.Tensor:
    """``[T]`` per-task example counts summed over the ranks and divided by the world size.

    Pass as ``counts=`` to :func:`ortholora_kernels.per_task_mean_loss`: then the DDP-averaged
    gradient of ``sum_t loss_t`` equals the gradient of the per-task means over the union batch
    whatever the per-rank counts. (With gloo the tensor is reduced on the CPU.)
    """
    ids = task_ids.to(device or task_ids.device, torch.int64).reshape(-1)  # [batch] or per-token [batch, seq]
    counts = torch.bincount(ids + 1, minlength=num_tasks + 1)[1:num_tasks + 1].to(torch.float64)  # id -1: no task
    w = _world(group)
    if w > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        counts /= w
    return counts


def all_reduce_grads(params: Iterable[torch.Tensor], group=None, average: bool = True) -> None:
    """All-reduce ``.grad`` of ``params`` (e.g. heads without DDP), averaging like DDP.

    A parameter without ``.grad`` on this rank contributes zeros (every rank must call this
    with the same parameter list).
    """
    w = _world(group)
    if w <= 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        if average:
            p.grad.div_(w)


def broadcast_params(params: Iterable[torch.Tensor], group=None, src: int = 0) -> None:
    """Copy ``params`` from rank ``src`` to every rank (DDP does this for the parameters it owns)."""
    if _world(group) <= 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src, group=group)


def exclude_from_ddp(model: nn.Module, layout) -> list[str]:
    """Tell a future ``DistributedDataParallel(model)`` to ignore the layout's parameters.

    Uses DDP's ``_set_params_and_buffers_to_ignore_for_model`` (a stable, documented-in-code
    hook used by FSDP/torchrec). Returns the ignored names. Harmless without DDP.
    """
    ids = {id(p) for p in layout.params}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    prev = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(set(prev) | set(names)))
    return names
