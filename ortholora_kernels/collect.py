"""Per-task gradients of the shared LoRA parameters, written into a ``[T, N]`` buffer.

Two collectors give the same numbers (ARCHITECTURE.md, "Per-task gradients"):

* :class:`LoopCollector` (the paper's method): each task's gradient comes from its own
  backward pass (either a separate forward/backward per task batch, or T backward passes
  over one forward with ``retain_graph``). After each pass the LoRA ``.grad`` is moved into
  the task's buffer row (and reset to ``None``).

* :class:`GroupedCollector`: ONE forward and ONE backward of ``sum_t mean-loss_t`` over the
  concatenated batch. Every LoRA ``nn.Linear`` (peft's ``lora_A``/``lora_B``) runs through a
  custom autograd function whose backward computes the input gradient as usual, but instead
  of the summed weight gradient it writes, for every task t present in the batch,
  ``dW_t = dy_t^T x_t`` (sum over that task's examples and tokens) straight into row t of the
  buffer, and returns no weight gradient. The backbone's backward runs once, there is no
  ``retain_graph``, no per-example gradient, and the summed weight gradient is never formed.
  peft applies dropout before ``lora_A`` and the scaling after ``lora_B``: hooking the two
  ``nn.Linear`` modules sees exactly the dropped-out input and the scaled output gradient.

Requirements of the grouped collector: every shared LoRA matrix is the weight of an
``nn.Linear`` whose input has the batch as dimension 0 (and the sequence as dimension 1 for
per-token task ids ``[batch, seq]``: packed sequences). A gradient that reaches the weight
otherwise (a regulariser or auxiliary loss on the shared weights, weight tying) and the
gradient of rows/tokens of id -1 are not per-task: they stay in ``.grad`` and are added,
unprojected, to the projected sum (never dropped).

Where gradients go is decided when the backward runs (the routing), so the forward may run
inside or outside :meth:`GroupedCollector.grouped`; outside any routing the patched layers
produce the ordinary ``.grad`` (plain joint training, evaluation, ``no_grad``: unchanged).
"""
from __future__ import annotations

import contextlib
import itertools
import types
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layout import LoRALayout

__all__ = ["per_task_mean_loss", "check_task_ids", "TaskGroups", "LoopCollector", "GroupedCollector"]


def check_task_ids(task_ids, num_tasks: int) -> torch.Tensor:
    """Validate ``task_ids``: an integer tensor ``[batch]`` (one id per example) or ``[batch, seq]``
    (one id per token: packed sequences), with values in ``[0, num_tasks)`` or -1 (an example or
    token of no task: padding, a prompt).

    Returns a CPU int64 copy. A CUDA tensor costs one host sync here.
    """
    if not isinstance(task_ids, torch.Tensor):
        if isinstance(task_ids, (list, tuple)):
            task_ids = torch.as_tensor(task_ids)
        else:
            raise TypeError(f"task_ids: expected a LongTensor [batch] or [batch, seq], got {type(task_ids).__name__}")
    if task_ids.dim() not in (1, 2):
        raise ValueError(f"task_ids: expected a 1-D tensor [batch] or a 2-D tensor [batch, seq] (per-token ids), "
                         f"got shape {tuple(task_ids.shape)}")
    if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids: expected an integer tensor, got {task_ids.dtype}")
    if task_ids.numel() == 0:
        raise ValueError("task_ids: empty batch")
    ids = task_ids.detach().to("cpu", torch.int64)
    _check_id_range(ids, num_tasks)
    return ids


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t.to(device)``; a CPU tensor goes to a GPU through pinned memory without blocking
    (a copy from pageable memory waits for the device: a host sync)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_id_range(task_ids: torch.Tensor, num_tasks: int) -> None:
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < -1 or hi >= num_tasks:
            bad = lo if lo < -1 else hi
            raise ValueError(f"task_ids: task id {bad} out of range [0, {num_tasks}) (num_tasks={num_tasks}; "
                             "-1 marks an example or token of no task)")


def per_task_mean_loss(per_example_loss: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """``[T]`` mean loss of each task over its examples (or tokens) in the batch (0 for an absent task).

    ``per_example_loss`` and ``task_ids`` have the same shape: ``[batch]`` (per-example losses
    and ids) or ``[batch, seq]`` (per-token losses and ids of packed sequences: task t's loss
    is the mean over its tokens). Entries with id -1 (padding, prompts, tokens of no task)
    are left out. ``.sum()`` of the result is the loss whose one backward the grouped
    collector splits into the per-task gradients of the loop method. ``counts`` (``[T]``,
    optional) replaces the local per-task counts as denominators, e.g.
    :func:`ortholora_kernels.distributed.global_task_counts` so that
    data-parallel ranks with unequal per-task counts reproduce the union-batch mean.
    No host sync: ids on the CPU are checked on the host (a ValueError naming an id outside
    ``[0, T)`` and not -1, as :meth:`OrthoLoRA.record`); device ids by an asynchronous
    device assert.
    """
    if not isinstance(per_example_loss, torch.Tensor) or per_example_loss.dim() not in (1, 2) \
            or per_example_loss.shape != task_ids.shape:
        got = tuple(per_example_loss.shape) if isinstance(per_example_loss, torch.Tensor) else type(per_example_loss).__name__
        raise ValueError(f"per_example_loss: expected the shape of task_ids ([batch] or [batch, seq]) = "
                         f"{tuple(task_ids.shape)}, got {got}")
    loss = per_example_loss.reshape(-1)
    if not torch.compiler.is_compiling():
        if task_ids.device.type == "cpu":
            _check_id_range(task_ids, num_tasks)
        else:
            torch._assert_async(((task_ids >= -1) & (task_ids < num_tasks)).all(),
                                f"task_ids: a task id out of range [0, {num_tasks}) and not -1")
    ids = _to_device(task_ids, per_example_loss.device).long().reshape(-1)
    # id -1 goes to an extra bin T that is dropped (no boolean indexing: no host sync)
    ids = torch.where(ids < 0, torch.full_like(ids, num_tasks), ids)
    sums = loss.new_zeros(num_tasks + 1).index_add(0, ids, loss)[:num_tasks]
    if counts is None:  # not torch.bincount: on CUDA it reads the max id back to the host
        counts = torch.zeros(num_tasks + 1, dtype=torch.int64, device=ids.device).index_add_(
            0, ids, torch.ones_like(ids))[:num_tasks]
    elif counts.shape != (num_tasks,):
        raise ValueError(f"counts: expected shape [num_tasks] = [{num_tasks}], got {tuple(counts.shape)}")
    counts = _to_device(counts, per_example_loss.device).to(per_example_loss.dtype)
    return sums / torch.where(counts > 0, counts, torch.ones_like(counts))


class TaskGroups:
    """Which rows (examples, or tokens for ``[batch, seq]`` ids) belong to which task; built once
    per ``record``.

    When the rows are sorted by task (the usual concatenation of per-task batches) each task is
    a slice and nothing is copied; otherwise rows are gathered per task. Rows with id -1 form
    :attr:`unassigned` (None when there are none).
    """

    def __init__(self, task_ids: torch.Tensor, num_tasks: int):
        ids = check_task_ids(task_ids, num_tasks)
        self.shape = tuple(ids.shape)       # [batch] or [batch, seq]
        self.batch_size = ids.shape[0]
        self.ids = ids                      # as given, for the compiled path
        ids = ids.reshape(-1)
        self.num_rows = ids.numel()
        self.counts = torch.bincount(ids + 1, minlength=num_tasks + 1)[1:].tolist()
        n_none = self.num_rows - sum(self.counts)
        self.sorted = bool((ids[1:] >= ids[:-1]).all()) if ids.numel() > 1 else True
        self.groups: list[tuple[int, object]] = []
        self.unassigned = None
        if self.sorted:
            start = n_none                  # the -1 rows come first
            if n_none:
                self.unassigned = slice(0, n_none)
            for t, c in enumerate(self.counts):
                if c:
                    self.groups.append((t, slice(start, start + c)))
                start += c
        else:
            for t, c in enumerate(self.counts):
                if c:
                    self.groups.append((t, (ids == t).nonzero().squeeze(1)))
            if n_none:
                self.unassigned = (ids < 0).nonzero().squeeze(1)
        # Sorted with every task present and the same count: one batched product per layer.
        self.uniform = self.sorted and n_none == 0 and len(set(self.counts)) == 1
        self._on_device: dict = {}

    def rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` (a LoRA layer input or output gradient) with the id dimensions flattened into
        dimension 0, so that :meth:`select` picks examples or tokens."""
        k = len(self.shape)
        if x.dim() <= k or tuple(x.shape[:k]) != self.shape:
            raise RuntimeError(
                f"task_ids: has shape {list(self.shape)} but the LoRA layer {what} saw an input of shape "
                f"{tuple(x.shape)}; the batch (and, for per-token ids, the sequence) must lead every LoRA input"
            )
        return x.flatten(0, k - 1) if k > 1 else x

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The ``[batch]`` int64 task ids on ``device`` (copied once, without blocking)."""
        key = (device, "ids")
        ids = self._on_device.get(key)
        if ids is None:
            # Its own tensor (never an alias of the caller's task ids, which a compiled step
            # may also take as an input).
            ids = self._on_device[key] = _to_device(self.ids, device).clone()
            # The batch size varies between steps: a compiled forward should read it as a
            # symbol (one recompile in all), not specialise on each size it meets.
            torch._dynamo.maybe_mark_dynamic(ids, 0)
        return ids

    def select(self, sel, x: torch.Tensor) -> torch.Tensor:
        """Rows ``sel`` (a slice or an index tensor from :attr:`groups`) of ``x`` along dimension 0."""
        if isinstance(sel, slice):
            return x[sel]
        key = (x.device, id(sel))
        idx = self._on_device.get(key)
        if idx is None:
            idx = self._on_device[key] = _to_device(sel, x.device)
        return x.index_select(0, idx)


class LoopCollector:
    """Per-task gradients from one backward pass per task (the paper's loop).

    Wrap each task's backward in :meth:`task`: the LoRA ``.grad`` produced inside is added
    into the task's buffer row and reset to ``None``. Other parameters (heads) accumulate ``.grad`` as usual.
    """

    def __init__(self, layout: LoRALayout, num_tasks: int, get_buffer):
        self.layout = layout
        self.num_tasks = num_tasks
        self._get_buffer = get_buffer
        self._active = False

    @contextlib.contextmanager
    def task(self, t: int):
        """Context: the LoRA ``.grad`` produced inside is added into task ``t``'s buffer row.

        A ``.grad`` present before the context (zeros from ``zero_grad(set_to_none=False)``, or
        a gradient of a backward outside any context) is set aside and put back afterwards, so
        :meth:`OrthoLoRA.project_` adds the projected sum to it: it is never lost. (So zero the
        gradients before collecting, not inside this context.)
        """
        buf = self._get_buffer()
        if self._active:
            raise RuntimeError("task: contexts do not nest")
        params = self.layout.params
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        self._active = True
        try:
            yield
            views = self.layout.views(buf[t])
            for p, v in zip(params, views):
                if p.grad is not None:
                    v.add_(p.grad)
        finally:
            self._active = False
            for p, g in zip(params, before):
                p.grad = g

    def remove(self):
        """Nothing to undo (the loop collector patches nothing)."""


def _accumulate(dst: torch.Tensor, dy2: torch.Tensor, x2: torch.Tensor) -> None:
    """``dst += dy2^T @ x2`` (dst ``[out, in]``), without a temporary when dtypes agree."""
    if dy2.dtype == dst.dtype and x2.dtype == dst.dtype:
        dst.addmm_(dy2.t(), x2)
    else:
        dst.add_(dy2.t().mm(x2.to(dy2.dtype)))


class _Slot:
    """Where a patched module's weight gradient goes: a weak reference to its collector (a
    collector that was garbage-collected without ``remove()`` leaves a plain linear layer)."""

    __slots__ = ("_ref", "index")

    def __init__(self, collector, index):
        self._ref, self.index = weakref.ref(collector), index

    @property
    def collector(self):
        return self._ref()


class _RoutedLinear(torch.autograd.Function):
    """``y = x W^T`` whose backward routes the weight gradient through the collector."""

    @staticmethod
    def forward(ctx, x, weight, slot):
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dy.matmul(w.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            col = ctx.slot.collector
            if col is None:  # collector gone: ordinary gradient
                dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
                dw = dy2.t().mm(x2.to(dy2.dtype)).to(w.dtype)
            else:
                dw = col._weight_grad(ctx.slot.index, x, dy, w)
        return dx, dw, None


def task_weight_grads(x: torch.Tensor, dy: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``[T, out, in]``: ``dW_t = sum over the rows of task t of dy^T x`` with static shapes.

    ``x`` is ``[*lead, in]``, ``dy`` is ``[*lead, out]`` and ``task_ids`` holds a task id for
    the leading dimensions it covers (``[batch]``, or ``[batch, seq]`` per token). The task
    one-hot multiplies the SMALLER feature side (a LoRA rank r), so the one product has an
    inner size of ``T * r``: no host sync, no data-dependent shape, so it traces, compiles
    and captures. Ids outside ``[0, T)`` select no row.
    """
    onehot = (task_ids.unsqueeze(-1) == torch.arange(num_tasks, device=task_ids.device)).to(dy.dtype)
    onehot = onehot.view(*task_ids.shape, *([1] * (dy.dim() - 1 - task_ids.dim())), num_tasks, 1)
    x = x.to(dy.dtype)
    o, i = dy.shape[-1], x.shape[-1]
    if o <= i:  # lora_A (out = r): expand dy
        dye = (dy.unsqueeze(-2) * onehot).reshape(-1, num_tasks * o)
        return dye.t().mm(x.reshape(-1, i)).view(num_tasks, o, i)
    xe = (x.unsqueeze(-2) * onehot).reshape(-1, num_tasks * i)  # lora_B (in = r): expand x
    return dy.reshape(-1, o).t().mm(xe).view(o, num_tasks, i).transpose(0, 1)


class _TracedTaskLinear(torch.autograd.Function):
    """``y = x W^T`` whose backward returns the per-task weight gradients as the gradient of
    ``sink`` (a ``[T, out, in]`` leaf whose ``.grad`` is a view of the per-task buffer, so the
    autograd engine accumulates them in place) and none for the weight. Purely functional:
    no Python state is read or written in the backward, so Dynamo/AOTAutograd trace it."""

    @staticmethod
    def forward(ctx, x, weight, sink, task_ids):
        ctx.save_for_backward(x, weight, task_ids)
        ctx.num_tasks = sink.shape[0]
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, w, ids = ctx.saved_tensors
        dx = dy.matmul(w.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # The weight is connected only when the batch has rows of task id -1: their part
            # is the ordinary gradient (as in eager), one more static-shape product: the rows
            # of id -1 are "task 0" of a one-task split, every other row is out of range.
            dw = task_weight_grads(x, dy, (ids >= 0).long(), 1)[0].to(w.dtype)
        return dx, dw, task_weight_grads(x, dy, ids, ctx.num_tasks), None


class _TraceRoute:
    """The routing a compiled forward reads (one per collector, shared by its modules): the
    ``task_ids`` tensor the graph consumes, or None (ordinary gradients). Written only
    outside the graph (entering/leaving ``record``/``task``)."""

    __slots__ = ("task_ids", "unassigned")

    def __init__(self):
        self.task_ids = None
        self.unassigned = False  # rows of task id -1 in the batch


# Collector key -> its _TraceRoute. A module-level table rather than an attribute of the
# nn.Linear: Dynamo gives tensors reached through a builtin nn.Module static shapes, and the
# task ids must follow the batch size as a symbol.
_TRACE_ROUTES: dict[int, _TraceRoute] = {}
_ROUTE_KEYS = itertools.count()


def _traced_forward(module: nn.Linear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Under torch.compile the routing is read when the FORWARD is traced (the compiled
    # backward is built ahead of time from what the forward saved): run it inside record().
    route = _TRACE_ROUTES.get(module._ortholora_route)
    ids = None if route is None else route.task_ids
    if ids is None:
        return F.linear(x, w)
    if ids.dim() == 0:  # task(t): the whole batch is task t
        ids = ids.expand(x.shape[0])
    if x.dim() < 2 or tuple(x.shape[:ids.dim()]) != tuple(ids.shape):
        raise RuntimeError(f"task_ids: has shape {tuple(ids.shape)} but a LoRA layer saw an input of shape "
                           f"{tuple(x.shape)}; the batch must be dimension 0 of every LoRA input")
    # Rows of task id -1 give the weight its ordinary gradient (kept in .grad, unprojected):
    # only then is the weight connected, so that .grad stays None otherwise, as in eager.
    return _TracedTaskLinear.apply(x, w if route.unassigned else w.detach(), module._ortholora_sink, ids)


def _eager_forward(module: nn.Linear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Eager: the routing is read when the backward runs (see the module docstring).
    return _RoutedLinear.apply(x, w, module._ortholora_slot)


def _routed_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = module.weight
    compiling = torch.compiler.is_compiling()
    if not (torch.is_grad_enabled() and w.requires_grad) or (not compiling and module._ortholora_slot.collector is None):
        return F.linear(x, w, module.bias)
    apply = _traced_forward if compiling else _eager_forward
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        # What autocast does to F.linear, done by hand so the function sees one dtype.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            y = apply(module, x.to(dt), w.to(dt))
    else:
        y = apply(module, x, w)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y


_LAYOUT_WARNING_SEEN = False
_PATCH_ATTRS = ("_ortholora_slot", "_ortholora_route", "_ortholora_sink")


class GroupedCollector:
    """Per-task LoRA gradients from one backward pass (grouped ``dy_t^T x_t`` products).

    Patches the ``forward`` of every layout entry's ``nn.Linear`` (instance attribute, undone
    by :meth:`remove`). Routing, read when the backward runs:

    * inside :meth:`grouped` (``task_ids`` of the batch): rows of task t -> buffer row t;
    * inside :meth:`task` (``t``): the whole batch -> buffer row t;
    * otherwise: the ordinary ``.grad`` (nothing changes for plain training or eval).

    The batch dimension of every LoRA layer input must be dimension 0 (``[batch, ...,
    features]``, as in Hugging Face models).
    """

    def __init__(self, layout: LoRALayout, num_tasks: int, get_buffer):
        self.layout = layout
        self.num_tasks = num_tasks
        self._get_buffer = get_buffer
        self._route: tuple | None = None
        self._views: list[torch.Tensor] | None = None
        self._views_of = None
        missing = [e.name for e in layout.entries if not isinstance(e.module, nn.Linear)]
        if missing:
            raise ValueError(
                "collect: 'grouped' needs every shared LoRA matrix to be the weight of an nn.Linear "
                f"(peft lora_A/lora_B); these are not: {missing[:4]}{'...' if len(missing) > 4 else ''}. "
                "Use collect='loop', or give the nn.Linear modules to LoRALayout.from_params."
            )
        for e in layout.entries:
            m = e.module
            old = m.__dict__.get("_ortholora_slot")
            if old is not None and old.collector is None:  # left by a collector that no longer exists
                for name in ("forward",) + _PATCH_ATTRS:
                    m.__dict__.pop(name, None)
            if "forward" in m.__dict__ or hasattr(m, "_ortholora_slot"):
                raise RuntimeError(f"collect: the module of {e.name} already has a patched forward "
                                   "(another OrthoLoRA on the same model? call .remove() on it first)")
            if m.weight is not e.param:
                raise ValueError(f"{e.name}: the parameter is not the weight of its nn.Linear")
        self._patched = []
        self._trace = _TraceRoute()
        key = next(_ROUTE_KEYS)
        _TRACE_ROUTES[key] = self._trace
        weakref.finalize(self, _TRACE_ROUTES.pop, key, None)
        self._sinks_of = None
        self._sink_grads: list[torch.Tensor] = []
        for i, e in enumerate(layout.entries):
            m = e.module
            m._ortholora_slot = _Slot(self, i)
            m._ortholora_route = key
            m.forward = types.MethodType(_routed_forward, m)
            self._patched.append(m)

    def remove(self) -> None:
        """Restore the original ``forward`` of every patched module."""
        for m in self._patched:
            m.__dict__.pop("forward", None)
            for name in _PATCH_ATTRS:
                m.__dict__.pop(name, None)
        self._patched = []
        self._trace.task_ids = None

    def _prepare_traced(self, buf: torch.Tensor) -> None:
        """Give every patched module its ``[T, out, in]`` sink for the compiled path: a leaf
        whose ``.grad`` IS its slice of ``buf``, so the engine's in-place accumulation lands in
        the buffer. Its value is never read: one element broadcast (no memory, and no
        aliasing of the buffer that a graph holding project_() would have to untangle).

        Each ``.grad`` has the memory of the slice but no ``._base``: a whole step compiled as
        one graph takes them as inputs beside the buffer, and torch 2.13 cannot compile input
        views of a ``._base`` that is not itself an input ("sources must not be empty for
        symbol", "non-differentiable view input mutations"). Such a graph leaves views in
        ``.grad`` (same memory): they are put back here, outside the graph, on each entry."""
        if self._sinks_of is not buf:
            self._sink_grads = []
            for m, v in zip(self._patched, self.layout.views(buf)):
                m._ortholora_sink = torch.empty_strided(v.shape, (0,) * v.dim(), dtype=v.dtype,
                                                        device=v.device).requires_grad_()
                self._sink_grads.append(torch.empty(0, dtype=v.dtype, device=v.device).set_(
                    buf.untyped_storage(), v.storage_offset(), v.shape, v.stride()))
            self._sinks_of = buf
        for m, g in zip(self._patched, self._sink_grads):
            if m._ortholora_sink.grad is not g:
                m._ortholora_sink.grad = g
        sink = self._patched[-1]._ortholora_sink
        global _LAYOUT_WARNING_SEEN
        if not _LAYOUT_WARNING_SEEN:
            # The slices of a [T, N] buffer are strided, so the engine warns ONCE per process
            # that the .grad it adds into breaks the "gradient layout contract" (a performance
            # note for optimizers). Intended here: consume that one warning silently, adding 0.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.autograd.backward(sink, torch.zeros_like(sink))
            _LAYOUT_WARNING_SEEN = True

    def _row_views(self) -> list[torch.Tensor]:
        buf = self._get_buffer()
        if self._views_of is not buf:
            self._views = self.layout.views(buf)  # [T, *shape] per entry
            self._views_of = buf
        return self._views

    @contextlib.contextmanager
    def _routing(self, route):
        if self._route is not None:
            raise RuntimeError("record/task: contexts do not nest")
        buf = self._get_buffer()
        self._prepare_traced(buf)
        # .grad is left alone: the routed weight gradients never reach it, so whatever
        # accumulates there inside is not per-task (a weight used outside its nn.Linear: a
        # regulariser, an auxiliary loss on the shared weights, weight tying; rows of task id
        # -1). It adds to what was there (a zero_grad inside the context works as usual), and
        # project_ adds the projected sum to it: kept, not projected.
        self._route = route
        kind, arg = route
        self._trace.unassigned = kind == "grouped" and arg.unassigned is not None
        self._trace.task_ids = (arg.on_device(buf.device) if kind == "grouped"
                                else torch.tensor(arg, dtype=torch.int64, device=buf.device))
        try:
            yield
        finally:
            self._route = None
            self._trace.task_ids = None

    def grouped(self, task_ids):
        """Context: backward passes inside split LoRA gradients by ``task_ids`` (``[batch]``, or
        ``[batch, seq]`` per-token ids; rows of id -1 give an ordinary, unprojected ``.grad``)."""
        return self._routing(("grouped", TaskGroups(task_ids, self.num_tasks)))

    def task(self, t: int):
        """Context: backward passes inside send all LoRA gradients to task ``t``'s row."""
        return self._routing(("task", t))

    def _weight_grad(self, index: int, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor):
        route = self._route
        if route is None:  # ordinary gradient
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            return dy2.t().mm(x2.to(dy2.dtype)).to(w.dtype)
        views = self._row_views()[index]
        kind, arg = route
        if kind == "task":
            _accumulate(views[arg], dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]))
            return None
        groups: TaskGroups = arg
        name = self.layout.entries[index].name
        x, dy = groups.rows(x, name), groups.rows(dy, name)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        allv = views
        if groups.uniform and dy2.dtype == allv.dtype and x2.dtype == allv.dtype:
            t = self.num_tasks  # rows of task k are the k-th contiguous block of the batch
            allv.baddbmm_(dy2.reshape(t, -1, dy2.shape[-1]).transpose(1, 2), x2.reshape(t, -1, x2.shape[-1]))
            return None
        for t, sel in groups.groups:
            xs = groups.select(sel, x)
            ds = groups.select(sel, dy)
            _accumulate(views[t], ds.reshape(-1, ds.shape[-1]), xs.reshape(-1, xs.shape[-1]))
        if groups.unassigned is not None:
            # rows of no task (id -1): their part is the ordinary (unprojected) gradient
            xs = groups.select(groups.unassigned, x)
            ds = groups.select(groups.unassigned, dy)
            ds2, xs2 = ds.reshape(-1, ds.shape[-1]), xs.reshape(-1, xs.shape[-1])
            return ds2.t().mm(xs2.to(ds2.dtype)).to(w.dtype)
        return None
