"""CLI: help, one-line errors for user mistakes, compare."""
import json

import pytest

from ortholora_kernels.glue.cli import build_parser, main


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("ortholora-glue: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for cmd in ("train", "compare", "demo", "synth", "sweep"):
        assert cmd in top
    for cmd in ("train", "compare", "demo", "synth", "sweep"):
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{cmd} {action.option_strings} has no help"
                assert action.option_strings[0] in out


@pytest.mark.parametrize("argv,match", [
    (["train", "--tasks", "sst2,bogus", "--tiny"], "unknown GLUE task 'bogus'"),
    (["train", "--tasks", "", "--tiny"], "no task"),
    (["train", "--method", "joint", "--collect", "loop", "--tiny"], "--collect applies only"),
    (["train", "--method", "single", "--granularity", "ab", "--tiny"], "--granularity applies only"),
    (["train", "--method", "ortho", "--log-conflicts", "--tiny"], "--log-conflicts applies only"),
    (["train", "--method", "joint", "--granularity", "ab", "--tiny"], "needs --log-conflicts"),
    (["train", "--method", "nope"], "invalid choice"),
    (["train", "--max-steps", "x"], "invalid int value"),
    (["train", "--batch-size", "0", "--tiny"], "--batch-size must be >= 1"),
    (["train", "--max-train-samples", "0", "--tiny"], "--max-train-samples must be >= 1"),
    (["train", "--method", "ortho", "--backend", "warp9", "--tiny"], "--backend"),
    (["train", "--synthetic", "--tasks", "sst2,qqp", "--tiny"], "no synthetic version of qqp"),
    (["demo", "--tasks", "mnli"], "no synthetic version of mnli"),
    (["demo", "--methods", "joint,warp"], "unknown method 'warp'"),
    (["compare"], "the following arguments are required"),
    (["bogus-command"], "invalid choice"),
])
def test_user_mistakes_give_one_line(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_missing_data_files(capsys, tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    _one_line_error(capsys, ["train", "--tiny", "--tasks", "rte", "--data-dir", str(tmp_path),
                             "--out", str(tmp_path / "run")], "missing file")
    _one_line_error(capsys, ["train", "--tiny", "--tasks", "rte", "--data-dir", str(tmp_path / "nodir"),
                             "--out", str(tmp_path / "run")], "does not exist")


def test_model_path_missing(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--model", str(tmp_path / "no_model"), "--synthetic", "--tasks", "sst2",
                             "--out", str(tmp_path / "run")], "does not exist")


def test_resume_without_checkpoint_and_compare_non_run(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--tiny", "--synthetic", "--tasks", "sst2", "--resume",
                             "--out", str(tmp_path / "run")], "no checkpoint")
    _one_line_error(capsys, ["compare", str(tmp_path)], "no results.json")


def test_compare_table(capsys, tmp_path):
    for name, acc in (("joint", 0.8), ("ortho", 0.9)):
        d = tmp_path / name
        d.mkdir()
        res = {"method": name, "final": {"mrpc": {"accuracy": acc, "f1": 0.5}, "cola": {"matthews_correlation": 0.2}},
               "glue_score": (100 * (acc + 0.5) / 2 + 20) / 2, "evals": [
                   {"step": 10, "task": "mrpc", "metrics": {"accuracy": acc, "f1": 0.5}, "score": 50.0}]}
        (d / "results.json").write_text(json.dumps(res))
        (d / "config.json").write_text(json.dumps({"method": name, "granularity": None}))
    out_md = tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "joint"), str(tmp_path / "ortho"), "--out", str(out_md)]) == 0
    out = capsys.readouterr().out
    assert "| method | mrpc (acc/F1) | cola (mcc) | avg |" in out
    assert "| ortho (ab) | 90.0/50.0 | 20.0 | 45.0 |" in out
    assert out_md.read_text() == out
    assert (tmp_path / "cmp_curves.png").stat().st_size > 0


def test_synth_command(capsys, tmp_path):
    assert main(["synth", str(tmp_path / "s"), "--tasks", "sst2,rte", "--n-train", "10", "--n-dev", "5"]) == 0
    assert (tmp_path / "s" / "SST-2" / "train.tsv").read_text().count("\n") == 11
    assert (tmp_path / "s" / "RTE" / "dev.tsv").exists()


def test_python_dash_m_entry_point():
    """The real process: `python -m ortholora_kernels.glue` exits 2 with one stderr line, no traceback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ortholora_kernels.glue", "train", "--tasks", "sst2,nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["ortholora-glue: error: unknown GLUE task 'nope' (known: cola, sst2, "
                                             "mrpc, stsb, qqp, mnli, qnli, rte, wnli)"]


@pytest.mark.parametrize("extra,match", [
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--tiny-hidden", "33"], "--tiny-hidden must be an even number"),
])
def test_bad_numeric_options_give_one_line(capsys, tmp_path, extra, match):
    """Values the optimizer or the tiny config would reject with a traceback are caught up front."""
    _one_line_error(capsys, ["train", "--tiny", "--synthetic", "--tasks", "sst2", "--out", str(tmp_path / "run"),
                             *extra], match)


def test_malformed_stsb_score_gives_one_line(capsys, tmp_path):
    from ortholora_kernels.glue.data import write_synthetic_suite

    write_synthetic_suite(str(tmp_path / "d"), n_train=6, n_dev=4, tasks=["stsb"])
    with open(tmp_path / "d" / "STS-B" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("\t".join(["9", "g", "f", "y", "o", "s", "s", "a b", "c d", "n/a"]) + "\n")
    _one_line_error(capsys, ["train", "--tiny", "--tasks", "stsb", "--data-dir", str(tmp_path / "d"),
                             "--out", str(tmp_path / "run")], "unexpected score 'n/a'")


def test_corrupt_checkpoint_and_results_give_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["train", "--tiny", "--synthetic", "--tasks", "sst2", "--resume", "--out", str(run)],
                    "--resume: cannot read")
    (run / "results.json").write_text("{truncated")
    _one_line_error(capsys, ["compare", str(run)], "not a results file")


def test_empty_dev_split_gives_one_line(capsys, tmp_path):
    from ortholora_kernels.glue.data import write_synthetic_suite

    write_synthetic_suite(str(tmp_path / "d"), n_train=6, n_dev=4, tasks=["sst2"])
    (tmp_path / "d" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n")   # header only
    _one_line_error(capsys, ["train", "--tiny", "--tasks", "sst2", "--data-dir", str(tmp_path / "d"),
                             "--no-progress", "--no-plots", "--max-steps", "1", "--out", str(tmp_path / "run")],
                    "no examples in the evaluation split 'dev'")
