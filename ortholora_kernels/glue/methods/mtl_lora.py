"""``--method mtl-lora``: MTL-LoRA (arXiv 2410.09437) in the GLUE harness, optionally with
Ortho-LoRA on top (``--projection``). The adapter itself is
:mod:`ortholora_kernels.adapters.mtl_lora`.

Model: the encoder's target modules (``--lora-target-modules``) get an MTL-LoRA adapter
(``apply_mtl_lora``: shared A, ``--mtl-num-b`` shared up-projections B_k, per-task
transform Lambda_t (``--mtl-diagonal``: diagonal) and per-task mixture logits w_t with
softmax temperature ``--mtl-temperature``; rank ``--lora-r``, ``--lora-alpha``,
``--lora-dropout``), plus one head per task. All tasks train together (one step = one batch
of every task, loss = sum of the per-task mean losses), like ``joint``.

Task routing: training forwards get their per-example task ids from the batch's
``task_slices`` (``route_task_slices`` hooks on the MultiTaskModel); evaluation of task t
runs inside ``mtl_task_ids(encoder, t)`` (:meth:`eval_context`).

``--projection G`` (G in global|ab|layer|matrix; default none): Ortho-LoRA projects the
per-task gradients of the *shared* parameters (A and the B_k of every module, grouped by
transformer layer and side, ``mtl_lora_parameters``) with granularity G,
like ``--method ortho --granularity G``; the task-specific Lambda_t and w_t (only task t's
examples reach them) and the heads take ordinary gradients. ``--collect`` (grouped|loop)
and ``--backend`` apply as for ortho.
"""
from __future__ import annotations

from ...adapters import count_trainable
from ...adapters.mtl_lora import apply_mtl_lora, mtl_lora_parameters, mtl_task_ids, route_task_slices
from . import (Method, check_projection, load_projector_state, make_seed_projector, projected_backward,
                      projector_state, register_method)
from ..model import MultiTaskModel

@register_method
class MTLLoRA(Method):
    """MTL-LoRA (shared A and B_k, task transforms and mixtures), optionally with Ortho-LoRA."""
    name = "mtl-lora"
    help = ("MTL-LoRA: shared A and B_1..B_n, task-specific transforms and B mixtures "
            "(--mtl-num-b/--mtl-temperature/--mtl-diagonal; --projection adds Ortho-LoRA)")
    options = ("projection", "collect", "backend", "mtl_num_b", "mtl_temperature", "mtl_diagonal", "aggregator",
               "aggregator_options", "aggregator_ema")
    defaults = {"projection": "none", "mtl_num_b": 3, "mtl_temperature": 0.1}

    @classmethod
    def check_config(cls, cfg):
        check_projection(cfg, cls.name)
        if cfg.mtl_num_b is not None and cfg.mtl_num_b < 1:
            raise ValueError("--mtl-num-b must be >= 1")
        if cfg.mtl_temperature is not None and not cfg.mtl_temperature > 0:
            raise ValueError("--mtl-temperature must be > 0")

    def build_model(self, encoder, tasks):
        c = self.cfg
        apply_mtl_lora(encoder, c.lora_target_modules, r=c.lora_r, alpha=c.lora_alpha, num_tasks=len(tasks),
                       num_b=c.mtl_num_b, temperature=c.mtl_temperature, diagonal=c.mtl_diagonal,
                       dropout=c.lora_dropout, freeze_base=True, keep_trainable=())
        return MultiTaskModel(encoder, tasks, pooling=c.pooling)

    def setup(self, model):
        self.hooks = route_task_slices(model, model.encoder)
        self.projector = None
        if self.cfg.projection not in (None, "none"):
            self.projector = make_seed_projector(self.cfg, mtl_lora_parameters(model.encoder), len(self.tasks))
            self.segment_names = list(self.projector.segment_names)

    def backward(self, model, losses, task_ids):
        if self.projector is None:
            return super().backward(model, losses, task_ids)
        return projected_backward(self.projector, self.cfg.collect, losses, task_ids)

    def eval_context(self, model, task_index):
        return mtl_task_ids(model.encoder, task_index)

    def param_counts(self, model):
        heads = sum(p.numel() for p in model.heads.parameters() if p.requires_grad)
        return {"adapter": count_trainable(model.encoder, adapter_only=True), "heads": heads}

    def teardown(self):
        for h in self.hooks:
            h.remove()
        if self.projector is not None:
            self.projector.remove()

    def state_dict(self):
        return {"projector": projector_state(self.projector)} if self.projector is not None else {}

    def load_state_dict(self, state):
        if self.projector is not None:
            load_projector_state(self.projector, state.get("projector"))
