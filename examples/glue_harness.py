"""The GLUE harness from Python: write the offline synthetic suite, train joint and
Ortho-LoRA on it with a tiny random RoBERTa, compare them. The same as the shell commands

    ortholora-glue synth OUT/data --tasks sst2,mrpc
    ortholora-glue train --tiny --data-dir OUT/data --tasks sst2,mrpc --method joint --out OUT/joint ...
    ortholora-glue train --tiny --data-dir OUT/data --tasks sst2,mrpc --method ortho --out OUT/ortho ...
    ortholora-glue compare OUT/joint OUT/ortho --out OUT/comparison.md

Run it:

    python examples/glue_harness.py --out runs/example_glue              # 200 steps per method, ~a minute
    python examples/glue_harness.py --out /tmp/glue --steps 2 --n-train 32   # the smallest run (the tests run it)

For real GLUE: ``--model roberta-base`` and ``--data-dir`` (or the hub) instead of the
synthetic suite; docs/glue.md has the paper's command line.
"""
from __future__ import annotations

import argparse
import os

from ortholora_kernels.glue.cli import main as glue


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/example_glue")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=1000, help="synthetic training rows per task")
    a = ap.parse_args(argv)

    data, tasks = os.path.join(a.out, "data"), "sst2,mrpc"
    assert glue(["synth", data, "--tasks", tasks, "--n-train", str(a.n_train), "--n-dev", "64"]) == 0
    common = ["train", "--tiny", "--data-dir", data, "--tasks", tasks, "--pooling", "mean", "--max-length", "32",
              "--lr", "2e-3", "--max-steps", str(a.steps), "--eval-every", str(a.steps), "--no-progress",
              "--no-plots"]
    for method in ("joint", "ortho"):
        extra = ["--log-conflicts", "--granularity", "ab"] if method == "joint" else []   # joint: log, don't project
        assert glue(common + ["--method", method, *extra, "--out", os.path.join(a.out, method)]) == 0
    return glue(["compare", os.path.join(a.out, "joint"), os.path.join(a.out, "ortho"),
                 "--out", os.path.join(a.out, "comparison.md")])


if __name__ == "__main__":
    raise SystemExit(main())
