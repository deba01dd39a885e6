"""LoRI (arXiv 2504.07448): LoRA with a frozen random A and a sparse B.

For a frozen linear layer y = W x + b, LoRI adds

    dy = (alpha / r) * (B * M) @ A @ dropout(x)

    A  (r, in)    frozen at its random initialisation (Kaiming-uniform, a=sqrt(5): peft's
                  default LoRA init, U(-1/sqrt(in), 1/sqrt(in))), drawn from a generator
                  seeded by (seed, module name): adapters built with the same seed on the
                  same architecture have bit-identical A, whatever else the model holds,
                  the device, or the global RNG state. A is a buffer, not a parameter: no
                  optimizer or gradient buffer ever sees it.
    B  (out, r)   the only trainable matrix, zero init.
    M  (out, r)   optional fixed 0/1 mask (LoRI-S); no mask means dense B (LoRI-D).

Training pipeline (the paper's two stages, as the authors' scripts run them):

    apply_lori(model, target_modules, r, alpha, seed)  # LoRI-D: dense B, A frozen
    ... train ...
    masks = lori_mask(model, sparsity=0.9)   # global magnitude mask over ALL B's of the model,
                                             # the authors' extract_mask.py rule (below)
    apply_lori_mask(model, masks)            # LoRI-S: B restarts from zero (reset_b=True)
    ... train (a separate run in the authors' scripts: its own lr, constant schedule) ...

Mask (``lori_mask``, the authors' ``get_model_mask``): k = int((1 - sparsity) * N) over the N
B entries of the model (Python float arithmetic, so int(0.09999999999999998 * 1280) = 127),
threshold = the k-th largest |B|, kept = |B| >= threshold. Ties at the threshold are all kept
(more than k entries then), and with fewer than k nonzero entries the threshold is 0 and
every entry is kept. ``exclude`` (continual learning) zeroes the scores of entries already
taken by earlier tasks and drops them from the mask (extract_mask.py's ``& ~mask`` rule).

LoRI-S restarting from B = 0 is what the authors' code does (a fresh adapter; the mask only
zeroes gradients); ``reset_b=False`` keeps the LoRI-D values on the mask instead. The
authors' LoRI-S run also draws a fresh random A; here LoRI-S keeps LoRI-D's A (the mask was
chosen for it), a documented difference.

Masked entries stay exactly zero: the forward uses B * M (so autograd gives them exactly
zero gradient, and the effective weight is zero whatever the stored value), and the
stored B is zeroed at masking time. With zero gradients Adam/AdamW leave a zero entry at
zero (decoupled weight decay of 0 is 0, moments stay 0). An optimizer that carries Adam
moments over from LoRI-D moves the stored masked entries, but never the effective weight
B * M (what the forward, ``lori_mask``, save and merge use). For gradients written by other
means (e.g. a grouped Ortho-LoRA collector that forms dB itself) or optimizer state
carried over from LoRI-D, ``attach_lori_mask(optimizer, model)`` masks ``.grad`` before
and re-zeroes the weights after every ``optimizer.step()``; ``mask_lori_grads`` /
``enforce_lori_mask`` do the same by hand.

Continual learning (``stack_lori_task``): the adapter of the earlier tasks becomes a frozen
buffer ``lora_B_frozen`` (its entries: ``lora_frozen_mask``) added to the forward, and B
restarts at zero on the new task's mask: effective B = B * M + B_frozen. The earlier tasks'
entries are never touched by any optimizer (exactly kept, whatever the weight decay).

Trainable scalars per adapted module: out*r (LoRI-D); the number of kept mask entries
(LoRI-S). ``count_trainable`` counts this (``LoRILinear.trainable_numel``).

Multi-task merging (``merge_lori``): per-task LoRI adapters trained separately are merged
into one as the authors do, peft's ``add_weighted_adapter(..., combination_type="cat")``:
A = [w_1 s_1 A_1; ...; w_T s_T A_T], B = [B_1, ..., B_T] (rank sum_t r_t, scaling 1, peft's
lora_alpha = new rank), i.e. dW = sum_t w_t * s_t * B_t A_t; masks are concatenated. The
shared-A variant (every adapter has the same A) merges to the same dW at rank r:
B = sum_t w_t (s_t / s_1) B_t, mask = union. ``default_merge_weights(T, stage)`` gives the
authors' weights (LoRI-D 0.5 / LoRI-S 0.4 for T = 3, 0.4 / 0.3 for T = 4) and the rule for
other T.

Ortho-LoRA composition: ``lori_parameters(model)`` gives the shared trainable parameters
(only the B's, side "B"; A is frozen and never in the projection buffer), grouped by layer
key as ``LoRALayout.from_params`` expects; ``.entries()`` gives its 4-tuples.

Implementation choice: our own wrapper of nn.Linear (``LoRILinear``) rather than peft, so
A can be a seeded buffer and the mask part of the forward. It plugs into the same target
modules as peft LoRA (``target_modules`` names, peft matching rules) and keeps the base
parameter names (``...query.weight``); adapter tensors are ``...query.lora_A`` (buffer),
``...query.lora_B`` (parameter), ``...query.lora_mask`` (bool buffer, LoRI-S only).
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import (DEFAULT_KEEP_TRAINABLE, AdapterParams, adopt_frozen_base, check_dropout, check_rank,
                     find_targets, freeze_pretrained, layer_key, set_submodule)

__all__ = [
    "LoRILinear",
    "apply_lori",
    "lori_modules",
    "lori_mask",
    "apply_lori_mask",
    "remove_lori_mask",
    "mask_lori_grads",
    "enforce_lori_mask",
    "attach_lori_mask",
    "lori_parameters",
    "lori_state_dict",
    "save_lori",
    "load_lori",
    "merge_lori",
    "default_merge_weights",
    "official_keep_count",
    "stack_lori_task",
    "lori_param_count",
]


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _random_a(seed: int, name: str, r: int, in_features: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(_module_seed(seed, name))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    return (torch.rand(r, in_features, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


class LoRILinear(nn.Module):
    """A frozen nn.Linear plus a LoRI adapter (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, seed: int, name: str,
                 dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        adopt_frozen_base(self, base, dropout)
        self.r, self.alpha, self.seed = r, float(alpha), int(seed)
        self.scaling = float(scaling) if scaling is not None else self.alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("lora_A", _random_a(seed, name, r, self.in_features).to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.lora_mask: torch.Tensor | None
        self.register_buffer("lora_mask", None)
        # continual learning: the earlier tasks' B (values, entries), never trained
        self.lora_B_frozen: torch.Tensor | None
        self.lora_frozen_mask: torch.Tensor | None
        self.register_buffer("lora_B_frozen", None)
        self.register_buffer("lora_frozen_mask", None)

    def extra_repr(self) -> str:
        mode = "LoRI-D" if self.lora_mask is None else f"LoRI-S, kept={int(self.lora_mask.sum())}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}, {mode}"

    def effective_b(self) -> torch.Tensor:
        """B with the sparse mask applied (B itself before the mask exists), plus the
        frozen B of earlier tasks in continual learning."""
        b = self.lora_B
        b = b if self.lora_mask is None else b * self.lora_mask.to(b.dtype)
        return b if self.lora_B_frozen is None else b + self.lora_B_frozen.to(b.dtype)

    def nonzero_mask(self) -> torch.Tensor | None:
        """The entries of the effective B that may be nonzero (mask, union with the frozen
        entries), or None for a dense B."""
        if self.lora_mask is None:
            return None
        return self.lora_mask if self.lora_frozen_mask is None else self.lora_mask | self.lora_frozen_mask

    def trainable_numel(self, param: torch.Tensor) -> int:
        """Trainable scalars of ``param``, one of this module's parameters: under a LoRI-S
        mask only the kept entries of B train (:func:`~.common.count_trainable` asks)."""
        if param is self.lora_B and self.lora_mask is not None:
            return int(self.lora_mask.count_nonzero())
        return param.numel()

    def delta_weight(self) -> torch.Tensor:
        """The dense weight update ``scaling * effective_b() @ A`` (out, in)."""
        return self.scaling * self.effective_b() @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
        return out + F.linear(h, self.effective_b().to(h.dtype)) * self.scaling


def lori_modules(model: nn.Module) -> list[tuple[str, LoRILinear]]:
    """(name, LoRILinear) of every LoRI-adapted module of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRILinear)]


def _require(model) -> list[tuple[str, LoRILinear]]:
    mods = lori_modules(model)
    if not mods:
        raise ValueError("model has no LoRI modules (call apply_lori first)")
    return mods


def apply_lori(
    model: nn.Module,
    target_modules: Sequence[str] | str = ("query", "value"),
    r: int = 8,
    alpha: float = 16,
    seed: int = 0,
    dropout: float = 0.0,
    freeze_base: bool = True,
    keep_trainable: Sequence[str] | None = DEFAULT_KEEP_TRAINABLE,
    scaling: float | None = None,
) -> list[str]:
    """Wrap every nn.Linear matching ``target_modules`` (peft rules: a name equals a target
    or ends with ``.<target>``; a single string is a full-match regex) in a LoRILinear with
    A frozen from ``seed`` and B = 0 (LoRI-D). Freezing as in ``apply_mtl_lora``.
    ``scaling`` overrides alpha / r (used when loading a concatenation-merged adapter).
    Returns the adapted module names."""
    check_rank(r)
    check_dropout(dropout)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got seed={seed!r}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got alpha={alpha!r}")
    targets = find_targets(model, target_modules, (LoRILinear,))
    if freeze_base:
        freeze_pretrained(model, keep_trainable)
    names = []
    for name, lin in targets:
        set_submodule(model, name, LoRILinear(lin, r, alpha, seed, name, dropout, scaling))
        names.append(name)
    model._lori_config = dict(target_modules=names, r=r, alpha=float(alpha), seed=int(seed), dropout=float(dropout),
                              scaling=float(scaling) if scaling is not None else float(alpha) / r)
    return names


def lori_param_count(out_features: int, r: int) -> int:
    """Trainable scalars of one LoRI-D module (A is frozen)."""
    return out_features * r


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------


def _check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got sparsity={sparsity!r}") from None
    if not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return s


def official_keep_count(sparsity: float, n: int) -> int:
    """The authors' number of kept entries: ``int((1 - sparsity) * n)`` in Python floats."""
    return int((1 - _check_sparsity(sparsity)) * n)


@torch.no_grad()
def lori_mask(model: nn.Module, sparsity: float = 0.9, exclude: dict | None = None) -> dict[str, torch.Tensor]:
    """Global magnitude masks over all B matrices of the model together, the authors' rule:
    k = int((1 - sparsity) * N) (N = total B entries), threshold = the k-th largest |B|,
    keep |B| >= threshold (ties at the threshold are all kept; with fewer than k nonzero
    entries the threshold is 0 and every entry is kept). Uses the effective B.
    ``exclude`` ({module name: bool tensor}, continual learning): those entries score 0 and
    are never kept (the authors' ``& ~mask``). Returns {module name: bool tensor of B's shape}."""
    s = _check_sparsity(sparsity)
    mods = _require(model)
    scores, excl = [], []
    for name, m in mods:
        v = m.effective_b().detach().abs().float().reshape(-1).cpu()
        e = torch.zeros_like(v, dtype=torch.bool)
        if exclude is not None:
            if name not in exclude:
                raise ValueError(f"exclude has no mask for LoRI module {name!r}")
            e = torch.as_tensor(exclude[name]).to("cpu", torch.bool).reshape(-1)
            if e.numel() != v.numel():
                raise ValueError(f"exclude[{name!r}] has {e.numel()} entries, B has {v.numel()}")
            v = v.masked_fill(e, 0.0)
        scores.append(v)
        excl.append(e)
    flat, flat_ex = torch.cat(scores), torch.cat(excl)
    n = flat.numel()
    k = official_keep_count(s, n)
    if k < 1:
        raise ValueError(f"sparsity={sparsity!r} keeps int((1 - sparsity) * {n}) = 0 of the {n} B entries")
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    keep = (flat >= threshold) & ~flat_ex
    masks, off = {}, 0
    for name, m in mods:
        numel = m.lora_B.numel()
        masks[name] = keep[off: off + numel].reshape(m.lora_B.shape).clone()
        off += numel
    return masks


@torch.no_grad()
def apply_lori_mask(model: nn.Module, masks: dict[str, torch.Tensor], reset_b: bool = True) -> None:
    """Switch to LoRI-S: fix ``masks`` (from ``lori_mask``) on the B matrices. With
    ``reset_b`` (default) B restarts from zero, else it keeps its values on the mask."""
    mods = dict(_require(model))
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{module name: bool tensor}}, got {type(masks).__name__}")
    missing, extra = sorted(set(mods) - set(masks)), sorted(set(masks) - set(mods))
    if missing or extra:
        raise ValueError(f"masks do not match the LoRI modules: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, m in mods.items():
        mask = torch.as_tensor(masks[name])
        if mask.shape != m.lora_B.shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, B has {tuple(m.lora_B.shape)}")
        m.lora_mask = mask.to(device=m.lora_B.device, dtype=torch.bool).clone()
        if reset_b:
            m.lora_B.zero_()
        else:
            m.lora_B.mul_(m.lora_mask.to(m.lora_B.dtype))


def remove_lori_mask(model: nn.Module) -> None:
    """Back to dense B (LoRI-D); the stored values are kept (a frozen continual part is
    folded into B)."""
    for _, m in _require(model):
        if m.lora_B_frozen is not None:
            with torch.no_grad():
                m.lora_B.copy_(m.effective_b())
            m.lora_B_frozen = m.lora_frozen_mask = None
        m.lora_mask = None


@torch.no_grad()
def stack_lori_task(model: nn.Module, previous, masks: dict[str, torch.Tensor], reset_b: bool = True) -> None:
    """Continual learning: freeze the adapter of the earlier tasks (``previous``: a path or
    the dict of ``lori_state_dict``, same A as the model) as ``lora_B_frozen`` and train B
    from zero (``reset_b``; else B keeps its values on the mask, e.g. after a resume) on the
    new task's ``masks``. The forward then uses B * M + B_frozen."""
    d = _load_dict(previous)
    mods = dict(_require(model))
    st = d["state"]
    for name, m in mods.items():
        if f"{name}.lora_A" not in st:
            raise ValueError(f"previous adapter has no LoRI module {name!r}")
        if not torch.equal(st[f"{name}.lora_A"].cpu(), m.lora_A.cpu()):
            raise ValueError(f"{name}: the previous adapter's A differs from the model's (continual learning "
                             "trains one adapter: same seed, same rank)")
        if float(d["config"].get("scaling", m.scaling)) != m.scaling:
            raise ValueError(f"{name}: the previous adapter's scaling differs from the model's")
    apply_lori_mask(model, masks, reset_b=reset_b)
    for name, m in mods.items():
        b = st[f"{name}.lora_B"].to(m.lora_B.device, m.lora_B.dtype)
        prev_mask = st.get(f"{name}.lora_mask")
        prev_mask = (b != 0) if prev_mask is None else prev_mask.to(m.lora_B.device, torch.bool)
        m.lora_B_frozen = (b * prev_mask.to(b.dtype)).clone()
        m.lora_frozen_mask = prev_mask.clone()


@torch.no_grad()
def mask_lori_grads(model: nn.Module) -> None:
    """Zero the masked entries of every B's ``.grad`` (no-op without a mask)."""
    for _, m in lori_modules(model):
        if m.lora_mask is not None and m.lora_B.grad is not None:
            m.lora_B.grad.mul_(m.lora_mask.to(m.lora_B.grad.dtype))


@torch.no_grad()
def enforce_lori_mask(model: nn.Module) -> None:
    """Zero the masked entries of every stored B (no-op without a mask)."""
    for _, m in lori_modules(model):
        if m.lora_mask is not None:
            m.lora_B.mul_(m.lora_mask.to(m.lora_B.dtype))


def attach_lori_mask(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Mask the gradients before and the weights after each ``optimizer.step()``.
    Returns the two hook handles (``.remove()`` them to detach)."""
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: mask_lori_grads(model))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: enforce_lori_mask(model))
    return pre, post


# ---------------------------------------------------------------------------------------
# Ortho-LoRA composition
# ---------------------------------------------------------------------------------------


def lori_parameters(model: nn.Module) -> AdapterParams:
    """The shared trainable parameters for Ortho-LoRA: only the B's (side "B"), grouped by
    layer key; A is frozen and has no A-side entry. No task-specific parameters."""
    out = AdapterParams()
    for name, m in _require(model):
        if m.lora_B.requires_grad:
            out.add_shared(layer_key(name), "B", f"{name}.lora_B", m.lora_B)
    return out


# ---------------------------------------------------------------------------------------
# save / load / merge
# ---------------------------------------------------------------------------------------


def lori_state_dict(model: nn.Module) -> dict:
    """{"method": "lori", "config": {...}, "state": {name: tensor}} with the adapter only:
    ``<module>.lora_A``, ``<module>.lora_B`` (effective: masked, plus the frozen entries of
    earlier tasks) and ``<module>.lora_mask`` (LoRI-S: the entries that may be nonzero)."""
    mods = _require(model)
    m0 = mods[0][1]
    cfg = dict(getattr(model, "_lori_config", {}))
    cfg.update(target_modules=[n for n, _ in mods], r=m0.r, alpha=m0.alpha, seed=m0.seed, scaling=m0.scaling)
    cfg.setdefault("dropout", 0.0)
    state = {}
    for name, m in mods:
        state[f"{name}.lora_A"] = m.lora_A.detach().cpu().clone()
        state[f"{name}.lora_B"] = m.effective_b().detach().cpu().clone()
        if m.lora_mask is not None:
            state[f"{name}.lora_mask"] = m.nonzero_mask().detach().cpu().clone()
    return {"method": "lori", "config": cfg, "state": state}


def save_lori(model: nn.Module, path) -> None:
    """Save :func:`lori_state_dict` of ``model`` (adapter state and config) to ``path``."""
    torch.save(lori_state_dict(model), path)


def _load_dict(src) -> dict:
    d = src if isinstance(src, dict) else torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("method") != "lori":
        raise ValueError(f"not a LoRI adapter (method={d.get('method') if isinstance(d, dict) else None!r})")
    return d


@torch.no_grad()
def load_lori(model: nn.Module, src, freeze_base: bool = True, keep_trainable=DEFAULT_KEEP_TRAINABLE) -> nn.Module:
    """Load a LoRI adapter (a path or the dict from ``lori_state_dict``/``merge_lori``).
    A model without LoRI modules is adapted first from the saved config. A, B and the mask
    (if any) are replaced by the saved ones (so a merged adapter of a larger rank loads
    into a model adapted at the same rank)."""
    d = _load_dict(src)
    cfg = d["config"]
    if not lori_modules(model):
        apply_lori(model, "|".join(re.escape(n) for n in cfg["target_modules"]), r=cfg["r"], alpha=cfg["alpha"],
                   seed=cfg["seed"], dropout=cfg.get("dropout", 0.0), freeze_base=freeze_base,
                   keep_trainable=keep_trainable, scaling=cfg.get("scaling"))
        model._lori_config["target_modules"] = list(cfg["target_modules"])
    mods = dict(lori_modules(model))
    if sorted(mods) != sorted(cfg["target_modules"]):
        raise ValueError(f"adapter modules {sorted(cfg['target_modules'])} do not match the model's LoRI modules {sorted(mods)}")
    st = d["state"]
    for name, m in mods.items():
        a, b = st[f"{name}.lora_A"], st[f"{name}.lora_B"]
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise ValueError(f"{name}: adapter A{tuple(a.shape)} B{tuple(b.shape)} vs model "
                             f"A{tuple(m.lora_A.shape)} B{tuple(m.lora_B.shape)} (rank r={cfg['r']})")
        m.lora_A.copy_(a.to(m.lora_A.device, m.lora_A.dtype))
        m.lora_B.copy_(b.to(m.lora_B.device, m.lora_B.dtype))
        mask = st.get(f"{name}.lora_mask")
        m.lora_mask = None if mask is None else mask.to(device=m.lora_B.device, dtype=torch.bool).clone()
        m.lora_B_frozen = m.lora_frozen_mask = None
        m.alpha, m.seed = float(cfg["alpha"]), int(cfg["seed"])
        m.scaling = float(cfg.get("scaling", cfg["alpha"] / cfg["r"]))
    return model


#: the authors' merge weights (scripts/merge_3_loras.sh, merge_4_loras.sh): T -> weight per stage
OFFICIAL_MERGE_WEIGHTS = {"lori_d": {3: 0.5, 4: 0.4}, "lori_s": {3: 0.4, 4: 0.3}}


def default_merge_weights(num_tasks: int, stage: str) -> tuple[list[float], str]:
    """The merge weight of every adapter for ``stage`` ("lori_d" or "lori_s") and T tasks,
    with the rule used (a string for results.json).

    T = 3 and 4: the authors' values (LoRI-D 0.5 / 0.4, LoRI-S 0.4 / 0.3). They keep the total
    weight sum_t w_t nearly constant (LoRI-D 1.5 and 1.6, LoRI-S 1.2 and 1.2), i.e. w ~ c / T,
    so other T hold the total of the nearest official T (c = 1.5 below T = 3, 1.6 above
    T = 4 for LoRI-D; 1.2 for LoRI-S) and clamp at 1: a merged adapter never scales a task's
    own update beyond its trained size (T = 1 is the unmerged adapter, T = 2 gives 0.75 / 0.6)."""
    if stage not in OFFICIAL_MERGE_WEIGHTS:
        raise ValueError(f"stage must be lori_d or lori_s, got stage={stage!r}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got num_tasks={num_tasks!r}")
    table = OFFICIAL_MERGE_WEIGHTS[stage]
    if num_tasks in table:
        return [table[num_tasks]] * num_tasks, f"official (T={num_tasks})"
    nearest = 3 if num_tasks < 3 else 4
    total = table[nearest] * nearest
    w = min(1.0, total / num_tasks)
    return [w] * num_tasks, f"min(1, {total:g}/T): total weight of the official T={nearest}"


def merge_lori(adapters: Sequence, weights: Sequence[float] | None = None) -> dict:
    """Merge per-task LoRI adapters (paths or dicts from ``lori_state_dict``) into one, as
    peft's ``add_weighted_adapter(..., combination_type="cat")`` (the authors' merge):
    A = cat_t(w_t s_t A_t) along the rank, B = cat_t(B_t), scaling 1 (peft sets lora_alpha to
    the new rank), so dW = sum_t w_t * s_t * B_t A_t; masks are concatenated. When every
    adapter has the same A (the shared-A variant) the same dW is kept at rank r:
    B = sum_t w_t (s_t / s_1) B_t, mask = union. ``weights`` default to 1/T each (callers
    pass :func:`default_merge_weights`). Returns an adapter dict (``load_lori``/``save``)."""
    ds = [_load_dict(a) for a in adapters]
    if not ds:
        raise ValueError("adapters: need at least one LoRI adapter to merge")
    T = len(ds)
    if weights is None:
        weights = [1.0 / T] * T
    weights = [float(w) for w in weights]
    if len(weights) != T or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {T} finite numbers (one per adapter), got {weights!r}")
    names = list(ds[0]["config"]["target_modules"])
    for i, d in enumerate(ds[1:], 1):
        if sorted(d["config"]["target_modules"]) != sorted(names):
            raise ValueError(f"adapters[{i}] adapts other modules than adapters[0]")
    s0 = float(ds[0]["config"]["scaling"])
    same_a = T > 1 and all(
        torch.equal(d["state"][f"{n}.lora_A"], ds[0]["state"][f"{n}.lora_A"]) for d in ds[1:] for n in names
    )
    state = {}
    for n in names:
        masks = [d["state"].get(f"{n}.lora_mask") for d in ds]
        dtype_a, dtype_b = ds[0]["state"][f"{n}.lora_A"].dtype, ds[0]["state"][f"{n}.lora_B"].dtype
        if same_a:
            bs = [w * float(d["config"]["scaling"]) / s0 * d["state"][f"{n}.lora_B"].double()
                  for w, d in zip(weights, ds)]
            state[f"{n}.lora_A"] = ds[0]["state"][f"{n}.lora_A"].clone()
            state[f"{n}.lora_B"] = torch.stack(bs).sum(0).to(dtype_b)
            if all(m is not None for m in masks):
                state[f"{n}.lora_mask"] = torch.stack(masks).any(0)
        else:   # peft "cat": the weight and the scaling go into A, B is concatenated as is
            state[f"{n}.lora_A"] = torch.cat([(w * float(d["config"]["scaling"]) * d["state"][f"{n}.lora_A"].double())
                                              .to(dtype_a) for w, d in zip(weights, ds)], 0)
            state[f"{n}.lora_B"] = torch.cat([d["state"][f"{n}.lora_B"] for d in ds], 1).to(dtype_b)
            if all(m is not None for m in masks):
                state[f"{n}.lora_mask"] = torch.cat(masks, 1)
    cfg = dict(ds[0]["config"])
    if same_a:
        cfg.update(scaling=s0)
    else:
        r = sum(int(d["config"]["r"]) for d in ds)
        cfg.update(r=r, alpha=float(r), scaling=1.0)
    cfg.update(merged_from=T, merge_weights=weights, merge="sum_B" if same_a else "concat")
    return {"method": "lori", "config": cfg, "state": state}
