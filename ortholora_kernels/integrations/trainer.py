"""Hugging Face ``Trainer`` integration: switch to Ortho-LoRA by changing one class.

    trainer = OrthoLoRATrainer(
        model=peft_model, args=TrainingArguments(...), train_dataset=ds,   # rows carry "task_id"
        data_collator=MultiTaskCollator(DataCollatorWithPadding(tokenizer)),
        num_tasks=3,                              # the only new required argument
    )
    trainer.train()

What changes against ``Trainer``:

* the loss is ``sum_t mean_{task-t examples} loss_i`` (per-example loss from the logits:
  cross-entropy, or MSE for one regression output; override :meth:`per_example_loss`);
* the per-task LoRA gradients are collected (``ortho_collect="grouped"``: one backward;
  ``"loop"``: one forward and backward per task in the batch) over every micro-batch of
  gradient accumulation, and projected once per optimizer step, right after the last
  micro-batch's backward: before gradient clipping, AMP unscaling and ``optimizer.step``;
* every logging step adds :meth:`OrthoLoRA.stats_dict`: ``ortho/conflict_fraction/<segment>``,
  ``ortho/mean_cosine/<segment>``, ``ortho/tasks_present/<segment>``, the per-task
  ``ortho/grad_norm/<segment>/<task>`` and pairwise ``ortho/cosine/<segment>/<task_i>~<task_j>``
  (one host sync per logging step; ``log_ortho_stats="summary"`` keeps the first three); besides, on a GPU the
  dataloader has already moved the batch's ``task_ids`` to the device, so reading them (the
  grouped collector needs the per-task row counts on the host; the loop splits the batch)
  costs one small device-to-host copy per micro-batch;
* the task ids column (``task_ids_key``, default "task_ids"; the collator also accepts
  "task_id" per row) is kept by ``remove_unused_columns`` and is not passed to the model
  unless ``pass_task_ids=True`` (models with per-task heads); an override of
  :meth:`~OrthoLoRATrainer.per_example_loss` that takes a ``task_ids`` argument receives them
  (mixed classification / regression heads: see the README's per-task heads recipe);
* per-token task ids (``[batch, seq]``: packed sequences of a causal LM, e.g. from
  :class:`PackedCausalLMCollator`) give per-token next-token losses: task t's loss is the
  mean over its tokens whose label is not -100 (override :meth:`per_token_loss`); the
  per-task train and eval losses are logged as ``loss/<task>`` and ``eval_loss/<task>``;
  documents of different tasks that attend to each other (no position-id or varlen
  separation) make per-task gradients ill-defined: the trainer warns once when it sees it;
* every checkpoint also holds ``ortholora_state.pt`` (the projection-order generator, the
  step count, the layout signature; loadable with ``torch.load(weights_only=True)``), restored
  by ``train(resume_from_checkpoint=...)``: a resumed run is bit-exact with an uninterrupted one.

Distributed (``torchrun`` / accelerate DDP): OrthoLoRA is built before accelerate wraps the
model, so DDP leaves the LoRA parameters alone and the per-task buffer is all-reduced
before projecting. The per-task means divide by the GLOBAL per-task counts of the
micro-batch (one ``[T]`` all-reduce per micro-batch), so W ranks train exactly like one
process on the union of their batches (see :mod:`.distributed`).
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Trainer
from transformers.data.data_collator import default_data_collator

from ..aggregate import Aggregator
from ..collect import per_task_mean_loss
from ..projector import OrthoLoRA

__all__ = ["OrthoLoRATrainer", "MultiTaskCollator", "PackedCausalLMCollator", "ORTHO_STATE_NAME",
           "token_loss_task_ids", "documents_mix_tasks"]

#: the file in each Trainer checkpoint folder that holds :meth:`OrthoLoRA.state_dict`
ORTHO_STATE_NAME = "ortholora_state.pt"


def token_loss_task_ids(task_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq - 1]`` task ids of the next-token losses: position s predicts label s+1, so
    its loss belongs to the task of token s+1, or to no task (-1) where that label is -100
    (padding, a document's first token in a packed row, a prompt under completion-only loss).

    ``task_ids`` are the routing ids ``[batch, seq]`` (the task of every token's document, -1
    on padding): a prompt token keeps its task there, since the completion's loss reaches it
    through attention and its LoRA gradient belongs to that task."""
    if task_ids.shape != labels.shape:
        raise ValueError(f"task_ids: per-token ids must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(task_ids.shape)}")
    ids = task_ids[:, 1:].to(labels.device)
    return torch.where(labels[:, 1:] != -100, ids, torch.full_like(ids, -1))


def lay_out_token_ids(ids: Sequence[torch.Tensor], batch: dict) -> torch.Tensor:
    """Per-token task ids laid out like ``batch["input_ids"]``: one ``[len]`` tensor per row
    (or, for a padding-free batch of one flattened row, one per document), -1 on padding.

    Raises a ValueError (naming ``data_collator``) when they cannot line up with the tokens or
    the attention mask (left padding)."""
    shape = tuple(batch["input_ids"].shape)
    if shape[0] == 1 and len(ids) > 1:  # padding-free: one flattened row
        ids = [torch.cat(list(ids))]
    if len(ids) != shape[0] or max(len(t) for t in ids) > shape[1]:
        raise ValueError(f"data_collator: cannot lay out the per-token task ids like input_ids {shape}")
    out = torch.full(shape, -1, dtype=torch.long)
    for r, t in enumerate(ids):
        out[r, :len(t)] = t
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2 and not torch.equal(out >= 0, mask.bool()):
        raise ValueError("data_collator: the per-token task ids do not line up with the attention mask "
                         "(left padding?); use right padding")
    return out


def documents_mix_tasks(task_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None) -> bool:
    """Whether tokens of different tasks can attend to each other in this batch.

    A row is one attention span, except in the padding-free form (``position_ids`` and no
    2-D ``attention_mask``), where a span ends where the position ids restart at 0, and for a
    2-D mask of document indices (values above 1, axolotl's sample packing), where a span is
    one index. A 4-D ``attention_mask`` is the caller's own (block-diagonal) mask: trusted.
    Ids -1 are ignored."""
    if task_ids.dim() != 2 or (attention_mask is not None and attention_mask.dim() == 4):
        return False
    ids = task_ids.detach().cpu().long()
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    if position_ids is not None and attention_mask is None:
        pos = position_ids.detach().cpu().long().expand_as(ids)
        span = (pos == 0).long().cumsum(1)
        key = rows * (ids.shape[1] + 1) + span
    elif attention_mask is not None and attention_mask.dim() == 2 and bool((attention_mask > 1).any()):
        key = rows * (ids.shape[1] + 1) + attention_mask.detach().cpu().long()
    else:
        key = rows
    keep = ids >= 0
    pairs = torch.unique(torch.stack([key[keep], ids[keep]], 1), dim=0)
    return pairs.shape[0] > 0 and bool((torch.unique(pairs[:, 0], return_counts=True)[1] > 1).any())


_MIXED_WARNING = ("documents of different tasks attend to each other in this batch (packing without position-id "
                  "or varlen separation, e.g. packing_strategy='wrapped'): a task's loss then depends on other "
                  "tasks' tokens and per-task gradients are ill-defined (the grouped collector attributes each "
                  "token's LoRA gradient to that token's task). Use padding-free packing (position ids restarting "
                  "per document: TRL's packing_strategy='bfd', PackedCausalLMCollator) or one document per row.")


class MultiTaskCollator:
    """Collate rows that carry a task id into a batch with a ``task_ids`` LongTensor.

    Args:
        base: the collator for everything else (default ``default_data_collator``; e.g.
            ``DataCollatorWithPadding(tokenizer)``).
        task_key: the row key holding the task id ("task_id" or "task_ids" are both found).
        out_key: the batch key of the ``[batch]`` task ids (default "task_ids").
        sort_by_task: stable-sort the rows by task so every task is a contiguous slice (the
            grouped collector then copies nothing). The order inside a task is kept.
        num_tasks: when given, task ids are checked against ``[0, num_tasks)``.
    """

    def __init__(self, base=None, task_key: str = "task_id", out_key: str = "task_ids", sort_by_task: bool = True,
                 num_tasks: int | None = None):
        self.base = base or default_data_collator
        self.task_key, self.out_key = task_key, out_key
        self.sort_by_task = sort_by_task
        self.num_tasks = num_tasks

    def _task_of(self, i, row) -> int:
        for key in (self.task_key, "task_id", "task_ids"):
            if key in row:
                v = row[key]
                v = int(v.item()) if isinstance(v, torch.Tensor) else int(v)
                if v < 0 or (self.num_tasks is not None and v >= self.num_tasks):
                    raise ValueError(f"task_ids: row {i} has task id {v}, out of range [0, {self.num_tasks})")
                return v
        raise KeyError(f"task_key: row {i} has no {self.task_key!r} entry (keys: {sorted(row)})")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tasks = [self._task_of(i, f) for i, f in enumerate(features)]
        order = sorted(range(len(features)), key=lambda i: tasks[i]) if self.sort_by_task else list(range(len(features)))
        drop = {self.task_key, "task_id", "task_ids"}
        rows = [{k: v for k, v in features[i].items() if k not in drop} for i in order]
        batch = dict(self.base(rows))
        batch[self.out_key] = torch.tensor([tasks[i] for i in order], dtype=torch.long)
        return batch


class PackedCausalLMCollator(MultiTaskCollator):
    """Pack documents (rows with ``input_ids``, optional ``labels`` and a task id) into one
    padding-free row for a causal LM, with per-token task ids.

    The packing is ``transformers.DataCollatorWithFlattening``'s: the documents concatenated
    into ``input_ids [1, L]``, ``position_ids`` restarting at 0 for every document (Hugging
    Face attention then keeps the documents apart: block-diagonal causal attention) and
    ``labels`` (-100 on each document's first token, so no document predicts the next one's).
    Added: ``task_ids [1, L]``, every token carrying its document's task.

    Args:
        task_key: the row key holding the task id ("task_id" or "task_ids" are both found).
        out_key: the batch key of the per-token task ids (default "task_ids").
        num_tasks: when given, task ids are checked against ``[0, num_tasks)``.
    """

    def __init__(self, task_key: str = "task_id", out_key: str = "task_ids", num_tasks: int | None = None):
        from transformers import DataCollatorWithFlattening
        super().__init__(DataCollatorWithFlattening(return_position_ids=True, separator_id=-100), task_key=task_key,
                         out_key=out_key, sort_by_task=False, num_tasks=num_tasks)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tasks = [self._task_of(i, f) for i, f in enumerate(features)]
        drop = {self.task_key, "task_id", "task_ids"}
        rows = [{k: v for k, v in f.items() if k not in drop} for f in features]
        batch = dict(self.base(rows, return_tensors="pt"))
        lens = [len(r["input_ids"]) for r in rows]
        batch[self.out_key] = torch.tensor(tasks, dtype=torch.long).repeat_interleave(torch.tensor(lens))[None]
        return batch


class OrthoLoRATrainer(Trainer):
    """A ``transformers.Trainer`` that trains the shared LoRA adapter with Ortho-LoRA.

    Keyword args (everything else goes to ``Trainer``):
        num_tasks: T (required).
        ortho_granularity: "ab" (default), "global", "layer" or "matrix".
        ortho_collect: "grouped" (default: one backward) or "loop" (per-task passes).
        ortho_reduction: "sum" (default) or "mean".
        ortho_seed: seed of the projection orders (default ``args.seed``).
        ortho_backend: the projection backend (default automatic).
        adapter_name: the peft adapter (default "default").
        task_ids_key: the batch key of the task ids (default "task_ids").
        pass_task_ids: also pass the task ids to the model's forward (per-task heads).
        log_ortho_stats: add the projection statistics to the logs (True: with per-task
            norms and pairwise cosines; "summary": conflict fraction, mean cosine and tasks
            present per segment; False: none).
        ortho_method: the aggregator, "pcgrad" (default) or any of
            ``ortholora_kernels.solvers.METHODS`` ("upgrad", "cagrad", "gradvac", ...).
        ortho_method_options: its options (e.g. ``{"c": 0.5}``); ortho_ema / ortho_every /
            ortho_start: smoothed conflict detection and schedule (see ``OrthoLoRA``).
        ortho_aggregator: instead of the five above, an ``ortholora_kernels.Aggregator``
            (method, options, EMA, schedule and state in one object).
        task_names: names of the tasks in the logs (default "task0", "task1", ...).

    Attributes:
        ortho: the :class:`~ortholora_kernels.OrthoLoRA` (``ortho.last_stats`` per step).
    """

    def __init__(self, *args, num_tasks: int, ortho_granularity: str = "ab", ortho_collect: str = "grouped",
                 ortho_reduction: str = "sum", ortho_seed: int | None = None, ortho_backend: str | None = None,
                 adapter_name: str = "default", task_ids_key: str = "task_ids", pass_task_ids: bool = False,
                 log_ortho_stats: bool | str = True, ortho_method: str = "pcgrad",
                 ortho_method_options: dict | None = None, ortho_ema: float | None = None, ortho_every: int = 1,
                 ortho_start: int = 0, ortho_aggregator=None, task_names: Sequence[str] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not self.label_names:  # a model whose forward takes no labels (e.g. per-task heads): the loss needs them
            self.label_names = ["labels"]
        self.task_ids_key = task_ids_key
        self.pass_task_ids = pass_task_ids
        if log_ortho_stats not in (True, False, "summary"):
            raise ValueError(f"log_ortho_stats: expected True, False or 'summary', got {log_ortho_stats!r}")
        self.log_ortho_stats = log_ortho_stats
        self.num_tasks = num_tasks
        names = [f"task{i}" for i in range(num_tasks)] if task_names is None else [str(n) for n in task_names]
        if len(names) != num_tasks or len(set(names)) != num_tasks:
            raise ValueError(f"task_names: expected {num_tasks} distinct names (num_tasks), got {list(names)}")
        self.task_names = names
        self._task_loss_acc: dict[str, list] = {}
        self._mixed_warned = False
        seed = self.args.seed if ortho_seed is None else ortho_seed
        if ortho_aggregator is not None:
            given = [k for k, v, d in (("ortho_method", ortho_method, "pcgrad"), ("ortho_method_options",
                     ortho_method_options or None, None), ("ortho_ema", ortho_ema, None), ("ortho_every", ortho_every, 1),
                     ("ortho_start", ortho_start, 0)) if v != d]
            if given:  # the object carries them; a second value would be silently ignored
                raise TypeError(f"{given[0]}: ortho_aggregator carries the method, its options, EMA and schedule; "
                                f"give them to the Aggregator, not beside it")
        self.ortho = OrthoLoRA(self.model, num_tasks, granularity=ortho_granularity, collect=ortho_collect,
                               reduction=ortho_reduction, seed=seed, backend=ortho_backend, adapter_name=adapter_name,
                               aggregator=ortho_aggregator if ortho_aggregator is not None else Aggregator(
                                   ortho_method, ema=ortho_ema, every=ortho_every, start=ortho_start,
                                   **(ortho_method_options or {})))
        # The loss is ours (per-task means): let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # an override written as per_example_loss(outputs, labels, task_ids) gets the task ids
        params = inspect.signature(self.per_example_loss).parameters
        self._loss_takes_task_ids = "task_ids" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for k in (self.task_ids_key, "task_id", "task_ids", "labels"):
            if k not in self._signature_columns:
                self._signature_columns.append(k)

    # ------------------------------------------------------------------ loss
    def per_example_loss(self, outputs, labels: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch]`` losses from the model outputs: cross-entropy (mean over tokens for
        token-level logits, ignoring label -100), or MSE for a single regression output.

        Override it for other losses; an override with a ``task_ids`` parameter receives the
        ``[batch]`` task ids (e.g. cross-entropy for some tasks, MSE for others); the default
        ignores them."""
        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point():
            return (logits.squeeze(-1).float() - labels.float()) ** 2
        if logits.dim() == 2:
            return nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
        if logits.dim() == 3:  # token classification / LM-style: mean over labelled tokens
            tok = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.long(), reduction="none",
                                              ignore_index=-100)
            n = (labels != -100).sum(1).clamp_min(1)
            return tok.sum(1) / n
        raise ValueError(f"outputs: cannot derive per-example losses from logits of shape {tuple(logits.shape)}; "
                         "override OrthoLoRATrainer.per_example_loss")

    def _split_inputs(self, inputs):
        inputs = dict(inputs)
        if self.task_ids_key not in inputs:
            raise KeyError(f"task_ids_key: the batch has no {self.task_ids_key!r} (use MultiTaskCollator); "
                           f"keys: {sorted(inputs)}")
        task_ids = inputs.pop(self.task_ids_key)
        labels = inputs.pop("labels", None)
        if self.pass_task_ids:
            inputs[self.task_ids_key] = task_ids
        return inputs, labels, task_ids

    def per_token_loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """``[batch, seq - 1]`` next-token cross-entropy of a causal LM (position s predicts
        label s+1; 0 where that label is -100), for per-token task ids. Override for other
        per-token losses."""
        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(f"outputs: per-token task ids need token logits [batch, seq, vocab] matching labels "
                             f"{tuple(labels.shape)}, got {tuple(logits.shape)}; override per_token_loss")
        return nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].long(),
                                           reduction="none", ignore_index=-100)

    def task_loss(self, per_item: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_t`` of the per-task mean of ``per_item`` (``[batch]`` or per-token losses) over
        the items of id t (-1: none); also accumulates the per-task losses for the logs."""
        ids = ids.to(per_item.device)
        per_task = per_task_mean_loss(per_item, ids, self.num_tasks, counts=counts)
        with torch.no_grad():  # the logged per-task losses: item-weighted means between two logs
            flat = ids.reshape(-1).long()
            flat = torch.where(flat < 0, torch.full_like(flat, self.num_tasks), flat)
            n = torch.zeros(self.num_tasks + 1, dtype=torch.float64, device=flat.device).index_add_(
                0, flat, torch.ones_like(flat, dtype=torch.float64))[:self.num_tasks]
            acc = self._task_loss_acc.setdefault("train" if self.model.training else "eval", [0.0, 0.0])
            acc[0] = acc[0] + per_task.detach().double() * n
            acc[1] = acc[1] + n
        return per_task.sum()

    def _per_task_logs(self, mode: str, prefix: str) -> dict[str, float]:
        acc = self._task_loss_acc.pop(mode, None)
        if acc is None or not isinstance(acc[1], torch.Tensor):
            return {}
        sums, n = acc[0].tolist(), acc[1].tolist()   # one host sync per log
        return {f"{prefix}loss/{name}": s / c for name, s, c in zip(self.task_names, sums, n) if c > 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sum_t`` of the per-task mean losses of the batch (tasks absent contribute 0):
        per example (``[batch]`` task ids) or per token (``[batch, seq]``: :meth:`per_token_loss`)."""
        model_inputs, labels, task_ids = self._split_inputs(inputs)
        if labels is None:
            raise ValueError("inputs: OrthoLoRATrainer needs 'labels' in the batch")
        if task_ids.dim() == 2 and "position_ids" in model_inputs:
            # transformers separates packed documents by their position ids only without a KV cache
            model_inputs.setdefault("use_cache", False)
        outputs = model(**model_inputs)
        counts = getattr(self, "_ortho_counts", None)  # global counts, set by training_step
        if task_ids.dim() == 2:
            loss = self.task_loss(self.per_token_loss(outputs, labels), token_loss_task_ids(task_ids, labels), counts)
            return (loss, outputs) if return_outputs else loss
        if self._loss_takes_task_ids:
            per_ex = self.per_example_loss(outputs, labels, task_ids=task_ids.to(labels.device))
        else:
            per_ex = self.per_example_loss(outputs, labels)
        loss = self.task_loss(per_ex, task_ids, counts)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: collect per-task gradients; on the last micro-batch, project."""
        task_ids = inputs.get(self.task_ids_key)
        if task_ids is None:
            raise KeyError(f"task_ids_key: the batch has no {self.task_ids_key!r} (use MultiTaskCollator)")
        self._ortho_counts = None
        if task_ids.dim() == 2 and not self._mixed_warned and documents_mix_tasks(
                task_ids, inputs.get("position_ids"), inputs.get("attention_mask")):
            self._mixed_warned = True
            warnings.warn(_MIXED_WARNING, stacklevel=2)
        if self.ortho.world_size() > 1:  # once per micro-batch, also for the loop's sub-batches
            from ..distributed import global_task_counts
            loss_ids = task_ids
            if task_ids.dim() == 2 and "labels" in inputs:  # per token: the denominators count loss tokens
                loss_ids = token_loss_task_ids(task_ids, inputs["labels"])
            self._ortho_counts = global_task_counts(loss_ids, self.num_tasks, self.ortho.process_group)
        try:
            if self.ortho.collect == "grouped":
                with self.ortho.record(task_ids):
                    loss = super().training_step(model, inputs, num_items_in_batch)
            else:
                loss = self._loop_training_step(model, inputs, task_ids, num_items_in_batch)
        finally:
            self._ortho_counts = None
        if self.accelerator.gradient_state.sync_gradients:
            self.ortho.project_()
        return loss

    def _loop_training_step(self, model, inputs, task_ids, num_items_in_batch):
        """The paper's loop: a forward and backward pass per task present in the batch."""
        ids = task_ids.detach().cpu()
        total = None
        if ids.dim() == 2:  # per-token ids (packed): the whole batch, only task t's tokens in the loss
            for t in torch.unique(ids[ids >= 0]).tolist():
                sub = dict(inputs)
                sub[self.task_ids_key] = torch.where(task_ids == t, task_ids, torch.full_like(task_ids, -1))
                with self.ortho.task(t):
                    loss_t = super().training_step(model, sub, num_items_in_batch)
                total = loss_t if total is None else total + loss_t
            return total
        for t in torch.unique(ids).tolist():
            rows = (ids == t).nonzero().squeeze(1)
            sub = {k: (v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == ids.numel()
                       else v) for k, v in inputs.items()}
            with self.ortho.task(t):
                loss_t = super().training_step(model, sub, num_items_in_batch)
            total = loss_t if total is None else total + loss_t
        return total

    # ------------------------------------------------------------------ checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        """Also writes the OrthoLoRA state (order generator, step count, layout signature)."""
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            from ..checkpoint import atomic_save
            atomic_save(self.ortho.state_dict(), os.path.join(output_dir, ORTHO_STATE_NAME))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Also restores the OrthoLoRA state of the checkpoint (refused if its layout differs)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ORTHO_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"resume_from_checkpoint: {checkpoint} has no {ORTHO_STATE_NAME} (not written by "
                          "OrthoLoRATrainer?): the projection orders restart from the seed, so the resumed run "
                          "is not bit-exact", stacklevel=2)
            return
        from ..checkpoint import safe_load
        self.ortho.load_state_dict(safe_load(path))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: as ``Trainer``; the task ids only reach the model with ``pass_task_ids``."""
        if self.task_ids_key in inputs and not self.pass_task_ids and "labels" not in inputs:
            inputs = {k: v for k, v in inputs.items() if k != self.task_ids_key}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the per-task losses since the last log (``loss/<task>``; in evaluation
        ``<prefix>loss/<task>``, e.g. ``eval_loss/<task>``) and the last projection's statistics
        (``ortho/...``). Updates ``logs`` in place, so ``evaluate()`` returns them too."""
        if "loss" in logs:
            logs.update(self._per_task_logs("train", ""))
            if self.log_ortho_stats and self.ortho.last_stats is not None:
                logs.update(self.ortho.stats_dict(per_task=self.log_ortho_stats != "summary",
                                                  task_names=self.task_names))
        else:
            prefix = next((k[:-4] for k in logs if k.endswith("_loss") and "/" not in k), None)
            if prefix is not None:
                logs.update(self._per_task_logs("eval", prefix))
        super().log(logs, *args, **kwargs)
