"""benchmarks/bench_llm_step.py: its data and its gradient check (no timing asserted)."""
import argparse
import os
import re
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_llm_step as bench  # noqa: E402

ARGS = dict(quick=True, hidden_size=64, intermediate_size=96, num_hidden_layers=1, vocab_size=128, rank=4,
            lora_dropout=0.05, rows=4, seq_len=32, docs_per_row=4, backend=None, dtype="float32")


def _docs(batch, doc_len):
    """Multiset of (task, document tokens) of a packed batch."""
    ids = batch.ids.reshape(-1, doc_len)
    tasks = batch.token_task.reshape(-1, doc_len)
    assert (tasks == tasks[:, :1]).all()            # a document has one task
    return Counter((int(t), tuple(d.tolist())) for t, d in zip(tasks[:, 0], ids))


def test_packings_hold_the_same_documents():
    a = argparse.Namespace(**ARGS)
    mixed, pure, per_task = bench.make_data(a, 2, 128, torch.device("cpu"))
    doc_len = a.seq_len // a.docs_per_row
    assert _docs(mixed, doc_len) == _docs(pure, doc_len) == sum((_docs(b, doc_len) for b in per_task), Counter())
    assert (mixed.token_task != mixed.token_task[:, :1]).any()          # tasks mixed inside sequences
    assert (pure.token_task == pure.row_task[:, None]).all() and pure.row_task.tolist() == [0, 0, 1, 1]
    # a document only sees itself: its loss is the same in both packings
    model, _ = bench.build_model(a, torch.device("cpu"), torch.float32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(mixed.losses(model, 2), pure.losses(model, 2), rtol=1e-5)


def test_grouped_matches_loop_and_the_check_catches_misrouting():
    a = argparse.Namespace(**ARGS)
    model, _ = bench.build_model(a, torch.device("cpu"), torch.float32)
    token_ids, _ = bench.supports_token_ids()
    b = bench.Bench(a, model, 2, torch.device("cpu"), token_ids)
    assert b.check() < 1e-5
    b.per_task = b.per_task[::-1]          # task 0's documents routed to task 1: the check must see it
    assert b.check() > 0.5
    b.loop.remove()


def test_main_prints_the_ratio_line(capsys):
    bench.main(["--quick", "--hidden-size", "64", "--intermediate-size", "96", "--num-hidden-layers", "1",
                "--vocab-size", "128", "--seq-len", "16", "--rows", "2", "--tasks", "2", "--repeat", "1",
                "--warmup", "0", "--no-mem"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("grouped collection: ")
    assert re.fullmatch(r"grouped/joint = \d+\.\d\d, loop/joint = \d+\.\d\d", out[-1])


def test_sft_path_steps_both_trainers_on_the_same_batch(capsys):
    pytest.importorskip("trl")
    argv = ["--quick", "--sft", "--hidden-size", "64", "--intermediate-size", "96", "--num-hidden-layers", "1",
            "--vocab-size", "128", "--seq-len", "16", "--rows", "2", "--tasks", "3", "--repeat", "2", "--warmup", "1"]
    rows = bench.main(argv)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"sft-joint", "sft-grouped"} and all(r["same_batch"] for r in rows)
    assert by["sft-grouped"]["projections"] == 3       # one projection per optimizer step (warmup + repeat)
    assert by["sft-joint"]["x_joint"] == 1.0 and by["sft-grouped"]["median_ms"] > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"sft grouped/joint = \d+\.\d\d", out[-1])
