"""The test matrix: every op test that takes the ``target`` fixture runs on every
(backend, device) pair of the registry, with ids like ``test_x[native-cpu-...]``.

Pairs: ``torch-cpu``, ``native-cpu``, ``triton-interp`` (the Triton kernels on CPU
tensors through TRITON_INTERPRET=1, marked ``interpreter``, interpreter-sized shapes),
and ``torch-cuda``, ``native-cuda``, ``triton-cuda`` (marked ``gpu``; skipped without a
GPU). A pair whose backend cannot run (not built, triton missing) is skipped with the
backend's own reason. See ARCHITECTURE.md, "Test matrix".
"""
import os

os.environ.setdefault("ORTHOLORA_JIT", "0")   # never a slow JIT build of the extension inside tests

import pytest
import torch

from cases import Target

from ortholora_kernels.backends import BACKENDS

#: the devices tests can reach: the CPU, and a CUDA GPU when there is one
DEVICES = ("cpu", "cuda")
#: every registered backend (a new one in the registry joins the matrix by itself) x DEVICES
PAIRS = [Target(backend, device) for device in DEVICES for backend in BACKENDS]


def _param(target: Target):
    marks = []
    if target.interpreted:
        marks.append(pytest.mark.interpreter)
    elif target.device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(target, id=target.id, marks=marks)


def _usable(t: Target) -> Target:
    if t.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = t.unavailable()
    if reason is not None:
        pytest.skip(f"{t.id}: {reason}")
    return t


@pytest.fixture(params=[_param(t) for t in PAIRS])
def target(request) -> Target:
    """One (backend, device) pair; skips (with the backend's reason) where it cannot run."""
    return _usable(request.param)


@pytest.fixture(params=[_param(t) for t in PAIRS if t.device == "cuda"])
def cuda_target(request) -> Target:
    """The CUDA pairs only, for what exists only on a GPU (graph capture, GPU-sized shapes)."""
    return _usable(request.param)


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interp:
            item.add_marker(pytest.mark.skip(reason="set TRITON_INTERPRET=1 (scripts/test.sh does)"))
