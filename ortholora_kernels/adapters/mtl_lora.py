"""MTL-LoRA (arXiv 2410.09437): LoRA with task-specific transforms and mixed up-projections.

For a frozen linear layer y = W x + b, MTL-LoRA adds, for an example of task t,

    dy = (alpha / r) * B_t @ Lambda_t @ A @ dropout(x)
    B_t = sum_k softmax(w_t / temperature)[k] * B_k

with
    A         (r, in)         shared down-projection (Kaiming-uniform init, as nn.Linear)
    Lambda_t  (r, r)          task-specific transform, identity at init
                              (``diagonal=True``: a vector (r,) of ones, Lambda_t = diag)
    B_k       (out, r)        n_B shared up-projections, zero init (so the model starts
                              exactly at the base model)
    w_t       (n_B,)          task-specific mixture logits (Kaiming-uniform init, as in
                              the reference code pUmpKin-Co/MTL-LoRA src/adapter/mlora.py)
    temperature               default 0.1, as in the reference training scripts

Trainable parameters per adapted module (``count_trainable``):

    r*in + T*r*r + n_B*out*r + T*n_B        (dense transforms)
    r*in + T*r   + n_B*out*r + T*n_B        (diagonal transforms)

Task routing. Hugging Face encoders do not pass extra arguments down to their Linear
layers, so the per-example task ids are set on the adapted modules before the forward
pass::

    with mtl_task_ids(model, task_ids):      # int, or 1-D LongTensor of batch length
        logits = model(input_ids=..., attention_mask=...).logits

(``set_mtl_task_ids(model, ids)`` / ``set_mtl_task_ids(model, None)`` does the same
without a ``with`` block). A forward pass without task ids raises. In a mixed-task batch
each example uses its own Lambda_t and mixture w_t (gathered per example; the grouped
product costs n_B small r -> out matmuls per adapted module). ``task_ids_from_slices``
turns the GLUE harness's ``task_slices`` into ids. Evaluation of task t: ``with
mtl_task_ids(model, t): ...``.

Ortho-LoRA composition. ``mtl_lora_parameters(model)`` splits the adapter into the
parameters shared by all tasks (A and the B_k: these are what task gradients fight over,
so these go into the projection buffer) and the task-specific ones (Lambda_t, w_t: only
task t's examples reach them, so they take ordinary gradients). Shared parameters are
grouped by layer key (the transformer layer, e.g. ``roberta.encoder.layer.0``) and side
("A": [A of each adapted module], "B": [B_1..B_nB of each adapted module]).

A and every B_k are bias-free ``nn.Linear`` submodules (``lora_A``: in -> r,
``lora_B[k]``: r -> out), called as modules: B_k is applied to mix_t[k] * Lambda_t A x
(sum_k B_k (mix_t[k] z) = B_t z), so the layout can remember them and Ortho-LoRA's grouped
collector (one backward for all tasks, ``collect="grouped"``) gets the exact per-task
gradients dA_t, dB_k,t; the task-specific Lambda_t and w_t get ordinary gradients.

Wrapping keeps the base parameter names (``...query.weight``, ``...query.bias``), so the
model's own state dict keys do not change; adapter parameters are
``...query.lora_A.weight``, ``...query.lora_B.<k>.weight``, ``...query.lora_lambdas``,
``...query.lora_B_w``.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import (DEFAULT_KEEP_TRAINABLE, AdapterParams, adopt_frozen_base, check_dropout, check_rank,
                     find_targets, freeze_pretrained, layer_key, set_submodule)

__all__ = [
    "MTLLoRALinear",
    "apply_mtl_lora",
    "mtl_task_ids",
    "set_mtl_task_ids",
    "task_ids_from_slices",
    "route_task_slices",
    "mtl_lora_modules",
    "mtl_lora_parameters",
    "mtl_lora_state_dict",
    "save_mtl_lora",
    "load_mtl_lora",
    "mtl_lora_param_count",
]


class MTLLoRALinear(nn.Module):
    """A frozen nn.Linear plus an MTL-LoRA adapter (see the module docstring)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        num_tasks: int,
        num_b: int,
        temperature: float = 0.1,
        diagonal: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        adopt_frozen_base(self, base, dropout)
        self.r, self.alpha = r, float(alpha)
        self.num_tasks, self.num_b = num_tasks, num_b
        self.temperature, self.diagonal = float(temperature), bool(diagonal)
        self.scaling = self.alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        lam_shape = (num_tasks, r) if diagonal else (num_tasks, r, r)
        self.lora_lambdas = nn.Parameter(torch.empty(lam_shape, **kw))
        self.lora_B = nn.ModuleList([nn.Linear(r, self.out_features, bias=False, **kw) for _ in range(num_b)])
        self.lora_B_w = nn.Parameter(torch.empty(num_tasks, num_b, **kw))
        self.task_ids: torch.Tensor | None = None
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Initial adapter: Kaiming-uniform A and w, identity Lambda_t, zero B_k."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if self.diagonal:
            self.lora_lambdas.fill_(1.0)
        else:
            self.lora_lambdas.copy_(torch.eye(self.r).expand(self.num_tasks, self.r, self.r))
        for b in self.lora_B:
            b.weight.zero_()
        nn.init.kaiming_uniform_(self.lora_B_w, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"tasks={self.num_tasks}, num_b={self.num_b}, temperature={self.temperature}, "
            f"diagonal={self.diagonal}"
        )

    def mixture(self) -> torch.Tensor:
        """(T, n_B) softmax(w_t / temperature) weights, computed in fp32."""
        return F.softmax(self.lora_B_w.float() / self.temperature, dim=-1)

    def task_matrices(self) -> torch.Tensor:
        """(T, out, r): M_t = B_t @ Lambda_t with B_t the task's mixture of the B_k."""
        mix = self.mixture().to(self.lora_A.weight.dtype)
        b = torch.stack([lin.weight for lin in self.lora_B])  # (n_B, out, r)
        bt = torch.einsum("tk,kor->tor", mix, b)
        if self.diagonal:
            return bt * self.lora_lambdas[:, None, :]
        return torch.matmul(bt, self.lora_lambdas)

    def delta_weight(self, task: int) -> torch.Tensor:
        """(out, in) dense weight update of task ``task`` (scaling included)."""
        return self.scaling * self.task_matrices()[task] @ self.lora_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        ids = self.task_ids
        if ids is None:
            raise RuntimeError(
                "MTL-LoRA forward needs the task ids of the batch: wrap the call in "
                "`with mtl_task_ids(model, task_ids):` (or call set_mtl_task_ids)"
            )
        h = self.lora_A(self.lora_dropout(x))  # (..., r)
        lam = self.lora_lambdas
        mix = self.mixture().to(h.dtype)  # (T, n_B)
        if ids.dim() == 0:
            z = h * lam[ids] if self.diagonal else F.linear(h, lam[ids])
            mix_i = mix[ids]
            delta = sum(b(z * mix_i[k]) for k, b in enumerate(self.lora_B))
        else:
            if x.dim() < 2 or x.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"task_ids has {ids.shape[0]} entries but the input batch has shape "
                    f"{tuple(x.shape)} (the first dimension must be the batch)"
                )
            hb = h.reshape(x.shape[0], -1, self.r)  # (batch, tokens, r)
            lam_i = lam.index_select(0, ids)
            z = hb * lam_i[:, None, :] if self.diagonal else torch.bmm(hb, lam_i.transpose(1, 2))
            mix_i = mix.index_select(0, ids)[:, :, None, None]  # (batch, n_B, 1, 1)
            delta = sum(b(z * mix_i[:, k]) for k, b in enumerate(self.lora_B))
            delta = delta.reshape(*x.shape[:-1], self.out_features)
        return out + delta.to(out.dtype) * self.scaling


# ---------------------------------------------------------------------------------------
# model-level API
# ---------------------------------------------------------------------------------------


def mtl_lora_modules(model: nn.Module) -> list[tuple[str, MTLLoRALinear]]:
    """(name, MTLLoRALinear) of every MTL-LoRA-adapted module of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MTLLoRALinear)]


def apply_mtl_lora(
    model: nn.Module,
    target_modules: Sequence[str] | str = ("query", "value"),
    r: int = 8,
    alpha: float = 16,
    num_tasks: int = 1,
    num_b: int = 3,
    temperature: float = 0.1,
    diagonal: bool = False,
    dropout: float = 0.0,
    freeze_base: bool = True,
    keep_trainable: Sequence[str] | None = DEFAULT_KEEP_TRAINABLE,
) -> list[str]:
    """Wrap every nn.Linear whose name matches ``target_modules`` (a name equals a target
    or ends with ``.<target>``; a single string is a full-match regex, as in peft) in an
    MTLLoRALinear, in place. The wrapped base weights are always frozen; with
    ``freeze_base`` (default) every other pre-existing parameter is frozen too, except
    names containing one of ``keep_trainable`` (task heads). Returns the adapted names.
    """
    check_rank(r)
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got num_tasks={num_tasks!r}")
    if isinstance(num_b, bool) or not isinstance(num_b, int) or num_b < 1:
        raise ValueError(f"num_b must be an integer >= 1, got num_b={num_b!r}")
    if not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got alpha={alpha!r}")
    check_dropout(dropout)
    targets = find_targets(model, target_modules, (MTLLoRALinear,))
    if freeze_base:
        freeze_pretrained(model, keep_trainable)
    names = []
    for name, lin in targets:
        set_submodule(
            model, name, MTLLoRALinear(lin, r, alpha, num_tasks, num_b, temperature, diagonal, dropout)
        )
        names.append(name)
    model._mtl_lora_config = dict(
        target_modules=names, r=r, alpha=float(alpha), num_tasks=num_tasks, num_b=num_b,
        temperature=float(temperature), diagonal=bool(diagonal), dropout=float(dropout),
    )
    return names


def _as_task_ids(model: nn.Module, task_ids, mods) -> torch.Tensor | None:
    if task_ids is None:
        return None
    num_tasks = mods[0][1].num_tasks
    t = torch.as_tensor(task_ids)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"task_ids must be integers, got dtype {t.dtype}")
    if t.dim() > 1:
        raise ValueError(f"task_ids must be an int or a 1-D tensor (one id per example), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("task_ids is empty")
    lo, hi = int(t.min()), int(t.max())  # one host sync per batch, outside the forward
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"task_ids out of range: got values in [{lo}, {hi}], the adapter has num_tasks={num_tasks}")
    return t.to(device=mods[0][1].lora_A.weight.device, dtype=torch.long)


def set_mtl_task_ids(model: nn.Module, task_ids) -> None:
    """Set (or with None clear) the per-example task ids on every MTL-LoRA module."""
    mods = mtl_lora_modules(model)
    if not mods:
        raise ValueError("model has no MTL-LoRA modules (call apply_mtl_lora first)")
    t = _as_task_ids(model, task_ids, mods)
    for _, m in mods:
        m.task_ids = t


@contextlib.contextmanager
def mtl_task_ids(model: nn.Module, task_ids) -> Iterator[None]:
    """``with mtl_task_ids(model, ids): model(...)`` routes example i through task ids[i]
    (``ids`` an int for a single-task batch, or a 1-D integer tensor of batch length).
    Restores the previous ids on exit."""
    mods = mtl_lora_modules(model)
    if not mods:
        raise ValueError("model has no MTL-LoRA modules (call apply_mtl_lora first)")
    t = _as_task_ids(model, task_ids, mods)
    prev = [m.task_ids for _, m in mods]
    for _, m in mods:
        m.task_ids = t
    try:
        yield
    finally:
        for (_, m), p in zip(mods, prev):
            m.task_ids = p


def task_ids_from_slices(task_slices: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """Per-example task ids of a batch given as (start, stop) rows per task, task t being
    the t-th slice (the GLUE harness's ``task_slices``). Rows outside every slice raise."""
    n = max((int(b) for _, b in task_slices), default=0)
    ids = torch.full((n,), -1, dtype=torch.long)
    for t, (a, b) in enumerate(task_slices):
        ids[int(a):int(b)] = t
    if (ids < 0).any():
        raise ValueError(f"task_slices {list(task_slices)!r} do not cover rows 0..{n - 1}")
    return ids if device is None else ids.to(device)


def route_task_slices(model: nn.Module, adapted: nn.Module | None = None, arg_index: int = 2,
                      kwarg: str = "task_slices") -> tuple:
    """Hooks on ``model`` (e.g. the harness's ``MultiTaskModel``, whose forward takes
    ``(input_ids, attention_mask, task_slices)``): each forward sets the MTL-LoRA task ids
    of ``adapted`` (default ``model``) from its ``task_slices`` argument (positional index
    ``arg_index`` or keyword ``kwarg``) and clears them afterwards, also on an exception;
    a forward without slices leaves the ids alone. Cleared ids make any other forward
    (e.g. evaluation through ``model.features``) fail loudly unless it runs inside
    ``mtl_task_ids(adapted, t)``. Returns the hook handles (``.remove()`` them)."""
    target = model if adapted is None else adapted
    if not mtl_lora_modules(target):
        raise ValueError("adapted: no MTL-LoRA modules (call apply_mtl_lora first)")
    state = {"set": False}

    def pre(mod, args, kwargs):
        slices = kwargs.get(kwarg) if kwarg in kwargs else (args[arg_index] if len(args) > arg_index else None)
        if slices is not None:
            set_mtl_task_ids(target, task_ids_from_slices(slices))
            state["set"] = True

    def post(mod, args, kwargs, output):
        if state["set"]:
            set_mtl_task_ids(target, None)
            state["set"] = False

    return (model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True, always_call=True))


def mtl_lora_parameters(model: nn.Module) -> AdapterParams:
    """Shared parameters (A, B_1..B_nB of each module; grouped by layer key and side) for
    the Ortho-LoRA layout, and the task-specific ones (lambdas, mixture logits) apart."""
    mods = mtl_lora_modules(model)
    if not mods:
        raise ValueError("model has no MTL-LoRA modules (call apply_mtl_lora first)")
    out = AdapterParams()
    for name, m in mods:
        key = layer_key(name)
        out.add_shared(key, "A", f"{name}.lora_A.weight", m.lora_A)
        for k, b in enumerate(m.lora_B):
            out.add_shared(key, "B", f"{name}.lora_B.{k}.weight", b)
        for pname in ("lora_lambdas", "lora_B_w"):
            p = getattr(m, pname)
            out.task_specific.append((f"{name}.{pname}", p))
            out.names[id(p)] = f"{name}.{pname}"
    return out


def mtl_lora_param_count(in_features: int, out_features: int, r: int, num_tasks: int, num_b: int, diagonal: bool = False) -> int:
    """Trainable scalars of one adapted module (paper formula)."""
    lam = num_tasks * r if diagonal else num_tasks * r * r
    return r * in_features + lam + num_b * out_features * r + num_tasks * num_b


def mtl_lora_state_dict(model: nn.Module) -> dict:
    """{"method": "mtl_lora", "config": {...}, "state": {name: tensor}}: the adapter only."""
    mods = mtl_lora_modules(model)
    if not mods:
        raise ValueError("model has no MTL-LoRA modules (call apply_mtl_lora first)")
    cfg = dict(getattr(model, "_mtl_lora_config", {}))
    m0 = mods[0][1]
    cfg.update(
        target_modules=[n for n, _ in mods], r=m0.r, alpha=m0.alpha, num_tasks=m0.num_tasks,
        num_b=m0.num_b, temperature=m0.temperature, diagonal=m0.diagonal,
    )
    cfg.setdefault("dropout", 0.0)
    state = {}
    for name, m in mods:
        for pname, p in m.named_parameters():
            if pname.startswith("lora_"):
                state[f"{name}.{pname}"] = p.detach().cpu().clone()
    return {"method": "mtl_lora", "config": cfg, "state": state}


def save_mtl_lora(model: nn.Module, path) -> None:
    """Save :func:`mtl_lora_state_dict` of ``model`` with its config to ``path``."""
    torch.save(mtl_lora_state_dict(model), path)


def load_mtl_lora(model: nn.Module, src, freeze_base: bool = True, keep_trainable=DEFAULT_KEEP_TRAINABLE) -> nn.Module:
    """Load an adapter saved by ``save_mtl_lora`` (a path or the dict). A model without
    MTL-LoRA modules is adapted first from the saved config (same module names)."""
    d = torch.load(src, map_location="cpu", weights_only=True) if not isinstance(src, dict) else src
    if d.get("method") != "mtl_lora":
        raise ValueError(f"not an MTL-LoRA adapter (method={d.get('method')!r})")
    cfg = d["config"]
    if not mtl_lora_modules(model):
        apply_mtl_lora(
            model,
            target_modules="|".join(re.escape(n) for n in cfg["target_modules"]),
            r=cfg["r"], alpha=cfg["alpha"], num_tasks=cfg["num_tasks"], num_b=cfg["num_b"],
            temperature=cfg["temperature"], diagonal=cfg["diagonal"], dropout=cfg.get("dropout", 0.0),
            freeze_base=freeze_base, keep_trainable=keep_trainable,
        )
        model._mtl_lora_config["target_modules"] = list(cfg["target_modules"])
    mods = dict(mtl_lora_modules(model))
    if sorted(mods) != sorted(cfg["target_modules"]):
        raise ValueError(
            f"adapter modules {sorted(cfg['target_modules'])} do not match the model's MTL-LoRA modules {sorted(mods)}"
        )
    for name, m in mods.items():
        for k in ("r", "num_tasks", "num_b", "diagonal"):
            if getattr(m, k) != cfg[k]:
                raise ValueError(f"{name}: {k}={getattr(m, k)!r} in the model, {cfg[k]!r} in the adapter")
        m.temperature, m.alpha = float(cfg["temperature"]), float(cfg["alpha"])
        m.scaling = m.alpha / m.r
    params = {f"{n}.{pn}": p for n, m in mods.items() for pn, p in m.named_parameters() if pn.startswith("lora_")}
    missing = sorted(set(params) - set(d["state"]))
    extra = sorted(set(d["state"]) - set(params))
    if missing or extra:
        raise ValueError(f"adapter state mismatch: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for k, p in params.items():
            v = d["state"][k]
            if v.shape != p.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the adapter, {tuple(p.shape)} in the model")
            p.copy_(v.to(p.device, p.dtype))
    return model
