"""ortholora_kernels: fused, sync-free gradient projection for multi-task LoRA.

Public names:
    project            the projection op (Ortho-LoRA / PCGrad through the Gram matrix)
    aggregate          every Gram-based multi-task aggregator (UPGrad, MGDA, CAGrad, ...)
    Aggregator         the method, its options, EMA, schedule and state as one object
                       (what OrthoLoRA(aggregator=...) takes); GradVac
    ProjectionResult   what ``project(..., return_stats=True)`` returns
    OrderGenerator     counter-based order generator that compiles and CUDA-graph captures
    backends_available which backends can run on a device, and why not
    reference          the literal float64 algorithm (test oracle)
    LoRALayout         the flat [T, N] buffer over a model's LoRA parameters, and its segments
    OrthoLoRA          the training-loop projector (collect -> project -> write .grad)
    per_task_mean_loss the sum of per-task mean losses of one concatenated batch
    PCGrad             Pytorch-PCGrad's API over OrthoLoRA

The reduction over ``torch.distributed`` ranks is ``ortholora_kernels.distributed`` (used by
``OrthoLoRA`` when there is more than one rank); the integrations (HF Trainer, Lightning)
live in ``ortholora_kernels.integrations`` and the GLUE harness in ``ortholora_kernels.glue``;
none of them is imported here. Every one of them runs the one composition of
``ortholora_kernels.pipeline`` (Gram -> Gram stage -> solve -> combine; docs/pipeline.md).
The map of the package is ARCHITECTURE.md.
"""
from . import reference
from .backends import backends_available
from .collect import per_task_mean_loss
from .layout import LoRALayout
from .ops import project
from .projector import OrthoLoRA
from .pcgrad import PCGrad   # Pytorch-PCGrad's API over OrthoLoRA (the compatibility path)
from .result import ProjectionResult
from .rng import OrderGenerator
# The Gramian family of aggregators (UPGrad, MGDA, CAGrad, ...) on the same Gram / solve /
# combine engine; one solve module per method in ortholora_kernels.solvers.
from .aggregate import AggregationResult, Aggregator, GradVac, aggregate

__all__ = ["project", "aggregate", "Aggregator", "GradVac", "AggregationResult", "ProjectionResult",
           "backends_available", "reference", "LoRALayout", "OrthoLoRA", "per_task_mean_loss", "PCGrad", "OrderGenerator"]
__version__ = "0.1.0"
