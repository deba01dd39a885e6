"""What every adapter of :mod:`ortholora_kernels.adapters` shares.

Target finding with peft's matching rules, freezing of the base model, argument checks,
the frozen-base wrapping of an ``nn.Linear`` (:func:`adopt_frozen_base`), the trainable
count (:func:`count_trainable`) and :class:`AdapterParams`, the split of an adapter's
parameters into the shared ones Ortho-LoRA projects and the task-specific ones it leaves
alone (``AdapterParams.layout()`` is the :class:`~ortholora_kernels.LoRALayout` over them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..layout import LoRALayout, layer_key  # the one layer-key rule (LoRALayout's)

__all__ = [
    "AdapterParams",
    "DEFAULT_KEEP_TRAINABLE",
    "adopt_frozen_base",
    "check_dropout",
    "check_rank",
    "count_trainable",
    "find_targets",
    "freeze_pretrained",
    "layer_key",
    "set_submodule",
]

#: parameter names (substrings) that ``freeze_pretrained`` leaves trainable by default: task heads
DEFAULT_KEEP_TRAINABLE = ("classifier", "score", "head")


def check_rank(r) -> int:
    """``r`` if it is an integer >= 1, else ValueError naming ``r``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got r={r!r}")
    return r


def check_dropout(dropout) -> float:
    """``dropout`` as a float if it is in [0, 1), else ValueError naming ``dropout``."""
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
    return float(dropout)


def _name_matches(name: str, targets) -> bool:
    if isinstance(targets, str):  # peft semantics: a string is a full-match regex
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, target_modules, wrapper_types: tuple) -> list[tuple[str, nn.Linear]]:
    """Matching nn.Linear modules (name, module), peft's rules (a name equals a target or
    ends with ``.<target>``; a single string is a full-match regex); clear errors when
    nothing matches or a match is already wrapped by one of ``wrapper_types``."""
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ValueError("target_modules must name at least one module (e.g. ('query', 'value'))")
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
        bad = [t for t in target_modules if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f"target_modules entries must be non-empty strings, got {bad!r}")
    found, not_linear, wrapped = [], [], []
    for name, mod in model.named_modules():
        if not name or not _name_matches(name, target_modules):
            continue
        if isinstance(mod, wrapper_types):
            wrapped.append(name)
        elif isinstance(mod, nn.Linear) and not hasattr(mod, "lora_A"):
            found.append((name, mod))
        else:
            not_linear.append(f"{name} ({type(mod).__name__})")
    if wrapped:
        raise ValueError(
            f"target_modules={target_modules!r}: modules already adapted: {wrapped[:4]}"
            + (" ..." if len(wrapped) > 4 else "")
        )
    if not found:
        hint = f"; matching names that are not nn.Linear: {not_linear[:4]}" if not_linear else ""
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear module in the model{hint}")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_pretrained(model: nn.Module, keep_trainable: Sequence[str] | None) -> None:
    """Freeze every parameter present before adapting, except names containing one of
    ``keep_trainable`` (task heads). Called before the adapter parameters exist."""
    keep = tuple(keep_trainable or ())
    for name, p in model.named_parameters():
        if not any(k in name for k in keep):
            p.requires_grad_(False)


def count_trainable(model: nn.Module, adapter_only: bool = False) -> int:
    """Number of trainable scalars: parameters with ``requires_grad``, each counted once.
    A module that trains only part of a parameter says so through a
    ``trainable_numel(param) -> int`` method (a LoRI-S B: only the entries its mask keeps).
    With ``adapter_only`` only adapter parameters (names containing ``lora_``) count."""
    total, seen = 0, set()
    # named_parameters() order and deduplication, but knowing each parameter's module
    for mod_name, mod in model.named_modules():
        own = getattr(mod, "trainable_numel", None)
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.requires_grad and (not adapter_only or "lora_" in name):
                total += int(own(p)) if callable(own) else p.numel()
    return total


def adopt_frozen_base(module: nn.Module, base: nn.Linear, dropout: float) -> None:
    """Give an adapter ``module`` the frozen weight and bias of ``base`` (same names, so
    state dicts keep the base model's keys) and the input dropout of its adapter path."""
    module.in_features, module.out_features = base.in_features, base.out_features
    module.weight = base.weight
    module.bias = base.bias
    module.weight.requires_grad_(False)
    if module.bias is not None:
        module.bias.requires_grad_(False)
    module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


@dataclass
class AdapterParams:
    """An adapter's trainable parameters split for Ortho-LoRA.

    shared         {layer_key: {"A": [params], "B": [params]}}, layers in model order;
                   the parameters every task updates (the projection applies to these)
    task_specific  [(name, param)], ordinary gradients (no projection)
    names          {id(param): full parameter name} for every parameter above
    modules        {id(param): nn.Linear} where a shared parameter is that Linear's weight
    """

    shared: dict[str, dict[str, list[nn.Parameter]]] = field(default_factory=dict)
    task_specific: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    modules: dict[int, nn.Linear] = field(default_factory=dict)

    def entries(self) -> list[tuple[str, str, str, object]]:
        """Flat (layer_key, side, name, param_or_linear) tuples for
        ``LoRALayout.from_params``: layer by layer, A side then B side. Where the parameter
        is the weight of an ``nn.Linear`` (MTL-LoRA's A and B_k) the Linear is given, so the
        layout remembers it (needed by the grouped collector)."""
        out = []
        for key, sides in self.shared.items():
            for side in ("A", "B"):
                for p in sides.get(side, []):
                    out.append((key, side, self.names[id(p)], self.modules.get(id(p), p)))
        return out

    def layout(self) -> LoRALayout:
        """``LoRALayout.from_params(self.entries())``: the Ortho-LoRA buffer layout over the
        shared parameters (frozen ones skipped), for ``OrthoLoRA(layout, T, ...)``. The
        grouped collector needs each shared parameter to be an ``nn.Linear`` weight
        (``modules``); ``collect="loop"`` takes any parameter."""
        return LoRALayout.from_params(self.entries())

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared parameters, layer by layer, A side then B side."""
        return [p for sides in self.shared.values() for side in ("A", "B") for p in sides.get(side, [])]

    def task_parameters(self) -> list[nn.Parameter]:
        """The task-specific parameters (ordinary gradients)."""
        return [p for _, p in self.task_specific]

    def num_shared(self) -> int:
        """Number of scalars in the shared parameters."""
        return sum(p.numel() for p in self.shared_parameters())

    def add_shared(self, key: str, side: str, name: str, p) -> None:
        """Add a shared parameter (or an nn.Linear: its weight, module remembered)."""
        if isinstance(p, nn.Linear):
            self.modules[id(p.weight)] = p
            p = p.weight
        self.shared.setdefault(key, {"A": [], "B": []})[side].append(p)
        self.names[id(p)] = name
