"""``--method lori``: LoRI (arXiv 2504.07448) in the GLUE harness, as the authors run it.

Adapter (:mod:`ortholora_kernels.adapters.lori`): on the target modules
(``--lora-target-modules``), A frozen at a random projection, B trainable; rank
``--lora-r``, ``--lora-alpha``, ``--lora-dropout``.
Every unit trains two stages, the authors' two runs:

* LoRI-D: dense B from zero, ``--max-steps`` (or ``--epochs``) steps at ``--lr`` with the
  harness's schedule (warm-up ``--warmup-ratio``, linear decay) and ``--weight-decay``;
* the mask (``lori_mask``): global magnitude top-k over all B's, the authors' count
  k = int((1 - s) N) and tie rule |B| >= threshold, s = ``--lori-sparsity`` (0.9);
* LoRI-S: B restarts from zero on the fixed mask (A and the heads carried over), its own
  budget ``--lori-s-steps`` (default: as many steps as LoRI-D; 0 = LoRI-D only), learning
  rate ``--lori-s-lr`` (default 10 x ``--lr``), schedule ``--lori-s-schedule`` (default
  constant; ``linear`` = the harness's warm-up + decay) and weight decay
  ``--lori-s-weight-decay`` (default 0), a fresh AdamW state.

Modes (``--lori-mode``):

* ``merge`` (default; the paper's multi-task recipe): one LoRI adapter (and head) per task,
  each trained alone with its own random A (from ``--seed`` + task index; ``--lori-shared-a``:
  the variant with one A from ``--seed`` for every task), then merged as the authors do
  (peft ``add_weighted_adapter(..., combination_type="cat")``: rank T*r,
  dW = sum_t w_t s_t B_t A_t; with a shared A the same dW at rank r) with the merge weights
  of the final stage (``--lori-merge-weights-s``; LoRI-D only: ``--lori-merge-weights-d``;
  default ``default_merge_weights``: the authors' 0.5/0.4 for T = 3, 0.4/0.3 for
  T = 4). The merged adapter is evaluated on every task with that task's head: the final
  metrics. The LoRI-D adapters are merged too (LoRI-D weights, LoRI-D heads) and reported as
  ``merged_lori_d``; ``unmerged_final`` keeps each task's own adapter. Files:
  ``lori_adapter_<task>.pt`` (adapter + head, and the LoRI-D ones), ``lori_merged.pt``,
  ``lori_merged_d.pt``.
* ``continual``: the tasks in ``--tasks`` order trained into one adapter (A from ``--seed``).
  Task t: LoRI-D alone on task t (a fresh dense B, as the authors' stand-alone LoRI-D run
  that gives the mask), its mask from the entries no earlier task holds (the authors'
  ``& ~mask`` rule), then LoRI-S on that mask with the earlier tasks' entries frozen in the
  forward (``stack_lori_task``, kept exactly). ``--lori-s-steps 0`` is the authors'
  LoRI-D baseline instead: the whole dense B continues from the previous task. After every
  task all seen tasks are evaluated (their own heads): results.json ``continual`` holds the
  score matrix and the forgetting per task, summary.md the table. Files:
  ``lori_continual_<task>.pt`` (the adapter and heads after that task).
* ``joint``: one shared LoRI adapter trained on all tasks together (summed task losses, as
  ``joint``), LoRI-D then LoRI-S. Composes with Ortho-LoRA: ``--projection G`` projects the
  per-task gradients of the B's (A is frozen and never projected; with ``ab`` this is one
  B segment) with granularity G. Both ``--collect grouped`` and ``loop`` respect the mask:
  the per-task B gradients are masked in the buffer before the projection (the masked
  forward gives grad(B) = mask * grad(B * mask)), so statistics and update see only the
  kept entries. Projection makes no sense in the per-task modes (each adapter sees one
  task), so ``--projection`` there is an error.

results.json ``lori_stages`` records the resolved stage settings (steps per unit, lr, weight
decay, schedule, mask rule) and ``merge_weights`` the weights per stage and their rule.
Checkpoints carry the masks and the LoRI-D adapter (method state), so ``--resume`` is exact
in either stage. Parameter counts: the trainable B entries of the final stage (LoRI-S: kept
entries only; A is frozen), summed over the per-task units.
"""
from __future__ import annotations

import math
import os
import types

import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ...adapters import count_trainable
from ...adapters.lori import (apply_lori, apply_lori_mask, default_merge_weights, enforce_lori_mask, load_lori, lori_mask,
                             lori_modules, lori_parameters, lori_state_dict, mask_lori_grads, merge_lori,
                             stack_lori_task)
from . import (Method, check_projection, load_projector_state, make_seed_projector, projected_backward,
                      projector_state, register_method)
from ..model import MultiTaskModel

MODES = ("merge", "joint", "continual")
SCHEDULES = ("constant", "linear")
#: LoRI-S learning rate over LoRI-D's in the authors' scripts (5e-5 -> 5e-4, 1e-5 -> 1e-4: 10x; 5-20x overall)
S_LR_FACTOR = 10.0


def _task_index(cfg, task_name: str) -> int:
    from ..tasks import parse_tasks

    return [t.name for t in parse_tasks(cfg.tasks)].index(task_name)


def _continual_file(out: str, task: str) -> str:
    return os.path.join(out, f"lori_continual_{task}.pt")


def _forward_through_linear(self, x):
    """LoRILinear.forward with B applied by the nn.Linear ``self._b_linear`` (which shares
    the B parameter), so Ortho-LoRA's grouped collector can route its weight gradient. Uses
    the stored B: equal to B * mask because masked entries are kept at exactly zero (joint
    mode only: no frozen continual part)."""
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


def merge_weights(cfg, num_tasks: int, stage: str) -> tuple[list[float], str]:
    """The merge weights of ``stage`` ("lori_d"/"lori_s"): ``--lori-merge-weights-d/-s`` (one
    number for every task, or one per task) or the adapter's ``default_merge_weights``;
    with the rule."""
    given = cfg.lori_merge_weights_d if stage == "lori_d" else cfg.lori_merge_weights_s
    if given is None:
        return default_merge_weights(num_tasks, stage)
    w = [float(x) for x in given]
    return (w * num_tasks if len(w) == 1 else w), f"--lori-merge-weights-{stage[-1]}"


def s_steps(cfg, dense_steps: int) -> int:
    """LoRI-S steps of a unit whose LoRI-D has ``dense_steps``: ``--lori-s-steps`` or as many."""
    return dense_steps if cfg.lori_s_steps is None else cfg.lori_s_steps


@register_method
class LoRI(Method):
    """LoRI (frozen random A, sparse B), merge, continual or joint mode; see the module docstring."""
    name = "lori"
    help = ("LoRI: frozen random A, sparse B (LoRI-D -> mask -> LoRI-S); --lori-mode merge (per-task adapters, "
            "merged), continual (tasks in order into one adapter) or joint (one shared adapter; --projection adds "
            "Ortho-LoRA)")
    options = ("projection", "collect", "backend", "lori_sparsity", "lori_mode", "lori_shared_a", "lori_s_steps",
               "lori_s_lr", "lori_s_weight_decay", "lori_s_schedule", "lori_merge_weights_d", "lori_merge_weights_s",
               "aggregator", "aggregator_options", "aggregator_ema")
    defaults = {"projection": "none", "lori_sparsity": 0.9, "lori_mode": "merge", "lori_s_weight_decay": 0.0,
                "lori_s_schedule": "constant"}

    @classmethod
    def check_config(cls, cfg):
        from ..tasks import parse_tasks

        mode = cfg.lori_mode or "merge"
        if mode not in MODES:
            raise ValueError(f"--lori-mode must be merge, joint or continual, not {cfg.lori_mode!r}")
        if mode != "joint" and cfg.projection not in (None, "none"):
            raise ValueError(f"--projection with --method lori needs --lori-mode joint (in {mode} mode every "
                             "adapter is trained on one task at a time: there is nothing to project)")
        if cfg.lori_shared_a and mode != "merge":
            raise ValueError("--lori-shared-a applies to --lori-mode merge (the other modes train one adapter, one A)")
        check_projection(cfg, cls.name, " and --lori-mode joint" if mode != "joint" else "")
        if cfg.lori_sparsity is not None and not 0 <= cfg.lori_sparsity < 1:
            raise ValueError("--lori-sparsity must be in [0, 1)")
        if cfg.lori_s_steps is not None and (isinstance(cfg.lori_s_steps, bool) or not isinstance(cfg.lori_s_steps, int)
                                             or cfg.lori_s_steps < 0):
            raise ValueError(f"--lori-s-steps must be an integer >= 0, got {cfg.lori_s_steps!r}")
        if cfg.lori_s_lr is not None and not (math.isfinite(cfg.lori_s_lr) and cfg.lori_s_lr > 0):
            raise ValueError(f"--lori-s-lr must be a finite number > 0, got {cfg.lori_s_lr!r}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0 with --method lori, got {cfg.lr!r}")
        if cfg.lori_s_weight_decay is not None and not (math.isfinite(cfg.lori_s_weight_decay)
                                                        and cfg.lori_s_weight_decay >= 0):
            raise ValueError(f"--lori-s-weight-decay must be a finite number >= 0, got {cfg.lori_s_weight_decay!r}")
        if cfg.lori_s_schedule is not None and cfg.lori_s_schedule not in SCHEDULES:
            raise ValueError(f"--lori-s-schedule must be constant or linear, not {cfg.lori_s_schedule!r}")
        T = len(parse_tasks(cfg.tasks))
        for stage in ("d", "s"):
            w = getattr(cfg, f"lori_merge_weights_{stage}")
            if w is None:
                continue
            if mode != "merge":
                raise ValueError(f"--lori-merge-weights-{stage} applies to --lori-mode merge")
            if len(w) not in (1, T) or not all(math.isfinite(float(x)) for x in w):
                raise ValueError(f"--lori-merge-weights-{stage} must be one finite number or {T} (one per task), "
                                 f"got {list(w)!r}")
        if cfg.lori_s_lr is None:   # resolved here so that config.json records it
            cfg.lori_s_lr = S_LR_FACTOR * cfg.lr

    @classmethod
    def is_separate(cls, cfg) -> bool:
        return (cfg.lori_mode or "merge") in ("merge", "continual")

    @property
    def mode(self) -> str:
        return self.cfg.lori_mode or "merge"

    def build_model(self, encoder, tasks):
        c = self.cfg
        seed = c.seed
        if self.mode == "merge" and not c.lori_shared_a:   # an independent random A per task
            seed += _task_index(c, tasks[0].name)
        apply_lori(encoder, c.lora_target_modules, r=c.lora_r, alpha=c.lora_alpha, seed=seed,
                   dropout=c.lora_dropout, freeze_base=True, keep_trainable=())
        return MultiTaskModel(encoder, tasks, pooling=c.pooling)

    def schedule_phases(self, total):
        c = self.cfg
        s = s_steps(c, total)
        self._dense = total if s > 0 else None    # the step after which LoRI-S starts
        if not s:
            return [total]
        return [total, {"steps": s, "lr_scale": c.lori_s_lr / c.lr, "schedule": c.lori_s_schedule}]

    def _previous(self):
        """Continual mode: the saved adapter and heads after the previous task (None for the first)."""
        if self.mode != "continual":
            return None
        i = _task_index(self.cfg, self.tasks[0].name)
        if i == 0:
            return None
        from ..tasks import parse_tasks

        prev = parse_tasks(self.cfg.tasks)[i - 1].name
        return ckpt.load(_continual_file(self.cfg.out, prev))

    def setup(self, model):
        self.model = model
        self.masks = None
        self.dense = None
        self.projector = None
        if self.mode == "continual" and self.cfg.lori_s_steps == 0:
            prev = self._previous()   # LoRI-D continual: the dense B continues from the previous task
            if prev is not None:
                load_lori(model.encoder, prev["adapter"], keep_trainable=())
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

    def _head_state(self):
        return {k: v.detach().cpu().clone() for k, v in self.model.heads[self.tasks[0].name].state_dict().items()}

    def _apply_masks(self, reset_b):
        prev = self._previous()
        if prev is None:
            apply_lori_mask(self.model.encoder, self.masks, reset_b=reset_b)
        else:
            stack_lori_task(self.model.encoder, prev["adapter"], self.masks, reset_b=reset_b)

    def step_end(self, model, step, optimizer):
        enforce_lori_mask(model.encoder)
        if step == self._dense:
            if self.mode == "merge":   # kept for the LoRI-D merge
                self.dense = {"adapter": lori_state_dict(model.encoder), "head": self._head_state()}
            prev = self._previous()
            exclude = None
            if prev is not None:   # the entries of the earlier tasks are taken
                st = prev["adapter"]["state"]
                exclude = {n: st[f"{n}.lora_mask"] if f"{n}.lora_mask" in st else st[f"{n}.lora_B"] != 0
                           for n, _ in lori_modules(model.encoder)}
            self.masks = lori_mask(model.encoder, self.cfg.lori_sparsity, exclude=exclude)
            self._apply_masks(reset_b=True)
            optimizer.state.clear()     # LoRI-S: a fresh AdamW state, its own weight decay
            for g in optimizer.param_groups:
                g["weight_decay"] = self.cfg.lori_s_weight_decay

    def param_counts(self, model):
        heads = sum(p.numel() for p in model.heads.parameters() if p.requires_grad)
        return {"adapter": count_trainable(model.encoder, adapter_only=True), "heads": heads}

    def teardown(self):
        if self.projector is not None:
            self.projector.remove()
            for _, m in lori_modules(self.model.encoder):   # back to the plain LoRILinear forward
                m.__dict__.pop("forward", None)
                m.__dict__.pop("_b_linear", None)
        task = self.tasks[0].name
        if self.mode == "merge":
            ckpt.atomic_save({"task": task, "adapter": lori_state_dict(self.model.encoder), "head": self._head_state(),
                              "dense": self.dense}, os.path.join(self.cfg.out, f"lori_adapter_{task}.pt"))
        elif self.mode == "continual":
            prev = self._previous()
            heads = dict(prev["heads"]) if prev is not None else {}
            heads[task] = self._head_state()
            ckpt.atomic_save({"tasks": list(heads), "adapter": lori_state_dict(self.model.encoder), "heads": heads},
                             _continual_file(self.cfg.out, task))

    def state_dict(self):
        s = {"masks": self.masks, "dense": self.dense}
        if self.projector is not None:
            s["projector"] = projector_state(self.projector)
        return s

    def load_state_dict(self, state):
        self.dense = state.get("dense")
        if state.get("masks") is not None:
            self.masks = state["masks"]
            self._apply_masks(reset_b=False)   # B was restored by the checkpoint
        if self.projector is not None:
            load_projector_state(self.projector, state.get("projector"))

    @classmethod
    def post_train(cls, cfg, tasks, datas, tokenizer, device, evals):
        from ..train import _num_steps

        mode = cfg.lori_mode or "merge"
        units = [[d] for d in datas] if mode != "joint" else [datas]
        d_steps = [_num_steps(cfg, u) for u in units]
        stages = {"lori_d": {"steps": d_steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                             "schedule": f"linear (warm-up {cfg.warmup_ratio})"}}
        ss = [s_steps(cfg, n) for n in d_steps]
        stages["lori_s"] = None if not any(ss) else {
            "steps": ss, "lr": cfg.lori_s_lr, "weight_decay": cfg.lori_s_weight_decay,
            "schedule": cfg.lori_s_schedule if cfg.lori_s_schedule == "constant"
            else f"linear (warm-up {cfg.warmup_ratio})",
            "mask": {"sparsity": cfg.lori_sparsity, "rule": "global over all B's: k = int((1 - s) N), "
                     "keep |B| >= k-th largest" + (", entries of earlier tasks excluded" if mode == "continual" else "")},
            "b_init": "zero", "a": "LoRI-D's A"}
        out = {"lori_stages": stages}
        if mode == "merge":
            out.update(_merge_and_evaluate(cfg, tasks, datas, tokenizer, device, evals, any(ss)))
        elif mode == "continual":
            out["continual"] = _continual_evaluate(cfg, tasks, datas, tokenizer, device, evals)
        return out


# ----------------------------------------------------------------------------- evaluation after training

def _evaluate_adapter(cfg, tasks, datas, tokenizer, device, adapter, heads, step, **extra) -> list:
    """Evaluations (as ``evaluate_tasks`` writes them) of ``adapter`` with ``heads`` {task: state} on ``tasks``."""
    from ..data import encode
    from ..model import load_encoder
    from ..train import evaluate_tasks

    encoder = load_encoder(cfg.model, tokenizer, cfg.max_length, cfg.seed, cfg.tiny_hidden, cfg.tiny_layers)
    load_lori(encoder, adapter, keep_trainable=())
    model = MultiTaskModel(encoder, tasks, pooling=cfg.pooling)
    for t in tasks:
        model.heads[t.name].load_state_dict(heads[t.name])
    model.to(device)
    eval_enc = [{k: encode(tokenizer, e, d.task, cfg.max_length) for k, e in d.evals.items()} for d in datas]
    out = []
    evaluate_tasks(model, Method(cfg, tasks), datas, eval_enc, cfg.eval_batch_size, tokenizer.pad_token_id,
                   device, step, out, **extra)
    return out


def _merge_and_evaluate(cfg, tasks, datas, tokenizer, device, evals, sparse: bool) -> dict:
    """Merge the per-task adapters of the final stage (and, after a LoRI-S stage, the LoRI-D
    ones), evaluate the merged adapters; the final stage's evaluations join ``evals``."""
    from ..metrics import glue_score, task_score
    from ..report import final_metrics

    unmerged = final_metrics(evals)
    saved = [ckpt.load(os.path.join(cfg.out, f"lori_adapter_{t.name}.pt")) for t in tasks]
    step = max((e["step"] for e in evals), default=0)
    T = len(tasks)
    w_d, rule_d = merge_weights(cfg, T, "lori_d")
    w_s, rule_s = merge_weights(cfg, T, "lori_s")
    merged = merge_lori([s["adapter"] for s in saved], w_s if sparse else w_d)
    ckpt.atomic_save(merged, os.path.join(cfg.out, "lori_merged.pt"))
    evals.extend(_evaluate_adapter(cfg, tasks, datas, tokenizer, device, merged,
                                   {t.name: s["head"] for t, s in zip(tasks, saved)}, step, merged=True))
    out = {"unmerged_final": unmerged, "unmerged_glue_score": glue_score(unmerged) if unmerged else None,
           "merge_weights": {"lori_d": w_d, "lori_s": w_s if sparse else None},
           "merge_weights_rule": {"lori_d": rule_d, "lori_s": rule_s if sparse else None},
           "merge": merged["config"]["merge"], "merged_rank": merged["config"]["r"],
           "merged_adapter_nonzero": sum(int(v.sum()) for k, v in merged["state"].items()
                                         if k.endswith(".lora_mask")) or None}
    if sparse:   # the LoRI-D adapters, merged with the LoRI-D weights (the authors merge both)
        merged_d = merge_lori([s["dense"]["adapter"] for s in saved], w_d)
        ckpt.atomic_save(merged_d, os.path.join(cfg.out, "lori_merged_d.pt"))
        ev = _evaluate_adapter(cfg, tasks, datas, tokenizer, device, merged_d,
                               {t.name: s["dense"]["head"] for t, s in zip(tasks, saved)}, step)
        fin = final_metrics(ev)
        out["merged_lori_d"] = {"final": fin, "task_scores": {t: task_score(t, m) for t, m in fin.items()},
                                "glue_score": glue_score(fin)}
    return out


def _continual_evaluate(cfg, tasks, datas, tokenizer, device, evals) -> dict:
    """Evaluate every seen task after each task of the order; the last round joins ``evals``
    (the final metrics). Forgetting of task j: its best score after any earlier round from
    its own on, minus its final score (Chaudhry et al., 2018); the last task has none."""
    step = max((e["step"] for e in evals), default=0)
    T = len(tasks)
    scores = [[None] * T for _ in range(T)]
    for i, t in enumerate(tasks):
        snap = ckpt.load(_continual_file(cfg.out, t.name))
        ev = _evaluate_adapter(cfg, tasks[:i + 1], datas[:i + 1], tokenizer, device, snap["adapter"], snap["heads"],
                               step, **({"continual_final": True} if i == T - 1 else {"after_task": t.name}))
        for e in ev:
            scores[i][[x.name for x in tasks].index(e["task"])] = e["score"]
        if i == T - 1:
            evals.extend(ev)
    forgetting = {tasks[j].name: max(scores[i][j] for i in range(j, T - 1)) - scores[T - 1][j] for j in range(T - 1)}
    return {"order": [t.name for t in tasks], "scores": scores, "forgetting": forgetting,
            "average_forgetting": sum(forgetting.values()) / len(forgetting) if forgetting else None}


def forgetting_table(cont: dict) -> str:
    """Markdown table of a continual run (results.json ``continual``): the score of every seen
    task (columns) after each task of the order (rows), and the forgetting per task."""
    order = cont["order"]
    lines = ["| after \\ task | " + " | ".join(order) + " |", "|" + "---|" * (len(order) + 1)]
    for t, row in zip(order, cont["scores"]):
        lines.append(f"| {t} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in row) + " |")
    fg = cont["forgetting"]
    lines.append("| forgetting | " + " | ".join(f"{fg[t]:.1f}" if t in fg else "-" for t in order) + " |")
    avg = cont.get("average_forgetting")
    tail = f"\nAverage forgetting: {avg:.1f} points.\n" if avg is not None else ""
    return "\n".join(lines) + "\n" + tail
