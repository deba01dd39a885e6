"""Training methods: a registry of name -> :class:`Method` subclass.

A method decides (1) how the model is built from the encoder (default: one shared peft
LoRA adapter + one head per task), (2) whether tasks train together or one at a time
(``separate_tasks``), and (3) what one training step does between the forward pass and
``optimizer.step()`` (writing ``.grad``). New methods (MTL-LoRA, LoRI...) register with::

    @register_method
    class MyMethod(Method):
        name = "mine"
        help = "one line for --help"
        options = ("granularity",)        # method-specific CLI options it accepts
        def build_model(self, encoder, tasks): ...
        def backward(self, model, losses, task_ids): ...   # returns stats or None

Optional hooks (defaults do nothing): ``defaults`` / ``check_config`` (option defaults and
checks), ``is_separate(cfg)`` (one unit per task, may depend on the options),
``eval_context(model, task_index)`` (context of each task's evaluation forward, e.g.
MTL-LoRA's task routing), ``schedule_phases(total)`` (phases with their own warm-up/decay,
e.g. LoRI-D / LoRI-S), ``step_end(model, step, optimizer)`` (after the step's update and
evaluation, before its checkpoint), ``param_counts(model)`` (trainable scalars of adapter
and heads, reported in results.json/config.json/compare) and the class method
``post_train`` (after every unit, e.g. LoRI's merge). ``state_dict``/``load_state_dict``
hold whatever an exact resume needs beyond the trainable parameters (LoRI: its masks).

A method defined in another module is found when that module is imported; list it in
:data:`LAZY_METHODS` (name -> module) so the CLI imports it on demand (``mtl-lora``:
:mod:`.mtl_lora`, ``lori``: :mod:`.lori`). The training loop
passes ``model(input_ids, attention_mask, task_slices)`` (task_slices: the rows of each
task in the concatenated batch) and ``task_ids`` (CPU LongTensor) to ``backward``.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ..model import MultiTaskModel, add_lora

METHODS: dict = {}

#: methods living in modules that are imported on first use (name -> module)
LAZY_METHODS = {"mtl-lora": "ortholora_kernels.glue.methods.mtl_lora", "lori": "ortholora_kernels.glue.methods.lori"}

#: method-specific CLI options (dest names); a method lists those it accepts in ``options``
METHOD_OPTIONS = ("granularity", "collect", "backend", "log_conflicts", "projection", "mtl_num_b",
                  "mtl_temperature", "mtl_diagonal", "lori_sparsity", "lori_mode", "lori_shared_a",
                  "lori_s_steps", "lori_s_lr", "lori_s_weight_decay", "lori_s_schedule", "lori_merge_weights_d",
                  "lori_merge_weights_s", "aggregator", "aggregator_options", "aggregator_ema")


def register_method(cls):
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    METHODS[cls.name] = cls
    return cls


#: lazy methods whose optional third-party dependency is missing: name -> reason
_MISSING: dict[str, str] = {}


def _import_lazy(name: str) -> None:
    if name in METHODS or name not in LAZY_METHODS or name in _MISSING:
        return
    try:
        importlib.import_module(LAZY_METHODS[name])   # registers the method, if it defines one
    except ModuleNotFoundError as exc:
        # Only a missing third-party package makes a method unavailable; a broken module
        # of this package is a bug and must surface, not show up as "unknown method".
        if (exc.name or "").split(".")[0] == "ortholora_kernels":
            raise
        _MISSING[name] = f"needs the missing package {exc.name!r}"


def available_methods() -> list[str]:
    """Registered methods, plus lazy ones whose module exists and registers them."""
    for name in LAZY_METHODS:
        _import_lazy(name)
    return list(METHODS)


def get_method(name: str):
    """The method class registered as ``name`` (importing a lazy one); ValueError if unknown."""
    _import_lazy(name)
    try:
        return METHODS[name]
    except KeyError:
        if name in _MISSING:
            raise ValueError(f"method {name!r} {_MISSING[name]}") from None
        raise ValueError(f"unknown method {name!r} (known: {', '.join(available_methods())})") from None


class Method:
    """Base: one shared LoRA adapter; the loss is the sum of the per-task mean losses."""

    name = "base"
    help = ""
    options: tuple = ()
    segment_names: list = []  # names of the projection segments (for reports), if any
    separate_tasks = False   # True: one independent run per task (e.g. "single")
    defaults: dict = {}      # resolved defaults of method options left unset (recorded in config.json)

    @classmethod
    def is_separate(cls, cfg) -> bool:
        """One independent unit per task? (``separate_tasks``; may depend on the options)."""
        return cls.separate_tasks

    @classmethod
    def check_config(cls, cfg) -> None:
        """Method-specific option checks (raise ValueError with a one-line message)."""

    @classmethod
    def post_train(cls, cfg, tasks, datas, tokenizer, device, evals):
        """Called once after every unit has trained (e.g. LoRI's merge + evaluation);
        may append to ``evals``; returns extra fields for results.json (or None)."""
        return None

    def __init__(self, cfg, tasks):
        self.cfg = cfg
        self.tasks = tasks

    def build_model(self, encoder, tasks) -> MultiTaskModel:
        """The model: one shared peft LoRA adapter on the encoder plus one head per task."""
        c = self.cfg
        peft_model = add_lora(encoder, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules)
        return MultiTaskModel(peft_model, tasks, pooling=c.pooling)

    def setup(self, model) -> None:
        """Called once the model is built (e.g. to attach a projector)."""

    def teardown(self) -> None:
        """Called when the run (unit) ends: undo patches, free buffers."""

    def backward(self, model, losses, task_ids):
        """Write ``.grad`` from the per-task losses; return stats (or None)."""
        torch.stack(losses).sum().backward()
        return None

    def eval_context(self, model, task_index: int):
        """Context the evaluation forward of task ``task_index`` runs in (e.g. MTL-LoRA's
        task routing); default: nothing."""
        return contextlib.nullcontext()

    def schedule_phases(self, total: int) -> list:
        """The training phases, from the budget ``total`` (--max-steps/--epochs): step counts
        (own warm-up + linear decay each) or dicts ``{"steps", "lr_scale", "schedule":
        "linear"|"constant"}``; the unit trains their sum (LoRI: LoRI-D, then LoRI-S with its
        own budget and learning rate). Default: one phase of ``total``."""
        return [total]

    def step_end(self, model, step: int, optimizer) -> None:
        """After ``optimizer.step()`` and the evaluation of ``step``, before its checkpoint."""

    def param_counts(self, model) -> dict:
        """Trainable scalars: {"adapter": ..., "heads": ...} (requires_grad parameters of the
        encoder / of the heads)."""
        heads = sum(p.numel() for p in model.heads.parameters() if p.requires_grad)
        adapter = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
        return {"adapter": adapter, "heads": heads}

    def state_dict(self) -> dict:
        """What an exact resume needs beyond the trainable parameters (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        pass


@register_method
class Single(Method):
    """One adapter and head per task, each task trained on its own."""
    name = "single"
    help = "one adapter (and head) per task, each task trained on its own"
    separate_tasks = True


@register_method
class Joint(Method):
    """Summed task losses. With ``--log-conflicts`` the per-task LoRA gradients are collected
    (one grouped backward) only to log their conflicts; the update is still their plain sum."""

    name = "joint"
    help = "one shared adapter, summed task losses (multi-task LoRA baseline)"
    options = ("log_conflicts", "granularity")

    def setup(self, model):
        self.projector = None
        if self.cfg.log_conflicts:
            self.projector = make_projector(model, len(self.tasks), self.cfg.granularity or "ab", "grouped",
                                            self.cfg.seed, None)
            self.segment_names = list(getattr(self.projector, "segment_names", []) or [])
            # visiting orders for the statistics come from a private generator: the global
            # RNG (dropout) must advance exactly as in a plain joint run
            self.generator = torch.Generator(device=self.projector.buffer.device)
            self.generator.manual_seed(self.cfg.seed)

    def backward(self, model, losses, task_ids):
        p = self.projector
        if p is None:
            return super().backward(model, losses, task_ids)
        from ortholora_kernels import project

        with p.record(task_ids):
            torch.stack(losses).sum().backward()
        buf = p.buffer
        stats = project(buf, p.offsets, return_stats=True, backend=p.backend,  # statistics only
                        generator=self.generator)
        total = buf.sum(0)
        for param, v in zip(p.layout.params, p.layout.views(total)):
            param.grad = v if v.dtype == param.dtype else v.to(param.dtype)
        p.zero_grad()
        # the conflicts only: joint projects nothing, so no fraction projected is logged
        return {"conflict_fraction": stats.conflict_fraction, "mean_cosine": stats.mean_cosine,
                "cosine": stats.cosine}

    def teardown(self):
        if self.projector is not None:
            self.projector.remove()

    def state_dict(self):
        return {"generator": self.generator.get_state()} if self.projector is not None else {}

    def load_state_dict(self, state):
        if self.projector is not None and "generator" in state:
            self.generator.set_state(state["generator"])


@register_method
class Ortho(Method):
    """One shared adapter trained with Ortho-LoRA (per-task gradients projected every step)."""
    name = "ortho"
    help = ("shared adapter with Ortho-LoRA gradient projection (--granularity/--collect/--backend; "
            "--aggregator for UPGrad, CAGrad, ... instead of PCGrad)")
    options = ("granularity", "collect", "backend", "aggregator", "aggregator_options", "aggregator_ema")

    def setup(self, model):
        c = self.cfg
        self.projector = make_projector(model, len(self.tasks), c.granularity or "ab", c.collect or "grouped",
                                        c.seed, c.backend, **aggregator_kwargs(c))
        self.segment_names = list(getattr(self.projector, "segment_names", []) or [])

    def backward(self, model, losses, task_ids):
        return projected_backward(self.projector, self.cfg.collect, losses, task_ids)

    def teardown(self):
        remove = getattr(self.projector, "remove", None)
        if callable(remove):
            remove()

    def state_dict(self):
        return {"projector": projector_state(self.projector)}

    def load_state_dict(self, state):
        load_projector_state(self.projector, state.get("projector"))


# ----------------------------------------------------------------------------- projector glue

def make_projector(model, num_tasks, granularity, collect, seed, backend, **aggregator):
    """The package's :class:`ortholora_kernels.OrthoLoRA` over the model's shared peft adapter.

    ``aggregator``: :func:`aggregator_kwargs` (the ``aggregator`` object).
    """
    from ortholora_kernels import OrthoLoRA

    return OrthoLoRA(model, num_tasks=num_tasks, granularity=granularity, collect=collect, seed=seed,
                     backend=backend, **aggregator)


#: ``--projection`` values of the seed methods (MTL-LoRA, LoRI): a granularity, or none
PROJECTIONS = ("none", "global", "ab", "layer", "matrix")


def check_projection(cfg, method: str, hint: str = "") -> None:
    """Shared checks of --projection/--collect/--backend for the seed methods."""
    if cfg.projection is not None and cfg.projection not in PROJECTIONS:
        raise ValueError(f"--projection must be one of {', '.join(PROJECTIONS)}, not {cfg.projection!r}")
    if cfg.projection in (None, "none"):
        for opt in ("collect", "backend", "aggregator", "aggregator_options", "aggregator_ema"):
            if getattr(cfg, opt) is not None:
                raise ValueError(f"--{opt.replace('_', '-')} with --method {method} needs --projection (global, ab, layer or matrix)"
                                 + hint)


def make_seed_projector(cfg, params, num_tasks):
    """OrthoLoRA over the shared parameters of a seed-method adapter (AdapterParams)."""
    from ortholora_kernels import OrthoLoRA

    return OrthoLoRA(params.layout(), num_tasks=num_tasks, granularity=cfg.projection,
                     collect=cfg.collect or "grouped", seed=cfg.seed, backend=cfg.backend, **aggregator_kwargs(cfg))


def projected_backward(projector, collect, losses, task_ids, before_project=None):
    """One Ortho-LoRA step's backward (``ortho``, and the seed methods with --projection):
    per-task gradients of the projected parameters (``collect="loop"``: one backward per
    task; else one backward recorded by the grouped collector) -> ``before_project(projector)``
    if given -> projection -> ``.grad``; the other parameters get the ordinary gradient of
    the summed loss. Returns the statistics."""
    if collect == "loop":
        projector.backward(losses)
    else:
        with projector.record(task_ids):
            torch.stack(losses).sum().backward()
    if before_project is not None:
        before_project(projector)
    return projector.project_()


def parse_aggregator_options(text: str | None) -> dict:
    """``"c=0.5,iters=8,scale_mode=median"`` -> ``{"c": 0.5, "iters": 8, "scale_mode": "median"}``."""
    out: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--aggregator-options: expected key=value[,key=value...], got {item!r}")
        value = value.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def check_aggregator(cfg) -> None:
    """Validate --aggregator / --aggregator-options / --aggregator-ema (ValueError naming the flag)."""
    from ortholora_kernels import solvers

    if cfg.aggregator is not None and cfg.aggregator not in solvers.METHODS:
        raise ValueError(f"--aggregator must be one of {', '.join(solvers.METHODS)}, not {cfg.aggregator!r}")
    if cfg.aggregator_options and cfg.aggregator is None:
        raise ValueError("--aggregator-options needs --aggregator")
    try:
        solvers.check_options(cfg.aggregator or "pcgrad", parse_aggregator_options(cfg.aggregator_options))
    except TypeError as e:
        raise ValueError(f"--aggregator-options: {e}") from None
    if cfg.aggregator_ema is not None and not 0 <= cfg.aggregator_ema < 1:
        raise ValueError(f"--aggregator-ema must be in [0, 1), not {cfg.aggregator_ema}")


def aggregator_kwargs(cfg) -> dict:
    """OrthoLoRA's ``aggregator`` (method, options, EMA) from the config (default: PCGrad)."""
    from ortholora_kernels import Aggregator

    return {"aggregator": Aggregator(getattr(cfg, "aggregator", None) or "pcgrad",
                                     ema=getattr(cfg, "aggregator_ema", None),
                                     **parse_aggregator_options(getattr(cfg, "aggregator_options", None)))}


def _generators(p):
    """Public order generator(s) of a projector without ``state_dict()`` (none if absent)."""
    g = getattr(p, "generator", None)
    return [("generator", g)] if isinstance(g, torch.Generator) else []


def projector_state(p):
    """The projector's resumable state (for a checkpoint), through its public API only: its
    ``state_dict()`` (:meth:`ortholora_kernels.OrthoLoRA.state_dict`: the step count, the order
    generator and the aggregator's state), or, for a projector without one, its public
    ``generator`` and ``num_steps``."""
    if callable(getattr(p, "state_dict", None)):
        return {"state_dict": p.state_dict()}
    return {"generators": {a: g.get_state() for a, g in _generators(p)}, "num_steps": getattr(p, "num_steps", None)}


def load_projector_state(p, s):
    """Restore :func:`projector_state` (no-op for None). Reads the earlier formats too: the
    state dict under ``"ortholora"``, and, before that, the generator and the step count
    alone (the layout is then taken as this projector's own: the checkpoint's model weights
    were loaded into it already)."""
    if not s:
        return
    full = s.get("state_dict", s.get("ortholora"))
    if full is not None:
        p.load_state_dict(full)
        return
    from ortholora_kernels import OrthoLoRA

    gens = s.get("generators", {})
    if isinstance(p, OrthoLoRA):   # a checkpoint written before the harness used state_dict()
        if s.get("num_steps") is not None:
            p.load_state_dict({"num_steps": s["num_steps"], "generator": gens.get("_generator"),
                               "aggregator": s.get("aggregator"), "signature": p.signature()})
        return
    for a, g in _generators(p):
        if a in gens:
            g.set_state(gens[a])
    if s.get("num_steps") is not None and hasattr(p, "num_steps"):
        p.num_steps = s["num_steps"]
