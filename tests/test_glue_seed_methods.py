"""The seed methods in the GLUE harness: mtl-lora (MTL-LoRA) and lori (LoRI), alone and with
Ortho-LoRA on top (--projection), from the CLI with the tiny model: runs, exact resume,
option errors, the compare table with parameter counts, a run on the real GLUE files."""
import json
from pathlib import Path

import pytest
import torch

from ortholora_kernels.glue import checkpoint as ckpt
from ortholora_kernels.glue.cli import main
from ortholora_kernels.glue.data import write_synthetic_suite

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"

FAST = ["--tiny", "--batch-size", "4", "--eval-batch-size", "32", "--max-eval-samples", "16", "--max-length", "32",
        "--no-progress", "--lr", "2e-3", "--no-plots"]
TASKS = ["--tasks", "sst2,mrpc,stsb"]

#: label -> extra CLI options; every method of the closing comparison
RUNS = {
    "single": ["--method", "single"],
    "joint": ["--method", "joint"],
    "ortho": ["--method", "ortho"],
    "mtl-lora": ["--method", "mtl-lora"],
    "mtl-lora-ab-grouped": ["--method", "mtl-lora", "--projection", "ab", "--collect", "grouped"],
    "mtl-lora-ab-loop": ["--method", "mtl-lora", "--projection", "ab", "--collect", "loop"],
    "lori": ["--method", "lori"],
    "lori-joint-ab-grouped": ["--method", "lori", "--lori-mode", "joint", "--projection", "ab"],
    "lori-joint-ab-loop": ["--method", "lori", "--lori-mode", "joint", "--projection", "ab", "--collect", "loop"],
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_suite(str(d), n_train=64, n_dev=16, seed=0, tasks=["sst2", "mrpc", "stsb"])
    return str(d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth):
    """Every configuration, 4 steps (LoRI: 2 LoRI-D + 2 LoRI-S), evaluated at 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for label, extra in RUNS.items():
        d = str(root / label)
        assert main(["train", *FAST, "--data-dir", synth, *TASKS, "--max-steps", "4", "--eval-every", "2",
                     "--out", d, *extra]) == 0, label
        out[label] = d
    return out


def _res(d):
    return json.loads((Path(d) / "results.json").read_text())


def _cfg(d):
    return json.loads((Path(d) / "config.json").read_text())


@pytest.mark.parametrize("label", list(RUNS))
def test_every_method_trains_and_records_parameter_counts(runs, label):
    res, cfg = _res(runs[label]), _cfg(runs[label])
    assert res["finished"] and set(res["final"]) == {"sst2", "mrpc", "stsb"}
    assert res["glue_score"] is not None
    p = res["params"]
    assert p["adapter"] > 0 and p["heads"] > 0 and p["total"] == p["adapter"] + p["heads"]
    assert cfg["resolved"]["params"] == p
    if "ab" in label or label == "ortho":
        assert (Path(runs[label]) / "conflicts.jsonl").read_text().count("\n") >= 4


def test_resolved_defaults_are_recorded(runs):
    m = _cfg(runs["mtl-lora"])
    assert (m["mtl_num_b"], m["mtl_temperature"], m["mtl_diagonal"], m["projection"]) == (3, 0.1, False, "none")
    assert m["collect"] is None
    l = _cfg(runs["lori"])
    assert (l["lori_sparsity"], l["lori_dense_fraction"], l["lori_mode"]) == (0.9, 0.5, "merge")
    assert _cfg(runs["lori-joint-ab-grouped"])["collect"] == "grouped"


def test_parameter_counts_match_the_papers_formulas(runs):
    # tiny-roberta: hidden 32, 2 layers, query+value adapted (4 modules 32 -> 32), r = 8, T = 3
    from ortholora_kernels.glue.mtl_lora import mtl_lora_param_count

    heads = 3 * (32 * 32 + 32) + 2 * (32 * 2 + 2) + (32 + 1)   # dense + out_proj per task (stsb: 1 output)
    assert _res(runs["mtl-lora"])["params"]["adapter"] == 4 * mtl_lora_param_count(32, 32, 8, 3, 3)
    assert _res(runs["mtl-lora"])["params"]["heads"] == heads
    assert _res(runs["joint"])["params"]["adapter"] == 4 * (8 * 32 + 32 * 8)
    assert _res(runs["single"])["params"]["adapter"] == 3 * 4 * (8 * 32 + 32 * 8)
    kept = round(0.1 * 4 * 32 * 8)   # LoRI-S: 10 % of the B entries, A frozen
    assert _res(runs["lori-joint-ab-grouped"])["params"]["adapter"] == kept
    assert _res(runs["lori"])["params"]["adapter"] == 3 * kept


@pytest.mark.parametrize("method", ["mtl-lora", "lori-joint"])
def test_grouped_and_loop_collection_give_the_same_training(runs, method):
    a = torch.load(Path(runs[f"{method}-ab-grouped"]) / "model_final.pt")["state_dict"]
    b = torch.load(Path(runs[f"{method}-ab-loop"]) / "model_final.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_lori_joint_grouped_respects_the_mask(runs):
    d = Path(runs["lori-joint-ab-grouped"])
    state = torch.load(d / "model_final.pt")["state_dict"]
    bs = {k: v for k, v in state.items() if k.endswith("lora_B")}
    nonzero = sum(int((v != 0).sum()) for v in bs.values())
    assert 0 < nonzero <= round(0.1 * sum(v.numel() for v in bs.values()))


@pytest.mark.parametrize("extra,pattern", [
    (["--method", "mtl-lora", "--mtl-num-b", "2", "--mtl-diagonal"], r"\.lora_(A|B\.[01])\.weight"),
    (["--method", "lori", "--lori-mode", "joint"], r"\.lora_B"),
])
def test_projection_covers_only_the_shared_matrices(tmp_path, synth, extra, pattern):
    """matrix granularity: one segment per projected matrix. MTL-LoRA: A and every B_k, never
    the task transforms / mixture logits; LoRI: the B's only (A is frozen)."""
    import re

    out = tmp_path / "m"
    assert main(["train", *FAST, "--data-dir", synth, *TASKS, "--max-steps", "2", "--eval-every", "2",
                 "--out", str(out), "--projection", "matrix", *extra]) == 0
    names = json.loads((out / "cosine.json").read_text())["segments"]
    n_b = 2 if extra[1] == "mtl-lora" else 0
    assert len(names) == 4 * (1 + n_b if n_b else 1)
    assert all(re.search(pattern + "$", n) for n in names), names


def test_lori_merge_evaluates_the_merged_adapter(runs):
    d = Path(runs["lori"])
    res = _res(d)
    merged = [e for e in res["evals"] if e.get("merged")]
    assert {e["task"] for e in merged} == {"sst2", "mrpc", "stsb"} and all(e["step"] == 4 for e in merged)
    assert set(res["unmerged_final"]) == {"sst2", "mrpc", "stsb"}
    assert res["merge_weights"] == pytest.approx([1 / 3] * 3)
    adapters = [ckpt.load(str(d / f"lori_adapter_{t}.pt")) for t in ("sst2", "mrpc", "stsb")]
    m = ckpt.load(str(d / "lori_merged.pt"))
    for k, v in m["state"].items():
        if k.endswith(".lora_B"):
            mean = sum(a["adapter"]["state"][k].double() for a in adapters) / 3
            torch.testing.assert_close(v.double(), mean)
        if k.endswith(".lora_A"):   # same seed: one shared frozen A
            assert all(torch.equal(a["adapter"]["state"][k], v) for a in adapters)
    # the final metrics are the merged adapter's
    for e in merged:
        assert res["final"][e["task"]] == e["metrics"]


def test_compare_lists_every_method_with_parameter_counts(runs, capsys):
    labels = ["single", "joint", "ortho", "mtl-lora", "mtl-lora-ab-grouped", "lori", "lori-joint-ab-grouped"]
    assert main(["compare", *[runs[k] for k in labels]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].endswith("| avg | adapter params | head params |")
    for name in ("| single |", "| joint |", "| ortho (ab) |", "| mtl-lora |", "| mtl-lora+ortho (ab, grouped) |",
                 "| lori |", "| lori-joint+ortho (ab, grouped) |"):
        assert any(ln.startswith(name) for ln in lines), (name, out)
    assert len(lines) == 2 + len(labels)
    assert f"| {_res(runs['mtl-lora'])['params']['adapter']:,} |" in out


def _evals(d):
    return [(e["step"], e["task"], e["metrics"], e.get("merged", False)) for e in _res(d)["evals"]]


@pytest.mark.parametrize("extra,stop", [
    (["--method", "mtl-lora", "--projection", "ab"], 3),
    (["--method", "lori"], 4),                                      # unit 0, after the LoRI-S switch (3)
    (["--method", "lori", "--lori-mode", "joint", "--projection", "ab"], 4),
])
def test_exact_resume(tmp_path, synth, capsys, extra, stop):
    args = ["train", *FAST, "--data-dir", synth, *TASKS, "--max-steps", "6", "--eval-every", "3", "--save-every",
            "100", *extra]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(args + ["--out", full]) == 0
    assert main(args + ["--out", part, "--stop-after-steps", str(stop)]) == 0
    assert "stopped after step" in capsys.readouterr().err
    if extra[1] == "lori":   # the LoRI-S masks travel in the checkpoint
        assert ckpt.load(str(Path(part) / ckpt.LATEST))["method"]["masks"] is not None
    assert main(args + ["--out", part, "--resume"]) == 0
    assert _evals(full) == _evals(part)
    assert _res(full)["glue_score"] == _res(part)["glue_score"]
    assert _res(full)["params"] == _res(part)["params"]


@pytest.mark.parametrize("argv,match", [
    (["--method", "lori", "--projection", "ab"], "needs --lori-mode joint"),
    (["--method", "lori", "--collect", "grouped"], "needs --projection (global, ab, layer or matrix) and --lori-mode joint"),
    (["--method", "lori", "--lori-mode", "joint", "--collect", "loop"], "--collect with --method lori needs --projection"),
    (["--method", "mtl-lora", "--collect", "grouped"], "needs --projection"),
    (["--method", "mtl-lora", "--backend", "torch"], "needs --projection"),
    (["--method", "ortho", "--projection", "ab"], "--projection applies only"),
    (["--method", "mtl-lora", "--granularity", "ab"], "--granularity applies only"),
    (["--method", "joint", "--mtl-num-b", "2"], "--mtl-num-b applies only"),
    (["--method", "mtl-lora", "--lori-sparsity", "0.5"], "--lori-sparsity applies only"),
    (["--method", "mtl-lora", "--mtl-num-b", "0"], "--mtl-num-b must be >= 1"),
    (["--method", "lori", "--lori-sparsity", "1.5"], "--lori-sparsity must be in [0, 1)"),
    (["--method", "lori", "--lori-dense-fraction", "0"], "--lori-dense-fraction must be in (0, 1]"),
    (["--method", "lori", "--lori-mode", "x"], "invalid choice"),
    (["--method", "lori", "--lori-mode", "joint", "--lori-task-seeds"], "--lori-task-seeds applies to --lori-mode merge"),
])
def test_incompatible_options_give_one_line(capsys, tmp_path, argv, match):
    rc = main(["train", "--tiny", "--synthetic", "--tasks", "sst2,mrpc", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ortholora-glue: error:"), err
    assert match in lines[0], lines[0]


@pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").exists() or not (GLUE / "MRPC" / "train.tsv").exists(),
                    reason="real GLUE files not present (../shared/glue)")
@pytest.mark.parametrize("extra", [["--method", "mtl-lora", "--projection", "ab"], ["--method", "lori"]])
def test_real_glue_tasks(tmp_path, extra):
    out = str(tmp_path / "run")
    assert main(["train", *FAST, "--data-dir", str(GLUE), "--tasks", "rte,mrpc", "--max-train-samples", "32",
                 "--max-steps", "2", "--eval-every", "2", "--out", out, *extra]) == 0
    res = _res(out)
    assert res["finished"] and set(res["final"]) == {"rte", "mrpc"} and res["params"]["adapter"] > 0


def test_lori_task_seeds_merge_by_concatenation(tmp_path, synth):
    out = tmp_path / "ts"
    assert main(["train", *FAST, "--data-dir", synth, "--tasks", "sst2,mrpc", "--max-steps", "2", "--eval-every", "2",
                 "--out", str(out), "--method", "lori", "--lori-task-seeds"]) == 0
    res = _res(out)
    assert res["merge"] == "concat" and res["merged_rank"] == 2 * 8
    a = [ckpt.load(str(out / f"lori_adapter_{t}.pt"))["adapter"]["state"] for t in ("sst2", "mrpc")]
    k = next(k for k in a[0] if k.endswith(".lora_A"))
    assert not torch.equal(a[0][k], a[1][k])
    assert {e["task"] for e in res["evals"] if e.get("merged")} == {"sst2", "mrpc"}
