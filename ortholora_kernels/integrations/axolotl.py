"""An axolotl plugin: multi-task LoRA fine-tuning with Ortho-LoRA from a YAML config.

    plugins:
      - ortholora_kernels.integrations.axolotl.OrthoLoRAPlugin
    ortholora_num_tasks: 3
    ortholora_task_field: task          # the per-row task column of the tokenized dataset
    ortholora_method: pcgrad            # or upgrad, cagrad, ... (ortholora_kernels.solvers.METHODS)

The plugin follows axolotl's ``BasePlugin`` interface (``axolotl.integrations.base``):

* ``get_input_args``: the config keys, :class:`OrthoLoRAArgs` (a pydantic model);
* ``get_trainer_cls``: axolotl's own trainer class (``AxolotlTrainer``) with
  :class:`~.trainer.OrthoLoRATrainer` mixed in, the ``ortholora_*`` keys bound;
* ``post_trainer_create``: wraps the trainer's collators with :class:`TaskIdsCollator`,
  which turns each row's task (an int, or a name of ``ortholora_task_names``) into
  per-token ``task_ids`` laid out as the batch's ``input_ids`` (sample packing included:
  the samples of a pack in order, -1 on padding).

The tokenized rows must still carry the task column when they reach the collator (a
pre-tokenized dataset, or a prompt strategy that returns it); axolotl's built-in prompt
strategies drop columns they do not know. The per-task gradients are well defined only
when packed samples do not attend to each other (axolotl's sample packing with flash
attention keeps them apart; the trainer warns when it sees tokens of different tasks in
one attention span).

axolotl itself is not a dependency of this package: ``BasePlugin`` and ``AxolotlTrainer``
are imported when present; without axolotl the plugin is a plain class with the same
hooks and the trainer base is ``transformers.Trainer`` (what the tests exercise).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .trainer import OrthoLoRATrainer, lay_out_token_ids

__all__ = ["OrthoLoRAPlugin", "OrthoLoRAArgs", "TaskIdsCollator", "make_trainer_cls"]

try:  # the real interface when axolotl is installed
    from axolotl.integrations.base import BasePlugin as _PluginBase
except ImportError:  # pragma: no cover - depends on the environment
    _PluginBase = object

from pydantic import BaseModel, Field  # axolotl's config schema is pydantic

#: config key -> OrthoLoRATrainer keyword
_KEYS = {"ortholora_method": "ortho_method", "ortholora_method_options": "ortho_method_options",
         "ortholora_collect": "ortho_collect", "ortholora_granularity": "ortho_granularity",
         "ortholora_reduction": "ortho_reduction", "ortholora_seed": "ortho_seed",
         "ortholora_log_stats": "log_ortho_stats", "ortholora_task_names": "task_names"}


class OrthoLoRAArgs(BaseModel):
    """The plugin's config keys (merged into axolotl's config schema)."""

    ortholora_num_tasks: int | None = Field(default=None, ge=1, description="number of tasks T")
    ortholora_task_field: str = Field(default="task", description="the dataset column holding each row's task")
    ortholora_task_names: list[str] | None = Field(default=None, description="task names, index order")
    ortholora_method: str = Field(default="pcgrad", description="pcgrad or any of ortholora_kernels.solvers.METHODS")
    ortholora_method_options: dict | None = None
    ortholora_collect: str = Field(default="grouped", description="grouped (one backward) or loop")
    ortholora_granularity: str = Field(default="ab", description="ab, global, layer or matrix")
    ortholora_reduction: str = "sum"
    ortholora_seed: int | None = None
    ortholora_log_stats: bool | str = True


def _cfg_get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    v = getattr(cfg, key, default)
    return default if v is None else v


def _trainer_kwargs(cfg) -> dict[str, Any]:
    """OrthoLoRATrainer keywords from an axolotl config (``DictDefault`` or dict)."""
    names = _cfg_get(cfg, "ortholora_task_names")
    t = _cfg_get(cfg, "ortholora_num_tasks") or (len(names) if names else None)
    if not t:
        raise ValueError("ortholora_num_tasks: required (or give ortholora_task_names)")
    kw = {"num_tasks": int(t)}
    for key, name in _KEYS.items():
        v = _cfg_get(cfg, key)
        if v is not None:
            kw[name] = v
    return kw


def make_trainer_cls(base: type, keep_columns: Sequence[str] = (), **ortho_kwargs) -> type:
    """``base`` (a ``transformers.Trainer`` subclass, e.g. ``AxolotlTrainer``) with
    :class:`OrthoLoRATrainer` mixed in and ``ortho_kwargs`` as defaults of its constructor;
    ``keep_columns`` (the task column) survive ``remove_unused_columns``."""
    if not (isinstance(base, type) and issubclass(base, OrthoLoRATrainer.__mro__[1])):
        raise TypeError(f"base: expected a transformers.Trainer subclass, got {base!r}")
    bound = dict(ortho_kwargs)
    bases = (OrthoLoRATrainer,) if base is OrthoLoRATrainer.__mro__[1] else (OrthoLoRATrainer, base)

    keep = list(keep_columns)

    class _Bound(*bases):
        ortho_defaults = bound

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**bound, **kwargs})

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns.extend(k for k in keep if k not in self._signature_columns)

    _Bound.__name__ = _Bound.__qualname__ = f"OrthoLoRA{base.__name__}"
    _Bound.__doc__ = f"{base.__name__} with Ortho-LoRA."
    return _Bound


class TaskIdsCollator:
    """Per-token ``task_ids`` for a collator of rows that carry a task column.

    A feature is a row (a dict) or, under sample packing, a list of rows (one pack); each
    row's task (an int, or a name in ``task_names``) covers its ``input_ids``. The ids are
    laid out like the batch's ``input_ids``: the rows of a pack in order, right padding -1
    (refused when that does not line up with a 2-D ``attention_mask``).
    """

    def __init__(self, base, task_field: str = "task", num_tasks: int | None = None,
                 task_names: Sequence[str] | None = None, out_key: str = "task_ids"):
        self.base, self.task_field, self.out_key = base, task_field, out_key
        self.num_tasks = num_tasks
        self.index = {str(n): i for i, n in enumerate(task_names)} if task_names else {}

    def _task(self, row) -> int:
        if self.task_field not in row:
            raise KeyError(f"ortholora_task_field: a row has no {self.task_field!r} column (keys: {sorted(row)})")
        v = row[self.task_field]
        v = v.item() if isinstance(v, torch.Tensor) else v
        if isinstance(v, str):
            if v not in self.index:
                raise ValueError(f"ortholora_task_names: unknown task {v!r} (tasks: {list(self.index)})")
            return self.index[v]
        v = int(v)
        if v < 0 or (self.num_tasks is not None and v >= self.num_tasks):
            raise ValueError(f"ortholora_task_field: task id {v} out of range [0, {self.num_tasks})")
        return v

    def __call__(self, features):
        packs = [f if isinstance(f, (list, tuple)) else [f] for f in features]
        ids = [torch.cat([torch.full((len(r["input_ids"]),), self._task(r), dtype=torch.long) for r in p])
               for p in packs]
        stripped = [[{k: v for k, v in r.items() if k != self.task_field} for r in p] for p in packs]
        batch = self.base([s if isinstance(f, (list, tuple)) else s[0] for s, f in zip(stripped, features)])
        out = lay_out_token_ids(ids, batch)
        batch[self.out_key] = out
        return batch


class OrthoLoRAPlugin(_PluginBase):
    """axolotl plugin: the trainer class and the collators for Ortho-LoRA (see the module doc)."""

    def __init__(self, trainer_base: type | None = None):
        super().__init__()
        self.trainer_base = trainer_base

    def get_input_args(self) -> str:
        """The pydantic model of the config keys (axolotl imports it by this path)."""
        return f"{__name__}.OrthoLoRAArgs"

    def _base(self) -> type:
        if self.trainer_base is not None:
            return self.trainer_base
        try:
            from axolotl.core.trainers.base import AxolotlTrainer
            return AxolotlTrainer
        except ImportError:
            from transformers import Trainer
            return Trainer

    def get_trainer_cls(self, cfg) -> type:
        """axolotl's trainer with Ortho-LoRA, the ``ortholora_*`` keys bound."""
        return make_trainer_cls(self._base(), keep_columns=[_cfg_get(cfg, "ortholora_task_field", "task")],
                                **_trainer_kwargs(cfg))

    def post_trainer_create(self, cfg, trainer) -> None:
        """Give the trainer's collators the per-token task ids."""
        kw = _trainer_kwargs(cfg)
        for attr in ("data_collator", "eval_data_collator"):
            coll = getattr(trainer, attr, None)
            if coll is not None and not isinstance(coll, TaskIdsCollator):
                setattr(trainer, attr, TaskIdsCollator(coll, _cfg_get(cfg, "ortholora_task_field", "task"),
                                                       num_tasks=kw["num_tasks"], task_names=kw.get("task_names")))
