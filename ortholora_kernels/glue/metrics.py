"""Official GLUE metrics (scikit-learn / scipy) and the GLUE average.

Per task (keys in the returned dicts):
    cola: matthews_correlation        sst2, qnli, rte, wnli: accuracy
    mrpc, qqp: accuracy, f1            stsb: pearson, spearmanr
    mnli: accuracy_m, accuracy_mm (matched / mismatched dev sets)

The task score entering the GLUE average is the mean of the task's metrics, x100
(the convention of the GLUE leaderboard); the average is the unweighted mean over tasks.
"""
from __future__ import annotations

import math

import numpy as np

from .tasks import TaskSpec, get_task


def split_metrics(task: TaskSpec, preds, labels) -> dict:
    """Metrics of one evaluation split. ``preds``: class ids, or scores for STS-B."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if task.is_regression:
        from scipy.stats import pearsonr, spearmanr

        if len(preds) < 2 or np.std(preds) == 0 or np.std(labels) == 0:
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    from sklearn.metrics import f1_score, matthews_corrcoef

    out = {}
    for m in task.metrics:
        if m == "accuracy":
            out[m] = float((preds == labels).mean()) if len(labels) else 0.0
        elif m == "f1":
            out[m] = float(f1_score(labels, preds, zero_division=0))
        elif m == "matthews_correlation":
            out[m] = float(matthews_corrcoef(labels, preds))
        else:
            raise ValueError(m)
    return {k: (0.0 if math.isnan(v) else v) for k, v in out.items()}


def task_score(task, metrics: dict) -> float:
    """The number that enters the GLUE average: mean of the task's official metrics, x100."""
    task = get_task(task) if isinstance(task, str) else task
    vals = [metrics[k] for k in task.metric_names()]
    return 100.0 * float(np.mean(vals))


def glue_score(per_task: dict) -> float:
    """Unweighted mean of :func:`task_score` over ``{task_name: metrics}``."""
    if not per_task:
        return float("nan")
    return float(np.mean([task_score(t, m) for t, m in per_task.items()]))
