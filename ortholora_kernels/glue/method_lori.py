"""``--method lori``: LoRI (arXiv 2504.07448) in the GLUE harness.

Adapter (:mod:`.lori`): on the target modules (``--lora-target-modules``), A frozen at a
random projection drawn from ``--seed`` (the same A for every task), B trainable; rank
``--lora-r``, ``--lora-alpha``, ``--lora-dropout``. Every unit trains in two stages:

* LoRI-D: dense B, the first ``round(--lori-dense-fraction * steps)`` steps (default 0.5);
* then the mask: global magnitude top-k over all B's, keeping ``1 - --lori-sparsity`` of the
  entries (default sparsity 0.9); LoRI-S: B restarts from zero on the fixed mask, for the
  remaining steps. The LoRI-S stage gets a fresh AdamW state and its own warm-up + linear
  decay (as a second training run would); the heads keep their LoRI-D weights.

``--max-steps`` (or ``--epochs``) is the budget of one unit, split between the stages
(``--lori-dense-fraction 1`` trains LoRI-D only).

Modes (``--lori-mode``):

* ``merge`` (default; the paper's multi-task recipe): one LoRI adapter (and head) per task,
  each trained alone (LoRI-D, mask, LoRI-S: ``--max-steps`` steps per task, as ``single``),
  then the T adapters are merged into one (:func:`.lori.merge_lori`, weights w_t = 1/T:
  with one shared A (default, all from ``--seed``) B = sum_t w_t B_t at rank r, mask =
  union; with ``--lori-task-seeds`` each task's A comes from ``--seed + t`` (independent
  random projections, nearly orthogonal task subspaces) and the merge concatenates them,
  rank T*r, dW = sum_t w_t B_t A_t) and the merged adapter is evaluated on every task with
  that task's head. results.json's final metrics are the merged
  adapter's; ``unmerged_final``/``unmerged_glue_score`` keep each task's own adapter.
  Files: ``lori_adapter_<task>.pt`` (adapter + head), ``lori_merged.pt``.
* ``joint``: one shared LoRI adapter trained on all tasks together (summed task losses, as
  ``joint``), LoRI-D then LoRI-S. Composes with Ortho-LoRA: ``--projection G`` projects the
  per-task gradients of the B's (A is frozen and never projected; with ``ab`` this is one
  B segment) with granularity G. Both ``--collect grouped`` and ``loop`` respect the mask:
  the per-task B gradients are masked in the buffer before the projection (the masked
  forward gives grad(B) = mask * grad(B * mask)), so statistics and update see only the
  kept entries. Projection makes no sense in ``merge`` mode (each adapter sees one task),
  so ``--projection`` there is an error.

Checkpoints carry the masks (method state), so ``--resume`` is exact in either stage.
Parameter counts: the adapter counts the trainable B entries of the final stage (LoRI-S:
kept entries only; A is frozen), summed over the per-task adapters in ``merge`` mode.
"""
from __future__ import annotations

import os
import types

import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .lori import (apply_lori, apply_lori_mask, count_trainable, enforce_lori_mask, load_lori, lori_mask,
                   lori_modules, lori_parameters, lori_state_dict, mask_lori_grads, merge_lori)
from .method_mtl_lora import check_projection, make_seed_projector, projected_backward
from .methods import Method, load_projector_state, projector_state, register_method
from .model import MultiTaskModel

MODES = ("merge", "joint")


def _dense_steps(cfg, total: int) -> int:
    return min(total, max(1, int(round(cfg.lori_dense_fraction * total))))


def _forward_through_linear(self, x):
    """LoRILinear.forward with B applied by the nn.Linear ``self._b_linear`` (which shares
    the B parameter), so Ortho-LoRA's grouped collector can route its weight gradient. Uses
    the stored B: equal to B * mask because masked entries are kept at exactly zero."""
    out = F.linear(x, self.weight, self.bias)
    h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
    return out + self._b_linear(h) * self.scaling


def _route_b_through_linears(encoder) -> list:
    """Give every LoRI module an (unregistered) nn.Linear sharing its B; returns
    (module name, linear) pairs. State dicts and parameter lists are unchanged."""
    out = []
    for name, m in lori_modules(encoder):
        lin = nn.Linear(m.r, m.out_features, bias=False, device="meta")
        lin.weight = m.lora_B
        m.__dict__["_b_linear"] = lin
        m.forward = types.MethodType(_forward_through_linear, m)
        out.append((name, lin))
    return out


@register_method
class LoRI(Method):
    """LoRI (frozen random A, sparse B), merge or joint mode; see the module docstring."""
    name = "lori"
    help = ("LoRI: frozen random A, sparse B (LoRI-D -> mask -> LoRI-S); --lori-mode merge (per-task adapters, "
            "merged) or joint (one shared adapter; --projection adds Ortho-LoRA)")
    options = ("projection", "collect", "backend", "lori_sparsity", "lori_dense_fraction", "lori_mode",
               "lori_task_seeds")
    defaults = {"projection": "none", "lori_sparsity": 0.9, "lori_dense_fraction": 0.5, "lori_mode": "merge"}

    @classmethod
    def check_config(cls, cfg):
        if cfg.lori_mode is not None and cfg.lori_mode not in MODES:
            raise ValueError(f"--lori-mode must be merge or joint, not {cfg.lori_mode!r}")
        if (cfg.lori_mode or "merge") == "merge" and cfg.projection not in (None, "none"):
            raise ValueError("--projection with --method lori needs --lori-mode joint (in merge mode every "
                             "adapter is trained on one task: there is nothing to project)")
        if cfg.lori_task_seeds and cfg.lori_mode == "joint":
            raise ValueError("--lori-task-seeds applies to --lori-mode merge (a joint adapter has one A)")
        check_projection(cfg, cls.name, " and --lori-mode joint" if (cfg.lori_mode or "merge") == "merge" else "")
        if cfg.lori_sparsity is not None and not 0 <= cfg.lori_sparsity < 1:
            raise ValueError("--lori-sparsity must be in [0, 1)")
        if cfg.lori_dense_fraction is not None and not 0 < cfg.lori_dense_fraction <= 1:
            raise ValueError("--lori-dense-fraction must be in (0, 1]")

    @classmethod
    def is_separate(cls, cfg) -> bool:
        return (cfg.lori_mode or "merge") == "merge"

    def build_model(self, encoder, tasks):
        c = self.cfg
        seed = c.seed
        if c.lori_task_seeds:   # merge mode: this unit's task index in the run
            from .tasks import parse_tasks

            seed += [t.name for t in parse_tasks(c.tasks)].index(tasks[0].name)
        apply_lori(encoder, c.lora_target_modules, r=c.lora_r, alpha=c.lora_alpha, seed=seed,
                   dropout=c.lora_dropout, freeze_base=True, keep_trainable=())
        return MultiTaskModel(encoder, tasks, pooling=c.pooling)

    def schedule_phases(self, total):
        d = _dense_steps(self.cfg, total)
        self._dense = d if d < total else None    # the step after which LoRI-S starts
        return [d, total - d] if d < total else [total]

    def setup(self, model):
        self.model = model
        self.masks = None
        self.projector = None
        if self.cfg.projection not in (None, "none"):
            params = lori_parameters(model.encoder)
            if self.cfg.collect == "grouped":   # the collector needs B to be an nn.Linear weight
                for name, lin in _route_b_through_linears(model.encoder):
                    params.modules[id(lin.weight)] = lin
            self.projector = make_seed_projector(self.cfg, params, len(self.tasks))
            self.segment_names = list(self.projector.segment_names)

    def _mask_buffer(self, projector):
        """Zero the masked entries of every task's B gradient in the buffer (LoRI-S)."""
        if self.masks is None:
            return
        mods = dict(lori_modules(self.model.encoder))
        views = projector.layout.views(projector.buffer)   # [T, *shape] per parameter
        for name, v in zip(projector.layout.names, views):
            m = mods[name[:-len(".lora_B")]]
            v.mul_(m.lora_mask.to(v.dtype))

    def backward(self, model, losses, task_ids):
        if self.projector is None:
            stats = super().backward(model, losses, task_ids)
        else:
            stats = projected_backward(self.projector, self.cfg.collect, losses, task_ids, self._mask_buffer)
        mask_lori_grads(model.encoder)
        return stats

    def step_end(self, model, step, optimizer):
        enforce_lori_mask(model.encoder)
        if step == self._dense:
            self.masks = lori_mask(model.encoder, self.cfg.lori_sparsity)
            apply_lori_mask(model.encoder, self.masks, reset_b=True)
            optimizer.state.clear()     # LoRI-S: a fresh AdamW state

    def param_counts(self, model):
        heads = sum(p.numel() for p in model.heads.parameters() if p.requires_grad)
        return {"adapter": count_trainable(model.encoder, adapter_only=True), "heads": heads}

    def teardown(self):
        if self.projector is not None:
            self.projector.remove()
            for _, m in lori_modules(self.model.encoder):   # back to the plain LoRILinear forward
                m.__dict__.pop("forward", None)
                m.__dict__.pop("_b_linear", None)
        if self.is_separate(self.cfg):
            task = self.tasks[0].name
            head = {k: v.detach().cpu().clone() for k, v in self.model.heads[task].state_dict().items()}
            ckpt.atomic_save({"task": task, "adapter": lori_state_dict(self.model.encoder), "head": head},
                             os.path.join(self.cfg.out, f"lori_adapter_{task}.pt"))

    def state_dict(self):
        s = {"masks": self.masks}
        if self.projector is not None:
            s["projector"] = projector_state(self.projector)
        return s

    def load_state_dict(self, state):
        if state.get("masks") is not None:
            self.masks = state["masks"]
            apply_lori_mask(self.model.encoder, self.masks, reset_b=False)
        if self.projector is not None:
            load_projector_state(self.projector, state.get("projector"))

    @classmethod
    def post_train(cls, cfg, tasks, datas, tokenizer, device, evals):
        if not cls.is_separate(cfg):
            return None
        from .model import load_encoder
        from .data import encode
        from .report import final_metrics
        from .metrics import glue_score
        from .train import evaluate_tasks

        unmerged = final_metrics(evals)
        saved = [ckpt.load(os.path.join(cfg.out, f"lori_adapter_{t.name}.pt")) for t in tasks]
        merged = merge_lori([s["adapter"] for s in saved])
        ckpt.atomic_save(merged, os.path.join(cfg.out, "lori_merged.pt"))
        encoder = load_encoder(cfg.model, tokenizer, cfg.max_length, cfg.seed, cfg.tiny_hidden, cfg.tiny_layers)
        load_lori(encoder, merged, keep_trainable=())
        model = MultiTaskModel(encoder, tasks, pooling=cfg.pooling)
        for t, s in zip(tasks, saved):
            model.heads[t.name].load_state_dict(s["head"])
        model.to(device)
        eval_enc = [{k: encode(tokenizer, e, d.task, cfg.max_length) for k, e in d.evals.items()} for d in datas]
        step = max((e["step"] for e in evals), default=0)
        evaluate_tasks(model, Method(cfg, tasks), datas, eval_enc, cfg.eval_batch_size, tokenizer.pad_token_id,
                       device, step, evals, merged=True)
        mask_kept = sum(int(v.sum()) for k, v in merged["state"].items() if k.endswith(".lora_mask"))
        return {"unmerged_final": unmerged, "unmerged_glue_score": glue_score(unmerged) if unmerged else None,
                "merged_adapter_nonzero": mask_kept or None, "merge_weights": merged["config"]["merge_weights"],
                "merge": merged["config"]["merge"], "merged_rank": merged["config"]["r"]}
