"""End-to-end training with a tiny model: methods, reports, exact resume, atomic checkpoints,
and a round-trip through the real GLUE files (../shared/glue) for every task present."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ortholora_kernels.glue import checkpoint as ckpt
from ortholora_kernels.glue.cli import main
from ortholora_kernels.glue.data import write_synthetic_suite
from ortholora_kernels.glue.tasks import get_task

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"

FAST = ["--tiny", "--batch-size", "4", "--eval-batch-size", "32", "--max-eval-samples", "16", "--max-length", "32",
        "--no-progress", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_suite(str(d), n_train=64, n_dev=16, seed=0)
    return str(d)


def _metrics(run):
    res = json.loads((Path(run) / "results.json").read_text())
    return [(e["step"], e["task"], e["metrics"]) for e in res["evals"]], res


@pytest.mark.parametrize("collect", ["grouped", "loop"])
def test_resume_matches_uninterrupted_run(tmp_path, synth, collect, capsys):
    args = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2,mrpc,stsb", "--method", "ortho",
            "--collect", collect, "--granularity", "ab", "--max-steps", "8", "--eval-every", "3", "--save-every", "5",
            "--log-every", "2", "--no-plots"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(args + ["--out", full]) == 0
    assert main(args + ["--out", part, "--stop-after-steps", "4"]) == 0
    assert "stopped after step 4" in capsys.readouterr().err
    assert not json.loads((Path(part) / "results.json").read_text())["finished"]
    state = torch.load(Path(part) / ckpt.LATEST, weights_only=True)  # tensors and plain types only
    assert state["step"] == 4 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert main(args + ["--out", part, "--resume"]) == 0
    a, ra = _metrics(full)
    b, rb = _metrics(part)
    assert a == b and [s for s, *_ in a] == [3, 3, 3, 6, 6, 6, 8, 8, 8]
    assert ra["glue_score"] == rb["glue_score"]
    # the conflict log has every step exactly once, identical values
    la = (Path(full) / "conflicts.jsonl").read_text()
    assert la == (Path(part) / "conflicts.jsonl").read_text()
    assert len(la.splitlines()) == 8 * 2


def test_resume_refuses_changed_options(tmp_path, synth, capsys):
    out = str(tmp_path / "r")
    args = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2", "--method", "joint", "--max-steps", "4",
            "--out", out, "--no-plots"]
    assert main(args + ["--stop-after-steps", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--lr", "1e-3"]) == 2
    assert "options differ" in capsys.readouterr().err


_EXECUTED = []


def _payload(x):
    _EXECUTED.append(x)
    return {"step": 0}


class _Evil:
    """Unpickling this calls ``_payload``: what a hostile checkpoint would do with os.system."""

    def __reduce__(self):
        return (_payload, ("ran",))


def test_checkpoint_with_a_pickled_callable_is_refused(tmp_path, synth, capsys):
    path = str(tmp_path / ckpt.LATEST)
    torch.save({"config": {}, "evil": _Evil()}, path)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refusing to unpickle"):
        ckpt.load(path)
    args = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2", "--method", "joint", "--max-steps", "2",
            "--out", str(tmp_path), "--no-plots", "--resume"]
    assert main(args) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert _EXECUTED == []  # the payload never ran
    # the RNG state round-trips through a weights_only file
    ckpt.seed_everything(3)
    ckpt.atomic_save({"rng": ckpt.rng_state()}, path)
    import random

    import numpy as np
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_single_resumes_across_task_units(tmp_path, synth):
    args = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2,cola", "--method", "single", "--max-steps", "4",
            "--eval-every", "2", "--no-plots"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(args + ["--out", full]) == 0
    assert main(args + ["--out", part, "--stop-after-steps", "3"]) == 0   # stops inside the first unit
    assert main(args + ["--out", part, "--resume"]) == 0
    assert _metrics(full)[0] == _metrics(part)[0]
    assert {t for _, t, _ in _metrics(full)[0]} == {"sst2", "cola"}
    final = torch.load(os.path.join(part, "model_final_cola.pt"))
    assert final["tasks"] == ["cola"] and any("lora_B" in k for k in final["state_dict"])


def test_methods_and_reports(tmp_path, synth, capsys):
    threads = torch.get_num_threads()
    runs = []
    for method, extra in (("joint", ["--log-conflicts", "--granularity", "global"]), ("ortho", ["--granularity", "layer"])):
        out = str(tmp_path / method)
        assert main(["train", *FAST, "--data-dir", synth, "--tasks", "sst2,cola,stsb", "--method", method,
                     "--max-steps", "4", "--eval-every", "2", "--out", out, *extra]) == 0
        runs.append(out)
        assert torch.get_num_threads() == threads       # the tiny model's 1 thread is not left behind
        for f in ("config.json", "results.json", "summary.md", "plots/learning_curves.png", "model_final.pt"):
            assert os.path.getsize(os.path.join(out, f)) > 0, f
    o = Path(runs[1])
    rows = [json.loads(x) for x in (o / "conflicts.jsonl").read_text().splitlines()]
    assert {r["segment"] for r in rows} == {0, 1, 2, 3}           # A/B x 2 layers
    assert all(0 <= r["conflict_fraction"] <= 1 and -1 <= r["mean_cosine"] <= 1 and 0 <= r["projection_fraction"] <= 1
               for r in rows)
    joint = [json.loads(x) for x in (Path(runs[0]) / "conflicts.jsonl").read_text().splitlines()]
    assert joint and all(0 <= r["conflict_fraction"] <= 1 for r in joint)
    assert all(r["projection_fraction"] != r["projection_fraction"] for r in joint)   # NaN: joint projects nothing
    cos = json.loads((o / "cosine.json").read_text())["mean_cosine"]
    assert torch.tensor(cos).shape == (4, 3, 3)
    assert (o / "plots" / "conflicts.png").stat().st_size > 0 and (o / "plots" / "cosine_heatmap.png").exists()
    cfg = json.loads((o / "config.json").read_text())
    assert cfg["method"] == "ortho" and cfg["granularity"] == "layer" and cfg["lora_r"] == 8
    assert cfg["collect"] == "grouped" and cfg["resolved"]["backend"] in ("torch", "native", "triton")
    capsys.readouterr()
    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out
    assert "| joint |" in table and "| ortho (layer) |" in table and "avg" in table
    rows = [json.loads(x) for x in (Path(runs[0]) / "conflicts.jsonl").read_text().splitlines()]
    assert {r["segment"] for r in rows} == {0} and len(rows) == 4     # joint --log-conflicts, global


def test_joint_log_conflicts_keeps_the_plain_update(tmp_path, synth):
    """Logging conflicts must not change joint training (same metrics up to float rounding)."""
    base = ["train", *FAST, "--data-dir", synth, "--tasks", "sst2,stsb", "--method", "joint", "--max-steps", "6",
            "--eval-every", "6", "--no-plots", "--lora-dropout", "0"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--log-conflicts"]) == 0
    ma, mb = _metrics(str(tmp_path / "a"))[0], _metrics(str(tmp_path / "b"))[0]
    for (_, _, x), (_, _, y) in zip(ma, mb):
        assert x == pytest.approx(y, abs=1e-3)


def test_demo_command(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--max-steps", "3", "--eval-every", "3", "--n-train", "32", "--n-dev", "16",
                 "--batch-size", "4", "--tasks", "sst2,mrpc", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "ortho: task gradients per step: A: " in text and "joint: task gradients per step: A: " in text
    for m in ("single", "joint", "ortho (ab)"):
        assert f"| {m} |" in text
    assert os.path.isfile(os.path.join(out, "comparison.md"))
    assert os.path.isfile(os.path.join(out, "plots", "learning_curves.png"))
    assert os.path.isfile(os.path.join(out, "ortho", "plots", "cosine_heatmap.png"))


def test_atomic_checkpoint_survives_a_crash_while_writing(tmp_path, monkeypatch):
    path = str(tmp_path / ckpt.LATEST)
    ckpt.atomic_save({"step": 1}, path)

    def boom(*a, **k):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2, "x": torch.ones(1000)}, path)
    monkeypatch.undo()
    assert ckpt.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == [ckpt.LATEST]    # no temp file left behind


def _real_task_dirs():
    if not GLUE.is_dir():
        return []
    names = []
    for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        spec = get_task(t)
        if (GLUE / spec.dir_name).is_dir():
            names.append(t)
    return names


@pytest.mark.skipif(not _real_task_dirs(), reason="real GLUE files not present (../shared/glue)")
def test_real_glue_round_trip(tmp_path, capsys):
    """Head of every real file present (bytes kept: BOM, quotes, no-header CoLA) -> train -> metrics."""
    data = tmp_path / "glue"
    tasks = _real_task_dirs()
    for t in tasks:
        spec = get_task(t)
        src = GLUE / spec.dir_name
        (data / spec.dir_name).mkdir(parents=True)
        for f in ["train"] + [s.file for s in spec.eval_splits]:
            p = src / f"{f}.tsv"
            if not p.exists():          # QNLI has dev only here: train on the dev head
                p = src / f"{spec.eval_splits[0].file}.tsv"
            with open(p, "rb") as fh:
                head = b"".join(fh.readline() for _ in range(41))
            (data / spec.dir_name / f"{f}.tsv").write_bytes(head)
    out = str(tmp_path / "run")
    assert main(["train", *FAST, "--data-dir", str(data), "--tasks", ",".join(tasks), "--method", "ortho",
                 "--max-steps", "2", "--eval-every", "2", "--out", out, "--no-plots"]) == 0
    res = json.loads((Path(out) / "results.json").read_text())
    assert set(res["final"]) == set(tasks)
    for t in tasks:
        assert set(res["final"][t]) == set(get_task(t).metric_names())
    assert res["glue_score"] == pytest.approx(sum(res["task_scores"].values()) / len(tasks))
    shutil.rmtree(data)


def test_synthetic_tasks_are_learnable(tmp_path):
    """A short joint run on the synthetic suite beats chance clearly (the demo's premise)."""
    data = str(tmp_path / "data")
    write_synthetic_suite(data, n_train=600, n_dev=200, seed=0, tasks=["sst2", "mrpc", "stsb"])
    out = str(tmp_path / "run")
    assert main(["train", "--tiny", "--data-dir", data, "--tasks", "sst2,mrpc,stsb", "--method", "joint",
                 "--pooling", "mean", "--lr", "2e-3", "--max-steps", "200", "--eval-every", "200", "--no-progress",
                 "--no-plots", "--max-length", "32", "--out", out]) == 0
    final = json.loads((Path(out) / "results.json").read_text())["final"]
    assert final["mrpc"]["accuracy"] > 0.75 and final["stsb"]["pearson"] > 0.6 and final["sst2"]["accuracy"] > 0.55


def test_local_model_directory(tmp_path, synth):
    """--model PATH: any saved Hugging Face encoder + tokenizer (the hub code path, offline)."""
    from transformers import RobertaModel

    from ortholora_kernels.glue.data import load_tasks
    from ortholora_kernels.glue.model import build_tiny_tokenizer, tiny_config
    from ortholora_kernels.glue.tasks import parse_tasks

    (d,) = load_tasks(parse_tasks("rte"), synth)
    tok = build_tiny_tokenizer(d.train.text_a + d.train.text_b, 200)
    model_dir = tmp_path / "my-encoder"
    tok.save_pretrained(str(model_dir))
    RobertaModel(tiny_config(len(tok), 64)).save_pretrained(str(model_dir))
    out = str(tmp_path / "run")
    args = [a for a in FAST if a != "--tiny"]
    assert main(["train", *args, "--model", str(model_dir), "--data-dir", synth, "--tasks", "rte", "--method", "joint",
                 "--max-steps", "2", "--eval-every", "2", "--out", out, "--no-plots", "--threads", "1"]) == 0
    res = json.loads((Path(out) / "results.json").read_text())
    assert "accuracy" in res["final"]["rte"]


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_conflict_log_resumed_on_the_cpu_accepts_device_statistics(tmp_path, device):
    """A resumed ConflictLog holds its cosine sum on the CPU (checkpoints are CPU tensors); the
    next step's statistics live on the training device ("meta" stands in for a GPU)."""
    from ortholora_kernels.glue.report import ConflictLog

    log = ConflictLog(str(tmp_path / "conflicts.jsonl"), flush_every=100)
    log.load_state_dict({"cos_sum": torch.ones(1, 2, 2, dtype=torch.float64), "cos_count": 1}, step=3)
    stats = {"conflict_fraction": torch.zeros(1, device=device), "mean_cosine": torch.zeros(1, device=device),
             "cosine": torch.full((1, 2, 2), 0.5, device=device)}
    log.append(4, stats)
    assert log.cos_count == 2 and log.cos_sum.device.type == device
    if device != "meta":
        assert log.mean_cosine_matrix() == [[[0.75, 0.75], [0.75, 0.75]]]
