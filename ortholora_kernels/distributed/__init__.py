"""``torch.distributed``: the "reduce over ranks" stage of :class:`~ortholora_kernels.OrthoLoRA`.

With more than one rank the per-task ``[T, N]`` buffer is reduced before (or, sharded,
while) it is projected, and the LoRA parameters are kept away from DDP, which would reduce
them a second time. This package is part of the core (it imports neither ``integrations``
nor ``glue``); :mod:`ortholora_kernels.integrations` re-exports its public names.

    reduce.py    all_reduce_task_grads, global_task_counts, all_reduce_grads, broadcast_params,
                 exclude_from_ddp, release_from_ddp (DDP/FSDP2 wiring), all_reduce_counts,
                 reduce_leftover_grads, prepare_distributed, fsdp_check
    sharded.py   ShardPlan, sharded_project, reduce_scatter_buffer, gram_sum_hook,
                 gather_output, write_sharded_grads, CommCounter, is_dtensor (reduce-scatter
                 the buffer, all-reduce only the Gram matrices)

Everything here takes and returns tensors, layouts and plans (never an ``OrthoLoRA``);
:meth:`ortholora_kernels.OrthoLoRA.project_` puts them together, and the Gram, the solve
and the combine are :mod:`ortholora_kernels.pipeline`'s (the Gram all-reduce is a
Gram-stage hook there), so every method, EMA and schedule runs in every mode.
"""
from .reduce import (all_reduce_grads, all_reduce_task_grads, broadcast_params, exclude_from_ddp,
                     global_task_counts, release_from_ddp)
from .sharded import CommCounter, ShardPlan, is_dtensor, sharded_project

__all__ = ["all_reduce_task_grads", "all_reduce_grads", "exclude_from_ddp", "release_from_ddp", "broadcast_params",
           "global_task_counts", "ShardPlan", "sharded_project", "CommCounter", "is_dtensor"]
