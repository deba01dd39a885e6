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
    "lori-continual": ["--method", "lori", "--lori-mode", "continual"],
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
    """Every configuration, 4 steps (LoRI: 4 LoRI-D + 4 LoRI-S), evaluated every 2."""
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
    l = _cfg(runs["lori"])   # the authors' recipe: LoRI-S at 10x the lr, constant, no decay, own budget
    assert (l["lori_sparsity"], l["lori_mode"], l["lori_shared_a"]) == (0.9, "merge", False)
    assert (l["lori_s_lr"], l["lori_s_weight_decay"], l["lori_s_schedule"], l["lori_s_steps"]) == (
        pytest.approx(10 * 2e-3), 0.0, "constant", None)
    stages = _res(runs["lori"])["lori_stages"]
    assert stages["lori_d"]["steps"] == [4, 4, 4] and stages["lori_s"]["steps"] == [4, 4, 4]
    assert stages["lori_s"]["lr"] == pytest.approx(2e-2) and stages["lori_s"]["weight_decay"] == 0.0
    assert _cfg(runs["lori-joint-ab-grouped"])["collect"] == "grouped"


def test_parameter_counts_match_the_papers_formulas(runs):
    # tiny-roberta: hidden 32, 2 layers, query+value adapted (4 modules 32 -> 32), r = 8, T = 3
    from ortholora_kernels.adapters.mtl_lora import mtl_lora_param_count

    heads = 3 * (32 * 32 + 32) + 2 * (32 * 2 + 2) + (32 + 1)   # dense + out_proj per task (stsb: 1 output)
    assert _res(runs["mtl-lora"])["params"]["adapter"] == 4 * mtl_lora_param_count(32, 32, 8, 3, 3)
    assert _res(runs["mtl-lora"])["params"]["heads"] == heads
    assert _res(runs["joint"])["params"]["adapter"] == 4 * (8 * 32 + 32 * 8)
    assert _res(runs["single"])["params"]["adapter"] == 3 * 4 * (8 * 32 + 32 * 8)
    kept = int((1 - 0.9) * 4 * 32 * 8)   # LoRI-S: the authors' int((1 - s) N) B entries, A frozen
    assert _res(runs["lori-joint-ab-grouped"])["params"]["adapter"] == kept
    assert _res(runs["lori"])["params"]["adapter"] == 3 * kept
    assert _res(runs["lori-continual"])["params"]["adapter"] == 3 * kept   # disjoint masks, no ties


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
    assert 0 < nonzero <= int((1 - 0.9) * sum(v.numel() for v in bs.values()))


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
    """Default merge: independent A per task, peft "cat" with the authors' LoRI-S weights
    (0.4 for T = 3); the LoRI-D adapters are merged with 0.5 and reported too."""
    d = Path(runs["lori"])
    res = _res(d)
    merged = [e for e in res["evals"] if e.get("merged")]
    assert {e["task"] for e in merged} == {"sst2", "mrpc", "stsb"} and all(e["step"] == 8 for e in merged)
    assert set(res["unmerged_final"]) == {"sst2", "mrpc", "stsb"}
    assert res["merge_weights"] == {"lori_d": [0.5] * 3, "lori_s": [0.4] * 3}
    assert res["merge_weights_rule"] == {"lori_d": "official (T=3)", "lori_s": "official (T=3)"}
    assert res["merge"] == "concat" and res["merged_rank"] == 3 * 8
    assert set(res["merged_lori_d"]["final"]) == {"sst2", "mrpc", "stsb"}
    saved = [ckpt.load(str(d / f"lori_adapter_{t}.pt")) for t in ("sst2", "mrpc", "stsb")]
    for stage, file, w, key in (("lori_s", "lori_merged.pt", 0.4, "adapter"), ("lori_d", "lori_merged_d.pt", 0.5, None)):
        ads = [s_[key] if key else s_["dense"]["adapter"] for s_ in saved]
        m = ckpt.load(str(d / file))
        s0 = ads[0]["config"]["scaling"]
        for k, v in m["state"].items():
            if k.endswith(".lora_A"):   # independent A's, each scaled by w * s (peft cat)
                assert not torch.equal(ads[0]["state"][k], ads[1]["state"][k])
                torch.testing.assert_close(v, torch.cat([w * s0 * a["state"][k] for a in ads]))
            if k.endswith(".lora_B"):
                torch.testing.assert_close(v, torch.cat([a["state"][k] for a in ads], 1))
        assert m["config"]["merge_weights"] == [w] * 3
    # the LoRI-D adapters are dense, the LoRI-S ones hold int(0.1 N) entries each
    assert all(not any(k.endswith("lora_mask") for k in s_["dense"]["adapter"]["state"]) for s_ in saved)
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
    table = lines[:lines.index("")] if "" in lines else lines   # the score table, then the conflicts table
    assert len(table) == 2 + len(labels)
    assert f"| {_res(runs['mtl-lora'])['params']['adapter']:,} |" in out


def _evals(d):
    return [(e["step"], e["task"], e["metrics"], e.get("merged", False)) for e in _res(d)["evals"]]


@pytest.mark.parametrize("extra,stop", [
    (["--method", "mtl-lora", "--projection", "ab"], 3),
    (["--method", "lori"], 8),                                      # unit 0, LoRI-S (steps 7-12)
    (["--method", "lori", "--lori-mode", "continual"], 8),
    (["--method", "lori", "--lori-mode", "joint", "--projection", "ab"], 8),
])
def test_exact_resume(tmp_path, synth, capsys, extra, stop):
    args = ["train", *FAST, "--data-dir", synth, *TASKS, "--max-steps", "6", "--eval-every", "3", "--save-every",
            "100", *extra]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(args + ["--out", full]) == 0
    assert main(args + ["--out", part, "--stop-after-steps", str(stop)]) == 0
    assert "stopped after step" in capsys.readouterr().err
    if extra[1] == "lori":   # the LoRI-S masks travel in the checkpoint; LoRI-S's lr and weight decay
        state = ckpt.load(str(Path(part) / ckpt.LATEST))
        assert state["method"]["masks"] is not None
        groups = state["optimizer"]["param_groups"]
        assert all(g["lr"] == pytest.approx(10 * 2e-3) and g["weight_decay"] == 0.0 for g in groups)
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
    (["--method", "lori", "--lori-s-steps", "-1"], "--lori-s-steps must be an integer >= 0"),
    (["--method", "lori", "--lori-s-lr", "0"], "--lori-s-lr must be a finite number > 0"),
    (["--method", "lori", "--lori-s-weight-decay", "-1"], "--lori-s-weight-decay must be a finite number >= 0"),
    (["--method", "lori", "--lori-s-schedule", "cosine"], "invalid choice"),
    (["--method", "lori", "--lori-mode", "x"], "invalid choice"),
    (["--method", "lori", "--lori-mode", "joint", "--lori-shared-a"], "--lori-shared-a applies to --lori-mode merge"),
    (["--method", "lori", "--lori-mode", "continual", "--projection", "ab"], "needs --lori-mode joint"),
    (["--method", "lori", "--lori-mode", "continual", "--lori-merge-weights-s", "0.5"],
     "--lori-merge-weights-s applies to --lori-mode merge"),
    (["--method", "lori", "--lori-merge-weights-d", "0.5,0.5,0.5"], "--lori-merge-weights-d must be one finite number or 2"),
    (["--method", "lori", "--lori-merge-weights-s", "a,b"], "expected a number or comma-separated numbers"),
    (["--method", "joint", "--lori-s-steps", "0"], "--lori-s-steps applies only"),
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


def test_lori_shared_a_variant_merges_by_summing_b(tmp_path, synth):
    out = tmp_path / "sa"
    assert main(["train", *FAST, "--data-dir", synth, "--tasks", "sst2,mrpc", "--max-steps", "2", "--eval-every", "2",
                 "--out", str(out), "--method", "lori", "--lori-shared-a", "--lori-merge-weights-s", "0.7,0.2"]) == 0
    res = _res(out)
    assert res["merge"] == "sum_B" and res["merged_rank"] == 8
    assert res["merge_weights"] == {"lori_d": [0.75, 0.75], "lori_s": [0.7, 0.2]}   # T = 2: min(1, 1.5/T)
    assert res["merge_weights_rule"]["lori_s"] == "--lori-merge-weights-s"
    a = [ckpt.load(str(out / f"lori_adapter_{t}.pt"))["adapter"]["state"] for t in ("sst2", "mrpc")]
    m = ckpt.load(str(out / "lori_merged.pt"))["state"]
    for k in a[0]:
        if k.endswith(".lora_A"):
            assert torch.equal(a[0][k], a[1][k]) and torch.equal(m[k], a[0][k])
        if k.endswith(".lora_B"):
            torch.testing.assert_close(m[k], 0.7 * a[0][k] + 0.2 * a[1][k])
    assert {e["task"] for e in res["evals"] if e.get("merged")} == {"sst2", "mrpc"}
    assert "| lori (shared A) |" in (out / "summary.md").read_text()


def test_lori_stage_schedules():
    """LoRI-D: --max-steps at --lr with warm-up and linear decay; LoRI-S: as many steps at
    10 x --lr, constant (the authors' LambdaLR with warmup_steps = 0); --lori-s-schedule linear
    and --lori-s-steps change only the LoRI-S phase."""
    from ortholora_kernels.glue.methods.lori import LoRI
    from ortholora_kernels.glue.tasks import parse_tasks
    from ortholora_kernels.glue.train import TrainConfig, _linear_schedule, validate

    def lrs(**kw):
        cfg = TrainConfig(tasks=["sst2"], method="lori", lr=1e-3, warmup_ratio=0.1, max_steps=10, **kw)
        validate(cfg)
        phases = LoRI(cfg, parse_tasks(cfg.tasks)).schedule_phases(10)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = _linear_schedule(opt, cfg.warmup_ratio, phases)
        out = []
        for _ in range(sum(p if isinstance(p, int) else p["steps"] for p in phases)):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    dense = [1e-3] + [1e-3 * (10 - s) / 9 for s in range(1, 10)]   # warm-up round(0.1 x 10) = 1 step
    assert lrs() == pytest.approx(dense + [1e-2] * 10)
    assert lrs(lori_s_lr=3e-3, lori_s_steps=4) == pytest.approx(dense + [3e-3] * 4)
    assert lrs(lori_s_schedule="linear", lori_s_steps=20) == pytest.approx(
        dense + [1e-2 * (s + 1) / 2 for s in range(2)] + [1e-2 * (20 - s) / 18 for s in range(2, 20)])
    assert lrs(lori_s_steps=0) == pytest.approx(dense)


def test_lori_continual_end_to_end(runs):
    """Tasks in order into one adapter; every seen task evaluated after each; earlier tasks'
    entries kept exactly; forgetting = best earlier score - final score; summary.md table."""
    d = Path(runs["lori-continual"])
    res = _res(d)
    cont = res["continual"]
    order = ["sst2", "mrpc", "stsb"]
    assert cont["order"] == order
    R = cont["scores"]
    assert all((R[i][j] is None) == (j > i) for i in range(3) for j in range(3))
    # right after its own unit, a task's score is its unit's last evaluation (same adapter and head)
    for j, t in enumerate(order):
        own = [e for e in res["evals"] if e["task"] == t and not e.get("continual_final")]
        assert R[j][j] == pytest.approx(max(own, key=lambda e: e["step"])["score"])
    assert cont["forgetting"] == pytest.approx({order[j]: max(R[i][j] for i in range(j, 2)) - R[2][j] for j in range(2)})
    assert cont["average_forgetting"] == pytest.approx(sum(cont["forgetting"].values()) / 2)
    final = [e for e in res["evals"] if e.get("continual_final")]
    assert [e["task"] for e in final] == order and all(res["final"][e["task"]] == e["metrics"] for e in final)
    assert [e["score"] for e in final] == pytest.approx(R[2])
    snaps = [ckpt.load(str(d / f"lori_continual_{t}.pt")) for t in order]
    assert [s["tasks"] for s in snaps] == [order[:1], order[:2], order]
    first, last = snaps[0]["adapter"]["state"], snaps[2]["adapter"]["state"]
    n = 0
    for k in first:
        if k.endswith(".lora_mask"):
            b = k[:-len("mask")] + "B"
            assert torch.equal(last[b][first[k]], first[b][first[k]])   # task 1's entries untouched
            assert torch.equal(last[k[:-len("mask")] + "A"], first[k[:-len("mask")] + "A"])   # one A
            n += int(last[k].sum())
    assert n == res["params"]["adapter"] == 3 * int((1 - 0.9) * 4 * 32 * 8)   # disjoint masks
    for t in order[:2]:   # earlier heads carried over unchanged
        assert all(torch.equal(v, snaps[2]["heads"][t][k]) for k, v in snaps[order.index(t)]["heads"][t].items())
    summary = (d / "summary.md").read_text()
    assert "| after \\ task | sst2 | mrpc | stsb |" in summary and "| forgetting |" in summary
    assert res["lori_stages"]["lori_s"]["mask"]["rule"].endswith("entries of earlier tasks excluded")


def test_lori_continual_dense_baseline_and_resume_in_a_later_unit(tmp_path, synth):
    """--lori-s-steps 0: the authors' LoRI-D continual baseline (the dense B continues from
    the previous task). A resume from a checkpoint inside the last unit's LoRI-S stage
    (stacked on the earlier tasks) ends with the same evaluations."""
    base = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2,mrpc", "--max-steps", "3", "--eval-every", "3",
            "--method", "lori", "--lori-mode", "continual"]
    dense = tmp_path / "dense"
    assert main(base + ["--out", str(dense), "--lori-s-steps", "0"]) == 0
    res = _res(dense)
    assert res["lori_stages"]["lori_s"] is None and res["continual"]["scores"][1][0] is not None
    a, b = (ckpt.load(str(dense / f"lori_continual_{t}.pt"))["adapter"]["state"] for t in ("sst2", "mrpc"))
    k = next(k for k in a if k.endswith(".lora_B"))
    assert not any(x.endswith("lora_mask") for x in b) and (a[k] != b[k]).float().mean() > 0.9
    run = tmp_path / "sparse"
    assert main(base + ["--out", str(run), "--save-every", "5"]) == 0   # last checkpoint: unit 1, step 5 (LoRI-S)
    state = ckpt.load(str(run / ckpt.LATEST))
    assert (state["unit"], state["step"]) == (1, 5) and state["method"]["masks"] is not None
    before = _res(run)
    assert main(base + ["--out", str(run), "--save-every", "5", "--resume"]) == 0
    after = _res(run)
    assert _evals(str(run)) == [(e["step"], e["task"], e["metrics"], e.get("merged", False)) for e in before["evals"]]
    assert after["continual"] == before["continual"]
