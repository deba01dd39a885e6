"""Flat ``[T, N]`` gradient buffer over a model's shared LoRA parameters.

A :class:`LoRALayout` fixes an order of the shared (task-agnostic) adapter parameters and
maps each one to a column range of a flat buffer. The order is

    all A-side matrices (layer by layer, module by module), then
    all B-side matrices (layer by layer, module by module)

so that every granularity (ARCHITECTURE.md, "Segments") is a list of contiguous column segments:

* ``"global"``: one segment ``[0, N]``;
* ``"ab"``:     ``[0, N_A, N]`` (all A's, all B's);
* ``"layer"``:  one segment per (side, layer): A of layer 0, A of layer 1, ..., B of layer 0, ...
* ``"matrix"``: one segment per parameter.

Only parameters with ``requires_grad=True`` enter the buffer (LoRI freezes A: then only
the B side is there). Task heads, classifier heads and ``modules_to_save`` are never part
of a layout: they keep their ordinary ``.grad``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

GRANULARITIES = ("global", "ab", "layer", "matrix")
SIDES = ("A", "B")


@dataclass(frozen=True)
class LoRAEntry:
    """One shared LoRA matrix in a layout.

    Attributes:
        layer: the layer key (entries with equal keys form one ``"layer"`` segment per side).
        side: ``"A"`` or ``"B"``.
        name: a readable name (e.g. the peft parameter name).
        param: the parameter itself.
        module: the ``nn.Linear`` whose ``weight`` is ``param``, when known. The grouped
            collector (one backward for all tasks) needs it; the loop collector does not.
        offset: first column of the parameter in the flat buffer.
    """

    layer: str
    side: str
    name: str
    param: nn.Parameter
    module: nn.Module | None
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements of the parameter (its column count in the buffer)."""
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        """Shape of the parameter."""
        return self.param.shape


_LAYER_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_key(module_name: str) -> str:
    """The transformer-layer prefix of a module name: up to its first numeric component.

    ``base_model.model.roberta.encoder.layer.3.attention.self.query`` -> ``...layer.3``.
    A name without a numeric component is its own layer.
    """
    m = _LAYER_INDEX.match(module_name)
    return m.group(1) if m else module_name


def _as_param(obj, what: str) -> tuple[nn.Parameter, nn.Module | None]:
    if isinstance(obj, nn.Linear):
        return obj.weight, obj
    if isinstance(obj, torch.Tensor):
        if not isinstance(obj, nn.Parameter) and not obj.requires_grad:
            raise TypeError(f"{what}: expected an nn.Parameter or an nn.Linear, got a plain tensor without requires_grad")
        return obj, None
    raise TypeError(f"{what}: expected an nn.Parameter or an nn.Linear, got {type(obj).__name__}")


class LoRALayout:
    """Order, offsets and segments of the shared LoRA parameters in a flat ``[T, N]`` buffer.

    Build one with :meth:`from_peft` (a peft model) or :meth:`from_params` (explicit
    parameters, any module structure). Row ``t`` of a buffer from :meth:`new_buffer` holds
    task ``t``'s gradient; :meth:`views` gives tensors shaped like each parameter that
    alias a row (writing into them writes into the buffer).
    """

    def __init__(self, entries: Sequence[LoRAEntry]):
        # Entries are already ordered and offset by the factory methods.
        if not entries:
            raise ValueError("model: no trainable LoRA parameters (requires_grad=True) found")
        self._entries = tuple(entries)
        self._numel = entries[-1].offset + entries[-1].numel
        self._segments_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ factories
    @classmethod
    def from_params(cls, entries: Iterable, model: nn.Module | None = None) -> "LoRALayout":
        """Layout over explicitly given shared parameters.

        ``entries`` is an iterable of either

        * ``(name, A, B)`` triples: one LoRA module with one A and one B matrix; the module
          is its own layer; or
        * ``(layer_key, side, name, param)`` 4-tuples, ``side in {"A", "B"}``: one shared
          matrix. A module may contribute any number of A-side and B-side matrices (e.g.
          MTL-LoRA's several shared ``B_k`` per module): give each its own tuple with the
          same ``layer_key``.

        ``A``, ``B`` and ``param`` may be ``nn.Parameter``\\ s or ``nn.Linear`` modules
        (then ``.weight`` is used and the module is remembered, which the grouped
        collector needs). Parameters with ``requires_grad=False`` (e.g. LoRI's frozen A)
        are skipped. The layout order is: A side before B side; within a side, layers in
        order of first appearance; within a layer, the given order.

        ``model`` (optional): a parameter given bare that is the ``weight`` of an ``nn.Linear``
        in ``model`` gets that module attached, so the grouped collector can be used (e.g.
        MTL-LoRA's ``lora_A`` / ``lora_B[k]`` linears).

        Raises:
            ValueError: no trainable parameter, a bad ``side``, a parameter given twice.
            TypeError: an entry that is neither a triple nor a 4-tuple of the right types.
        """
        flat: list[tuple[str, str, str, object]] = []
        for i, e in enumerate(entries):
            if not isinstance(e, (tuple, list)):
                raise TypeError(f"entries[{i}]: expected (name, A, B) or (layer_key, side, name, param), got {type(e).__name__}")
            if len(e) == 3:
                name, a, b = e
                flat.append((str(name), "A", f"{name}.A", a))
                flat.append((str(name), "B", f"{name}.B", b))
            elif len(e) == 4:
                layer, side, name, p = e
                if side not in SIDES:
                    raise ValueError(f"entries[{i}]: side must be 'A' or 'B', got {side!r}")
                flat.append((str(layer), side, str(name), p))
            else:
                raise TypeError(f"entries[{i}]: expected (name, A, B) or (layer_key, side, name, param), got {len(e)} items")
        if model is not None:
            linears = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}
            flat = [(l, s, n, linears.get(id(p), p) if isinstance(p, torch.Tensor) else p) for l, s, n, p in flat]
        return cls._build(flat)

    @classmethod
    def from_peft(cls, model: nn.Module, adapter_name: str = "default") -> "LoRALayout":
        """Layout over the LoRA matrices of one peft adapter in ``model``.

        Every peft LoRA layer (``lora_A``/``lora_B`` ``nn.Linear`` modules, and LoRA
        embeddings' ``lora_embedding_A``/``_B``) of ``adapter_name`` contributes its A and
        B weights; the layer key is the module path up to its first numeric component
        (the transformer block). Frozen matrices are skipped. Works on a ``PeftModel``,
        its base model, or any module tree with peft LoRA layers (also inside DDP).

        Raises:
            ValueError: ``model`` has no trainable LoRA parameter for ``adapter_name``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module (a peft model), got {type(model).__name__}")
        flat = []
        for mname, mod in model.named_modules():
            lora_a = getattr(mod, "lora_A", None)
            lora_b = getattr(mod, "lora_B", None)
            if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict) and adapter_name in lora_a:
                layer = layer_key(mname)
                a, b = lora_a[adapter_name], lora_b[adapter_name]
                flat.append((layer, "A", f"{mname}.lora_A.{adapter_name}.weight", a if isinstance(a, nn.Linear) else a.weight))
                flat.append((layer, "B", f"{mname}.lora_B.{adapter_name}.weight", b if isinstance(b, nn.Linear) else b.weight))
            ea = getattr(mod, "lora_embedding_A", None)
            eb = getattr(mod, "lora_embedding_B", None)
            if isinstance(ea, nn.ParameterDict) and isinstance(eb, nn.ParameterDict) and adapter_name in ea:
                layer = layer_key(mname)
                flat.append((layer, "A", f"{mname}.lora_embedding_A.{adapter_name}", ea[adapter_name]))
                flat.append((layer, "B", f"{mname}.lora_embedding_B.{adapter_name}", eb[adapter_name]))
        if not flat:
            raise ValueError(f"model: no peft LoRA layers found for adapter_name={adapter_name!r}")
        return cls._build(flat)

    @classmethod
    def _build(cls, flat) -> "LoRALayout":
        items = []
        seen: set[int] = set()
        for layer, side, name, obj in flat:
            p, module = _as_param(obj, name)
            if not p.requires_grad:
                continue
            if id(p) in seen:
                raise ValueError(f"entries: parameter {name!r} is given twice")
            if not p.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point parameter, got {p.dtype}")
            seen.add(id(p))
            items.append((layer, side, name, p, module))
        if not items:
            raise ValueError("model: no trainable LoRA parameters (requires_grad=True) found")
        layer_rank: dict[str, int] = {}
        for layer, *_ in items:
            layer_rank.setdefault(layer, len(layer_rank))
        # stable sort: side, then layer in order of first appearance, then given order
        order = sorted(range(len(items)), key=lambda i: (SIDES.index(items[i][1]), layer_rank[items[i][0]], i))
        entries, off = [], 0
        for i in order:
            layer, side, name, p, module = items[i]
            entries.append(LoRAEntry(layer, side, name, p, module, off))
            off += p.numel()
        return cls(entries)

    # ------------------------------------------------------------------ properties
    @property
    def entries(self) -> tuple[LoRAEntry, ...]:
        """The ordered :class:`LoRAEntry` records."""
        return self._entries

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters in buffer order."""
        return [e.param for e in self._entries]

    @property
    def names(self) -> list[str]:
        """The parameter names in buffer order."""
        return [e.name for e in self._entries]

    @property
    def numel(self) -> int:
        """N, the number of buffer columns (total elements of the trainable LoRA parameters)."""
        return self._numel

    @property
    def device(self) -> torch.device:
        """Device of the parameters (the first one's)."""
        return self._entries[0].param.device

    @property
    def dtype(self) -> torch.dtype:
        """Common dtype of the parameters, float32 if they differ."""
        dts = {e.param.dtype for e in self._entries}
        return dts.pop() if len(dts) == 1 else torch.float32

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        na = sum(e.numel for e in self._entries if e.side == "A")
        return f"LoRALayout({len(self._entries)} matrices, N={self._numel} (A: {na}, B: {self._numel - na}))"

    # ------------------------------------------------------------------ segments
    def segments(self, granularity: str = "ab") -> list[int]:
        """Column offsets ``[0, ..., N]`` of the segments of ``granularity``.

        ``granularity`` is one of ``"global"``, ``"ab"``, ``"layer"``, ``"matrix"``.
        Empty segments are never produced (e.g. ``"ab"`` with a frozen A side is one segment).
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
        cached = self._segments_cache.get(granularity)
        if cached is not None:
            return list(cached)
        if granularity == "global":
            keys = [0] * len(self._entries)
        elif granularity == "ab":
            keys = [e.side for e in self._entries]
        elif granularity == "layer":
            keys = [(e.side, e.layer) for e in self._entries]
        else:
            keys = list(range(len(self._entries)))
        offs = [0]
        for i in range(1, len(self._entries)):
            if keys[i] != keys[i - 1]:
                offs.append(self._entries[i].offset)
        offs.append(self._numel)
        self._segments_cache[granularity] = offs
        return list(offs)

    def segment_names(self, granularity: str = "ab") -> list[str]:
        """A readable name per segment of ``granularity`` (same length as ``segments() - 1``)."""
        offs = self.segments(granularity)
        starts = {e.offset: e for e in self._entries}
        out = []
        for o in offs[:-1]:
            e = starts[o]
            if granularity == "global":
                out.append("all")
            elif granularity == "ab":
                out.append(e.side)
            elif granularity == "layer":
                out.append(f"{e.side}:{e.layer}")
            else:
                out.append(e.name)
        return out

    # ------------------------------------------------------------------ buffers
    def new_buffer(self, num_tasks: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """A zeroed ``[num_tasks, N]`` buffer (default: the parameters' dtype and device)."""
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected an int >= 1, got {num_tasks!r}")
        return torch.zeros(num_tasks, self._numel, dtype=dtype or self.dtype, device=device or self.device)

    def views(self, buffer_row: torch.Tensor) -> list[torch.Tensor]:
        """Tensors shaped like each parameter that alias ``buffer_row`` (a contiguous ``[N]``).

        Also accepts a ``[T, N]`` buffer: then each view is ``[T, *param.shape]``.
        """
        if not isinstance(buffer_row, torch.Tensor) or buffer_row.shape[-1] != self._numel or buffer_row.dim() not in (1, 2):
            shape = tuple(buffer_row.shape) if isinstance(buffer_row, torch.Tensor) else type(buffer_row).__name__
            raise ValueError(f"buffer_row: expected a tensor of shape [N] or [T, N] with N = {self._numel}, got {shape}")
        lead = tuple(buffer_row.shape[:-1])
        return [buffer_row[..., e.offset:e.offset + e.numel].view(*lead, *e.shape) for e in self._entries]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters (e.g. their ``.grad``) into ``[N]``."""
        if len(tensors) != len(self._entries):
            raise ValueError(f"tensors: expected {len(self._entries)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1) for t in tensors])
