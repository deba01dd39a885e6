"""``torchrun --nproc_per_node 2`` (gloo, CPU): OrthoLoRATrainer and accelerate's
``Accelerator.prepare`` train exactly like one process on the union batch.

The launched script is tests/torchrun_script.py; the one-process reference runs the same
functions here.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(HERE, "torchrun_script.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("kind", ["trainer", "accelerate"])
def test_two_processes_equal_one_on_union(launched, kind, tmp_path):
    import torchrun_script as script
    from accelerate.state import AcceleratorState, PartialState
    try:
        single = getattr(script, f"{kind}_run")(str(tmp_path), 1)
    finally:  # the reference's Accelerator must not leak into other tests
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    two = torch.load(launched / f"{kind}-world2.pt")
    assert two.keys() == single.keys()
    init = dict(script.tiny_peft_classifier("roberta", num_labels=2).named_parameters())
    trained = 0
    for n in single:
        rel = ((two[n] - single[n]).norm() / single[n].norm().clamp_min(1e-30)).item()
        assert rel <= 1e-6, (kind, n, rel)
        trained += not torch.equal(single[n], init[n].detach())
    assert trained >= 4  # LoRA matrices and the head moved
