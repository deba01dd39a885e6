"""examples/sft_multitask.py: its smallest setting runs end to end on the real GLUE files."""
import os
import sys

import pytest

pytest.importorskip("trl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import sft_multitask as ex  # noqa: E402


@pytest.mark.skipif(not os.path.isdir(ex.default_glue_dir()), reason="no GLUE files next to the checkout")
def test_smoke_runs_and_reports_every_task(tmp_path):
    res = ex.main(["--smoke", "--out", str(tmp_path)])
    assert set(res) == {"joint", "ortho"}
    for method in res:
        for t in ex.TASKS:
            assert res[method][t]["loss"] > 0 and 0.0 <= res[method][t]["accuracy"] <= 1.0
    assert (tmp_path / "sft_multitask.png").stat().st_size > 0
    assert (tmp_path / "sft_multitask.json").stat().st_size > 0


@pytest.mark.skipif(not os.path.isdir(ex.default_glue_dir()), reason="no GLUE files next to the checkout")
def test_prompts_and_answers():
    rows = ex.load_rows(ex.default_glue_dir(), "dev", 2, 0)
    assert len(rows) == 2 * len(ex.TASKS)
    for r in rows:
        assert r["prompt"].startswith(r["task"]) and r["completion"] in ex.ANSWERS[r["task"]]
        assert ex.ANSWERS[r["task"]][r["label"]] == r["completion"]
    assert ex.prompt("rte", "a b", "c").endswith("entailment:")
