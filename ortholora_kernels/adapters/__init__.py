"""Multi-task LoRA adapters that compose with Ortho-LoRA, usable in any PyTorch model.

    mtl_lora   MTL-LoRA (arXiv 2410.09437): shared A and B_k, per-task transforms and mixtures
    lori       LoRI (arXiv 2504.07448): frozen random A, sparse B; masks, merge, continual
    common     what both share: target finding, freezing, ``count_trainable``,
               ``AdapterParams`` (shared vs task-specific parameters -> ``LoRALayout``)

Each adapter wraps the matching ``nn.Linear`` modules in place (peft's ``target_modules``
rules) and gives ``*_parameters(model) -> AdapterParams``, whose ``.layout()`` is what
``OrthoLoRA`` projects. This package depends on torch and the core (``layout``) only: the
GLUE harness (``ortholora_kernels.glue``) uses it, never the other way round.
"""
from .common import AdapterParams, count_trainable, layer_key
from .lori import *  # noqa: F401,F403
from .lori import __all__ as _lori_all
from .mtl_lora import *  # noqa: F401,F403
from .mtl_lora import __all__ as _mtl_all

__all__ = ["AdapterParams", "count_trainable", "layer_key", *_mtl_all, *_lori_all]
