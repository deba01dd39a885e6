"""Integrations: Hugging Face ``Trainer``, TRL's ``SFTTrainer``, axolotl, PyTorch Lightning; the
``torch.distributed`` helpers.

Names are imported lazily so that ``import ortholora_kernels`` needs neither transformers
nor lightning:

    OrthoLoRATrainer, MultiTaskCollator, PackedCausalLMCollator,
    ORTHO_STATE_NAME                                          (trainer.py, needs transformers)
    OrthoLoRASFTTrainer                                       (trl.py, needs trl)
    OrthoLoRAPlugin                                           (axolotl.py, an axolotl plugin)
    OrthoLoRACallback                                         (lightning.py, needs lightning)
    all_reduce_task_grads, all_reduce_grads, exclude_from_ddp, release_from_ddp,
    broadcast_params, global_task_counts                      (re-exported from the core's
                                                               :mod:`ortholora_kernels.distributed`)
"""
from __future__ import annotations

import importlib

#: public name -> the module that defines it (relative to this package)
_NAMES = {
    "OrthoLoRATrainer": ".trainer",
    "MultiTaskCollator": ".trainer",
    "ORTHO_STATE_NAME": ".trainer",
    "PackedCausalLMCollator": ".trainer",
    "OrthoLoRASFTTrainer": ".trl",
    "OrthoLoRAPlugin": ".axolotl",
    "all_reduce_task_grads": "..distributed",
    "all_reduce_grads": "..distributed",
    "exclude_from_ddp": "..distributed",
    "release_from_ddp": "..distributed",
    "broadcast_params": "..distributed",
    "global_task_counts": "..distributed",
    "OrthoLoRACallback": ".lightning",
}

__all__ = list(_NAMES)


def __getattr__(name):
    mod = _NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(mod, __name__), name)   # relative to this package
