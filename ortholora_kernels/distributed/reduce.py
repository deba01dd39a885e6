"""Reduce the per-task buffer over the ranks so that every rank projects the same.

Each rank records its local per-task gradients ``g_t^(r)`` (of its local loss
``sum_t mean_{i in rank r, task t} loss_i``). :func:`all_reduce_task_grads` sums them over the
ranks and divides by the world size W, exactly as DDP averages ordinary gradients, so every
rank projects ``(1/W) sum_r g_t^(r)`` and applies the same update. These functions take
tensors and layouts (never the ``OrthoLoRA`` object, which composes them in ``project_``).

Normalisation: ``(1/W) sum_r mean_{rank r, task t}`` equals the per-task mean over the union
batch only when every rank holds the same number of examples of task t (for every t). With
unequal per-rank counts (or a task missing on some rank) the reduced gradient weights
examples of small per-rank groups more; to match the union exactly then, make each rank's
per-task loss ``sum_{i in rank r, task t} loss_i * W / n_t^global``: that is
``per_task_mean_loss(per_example_loss, task_ids, T, counts=global_task_counts(task_ids, T))``
(one small all-reduce of the ``[T]`` counts per micro-batch).

DDP: the LoRA parameters are reduced by OrthoLoRA, never by DDP (the grouped collector
produces no ``.grad`` for them, and the loop collector would otherwise reduce them twice).
Any structure and order works: ``OrthoLoRA(model)`` marks them ignored for a future
``DistributedDataParallel(model)`` (:func:`exclude_from_ddp`), and at the first LoRA forward
(a forward pre-hook, so still before DDP prepares the backward) it finds any DDP instance
that still holds them (e.g. DDP around a wrapper of the peft model, or built earlier; also
``OrthoLoRA(ddp_model)`` and accelerate's prepared model) and rebuilds that DDP's reducer
without them (:func:`release_from_ddp`). With a plain process group (no DDP), reduce the
other trainable parameters (heads) yourself with :func:`all_reduce_grads`.

How the buffers meet (``OrthoLoRA(comm=...)``): "all_reduce" (default under DDP) all-reduces
``[T, N]``; "sharded" reduce-scatters it and reduces only the Gram matrices
(:mod:`.sharded`, with the bytes of each). FSDP2 (``fully_shard``: the LoRA parameters are
``Shard(0)`` DTensors) always uses the sharded way, and each rank's shard of the projected
gradient becomes the local part of the sharded ``.grad``; the collector must be "grouped".

Collection modes under DDP: "grouped" (one forward, one backward) and the loop with a
separate forward and backward per task both work (every rank must run the same number of
backward passes: DDP reduces the heads in each). ``OrthoLoRA.backward(task_losses)`` (T
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
        from .sharded import all_reduce
        all_reduce(buffer, group)
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
    from .sharded import is_dtensor
    with torch.no_grad():
        for p in params:
            if not is_dtensor(p):  # FSDP2's shards differ per rank by design
                dist.broadcast(p.data, src=src, group=group)


def exclude_from_ddp(model: nn.Module, layout) -> list[str]:
    """Make DDP leave the layout's parameters to OrthoLoRA (which reduces them itself).

    ``model`` a plain module: tells a future ``DistributedDataParallel(model)`` to ignore
    them (DDP's ``_set_params_and_buffers_to_ignore_for_model``, the hook FSDP/torchrec use).
    ``model`` an existing ``DistributedDataParallel``: also rebuilds its reducer without
    them (see :func:`release_from_ddp`). Returns the ignored names. Harmless without DDP.
    """
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        return release_from_ddp(model, layout)
    ids = {id(p) for p in layout.params}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    prev = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(set(prev) | set(names)))
    return names


def _ddp_lora_names(ddp, layout) -> list[str]:
    ids = {id(p) for p in layout.params}
    return [n for n, p in ddp.module.named_parameters() if id(p) in ids and n not in ddp.parameters_to_ignore]


def release_from_ddp(ddp, layout) -> list[str]:
    """Rebuild the reducer of an existing ``DistributedDataParallel`` without the LoRA parameters.

    For a model wrapped before OrthoLoRA was built (``OrthoLoRA(ddp_model)``, accelerate's
    ``prepare`` first, or OrthoLoRA on an inner module of a wrapper that DDP wraps): DDP would
    otherwise reduce the LoRA gradients itself (twice with the loop collector) or wait for
    gradients the grouped collector never produces. Uses DDP's own construction steps
    (``_build_params_for_reducer``/``_ddp_init_helper``), the same as at ``__init__``. Must run
    before the first backward through ``ddp`` (OrthoLoRA does it at its first step). Returns
    the names released (empty when DDP already ignored them).
    """
    names = _ddp_lora_names(ddp, layout)
    if not names:
        return []
    if getattr(ddp, "static_graph", False) or getattr(ddp, "_comm_hooks", None) or \
            getattr(ddp, "mixed_precision", None) is not None or getattr(ddp, "_delay_all_reduce_params", None):
        raise RuntimeError(
            "DistributedDataParallel: this DDP instance (static_graph, a comm hook, mixed_precision or "
            "delay_all_reduce) reduces the LoRA parameters and cannot be rebuilt without them; before "
            "wrapping, build OrthoLoRA on the very module given to DistributedDataParallel, or call "
            "ortholora_kernels.distributed.exclude_from_ddp(that_module, ortho.layout)")
    ddp.parameters_to_ignore = set(ddp.parameters_to_ignore) | set(names)
    ddp.module._ddp_params_and_buffers_to_ignore = sorted(ddp.parameters_to_ignore)
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters() if n not in ddp.parameters_to_ignore]
    if not any(p.requires_grad for p in ddp._module_parameters):
        raise RuntimeError("DistributedDataParallel: every trainable parameter is a LoRA parameter that OrthoLoRA "
                           "reduces itself; DDP is not needed (OrthoLoRA alone keeps the ranks in sync)")
    params, sparse = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(params)
    ddp._ddp_init_helper(params, sparse, mapping, False)
    return names


def find_ddp_wrappers(layout) -> list:
    """Live ``DistributedDataParallel`` instances whose reducer still holds a LoRA parameter.

    Found by a scan of the garbage collector's objects (done once, at OrthoLoRA's first step):
    DDP may wrap any module that contains the LoRA model, built before or after OrthoLoRA.
    """
    import gc

    from torch.nn.parallel import DistributedDataParallel
    out = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, DistributedDataParallel) and _ddp_lora_names(obj, layout):
                out.append(obj)
        except ReferenceError:  # a dead weakref proxy
            continue
    return out


def current_params(layout) -> list[torch.Tensor]:
    """The layout's parameters as the modules hold them NOW.

    ``fully_shard`` (FSDP2) replaces every parameter by a new sharded ``DTensor`` parameter;
    a layout built before it still points to the old ones. The grouped collector's entries
    know their ``nn.Linear``: its ``weight`` is the current parameter.
    """
    out = []
    for e in layout.entries:
        m = e.module
        p = getattr(m, "weight", None) if m is not None else None
        out.append(p if isinstance(p, torch.Tensor) else e.param)
    return out


def fsdp_sharded(layout, params) -> bool:
    """Whether the layout's current ``params`` are FSDP2 DTensors (all or none; raises when mixed)."""
    from .sharded import is_dtensor
    fsdp = [is_dtensor(p) for p in params]
    if any(fsdp) and not all(fsdp):
        names = [e.name for e, f in zip(layout.entries, fsdp) if not f]
        raise NotImplementedError(f"FSDP2: some LoRA parameters are sharded and some are not ({names[:3]}); "
                                  "apply fully_shard to modules covering all of them")
    return any(fsdp)


def prepare_distributed(layout, *, collect: str, comm: str | None, group=None) -> None:
    """The first step under ``torch.distributed``: check what FSDP2 needs (before any backward)
    and release the layout's parameters from every DDP instance that would reduce them
    (whatever module DDP was given, before or after OrthoLoRA was built); see
    :func:`release_from_ddp`."""
    params = current_params(layout)
    if fsdp_sharded(layout, params):
        fsdp_check(layout, params, collect=collect, comm=comm, group=group)
    for ddp in find_ddp_wrappers(layout):
        release_from_ddp(ddp, layout)


def fsdp_check(layout, params, *, collect: str, comm: str | None, group=None) -> None:
    """Raise what OrthoLoRA cannot do right under FSDP2 (the loop collector, the all-reduce
    mode, other placements than a 1-D mesh with ``Shard(0)``)."""
    from torch.distributed.tensor import Shard
    if collect != "grouped":
        raise RuntimeError("collect: under FSDP2 (fully_shard) OrthoLoRA needs collect='grouped' (the loop "
                           "collector would read gradients FSDP has already reduce-scattered and averaged)")
    if comm == "all_reduce":
        raise ValueError("comm: under FSDP2 (fully_shard) the per-task gradients are reduce-scattered; "
                         "use comm=None or 'sharded'")
    world = dist.get_world_size(group)
    for e, p in zip(layout.entries, params):
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != world:
            raise NotImplementedError(
                f"{e.name}: OrthoLoRA under FSDP2 supports a 1-D mesh over process_group with Shard(0) "
                f"parameters (fully_shard's default); got placements {tuple(p.placements)} on a mesh of "
                f"shape {tuple(p.device_mesh.shape)}")


def reduce_leftover_grads(layout, params, group, device) -> None:
    """Average the ordinary ``.grad`` the LoRA parameters already hold (the non-per-task part:
    a backward outside ``record``, rows of task id -1), as DDP would have: DDP was told to leave
    them alone. One ``[1]`` all-reduce (and a host read of it) says whether any rank has one;
    then ``[N]`` is all-reduced, a missing ``.grad`` counting as zeros."""
    from .sharded import all_reduce
    has = torch.tensor([float(any(p.grad is not None for p in params))], device=device)
    all_reduce(has, group)
    if not has.item():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32
                      if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for p in params])
    all_reduce(flat, group)
    flat /= dist.get_world_size(group)
    for p, v in zip(params, layout.views(flat)):
        p.grad = v.to(p.dtype).clone() if v.dtype != p.dtype else v


def all_reduce_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """The ``[T]`` per-task example counts summed over the ranks (in place; returned): a task
    with no example on any rank is absent from the step."""
    if _world(group) > 1:
        from .sharded import all_reduce
        all_reduce(counts, group)
    return counts
