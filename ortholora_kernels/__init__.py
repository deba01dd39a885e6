"""ortholora_kernels: fused, sync-free gradient projection for multi-task LoRA.

Public names:
    project            the projection op (Ortho-LoRA / PCGrad through the Gram matrix)
    aggregate          every Gram-based multi-task aggregator (UPGrad, MGDA, CAGrad, ...)
    Aggregator         a stateful aggregate (EMA conflict detection, schedule); GradVac
    ProjectionResult   what ``project(..., return_stats=True)`` returns
    backends_available which backends can run on a device, and why not
    reference          the literal float64 algorithm (test oracle)
"""
from . import reference
from .backends import backends_available
from .ops import project
from .result import ProjectionResult

__all__ = ["project", "ProjectionResult", "backends_available", "reference"]
__version__ = "0.1.0"

# Training-loop integration (issue 8): layout of the LoRA parameters, per-task gradient
# collection (loop / grouped), the OrthoLoRA projector. Integrations (HF Trainer,
# torch.distributed) live in ortholora_kernels.integrations (imported lazily).
from .collect import per_task_mean_loss
from .layout import LoRALayout
from .projector import OrthoLoRA
from .pcgrad import PCGrad   # Pytorch-PCGrad's API over OrthoLoRA (the compatibility path)

__all__ += ["LoRALayout", "OrthoLoRA", "per_task_mean_loss", "PCGrad"]

# The Gramian family of aggregators (issue 16): UPGrad, MGDA, CAGrad, ... on the same
# Gram / solve / combine engine; solve modules in ortholora_kernels.solvers.
from .aggregate import AggregationResult, Aggregator, GradVac, aggregate

__all__ += ["aggregate", "Aggregator", "GradVac", "AggregationResult"]
