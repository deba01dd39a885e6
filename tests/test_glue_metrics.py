"""Official GLUE metrics and the GLUE average."""
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from ortholora_kernels.glue.metrics import glue_score, split_metrics, task_score
from ortholora_kernels.glue.tasks import get_task


def test_metrics_match_sklearn_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    m = split_metrics(get_task("mrpc"), p, y)
    assert m == {"accuracy": pytest.approx((p == y).mean()), "f1": pytest.approx(f1_score(y, p))}
    assert split_metrics(get_task("cola"), p, y)["matthews_correlation"] == pytest.approx(matthews_corrcoef(y, p))
    s = rng.random(100) * 5
    q = s + rng.normal(0, 1, 100)
    m = split_metrics(get_task("stsb"), q, s)
    assert m["pearson"] == pytest.approx(pearsonr(q, s)[0]) and m["spearmanr"] == pytest.approx(spearmanr(q, s)[0])
    # degenerate predictions give 0, not NaN
    assert split_metrics(get_task("stsb"), np.ones(5), s[:5]) == {"pearson": 0.0, "spearmanr": 0.0}
    assert split_metrics(get_task("cola"), np.ones(5, int), y[:5])["matthews_correlation"] == 0.0


def test_glue_average_is_mean_of_task_means():
    per_task = {"cola": {"matthews_correlation": 0.5}, "mrpc": {"accuracy": 0.8, "f1": 0.9},
                "stsb": {"pearson": 0.7, "spearmanr": 0.9}, "mnli": {"accuracy_m": 0.6, "accuracy_mm": 0.8}}
    assert task_score("mrpc", per_task["mrpc"]) == pytest.approx(85.0)
    assert glue_score(per_task) == pytest.approx((50 + 85 + 80 + 70) / 4)
    assert get_task("mnli").metric_names() == ["accuracy_m", "accuracy_mm"]
