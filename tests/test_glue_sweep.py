"""Seeds and intervals in ``compare``, and the ``sweep`` subcommand (grid, skip, resume)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ortholora_kernels.glue.cli import main
from ortholora_kernels.glue.intervals import t_interval

# tiny steps: the sweep's own tiny budget, cut to a few steps on a small synthetic suite
TINY = ["--tasks", "sst2,stsb", "--n-train", "48", "--n-dev", "16", "--max-steps", "3", "--batch-size", "4",
        "--max-eval-samples", "16", "--eval-every", "3"]


def test_t_interval_quantiles_and_coverage():
    # half-width = t_{0.975, n-1} s / sqrt(n); the t quantiles are the textbook values
    m, h, n = t_interval([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)
    m, h, n = t_interval([0.0, 2.0])
    assert h == pytest.approx(12.706205 * np.sqrt(2) / np.sqrt(2), rel=1e-6)
    m, h, n = t_interval([5.0])
    assert (m, n) == (5.0, 1) and np.isnan(h)
    # the interval covers the true mean of normal samples 95% of the time (n=3, 2000 draws)
    rng = np.random.default_rng(0)
    cover = 0
    for _ in range(2000):
        m, h, _ = t_interval(rng.normal(10.0, 2.0, 3))
        cover += abs(m - 10.0) <= h
    assert 0.93 < cover / 2000 < 0.97


def _fake_run(d, method, seed, scores, r=8, gran=None):
    d.mkdir(parents=True)
    final = {"sst2": {"accuracy": scores[0] / 100}, "cola": {"matthews_correlation": scores[1] / 100}}
    res = {"method": method, "final": final, "task_scores": {"sst2": scores[0], "cola": scores[1]},
           "glue_score": (scores[0] + scores[1]) / 2, "finished": True,
           "evals": [{"step": 5, "task": "sst2", "metrics": final["sst2"], "score": scores[0]}]}
    (d / "results.json").write_text(json.dumps(res))
    (d / "config.json").write_text(json.dumps({"method": method, "seed": seed, "lora_r": r, "granularity": gran,
                                               "out": str(d), "tasks": ["sst2", "cola"]}))
    return str(d)


def test_compare_groups_seeds_and_pairs_only_common_seeds(tmp_path, capsys):
    joint = {0: (80, 40), 1: (82, 41), 2: (78, 30)}
    ortho = {0: (85, 50), 1: (86, 52)}             # seed 2 missing: paired over seeds 0, 1
    dirs = [_fake_run(tmp_path / f"j{s}", "joint", s, v) for s, v in joint.items()]
    dirs += [_fake_run(tmp_path / f"o{s}", "ortho", s, v, gran="ab") for s, v in ortho.items()]
    dirs += [_fake_run(tmp_path / "o4", "ortho", 0, (70, 20), r=4, gran="ab")]   # another rank: not paired
    dirs += [_fake_run(tmp_path / "j0again", "joint", 0, (10, 10))]   # seed 0 again: left out, noted
    out = tmp_path / "cmp.md"
    assert main(["compare", *dirs, dirs[0], "--out", str(out)]) == 0   # a directory twice counts once
    table = capsys.readouterr().out
    assert out.read_text() == table
    m, h, _ = t_interval([80, 82, 78])
    assert f"| joint, r=8 | 3 | 0,1,2 | {m:.1f} ± {h:.1f} |" in table
    avg = t_interval([(a + b) / 2 for a, b in ortho.values()])
    assert f"| ortho (ab), r=8 | 2 | 0,1 | 85.5 ± {t_interval([85, 86])[1]:.1f} | 51.0 ± " in table
    assert f"{avg[0]:.1f} ± {avg[1]:.1f} |" in table
    assert "| ortho (ab), r=4 | 1 | 0 | 70.0 | 20.0 | 45.0 |" in table
    d_sst = t_interval([85 - 80, 86 - 82])
    d_cola = t_interval([50 - 40, 52 - 41])
    assert (f"| ortho (ab), r=8 − joint, r=8 | 2 | +{d_sst[0]:.1f} ± {d_sst[1]:.1f} | "
            f"+{d_cola[0]:.1f} ± {d_cola[1]:.1f} * |") in table
    assert "Left out: " + str(tmp_path / "j0again") in table
    pairs = [ln for ln in table.splitlines() if ln.startswith("| ") and " − " in ln and "A − B" not in ln]
    assert len(pairs) == 1                                                 # r=4 is not paired with r=8
    assert (tmp_path / "cmp_seeds.png").stat().st_size > 0 and (tmp_path / "cmp_curves.png").stat().st_size > 0


def _conflict_log(d, rows):
    """conflicts.jsonl rows: (step, segment, conflict_fraction, projection_fraction)."""
    with open(d / "conflicts.jsonl", "w", encoding="utf-8") as f:
        for step, seg, cf, pf in rows:
            f.write(json.dumps({"step": step, "segment": seg, "conflict_fraction": cf, "mean_cosine": 0.0,
                                "projection_fraction": pf}) + "\n")


def test_compare_conflict_table_shows_the_share_projected(tmp_path, capsys):
    """The conflicts table has the fraction of conflicting pairs AND the fraction the method
    projected: they differ when conflicts are detected on a smoothed Gram (EMA), and a joint
    run that only logs its conflicts projects nothing ('-', its NaN never averaged in)."""
    joint = tmp_path / "joint"
    ortho = tmp_path / "ortho_ema"
    _fake_run(joint, "joint", 0, (80, 40))
    _fake_run(ortho, "ortho", 0, (81, 41), gran="ab")
    _conflict_log(joint, [(1, 0, 0.5, float("nan")), (1, 1, 0.25, float("nan")), (2, 0, 0.75, float("nan"))])
    _conflict_log(ortho, [(1, 0, 0.5, 0.25), (1, 1, 0.5, 0.5), (2, 0, 0.5, 0.0)])
    assert main(["compare", str(joint), str(ortho)]) == 0
    out = capsys.readouterr().out
    assert "| method | n | conflicting pairs | projected pairs |" in out
    assert "| joint | 1 | 0.500 | - |" in out
    assert "| ortho (ab) | 1 | 0.500 | 0.250 |" in out
    # over seeds: mean ± t half-width of both columns
    dirs = []
    for s, (cf, pf) in enumerate([(0.5, 0.25), (0.5, 0.35)]):
        d = tmp_path / f"o{s}"
        _fake_run(d, "ortho", s, (80 + s, 40), gran="ab")
        _conflict_log(d, [(1, 0, cf, pf)])
        dirs.append(str(d))
    assert main(["compare", *dirs]) == 0
    out = capsys.readouterr().out
    half = t_interval([0.25, 0.35])[1]
    assert f"| ortho (ab) | 2 | 0.500 ± 0.000 | 0.300 ± {half:.3f} |" in out


def test_labels_tell_configurations_apart(tmp_path, capsys):
    """Configurations the run label does not separate get the method options that differ."""
    a = _fake_run(tmp_path / "a", "ortho", 0, (80, 40), gran="ab")
    b = _fake_run(tmp_path / "b", "ortho", 0, (81, 41), gran="ab")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "aggregator": "upgrad"}))
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "| ortho (ab) [aggregator=None] |" in out and "| ortho (ab) [aggregator=upgrad] |" in out


def test_sweep_seeded_intervals_skip_and_compare(tmp_path, capsys):
    out = str(tmp_path / "sw")
    argv = ["sweep", "--out", out, "--methods", "joint,ortho", "--seeds", "0,1", *TINY]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "4 runs" in log and "4 new" in log
    names = sorted(os.listdir(os.path.join(out, "runs")))
    assert names == ["joint-r8-s0", "joint-r8-s1", "ortho-ab-r8-s0", "ortho-ab-r8-s1"]
    cfg = json.loads(Path(out, "runs", "joint-r8-s1", "config.json").read_text())
    assert cfg["seed"] == 1 and cfg["max_steps"] == 3 and cfg["log_conflicts"] and cfg["model"] == "tiny-roberta"
    table = Path(out, "comparison.md").read_text()
    assert table in log and "| joint | 2 | 0,1 |" in table and "| ortho (ab) − joint | 2 |" in table
    scores = [json.loads(Path(out, "runs", f"ortho-ab-r8-s{s}", "results.json").read_text())["glue_score"]
              for s in (0, 1)]
    m, h, _ = t_interval(scores)
    assert f"{m:.1f} ± {h:.1f} |" in table.split("| ortho (ab) | 2 | 0,1 |")[1].splitlines()[0]
    assert Path(out, "comparison_seeds.png").stat().st_size > 0
    # conflict frequency (the paper's second check) of the runs that log it, over seeds
    fr = [np.mean([json.loads(x)["conflict_fraction"] for x in
                   Path(out, "runs", f"joint-r8-s{s}", "conflicts.jsonl").read_text().splitlines()]) for s in (0, 1)]
    m, h, _ = t_interval(fr)
    assert f"| joint | 2 | {m:.3f} ± {h:.3f} |" in table
    # compare on the run directories gives the same table
    assert main(["compare", *[os.path.join(out, "runs", n) for n in names]]) == 0
    assert capsys.readouterr().out == table
    # finished runs are skipped: nothing is rewritten
    stamp = {n: os.stat(os.path.join(out, "runs", n, "results.json")).st_mtime_ns for n in names}
    assert main(argv) == 0
    assert "4 finished (skipped)" in capsys.readouterr().out
    assert stamp == {n: os.stat(os.path.join(out, "runs", n, "results.json")).st_mtime_ns for n in names}
    # a finished run with other options in the same directory stops the sweep with one line
    assert main(argv + ["--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run with other options (lr)" in err[0]


def test_sweep_resumes_interrupted_runs(tmp_path, capsys):
    base = ["sweep", "--methods", "ortho", "--seeds", "0", *TINY, "--max-steps", "4", "--save-every", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(base + ["--out", full]) == 0
    assert main(base + ["--out", part, "--stop-after-steps", "2"]) == 0
    assert "stopped after step 2" in capsys.readouterr().out
    assert not Path(part, "comparison.md").exists()
    assert main(base + ["--out", part]) == 0
    assert "1 to resume" in capsys.readouterr().out
    a = json.loads(Path(full, "runs", "ortho-ab-r8-s0", "results.json").read_text())
    b = json.loads(Path(part, "runs", "ortho-ab-r8-s0", "results.json").read_text())
    assert a["evals"] == b["evals"] and b["finished"]


def test_sweep_worker_processes(tmp_path, capsys):
    out = str(tmp_path / "w")
    assert main(["sweep", "--out", out, "--methods", "joint", "--seeds", "0,1", "--workers", "2", *TINY,
                 "--max-steps", "1"]) == 0
    assert "| joint | 2 | 0,1 |" in capsys.readouterr().out
    for s in (0, 1):
        assert "$ " in Path(out, "runs", f"joint-r8-s{s}", "train.log").read_text()


def test_paper_checks_plan():
    import argparse

    from ortholora_kernels.glue.sweep import plan

    a = argparse.Namespace(preset="paper-checks", methods=None, seeds=None, ranks=None, granularities=None,
                           aggregators=None, workers=1, budget="tiny", tasks=None, out="o")
    runs = plan(a, ["--max-steps", "7"])
    names = {r.name for r in runs}
    assert len(runs) == 36 == len(names)
    for r in (4, 8, 16):
        for s in (0, 1, 2):
            assert {f"single-r{r}-s{s}", f"joint-r{r}-s{s}", f"ortho-ab-r{r}-s{s}", f"ortho-global-r{r}-s{s}"} <= names
    joint = next(r for r in runs if r.name == "joint-r4-s0")
    assert "--log-conflicts" in joint.argv and joint.argv[-4:] == ["--max-steps", "7", "--out",
                                                                   os.path.join("o", "runs", "joint-r4-s0")]
    cfg = next(r for r in runs if r.name == "ortho-global-r16-s2").config()
    assert (cfg.method, cfg.granularity, cfg.lora_r, cfg.seed, cfg.max_steps) == ("ortho", "global", 16, 2, 7)


def _one_line(capsys, argv, match):
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ortholora-glue: error:") and match in err[0], err


@pytest.mark.parametrize("extra,match", [
    (["--seeds", "0,x"], "--seeds: expected comma-separated int"),
    (["--granularities", "rows"], "'rows' is not one of"),
    (["--methods", "joint,warp"], "unknown method 'warp'"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--lora-r", "4"], "--lora-r is set by the sweep"),
    (["--max-steps", "zero"], "invalid int value"),
    (["--tasks", "sst2,qqp"], "--budget tiny: no synthetic version of qqp"),
    (["--tasks", "sst2,nope"], "unknown GLUE task 'nope'"),
])
def test_sweep_mistakes_give_one_line(tmp_path, capsys, extra, match):
    _one_line(capsys, ["sweep", "--out", str(tmp_path / "s"), "--dry-run", *extra], match)


def test_aggregators_only_when_train_has_the_option(tmp_path, capsys):
    from ortholora_kernels.glue.sweep import train_has_option

    argv = ["sweep", "--out", str(tmp_path / "s"), "--dry-run", "--methods", "joint,ortho"]
    if not train_has_option("--aggregator"):
        _one_line(capsys, argv + ["--aggregators", "upgrad"], "no --aggregator option")
    else:   # the methods that take --aggregator run once per aggregator, the others once
        from ortholora_kernels.glue.cli import build_parser
        from ortholora_kernels.glue.methods import get_method

        choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                       if "--aggregator" in a.option_strings).choices
        agg = sorted(choices)[:2] if choices else ["pcgrad"]
        assert main(argv + ["--aggregators", ",".join(agg)]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        for m in ("joint", "ortho"):
            mine = [ln for ln in lines if f"--method {m} " in ln]
            if "aggregator" in get_method(m).options:
                assert sorted(ln.split("--aggregator ")[1].split()[0] for ln in mine) == sorted(agg)
            else:
                assert len(mine) == 1 and "--aggregator" not in mine[0]


def test_unknown_options_refused_outside_sweep(capsys):
    _one_line(capsys, ["compare", "x", "--max-steps", "3"], "unrecognized arguments: --max-steps 3")
