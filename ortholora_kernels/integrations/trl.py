"""TRL's ``SFTTrainer`` with Ortho-LoRA: change one class and name the task column.

    trainer = OrthoLoRASFTTrainer(
        model=peft_model, args=SFTConfig(packing=True, max_length=512, ...),
        train_dataset=ds,                  # rows carry a "task" column (strings or ints)
        processing_class=tokenizer,
    )                                      # or train_dataset={"sst2": ds1, "rte": ds2}
    trainer.train()

What changes against ``SFTTrainer`` (and what is kept):

* the task of every row comes from the column ``task_field`` (default "task"; strings are
  task names, ints task indices), or, when ``train_dataset`` is a dict (or list) of
  datasets, from the dataset a row came from. The names are kept for the logs
  (``task_names``); ``num_tasks`` is inferred;
* the task ids survive TRL's preparation and packing (``packing=True`` with "bfd",
  "bfd_split" or "wrapped", padding-free batches) as a per-token column, packed with the
  tokens: every batch gets ``task_ids [batch, seq]`` (the task of each token's document, -1
  on padding). The loss of task t is the mean of the next-token losses over its tokens whose
  label is not -100 (so prompts under completion-only loss, padding and each packed
  document's first token count for no task), the sum over tasks is what one backward
  splits into the per-task LoRA gradients, which OrthoLoRA projects once per optimizer
  step. Prompt tokens keep their task in the routing ids: the completion's loss reaches them
  through attention, and that part of the gradient is the task's too;
* per-task losses ``loss/<task>`` (training) and ``eval_loss/<task>`` (evaluation), the
  projection statistics ``ortho/...`` (per-task names), next to TRL's own metrics
  (``entropy``, ``mean_token_accuracy``, ``num_tokens``, computed by TRL's ``compute_loss``);
* checkpoints hold the OrthoLoRA state: a resumed run is bit-exact (as ``OrthoLoRATrainer``).

Documents must not attend across their boundaries: padding-free packing ("bfd", the
default) restarts the position ids per document, and Hugging Face attention keeps the
documents apart (block-diagonal). ``packing_strategy="wrapped"`` without ``padding_free``
lets a document attend to the ones before it in its row; a task's loss then depends on
other tasks' tokens and per-task gradients are ill-defined: the trainer warns when it is
configured so and at the first batch where tokens of different tasks share an attention span.

Not supported (a clear error): ``compute_loss_func``, label smoothing, MoE auxiliary losses,
vision datasets, ``IterableDataset``. Under ``torch.distributed`` the per-task means divide by
the global per-task token counts (as ``OrthoLoRATrainer``); the logged per-task losses are
the local process's. All keyword arguments of :class:`~.trainer.OrthoLoRATrainer` (``ortho_method``,
``ortho_collect``, ``ortho_granularity``, ...) are accepted.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from trl import SFTTrainer
from trl.data_utils import pack_dataset

from .trainer import OrthoLoRATrainer, lay_out_token_ids

__all__ = ["OrthoLoRASFTTrainer", "TokenTaskCollator"]

#: the per-example task index column added to the datasets
TASK_COLUMN = "_ortho_task"
#: the per-token task column (packed along with the tokens)
TOKEN_TASK_COLUMN = "_ortho_token_task"


class TokenTaskCollator:
    """Wrap a collator of token rows (TRL's ``DataCollatorForLanguageModeling``) to add the
    per-token task ids of the rows' ``_ortho_token_task`` column as ``task_ids [batch, seq]``,
    laid out as the base lays out ``input_ids``: right-padded with -1, or flattened into one
    row (padding-free). Refuses a layout it cannot match (e.g. left padding)."""

    def __init__(self, base, key: str = TOKEN_TASK_COLUMN, out_key: str = "task_ids"):
        self.base, self.key, self.out_key = base, key, out_key

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if any(self.key not in ex for ex in examples):
            raise KeyError(f"examples: a row has no {self.key!r} column (not prepared by OrthoLoRASFTTrainer)")
        batch = self.base([{k: v for k, v in ex.items() if k != self.key} for ex in examples])
        ids = [torch.as_tensor(ex[self.key], dtype=torch.long) for ex in examples]
        out = lay_out_token_ids(ids, batch)
        batch[self.out_key] = out
        return batch


class _ArgsView:
    """``args`` with a few attributes replaced (for one call of TRL's dataset preparation)."""

    def __init__(self, args, **over):
        self._args, self._over = args, over

    def __getattr__(self, name):
        over = self.__dict__["_over"]
        return over[name] if name in over else getattr(self.__dict__["_args"], name)


class _Recorder:
    """Calls the model and keeps its outputs (TRL's ``compute_loss`` calls it as the model)."""

    def __init__(self, model):
        self.model, self.outputs = model, None

    def __call__(self, *args, **kwargs):
        self.outputs = self.model(*args, **kwargs)
        return self.outputs

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


def _combine(datasets, task_field: str, what: str):
    """A dict/list of datasets -> one dataset with a task column (the key / the list index)."""
    from datasets import Dataset, concatenate_datasets
    items = list(datasets.items()) if isinstance(datasets, dict) else list(enumerate(datasets))
    if not items:
        raise ValueError(f"{what}: no datasets given")
    parts = []
    for name, ds in items:
        if not isinstance(ds, Dataset):
            raise TypeError(f"{what}[{name!r}]: expected a datasets.Dataset, got {type(ds).__name__}")
        if task_field in ds.column_names:
            ds = ds.remove_columns(task_field)
        parts.append(ds.add_column(task_field, [name] * len(ds)))
    return concatenate_datasets(parts), [n for n, _ in items]


class OrthoLoRASFTTrainer(OrthoLoRATrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` that trains the shared LoRA adapter with Ortho-LoRA.

    Keyword args (everything else goes to ``SFTTrainer``; the ``ortho_*`` ones and
    ``log_ortho_stats`` are :class:`~.trainer.OrthoLoRATrainer`'s):
        task_field: the dataset column of the task (default "task"): strings (task names) or
            ints (task indices). Unused when ``train_dataset`` is a dict/list of datasets.
        task_names: the tasks' names in index order (default: the dict's keys, the sorted
            distinct strings, or "0", "1", ... for int tasks).
        num_tasks: T (default: the number of names).

    ``eval_dataset`` may also be a dict of datasets without the task column (each one
    task, named by its key): they are then concatenated into one evaluation set.
    """

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, *,
                 task_field: str = "task", task_names: Sequence[str] | None = None, num_tasks: int | None = None,
                 **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: not supported by OrthoLoRASFTTrainer (the loss is the sum of the "
                             "per-task means)")
        self.task_field = task_field
        names = None
        if isinstance(train_dataset, (dict, list, tuple)):
            train_dataset, names = _combine(train_dataset, task_field, "train_dataset")
        if isinstance(eval_dataset, dict) and eval_dataset and all(
                task_field not in d.column_names for d in eval_dataset.values()):
            eval_dataset, _ = _combine(eval_dataset, task_field, "eval_dataset")
        if train_dataset is None:
            raise ValueError("train_dataset: required")
        from datasets import Dataset
        if not isinstance(train_dataset, Dataset):
            raise TypeError(f"train_dataset: expected a datasets.Dataset (or a dict/list of them), got "
                            f"{type(train_dataset).__name__} (IterableDataset is not supported)")
        if task_field not in train_dataset.column_names:
            raise KeyError(f"task_field: the train dataset has no {task_field!r} column "
                           f"(columns: {train_dataset.column_names}); name it with task_field=")
        if task_names is None:
            task_names = names if names is not None else self._infer_names(train_dataset, num_tasks)
        task_names = [str(n) for n in task_names]
        num_tasks = len(task_names) if num_tasks is None else num_tasks
        self._task_index = {n: i for i, n in enumerate(task_names)}
        self._num_tasks_for_prep = num_tasks
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, num_tasks=num_tasks, task_names=task_names,
                         task_ids_key="task_ids", **kwargs)
        if self.label_smoother is not None:
            raise ValueError("label_smoothing_factor: not supported by OrthoLoRASFTTrainer")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: MoE auxiliary losses are not supported by OrthoLoRASFTTrainer "
                             "(set router_aux_loss_coef=0.0)")
        if self._is_vision_dataset:
            raise ValueError("train_dataset: vision datasets are not supported by OrthoLoRASFTTrainer")
        self.data_collator = TokenTaskCollator(self.data_collator)
        if self.args.packing and self.args.packing_strategy == "wrapped":
            # seen at configuration: "wrapped" keeps no document boundaries (no per-document positions)
            import warnings

            from .trainer import _MIXED_WARNING
            self._mixed_warned = True
            warnings.warn("packing_strategy='wrapped': " + _MIXED_WARNING, stacklevel=2)

    # ------------------------------------------------------------------ datasets
    def _infer_names(self, ds, num_tasks):
        values = ds.unique(self.task_field)
        if all(isinstance(v, str) for v in values):
            return sorted(values)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(f"task_field: task index {min(values)} < 0 in column {self.task_field!r}")
            return [str(i) for i in range(num_tasks or max(values) + 1)]
        raise TypeError(f"task_field: column {self.task_field!r} must hold strings or ints, got "
                        f"{sorted({type(v).__name__ for v in values})}")

    def _task_of(self, value) -> int:
        if isinstance(value, str):
            if value not in self._task_index:
                raise ValueError(f"task_field: unknown task {value!r} (tasks: {list(self._task_index)})")
            return self._task_index[value]
        v = int(value)
        if not 0 <= v < self._num_tasks_for_prep:
            raise ValueError(f"task_field: task index {v} out of range [0, {self._num_tasks_for_prep})")
        return v

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation with the task carried along as a per-token column.

        Tokenisation and labels are TRL's (the task column rides along); when packing, the
        packing step is TRL's too (shuffle, ``pack_dataset`` with ``args.packing_strategy``),
        applied with the per-token task column selected beside ``input_ids`` and ``labels``."""
        cols = dataset.column_names
        if TOKEN_TASK_COLUMN in cols:  # prepared already
            return dataset
        if self.task_field not in cols and TASK_COLUMN not in cols:
            raise KeyError(f"task_field: the {dataset_name} dataset has no {self.task_field!r} column "
                           f"(columns: {cols})")
        if TASK_COLUMN not in cols:
            dataset = dataset.map(lambda ex: {TASK_COLUMN: self._task_of(ex[self.task_field])},
                                  desc=f"Task ids of the {dataset_name} dataset")
        if not packing:
            dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
            return dataset.map(lambda ex: {TOKEN_TASK_COLUMN: [ex[TASK_COLUMN]] * len(ex["input_ids"])})
        # TRL's packing selects input_ids and labels only: prepare unpacked and untruncated
        # (packing truncates/splits), then pack here with the task column beside them.
        view = _ArgsView(args, max_length=None, shuffle_dataset=False)
        dataset = super()._prepare_dataset(dataset, processing_class, view, False, formatting_func, dataset_name)
        if args.max_length is None:
            raise ValueError("max_length: when packing is enabled, `max_length` can't be `None`")
        dataset = dataset.map(lambda ex: {TOKEN_TASK_COLUMN: [ex[TASK_COLUMN]] * len(ex["input_ids"])})
        dataset = dataset.select_columns(["input_ids", "labels", TOKEN_TASK_COLUMN])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Packing {dataset_name} dataset"}
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TOKEN_TASK_COLUMN not in self._signature_columns:
            self._signature_columns.append(TOKEN_TASK_COLUMN)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sum_t`` of the per-task mean next-token losses; TRL's forward (fused LM head) and
        metrics."""
        inputs = dict(inputs)
        task_ids = inputs.pop(self.task_ids_key, None)
        if task_ids is None:
            raise KeyError(f"inputs: the batch has no {self.task_ids_key!r} (per-token task ids)")
        rec = _Recorder(model)
        SFTTrainer.compute_loss(self, rec, inputs, return_outputs=False, num_items_in_batch=None)
        out = rec.outputs
        if out is None or getattr(out, "log_probs", None) is None:
            raise RuntimeError("compute_loss: TRL's forward gave no per-token log-probabilities")
        per_token = -out.log_probs  # [batch, seq - 1], 0 where the label is -100
        if self.args.loss_type == "dft":
            per_token = per_token * out.log_probs.exp().detach()
        ids = task_ids[:, 1:].to(per_token.device)
        loss_ids = torch.where(out.label_mask, ids, torch.full_like(ids, -1))
        counts = None
        if self.ortho.world_size() > 1:
            from ..distributed import global_task_counts
            counts = global_task_counts(loss_ids, self.num_tasks, self.ortho.process_group)
        loss = self.task_loss(per_token, loss_ids, counts)
        if return_outputs:
            with torch.no_grad():
                logits_out = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, logits_out
        return loss
