"""GLUE multi-task LoRA harness: data, task heads, methods, metrics, reports, CLI.

Entry points: ``ortholora-glue`` (console script) and ``python -m ortholora_kernels.glue``;
programmatic use: :class:`TrainConfig` and :func:`train`.
"""
from .tasks import TASKS, TaskSpec, get_task, parse_tasks

__all__ = ["TASKS", "TaskSpec", "get_task", "parse_tasks", "TrainConfig", "train", "main"]


def __getattr__(name):  # lazy: keep `import ortholora_kernels.glue` light
    if name in ("TrainConfig", "train"):
        from . import train as _t

        return getattr(_t, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(name)
