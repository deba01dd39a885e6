"""Training-loop integration: collect per-task LoRA gradients -> project -> write ``.grad``.

    ortho = OrthoLoRA(model, num_tasks=3, granularity="ab", collect="grouped", seed=0)
    ...
    with ortho.record(task_ids):              # task ids of the concatenated batch
        loss = per_task_mean_loss(model(...), task_ids, 3).sum()   # forward may be outside too
        loss.backward()
    stats = ortho.project_()                  # projected sum -> LoRA .grad; heads untouched
    optimizer.step(); optimizer.zero_grad()

Works with any optimizer and scheduler (it only sets ``.grad``), gradient accumulation (call
``record``/``task`` per micro-batch, ``project_`` once per optimizer step), AMP with
``GradScaler`` (projection is scale-invariant and NaN/Inf pass through to the scaler),
``clip_grad_norm_`` after ``project_``, and ``torch.distributed`` (the per-task buffer is
all-reduced before projecting; see :mod:`ortholora_kernels.distributed`).

No gradient is lost: ``project_`` ADDS the projected sum to the LoRA ``.grad`` (None or zeros
after ``optimizer.zero_grad()``, so it is the projected sum in a usual loop). A gradient that
reaches a LoRA weight inside ``record`` without being per-task (a regulariser or auxiliary loss
on the shared weights, tokens of task id -1) stays in ``.grad``: it is added, NOT projected.
Under ``torch.distributed`` that part is averaged over the ranks as DDP would average it
(DDP is told to leave the LoRA parameters to OrthoLoRA); under FSDP2, FSDP reduce-scatters it.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Sequence

import torch
from torch import nn

from ._args import segments_for
from .collect import GroupedCollector, LoopCollector, _to_device, check_task_ids
from .layout import GRANULARITIES, LoRALayout
from .ops import project
from .result import ProjectionResult
from .rng import OrderGenerator

COLLECT_MODES = ("grouped", "loop")


def _compiled_backward_nodes(roots) -> set:
    """The AOTAutograd backward nodes (``CompiledFunctionBackward``: a ``torch.compile``'d
    region) reachable from the autograd nodes ``roots``."""
    seen, found, stack = set(), set(), [r for r in roots if r is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "CompiledFunctionBackward":
            found.add(fn)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return found


def _shared_compiled_backward(losses) -> tuple[int, int, set] | None:
    """``(i, j, regions)``: the first two of ``losses`` whose backward passes both run one
    compiled region's backward, and the regions they share; or None. One walk of the whole
    graph when nothing is compiled (eager)."""
    if len(losses) < 2 or not _compiled_backward_nodes([l.grad_fn for l in losses]):
        return None
    owner: dict = {}
    for j, loss in enumerate(losses):
        for fn in _compiled_backward_nodes([loss.grad_fn]):
            i = owner.setdefault(fn, j)
            if i != j:
                shared = {f for f, k in owner.items() if k == i} & _compiled_backward_nodes([loss.grad_fn])
                return i, j, shared
    return None


_LEGACY = ("method", "method_options", "ema", "every", "start")


def _aggregator_from(aggregator, legacy: dict):
    """The :class:`~ortholora_kernels.Aggregator` of ``OrthoLoRA(aggregator=..., **legacy)``."""
    from .aggregate import Aggregator
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"OrthoLoRA() got an unexpected keyword argument {unknown[0]!r}")
    defaults = {"method_options": None, "ema": None, "every": 1, "start": 0}
    legacy = {k: v for k, v in legacy.items() if k not in defaults or not (v == defaults[k] or v == {})}
    method = legacy.pop("method", None)
    if method is not None:
        if isinstance(aggregator, Aggregator) or aggregator != "pcgrad":
            raise TypeError("method: give the method once, as aggregator= (method= is its old name)")
        aggregator = method
    if legacy:
        import warnings
        warnings.warn(f"OrthoLoRA({', '.join(sorted(legacy))}=...): pass them to the aggregator instead, "
                      "e.g. aggregator=ortholora_kernels.Aggregator('upgrad', ema=0.9, every=2, c=0.5)",
                      DeprecationWarning, stacklevel=3)
        if isinstance(aggregator, Aggregator):
            raise TypeError(f"{sorted(legacy)[0]}: an Aggregator object carries its own options, EMA and schedule")
        opts = dict(legacy.pop("method_options", None) or {})
        return Aggregator(aggregator, **legacy, **opts)
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, str):
        return Aggregator(aggregator)
    raise TypeError(f"aggregator: expected an ortholora_kernels.Aggregator or a method name, "
                    f"got {type(aggregator).__name__}")


# Verdict of the retained-pass probe per compiled region (the class AOTAutograd makes for each
# compiled graph), for this process: True when repeated backward passes over one forward agree.
_RETAINED_OK: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()
# A repeated pass differs from the first by rounding at most (the same kernels on the same
# inputs); the in-place buffer fault seen with torch 2.13's inductor moves gradients by ~1e-3.
_PROBE_RTOL = 1e-6


def _leaves(loss) -> list[torch.Tensor]:
    """The leaf tensors ``loss.backward()`` would accumulate into (AccumulateGrad nodes)."""
    seen, out, stack = set(), [], [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return out


def _retained_passes_agree(loss) -> tuple[bool, float]:
    """Two backward passes of ``loss`` with ``retain_graph`` (``autograd.grad``: no ``.grad`` is
    written): whether the second equals the first, and their largest relative difference.

    A compiled backward that reuses, in place, a buffer the next pass still reads gives a
    second pass different from the first; a correct one repeats it."""
    leaves = _leaves(loss)
    first = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    worst = 0.0
    for a, b in zip(first, second):
        if a is None or b is None:
            if (a is None) != (b is None):
                return False, float("inf")
            continue
        a, b = a.detach().double(), b.detach().double()
        if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
            if not torch.equal(a.isnan(), b.isnan()) or not bool(((a == b) | a.isnan()).all()):
                return False, float("inf")
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst <= _PROBE_RTOL, worst


def retained_passes_ok(loss, regions) -> bool:
    """Whether T backward passes with ``retain_graph`` over the compiled ``regions`` reached by
    ``loss`` give the gradients eager would: probed on this loss the first time a region is
    seen (two passes through :func:`torch.autograd.grad`, no ``.grad`` written), then cached
    for the process. The probe measures what the running torch does on this machine: the
    inductor fault it looks for shows on some CPUs and thread counts and not on others."""
    kinds = {type(fn) for fn in regions}
    if all(k in _RETAINED_OK for k in kinds):
        return all(_RETAINED_OK[k] for k in kinds)
    ok, _ = _retained_passes_agree(loss)
    for k in kinds:
        _RETAINED_OK[k] = ok
    return ok


class OrthoLoRA:
    """Ortho-LoRA (PCGrad in the LoRA subspace, A and B apart) for an existing training loop.

    Args:
        model: a peft model (``LoRALayout.from_peft(model, adapter_name)``), or a
            :class:`LoRALayout` for any module structure.
        num_tasks: T >= 1.
        granularity: "global", "ab" (the paper's bipartite decoupling), "layer" or "matrix".
        collect: "grouped" (one backward for all tasks; patches the LoRA ``nn.Linear``
            forwards until :meth:`remove`) or "loop" (one backward per task, reads ``.grad``).
        reduction: "sum" (the paper) or "mean" of the projected task gradients.
        seed: seed of the generator that draws the visiting orders (a fresh order every
            step). ``None`` uses torch's global RNG (not allowed under ``torch.distributed``:
            every rank must draw the same orders).
        backend: the projection backend (see :func:`ortholora_kernels.project`).
        adapter_name: the peft adapter.
        buffer_dtype: dtype of the ``[T, N]`` buffer (default: the parameters' dtype).
        distributed: "auto" (reduce the buffer when ``torch.distributed`` is initialised
            with more than one rank), True (require it), or False.
        process_group: the group to reduce over (default: the world).
        aggregator: the method, its options and its state: an
            :class:`~ortholora_kernels.Aggregator` (``Aggregator("upgrad", ema=0.9)``,
            ``Aggregator("cagrad", c=0.5, every=2)``, :class:`~ortholora_kernels.GradVac`), or a
            method name (default "pcgrad", the paper's; any of
            :data:`ortholora_kernels.solvers.METHODS`), applied per segment in every mode (one
            process, DDP, ``comm="sharded"``, FSDP2). Its ``reduction``/``backend``/``generator``
            are OrthoLoRA's; it holds the state, so give each OrthoLoRA its own. A task with no example in a step (counted in ``record``/``task``,
            over all ranks) is left out of the method's solve (weight 0; the others get what
            the method gives on the present tasks alone). ``method=`` is the same as
            ``aggregator=`` with a name; ``method_options``, ``ema``, ``every`` and ``start``
            still work (a DeprecationWarning: pass them to ``Aggregator``).
        rng: "torch" (a ``torch.Generator`` seeded with ``seed``) or "counter" (an
            :class:`~ortholora_kernels.OrderGenerator`: the orders then compile with
            :meth:`project_` under ``torch.compile(fullgraph=True)`` and replay in CUDA graphs).
        comm: how the ranks' buffers meet under ``torch.distributed`` (ARCHITECTURE.md):
            "all_reduce" (the ``[T, N]`` buffer; the default under DDP), or "sharded"
            (reduce-scatter, all-reduce of the ``S x T x T`` Gram, local combine, all-gather of
            ``[N]``: ~(T+1)/(2T) of the bytes). Under FSDP2 (``fully_shard``, DTensor LoRA
            parameters) the sharded way is used and its shard is the sharded ``.grad``.
            See :mod:`ortholora_kernels.distributed`.
        check_finite: in ``project_``, raise ``FloatingPointError`` naming the tasks whose
            gradient holds NaN/Inf (one host read of the Gram's diagonal, the same on every
            rank) before any ``.grad`` is written; the step's task gradients are dropped and the
            aggregator's state (step count, schedule, EMA) is left as before the step. Default
            False: NaN/Inf propagate into ``.grad`` (GradScaler then skips the step) and the
            statistics show NaN.

    Attributes:
        layout: the :class:`LoRALayout`.
        last_stats: the :class:`ProjectionResult` of the last :meth:`project_` (device tensors:
            ``conflict_fraction``, ``mean_cosine``, ``cosine`` per segment), or None.
    """

    def __init__(self, model: nn.Module | LoRALayout, num_tasks: int, *, granularity: str = "ab",
                 collect: str = "grouped", reduction: str = "sum", seed: int | None = 0, backend: str | None = None,
                 adapter_name: str = "default", buffer_dtype: torch.dtype | None = None, distributed="auto",
                 process_group=None, aggregator="pcgrad", rng: str = "torch", comm: str | None = None,
                 check_finite: bool = False, **legacy):
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected an int >= 1, got {num_tasks!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
        if collect not in COLLECT_MODES:
            raise ValueError(f"collect: expected one of {COLLECT_MODES}, got {collect!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
        if distributed not in ("auto", True, False):
            raise ValueError(f"distributed: expected 'auto', True or False, got {distributed!r}")
        if rng not in ("torch", "counter"):
            raise ValueError(f"rng: expected 'torch' or 'counter', got {rng!r}")
        if comm not in (None, "all_reduce", "sharded"):
            raise ValueError(f"comm: expected None, 'all_reduce' or 'sharded', got {comm!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        if isinstance(model, LoRALayout):
            layout, module = model, None
        elif isinstance(model, nn.Module):
            # A DistributedDataParallel (or accelerate-prepared) model: the LoRA model is inside;
            # exclude_from_ddp below rebuilds DDP's reducer without the LoRA parameters.
            from torch.nn.parallel import DistributedDataParallel
            inner = model.module if isinstance(model, DistributedDataParallel) else model
            layout, module = LoRALayout.from_peft(inner, adapter_name), model
        else:
            raise TypeError(f"model: expected a peft model (nn.Module) or a LoRALayout, got {type(model).__name__}")
        self.layout = layout
        self.num_tasks = num_tasks
        self.granularity = granularity
        self.collect = collect
        self.reduction = reduction
        self.seed = seed
        self.backend = backend
        self.buffer_dtype = buffer_dtype
        self.distributed = distributed
        self.process_group = process_group
        self.aggregator = _aggregator_from(aggregator, legacy)
        self.method = self.aggregator.method
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected a bool, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        # Per-task example counts of the step (only for the methods that leave absent tasks out).
        self._counts: torch.Tensor | None = None
        self._agg_before: dict | None = None
        self.rng = rng
        self.comm = comm
        self._dist_ready = False
        self._shard_plan = None
        self.offsets = layout.segments(granularity)
        # Built (and cached) now: a project_() compiled later finds it cached, where one
        # that builds it would fail its own guard on the cache at the next call (a recompile).
        segments_for(self.offsets, layout.numel)
        self.segment_names = layout.segment_names(granularity)
        self.last_stats: ProjectionResult | None = None
        self._num_steps = 0
        # Steps projected inside a compiled graph: counted on the buffer's device, made with
        # the buffer (a Python int incremented in the graph would be a guard: a recompile
        # every step).
        self._graph_steps: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pending = False
        self._removed = False
        if collect == "grouped":
            self._collector = GroupedCollector(layout, num_tasks, self._get_buffer)
        else:
            self._collector = LoopCollector(layout, num_tasks, self._get_buffer)
        if rng == "counter":  # built now: a compiled project_() must find it, not create it
            self._get_generator(layout.device)
        if module is not None:
            from .distributed.reduce import exclude_from_ddp
            exclude_from_ddp(module, layout)
        self._dist_hooks = []
        if self.world_size() > 1:
            from .distributed.reduce import broadcast_params
            broadcast_params(layout.params, self.process_group)
            # First LoRA forward: a DDP wrapping the model (built now or later) is found and
            # told to leave the LoRA parameters alone, before its forward ends (and before
            # the reducer prepares the backward).
            hook = lambda *_: self._prepare_distributed()  # noqa: E731
            self._dist_hooks = [e.module.register_forward_pre_hook(hook) for e in layout.entries
                                if e.module is not None]

    def _prepare_distributed(self) -> None:
        """Once, before the first backward: release the LoRA parameters from any DDP holding them."""
        if self._dist_ready or not torch.is_grad_enabled():
            return
        self._dist_ready = True
        for h in self._dist_hooks:
            h.remove()
        self._dist_hooks = []
        if self.world_size() > 1:
            from .distributed.reduce import prepare_distributed
            prepare_distributed(self.layout, collect=self.collect, comm=self.comm, group=self.process_group)

    @property
    def num_steps(self) -> int:
        """The number of :meth:`project_` calls (optimizer steps). Those run inside a compiled
        graph are counted in a device tensor, which this reads (a host sync on a GPU)."""
        return self._num_steps + (0 if self._graph_steps is None else int(self._graph_steps))

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps = int(value)
        if self._graph_steps is not None:
            self._graph_steps.zero_()

    # ------------------------------------------------------------------ buffer
    @property
    def buffer(self) -> torch.Tensor:
        """The ``[T, N]`` per-task gradient buffer (allocated on first use)."""
        return self._get_buffer()

    def _get_buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = self.layout.new_buffer(self.num_tasks, self.buffer_dtype, self.layout.device)
            self._graph_steps = torch.zeros((), dtype=torch.int64, device=self._buffer.device)
        return self._buffer

    @property
    def pending(self) -> bool:
        """Whether task gradients were recorded since the last :meth:`project_`."""
        return self._pending

    def zero_grad(self) -> None:
        """Clear the accumulated per-task gradients (``project_`` does this by itself)."""
        if self._buffer is not None:
            self._buffer.zero_()
        self._pending = False
        self._counts = None

    def _check_live(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"{what}: this OrthoLoRA was removed (remove() or the end of its with-block); "
                               "build a new OrthoLoRA on the model to collect and project again")

    def _check_task(self, t) -> int:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = int(t)
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"task: expected an int task id, got {type(t).__name__}")
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task: task id {t} out of range [0, {self.num_tasks}) (num_tasks={self.num_tasks})")
        return t

    # ------------------------------------------------------------------ collection
    @contextlib.contextmanager
    def record(self, task_ids: torch.Tensor):
        """Context for ONE backward of ``sum_t mean-loss_t`` over a concatenated batch.

        ``task_ids`` is the ``[batch]`` task id of every example, or ``[batch, seq]`` the task
        id of every token (packed sequences: several documents of different tasks in one
        row; each task's weight gradient is then computed from its own tokens only, which
        equals the loop method when documents do not attend to each other). Id -1 marks an
        example or token of no task (padding, a prompt): its gradient goes to ``.grad``
        unprojected. A CPU tensor avoids a host sync. Needs ``collect="grouped"``. The
        forward may run inside or before the context; the backward must run inside. May be
        entered once per micro-batch: gradients accumulate until :meth:`project_`. Under
        ``torch.compile`` the forward must run inside too, and a compiled step may call
        :meth:`project_` inside (README).

        A gradient reaching a LoRA weight other than through its ``nn.Linear`` (an L2
        regulariser, an auxiliary loss on the shared weights) is kept in ``.grad`` and added
        to the projected sum by :meth:`project_`: it is not projected.
        """
        self._check_live("record")
        if self.collect != "grouped":
            raise RuntimeError("record: needs collect='grouped'; with collect='loop' use task(t) or backward(task_losses)")
        self._prepare_distributed()
        with self._collector.grouped(task_ids):
            self._count_tasks(task_ids)
            # Set on entry, not on exit: a step compiled as one graph runs project_() in here
            # (which leaves nothing pending).
            self._pending = True
            yield self

    @contextlib.contextmanager
    def task(self, t: int):
        """Context for the backward pass(es) of task ``t`` alone (separate per-task passes).

        With ``collect="loop"`` every LoRA gradient produced inside is task ``t``'s (a
        regulariser backward inside counts as task ``t``'s and is projected); with
        ``collect="grouped"`` what flows through the LoRA ``nn.Linear`` forwards is task ``t``'s
        and any other gradient stays in ``.grad``, unprojected, as in :meth:`record`. A
        ``.grad`` present before is kept.
        """
        self._check_live("task")
        t = self._check_task(t)
        self._prepare_distributed()
        with self._collector.task(t):
            yield self
        self._count_tasks(torch.tensor([t]))
        self._pending = True

    def backward(self, task_losses: Sequence[torch.Tensor], retain_graph: bool = False) -> None:
        """T backward passes over one forward: ``task_losses[t]`` -> row t (``retain_graph`` between).

        ``task_losses`` holds T scalar losses (a task absent from the batch may be ``None``).
        """
        self._check_live("backward")
        if isinstance(task_losses, torch.Tensor):
            if task_losses.dim() != 1:
                raise ValueError(f"task_losses: expected T scalar losses, got a tensor of shape {tuple(task_losses.shape)}")
            task_losses = list(task_losses.unbind(0))
        if len(task_losses) != self.num_tasks:
            raise ValueError(f"task_losses: expected {self.num_tasks} losses (num_tasks), got {len(task_losses)}")
        present = [t for t, l in enumerate(task_losses) if l is not None]
        for t in present:
            loss = task_losses[t]
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"task_losses: entry {t} must be a scalar tensor")
        shared = _shared_compiled_backward([task_losses[t] for t in present])
        if shared is not None:
            i, j = present[shared[0]], present[shared[1]]
            try:
                ok = retained_passes_ok(task_losses[i], shared[2])
            except RuntimeError as e:
                if "donated buffers" not in str(e):
                    raise
                ok = True  # the loop below raises the donated-buffer error with its way out
            if not ok:
                raise RuntimeError(
                    f"task_losses: the losses of tasks {i} and {j} come from ONE torch.compile'd forward, whose "
                    "compiled backward would run once per task with retain_graph; on this machine a probe found "
                    "that the running torch's compiled backward gives a second pass different from the first "
                    "(inductor reuses, in place, buffers the later passes still read), so the later tasks would "
                    "get wrong gradients. On a compiled model use collect='grouped' with record(task_ids) (one "
                    "backward for all tasks), or one forward and backward per task inside `with ortho.task(t)`, "
                    "or set torch._inductor.config.inplace_buffers = False before the first backward")
        for k, t in enumerate(present):
            loss = task_losses[t]
            with self.task(t):
                try:
                    loss.backward(retain_graph=retain_graph or k < len(present) - 1)
                except RuntimeError as e:
                    if "donated buffers" not in str(e):
                        raise
                    raise RuntimeError(
                        "backward: the model was compiled with donated buffers, which forbid the T backward "
                        "passes over one forward; set torch._functorch.config.donated_buffer = False before "
                        "compiling (or run one forward per task inside task(t))") from e
        self._pending = True

    # ------------------------------------------------------------------ projection
    def world_size(self) -> int:
        """The number of ranks the per-task buffer is reduced over: 1 with ``distributed=False`` or
        without an initialised ``torch.distributed`` (which ``distributed=True`` rejects), else the
        size of ``process_group``."""
        if self.distributed is False:
            return 1
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            if self.distributed is True:
                raise RuntimeError("distributed=True: torch.distributed is not initialised")
            return 1
        return dist.get_world_size(self.process_group)

    def _get_generator(self, device):
        if self.seed is None and self.rng == "torch":
            return None
        if self._generator is None:
            if self.rng == "counter":
                self._generator = OrderGenerator(self.seed or 0, device)
            else:
                self._generator = torch.Generator(device=device)
                self._generator.manual_seed(self.seed)
        return self._generator

    def _count_tasks(self, task_ids) -> None:
        """Add the step's per-task example counts (only where the method leaves absent tasks out:
        pcgrad needs none, an absent task's zero row changes nothing in it)."""
        if self.aggregator.method == "pcgrad":
            return
        ids = torch.as_tensor(task_ids).reshape(-1)
        c = (ids.unsqueeze(1) == torch.arange(self.num_tasks, device=ids.device)).sum(0).to(torch.float64)
        self._counts = c if self._counts is None else self._counts + c.to(self._counts.device)

    def _present(self, device, group=None) -> torch.Tensor | None:
        """``[T]`` bool: the tasks with an example in the step on any rank (None: not counted).

        ``group`` False: this process alone. Otherwise every rank joins the counts' all-reduce,
        one that recorded nothing with zeros (skipping it would leave the others waiting).
        Counts on the CPU reach a GPU through pinned memory, without blocking (no host sync)."""
        if self._counts is None:
            if group is False or self.aggregator.method == "pcgrad":
                return None
            counts = torch.zeros(self.num_tasks, dtype=torch.float64, device=device)
        else:
            # (traced: a plain copy, which the compiled graph schedules itself)
            counts = self._counts.to(device) if torch.compiler.is_compiling() else _to_device(self._counts, device)
        if group is not False:
            from .distributed.reduce import all_reduce_counts
            all_reduce_counts(counts, group)
        return counts > 0

    def project_(self) -> ProjectionResult:
        """Project the accumulated per-task gradients, write them to the LoRA ``.grad``, reset.

        Under ``torch.distributed`` the buffer is first reduced over the ranks (sum divided by
        the world size, matching DDP's gradient averaging; ``comm`` says how), and under FSDP2
        each rank handles its shard of the sharded ``.grad``. Each LoRA parameter's slice of the
        projected sum is ADDED to its ``.grad`` (set when ``.grad`` is None): what is already
        there (the non-per-task part collected inside ``record``, a backward outside any
        context) is kept, unprojected (under torch.distributed averaged over the ranks). Other
        parameters are untouched. NaN/Inf in the buffer propagate into ``.grad`` (so
        ``GradScaler`` skips the step) unless ``check_finite``.

        Returns the :class:`ProjectionResult` (device tensors, no host sync), also kept in
        :attr:`last_stats`.
        """
        self._check_live("project_")
        # check_finite: the aggregator's state before the step, restored if the step is refused
        self._agg_before = self.aggregator.state_dict() if self.check_finite and not self.aggregator.plain else None
        if self._buffer is None or not self._pending:
            raise RuntimeError("project_: no task gradients recorded since the last project_ "
                               "(run a backward inside record(...) / task(t), or backward(task_losses))")
        buf = self._buffer
        if self.world_size() > 1:
            if self.seed is None:
                raise ValueError("seed: must be an int under torch.distributed so every rank draws the same orders")
            res = self._project_distributed(buf)
        else:
            res = self._aggregate(buf, self._present(buf.device, group=False))
            self._check_finite(res)
            self._set_grads(self.layout.params, res.output)
        buf.zero_()
        self._pending = False
        self._counts = None
        self.last_stats = res
        if torch.compiler.is_compiling():
            self._graph_steps.add_(1)
        else:
            self._num_steps += 1
        return res

    def _check_finite(self, res) -> None:
        """With ``check_finite``: raise naming the tasks whose gradient holds NaN/Inf (from the
        Gram's diagonal, the same on every rank), before any ``.grad`` is written."""
        if not self.check_finite:
            return
        diag = torch.diagonal(res.gram, dim1=-2, dim2=-1)
        bad = (~torch.isfinite(diag)).any(0).nonzero().flatten().tolist()
        if bad:
            self.zero_grad()
            if self._agg_before is not None:   # a refused step leaves no trace (step count, schedule, EMA)
                self.aggregator.load_state_dict(self._agg_before)
            raise FloatingPointError(f"check_finite: the gradient of task(s) {bad} holds NaN or Inf "
                                     "(nothing was written to .grad; this step's task gradients are dropped)")

    def _aggregate(self, buf: torch.Tensor, present) -> ProjectionResult:
        """The (reduced) ``[T, N]`` buffer through the aggregator: the plain projection as the
        fused, differentiable op (a compiled step traces it), anything else as its step."""
        gen = self._get_generator(buf.device)
        if self.aggregator.plain:
            return project(buf, self.offsets, reduction=self.reduction, generator=gen, backend=self.backend,
                           return_stats=True)
        from .backends import select
        name = select(self.backend, buf.device, self.num_tasks)
        return self.aggregator.step_(buf, self.offsets, reduction=self.reduction, backend=name, generator=gen,
                                     present=present)

    def _project_distributed(self, buf: torch.Tensor) -> ProjectionResult:
        """More than one rank: reduce (all-reduce of ``[T, N]``, or the sharded way: reduce-scatter,
        Gram all-reduce, own-shard combine, all-gather; FSDP2: the shard is the sharded ``.grad``),
        aggregate, write ``.grad``. The pieces are :mod:`ortholora_kernels.distributed`'s."""
        from .distributed import reduce as dr
        from .distributed import sharded as ds
        group = self.process_group
        params = dr.current_params(self.layout)
        fsdp = dr.fsdp_sharded(self.layout, params)
        if fsdp:
            dr.fsdp_check(self.layout, params, collect=self.collect, comm=self.comm, group=group)
        else:  # FSDP2 reduce-scatters an ordinary LoRA .grad itself; DDP leaves it to us
            dr.reduce_leftover_grads(self.layout, params, group, buf.device)
        present = self._present(buf.device, group)
        if not fsdp and self.comm in (None, "all_reduce"):
            dr.all_reduce_task_grads(buf, group, average=True)
            res = self._aggregate(buf, present)
            self._check_finite(res)
            self._set_grads(params, res.output)
            return res
        import torch.distributed as dist
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        plan = self._shard_plan
        if plan is None or (plan.world, plan.rank) != (world, rank):
            plan = self._shard_plan = ds.ShardPlan(self.layout, self.offsets, world, rank)
        res, _ = ds.sharded_project(buf, plan, self.offsets, reduction=self.reduction,
                                    generator=self._get_generator(buf.device), group=group, gather=not fsdp,
                                    backend=self.backend, aggregator=self.aggregator, present=present)
        self._check_finite(res)
        if fsdp:
            ds.write_sharded_grads(params, plan, res.output, [e.name for e in self.layout.entries])
        else:
            self._set_grads(params, res.output)
        return res

    def _set_grads(self, params, flat: torch.Tensor) -> None:
        """Add the views of ``flat`` to ``params``' ``.grad`` (set when None)."""
        for p, v in zip(params, self.layout.views(flat)):
            if p.grad is None:
                # Each .grad gets its own memory (a copy, same values), not a view of the one
                # flat output: .grad views of a ._base that no one holds cannot be inputs of a
                # compiled step (torch 2.13 fails to compile them, or computes them wrongly).
                p.grad = v.clone() if v.dtype == p.dtype else v.to(p.dtype)
            else:
                p.grad.add_(v.to(p.grad.dtype))

    def signature(self) -> dict:
        """What a state must match to be loaded: parameter names and shapes, T, granularity, collect."""
        return {"names": list(self.layout.names), "shapes": [list(e.shape) for e in self.layout.entries],
                "num_tasks": self.num_tasks, "granularity": self.granularity, "collect": self.collect}

    def state_dict(self) -> dict:
        """Step count, the order generator's state (for resuming a run bit-exactly) and the
        layout :meth:`signature`. Tensors and plain types only (``torch.load(weights_only=True)``)."""
        gen = self._generator
        state = {"num_steps": self.num_steps, "seed": self.seed,
                 "generator": gen.get_state() if gen is not None else None, "signature": self.signature()}
        if not self.aggregator.plain:
            state["aggregator"] = self.aggregator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the generator is created on the parameters' device).

        Raises:
            ValueError: the state was saved for another layout (names the difference), or
                carries no signature.
        """
        if not isinstance(state, dict) or "num_steps" not in state:
            raise ValueError("state: expected a dict from OrthoLoRA.state_dict()")
        sig = state.get("signature")
        if sig is None:
            raise ValueError("state: no layout signature (not written by OrthoLoRA.state_dict() of this version); "
                             "refusing to load a state that cannot be checked against this model")
        mine = self.signature()
        for key in ("num_tasks", "granularity", "collect"):
            if sig.get(key) != mine[key]:
                raise ValueError(f"state: saved with {key}={sig.get(key)!r}, this OrthoLoRA has {key}={mine[key]!r}")
        names, shapes = list(sig.get("names", [])), [list(x) for x in sig.get("shapes", [])]
        if names != mine["names"]:
            extra = [n for n in names if n not in mine["names"]]
            missing = [n for n in mine["names"] if n not in names]
            raise ValueError(f"state: saved for other LoRA parameters ({len(names)} vs {len(mine['names'])}); "
                             f"only in the state: {extra[:3]}, only in this model: {missing[:3]}"
                             + ("" if extra or missing else " (same names, another order)"))
        for n, a, b in zip(names, shapes, mine["shapes"]):
            if a != b:
                raise ValueError(f"state: parameter {n} had shape {a}, here {b} (another LoRA rank?)")
        self.num_steps = int(state["num_steps"])
        if not self.aggregator.plain and state.get("aggregator") is not None:
            self.aggregator.load_state_dict(state["aggregator"])
        if state.get("generator") is not None:
            if self.seed is None:
                raise ValueError("state: carries an order generator but this OrthoLoRA has seed=None")
            self._get_generator(self.layout.device).set_state(state["generator"])

    def stats_dict(self, prefix: str = "ortho/", *, per_task: bool = True,
                   task_names: Sequence[str] | None = None) -> dict[str, float]:
        """The last step's statistics as floats, keyed for TensorBoard / W&B (a host sync).

        Per segment ``s``: ``{prefix}conflict_fraction/s``, ``{prefix}mean_cosine/s`` and
        ``{prefix}tasks_present/s`` (over the tasks present in the step: those with an example,
        as counted in ``record``/``task`` for the methods that leave absent tasks out; for
        pcgrad, those whose gradient is not all zeros), and with ``per_task``: ``{prefix}grad_norm/s/<task>`` (the
        unprojected task gradient's norm) and ``{prefix}cosine/s/<task_i>~<task_j>`` (i < j,
        the pairwise cosine matrix's upper triangle; 0 when a task is absent). ``task_names``
        (T strings) name the tasks; default ``task0``, ``task1``, ...
        """
        s = self.last_stats
        if s is None:
            return {}
        t = s.num_tasks
        names = [f"task{i}" for i in range(t)] if task_names is None else [str(n) for n in task_names]
        if len(names) != t:
            raise ValueError(f"task_names: expected {t} names (num_tasks), got {len(names)}")
        cf = s.conflict_fraction.tolist()
        mc = s.mean_cosine.tolist()
        npres = s.present.sum(-1).tolist()
        out = {}
        for name, a, b, k in zip(self.segment_names, cf, mc, npres):
            out[f"{prefix}conflict_fraction/{name}"] = a
            out[f"{prefix}mean_cosine/{name}"] = b
            out[f"{prefix}tasks_present/{name}"] = float(k)
        if per_task:
            norms = s.grad_norm.tolist()
            cos = s.cosine.tolist()
            for si, seg in enumerate(self.segment_names):
                for i in range(t):
                    out[f"{prefix}grad_norm/{seg}/{names[i]}"] = norms[si][i]
                for i in range(t):
                    for j in range(i + 1, t):
                        out[f"{prefix}cosine/{seg}/{names[i]}~{names[j]}"] = cos[si][i][j]
        return out

    def remove(self) -> None:
        """Undo the forward patches of the grouped collector (the model is plain peft again).

        An OrthoLoRA that is garbage-collected without ``remove()`` leaves patched layers that
        behave as plain linear layers, and a new OrthoLoRA may patch them again. After
        ``remove()``, ``record``/``task``/``backward``/``project_`` raise.
        """
        self._collector.remove()
        self._removed = True
        for h in self._dist_hooks:
            h.remove()
        self._dist_hooks = []

    def __enter__(self) -> "OrthoLoRA":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        agg = "" if self.aggregator.plain else f", aggregator={self.aggregator!r}"
        return (f"OrthoLoRA(num_tasks={self.num_tasks}, granularity={self.granularity!r}, collect={self.collect!r}, "
                f"reduction={self.reduction!r}{agg}, {self.layout!r})")
