"""Every script under examples/ runs at its smallest setting, as its docstring says.

The scripts check what they show themselves (compile.py: compiled steps equal eager;
distributed.py: the ranks end with identical parameters); here they must exit 0 and print
what they promise. Each runs in a fresh interpreter, from a temporary directory.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, tmp_path, timeout=300):
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout


#: (script, smallest arguments, a line its output must contain)
CASES = {
    "custom_loop.py": (["--steps", "2", "--log-every", "1"], "step 2: loss"),
    "trainer.py": (["--steps", "2"], "'loss'"),
    "compile.py": (["--steps", "2", "--backend", "aot_eager"], "step 2: loss compiled"),
    "glue_harness.py": (["--out", "glue", "--steps", "2", "--n-train", "32"], "| ortho (ab) |"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args, expect = CASES[script]
    assert expect in _run([str(EXAMPLES / script), *args], tmp_path)


def test_distributed_example_on_two_gloo_ranks(tmp_path):
    out = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(EXAMPLES / "distributed.py"), "--steps", "2"], tmp_path)
    assert "2 ranks, 2 steps: parameters identical on every rank: True" in out


def test_every_example_is_run_by_a_test():
    """A new example joins CASES here, or another test file runs it (e.g. the TRL example's)."""
    here = set(CASES) | {"distributed.py"}
    tests = [p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    untested = sorted(p.name for p in EXAMPLES.glob("*.py")
                      if p.name not in here | {"toy.py"} and not any(p.name in t for t in tests))
    assert not untested, f"examples no test runs: {untested}"
