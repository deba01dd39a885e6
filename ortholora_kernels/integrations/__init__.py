"""Integrations: Hugging Face ``Trainer``, PyTorch Lightning and ``torch.distributed``.

Names are imported lazily so that ``import ortholora_kernels`` needs neither transformers
nor an initialised process group:

    OrthoLoRATrainer, MultiTaskCollator                       (trainer.py, needs transformers)
    all_reduce_task_grads, all_reduce_grads, exclude_from_ddp, release_from_ddp,
    broadcast_params, global_task_counts                      (distributed.py)
    OrthoLoRACallback                                         (lightning.py, needs lightning)
"""
from __future__ import annotations

import importlib

_NAMES = {
    "OrthoLoRATrainer": "trainer",
    "MultiTaskCollator": "trainer",
    "ORTHO_STATE_NAME": "trainer",
    "all_reduce_task_grads": "distributed",
    "all_reduce_grads": "distributed",
    "exclude_from_ddp": "distributed",
    "release_from_ddp": "distributed",
    "broadcast_params": "distributed",
    "global_task_counts": "distributed",
    "OrthoLoRACallback": "lightning",
}

__all__ = list(_NAMES)


def __getattr__(name):
    mod = _NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
