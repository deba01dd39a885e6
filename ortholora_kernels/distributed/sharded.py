"""Sharded projection: reduce the Gram matrices, not the ``[T, N]`` per-task gradients.

The projection only needs the ``[S, T, T]`` Gram matrices (ARCHITECTURE.md, "Reduce over
ranks"), and the Gram matrix of a column-sharded buffer is the sum of the shards' partial
Gram matrices. With R ranks, each holding its local ``[T, N]`` per-task buffer:

1. reduce-scatter the buffer (sum, then ``/ R`` like DDP): rank r owns its shard of every
   task's global gradient;
2. partial Gram of the own shard per segment, all-reduce of ``S x T x T`` float64 numbers;
3. the same small solve on every rank (the orders come from the shared seed);
4. combine the own shard: ``out_shard = W_s X_shard`` per segment;
5. DDP: all-gather the ``[N]`` result into every rank's ``.grad``. FSDP2: the shard IS the
   sharded ``.grad`` (a ``DTensor``) that FSDP's optimizer step expects; nothing more moves.

The shards follow FSDP2's layout: rank r owns rows ``[r c, (r + 1) c)`` (``c = ceil(dim0 / R)``,
``torch.chunk``) of every LoRA matrix, so under FSDP2 the owned pieces are exactly the local
tensors of the ``Shard(0)`` parameters.

Bytes sent per rank per step (ring collectives, b bytes per element, N LoRA elements):

* all-reduce mode (:func:`~.reduce.all_reduce_task_grads`): ``2 T N b (R-1)/R``;
* sharded mode under DDP: ``(T + 1) N b (R-1)/R`` plus ``2 S T^2 8 (R-1)/R`` for the Gram;
* sharded mode under FSDP2: ``T N b (R-1)/R`` plus the Gram.

So the sharded mode moves about ``(T+1)/(2T)`` of the all-reduce mode's bytes (56% at T=8)
in two collectives instead of one, and the combine runs on ``N/R`` columns instead of ``N``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import backends, pipeline

__all__ = ["ShardPlan", "sharded_project", "reduce_scatter_buffer", "gram_sum_hook", "gather_output",
           "write_sharded_grads", "CommCounter", "is_dtensor"]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


class CommCounter:
    """Counts the bytes this rank sends in the collectives issued by this module (ring model).

    ``with CommCounter() as c: ...; c.bytes`` (per rank; a ring all-reduce of B bytes sends
    ``2 B (R-1)/R``, a reduce-scatter of a B-byte input and an all-gather of a B-byte output
    ``B (R-1)/R``). ``c.calls`` lists ``(kind, bytes_sent)``.
    """

    _active: list["CommCounter"] = []

    def __init__(self):
        self.bytes = 0
        self.calls: list[tuple[str, int]] = []

    def __enter__(self):
        CommCounter._active.append(self)
        return self

    def __exit__(self, *exc):
        CommCounter._active.remove(self)

    @classmethod
    def record(cls, kind: str, total_bytes: int, world: int) -> None:
        """Add one collective over a ``total_bytes`` tensor (the full, unsharded size)."""
        factor = 2 if kind == "all_reduce" else 1
        sent = factor * total_bytes * (world - 1) // world
        for c in cls._active:
            c.bytes += sent
            c.calls.append((kind, sent))


def all_reduce(t: torch.Tensor, group=None) -> None:
    """``dist.all_reduce`` (sum) that reports to :class:`CommCounter`."""
    CommCounter.record("all_reduce", t.numel() * t.element_size(), dist.get_world_size(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Sum of the ranks' ``inp`` (``[R * M]``), rank r's M elements into ``out``."""
    world = dist.get_world_size(group)
    CommCounter.record("reduce_scatter", inp.numel() * inp.element_size(), world)
    if dist.get_backend(group) == "gloo":
        # gloo's reduce-scatter sends as many bytes as an all-reduce (measured: 2 B (R-1)/R);
        # an all-to-all sends B (R-1)/R, the ring reduce-scatter's bytes, and the R pieces
        # are summed here (in rank order: deterministic).
        recv = torch.empty_like(inp)
        dist.all_to_all_single(recv, inp, group=group)
        torch.sum(recv.view(world, -1), dim=0, out=out)
        return
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    CommCounter.record("all_gather", out.numel() * out.element_size(), dist.get_world_size(group))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _running(pieces):
    at = 0
    for p in pieces:
        yield at
        at += p[4]


class ShardPlan:
    """Which columns of the ``[T, N]`` buffer each rank owns (FSDP2's ``Shard(0)`` chunks).

    Attributes:
        world, rank: R and r.
        pieces: per rank, ``[(entry index, first row, row count, first column, columns)]``.
        shard_len: L, the padded length of every rank's shard (``max`` over the ranks).
        send_slices: per rank, the ``(column, count)`` slices of the buffer in shard order.
        gather_slices: ``(start, count)`` slices of the ``[R * L]`` shard-major vector (rank
            q's shard at ``[q L, (q+1) L)``) that, concatenated, give the buffer's columns.
        local_offsets: the segment offsets ``[0, ..., L_r]`` inside this rank's shard (a
            segment may be empty on a rank).
    """

    def __init__(self, layout, offsets, world: int, rank: int):
        self.world, self.rank = world, rank
        seg_of = []  # segment index of every entry (segments are runs of whole entries)
        bounds = list(offsets)
        for e in layout.entries:
            s = next(i for i in range(len(bounds) - 1) if bounds[i] <= e.offset < bounds[i + 1])
            seg_of.append(s)
        self.num_segments = len(bounds) - 1
        self.pieces: list[list[tuple]] = [[] for _ in range(world)]
        for i, e in enumerate(layout.entries):
            d0 = e.shape[0] if len(e.shape) else 1
            rest = e.numel // max(d0, 1)
            c = math.ceil(d0 / world)
            for q in range(world):
                lo, hi = min(q * c, d0), min((q + 1) * c, d0)
                self.pieces[q].append((i, lo, hi - lo, e.offset + lo * rest, (hi - lo) * rest))
        lens = [sum(p[4] for p in ps) for ps in self.pieces]
        self.shard_len = max(lens)
        self.local_len = lens[rank]
        self.send_slices = [[(col, n) for (_, _, _, col, n) in ps if n] for ps in self.pieces]
        starts = [list(_running(ps)) for ps in self.pieces]
        self.gather_slices = [(q * self.shard_len + starts[q][i], self.pieces[q][i][4])
                              for i in range(len(layout.entries)) for q in range(world) if self.pieces[q][i][4]]
        sizes = [0] * self.num_segments
        for (i, _, _, _, n) in self.pieces[rank]:
            sizes[seg_of[i]] += n
        self.local_offsets = [0]
        for n in sizes:
            self.local_offsets.append(self.local_offsets[-1] + n)

    def local_pieces(self):
        """This rank's ``(entry index, first row, rows, start in the shard, columns)``."""
        at = 0
        for (i, lo, rows, _, n) in self.pieces[self.rank]:
            yield i, lo, rows, at, n
            at += n


def reduce_scatter_buffer(buf: torch.Tensor, plan: ShardPlan, group=None, average: bool = True) -> torch.Tensor:
    """Step 1: the ``[T, L_r]`` shard of the ranks' summed (``/ R`` if ``average``) ``[T, N]`` buffers
    that this rank owns (contiguous)."""
    t = buf.shape[0]
    r, big_l = plan.world, plan.shard_len
    # shard-major copy [R, T, L] (one concatenation per rank; padding 0), reduce-scatter.
    send = buf.new_empty(r, t, big_l)
    for q, slices in enumerate(plan.send_slices):
        parts = [buf[:, c:c + k] for c, k in slices]
        pad = big_l - sum(k for _, k in slices)
        if pad:
            parts.append(buf.new_zeros(t, pad))
        torch.cat(parts, dim=1, out=send[q])
    shard = buf.new_empty(t * big_l)
    _reduce_scatter(shard, send.view(-1), group)
    del send
    shard = shard.view(t, big_l)[:, :plan.local_len]
    if average:
        shard = shard / r
    return shard.contiguous()


def gram_sum_hook(group=None):
    """Step 2's collective as a Gram-stage hook of :mod:`ortholora_kernels.pipeline`: the
    partial Gram matrices of the shards, all-reduced (``S x T x T`` float64 numbers)."""
    return pipeline.sum_over_ranks(lambda g: all_reduce(g, group))


def gather_output(out: torch.Tensor, plan: ShardPlan, group=None) -> torch.Tensor:
    """Step 5 (DDP): the full ``[N]`` from every rank's ``[L_r]`` piece of the output."""
    padded = out.new_zeros(plan.shard_len)
    padded[:plan.local_len] = out
    full = out.new_empty(plan.world * plan.shard_len)
    _all_gather(full, padded, group)
    return torch.cat([full[a:a + k] for a, k in plan.gather_slices])


def write_sharded_grads(params, plan: ShardPlan, out: torch.Tensor, names=None) -> None:
    """Step 5 (FSDP2): add this rank's ``[L_r]`` output to the ``Shard(0)`` DTensor ``.grad``
    of ``params`` (the layout's parameters as the modules hold them; set when None)."""
    from torch.distributed.tensor import DTensor
    for i, _, rows, at, n in plan.local_pieces():
        p = params[i]
        local = out[at:at + n].view(rows, *p.shape[1:])
        if tuple(p.to_local().shape) != tuple(local.shape):
            name = names[i] if names is not None else f"parameter {i}"
            raise NotImplementedError(f"{name}: FSDP2 local shard of shape {tuple(p.to_local().shape)}, "
                                      f"expected torch.chunk rows {tuple(local.shape)}")
        g = DTensor.from_local(local.to(p.dtype), p.device_mesh, p.placements, run_check=False,
                               shape=p.shape, stride=p.stride())
        if p.grad is None:
            p.grad = g
        else:  # kept, as without FSDP: the non-per-task part already there
            p.grad.add_(g)


def sharded_project(buf: torch.Tensor, plan: ShardPlan, offsets, *, reduction: str, generator,
                    group=None, average: bool = True, gather: bool = True, backend: str | None = None,
                    aggregator=None, present: torch.Tensor | None = None):
    """Steps 1-5 of the module docstring for the local ``[T, N]`` buffer ``buf``.

    Returns ``(result, shard)``: the :class:`~ortholora_kernels.AggregationResult` of one step
    of ``aggregator`` (an :class:`~ortholora_kernels.Aggregator`; default the plain PCGrad
    projection) whose ``output`` is the full ``[N]`` when ``gather`` (DDP) or this rank's
    ``[L_r]`` shard otherwise (FSDP2), and the ``[T, L_r]`` reduced shard of the buffer.
    The composition is the pipeline's (:meth:`Aggregator.step_`: the backend's Gram over the
    shard, the Gram all-reduce as a Gram-stage hook, then ``present`` (bool ``[T]``, global),
    the EMA, the method's solve and the combine of the own shard); the orders are drawn as
    :func:`ortholora_kernels.project` draws them, so every rank and a one-process run agree.
    """
    if reduction == "none":
        raise ValueError("reduction: the sharded projection needs 'sum' or 'mean'")
    if aggregator is None:
        from ..aggregate import Aggregator
        aggregator = Aggregator("pcgrad")
    t = buf.shape[0]
    shard = reduce_scatter_buffer(buf, plan, group, average)
    name = backends.select(backend, shard.device, t)
    res = aggregator.step_(shard, plan.local_offsets, reduction=reduction, backend=name, generator=generator,
                           present=present, hooks=[gram_sum_hook(group)], result_offsets=tuple(offsets),
                           return_stats=True)
    if gather:
        res.output = gather_output(res.output, plan, group)
    return res, shard
