import os

import pytest
import torch

from ortholora_kernels import backends_available

# Backends that run directly on CPU tensors (triton needs the interpreter: its tests
# live in test_triton.py under the `interpreter` marker).
CPU_BACKENDS = [name for name, (ok, _) in backends_available("cpu").items() if ok and name != "triton"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (CPU twin runs instead)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interp:
            item.add_marker(pytest.mark.skip(reason="set TRITON_INTERPRET=1 (scripts/test.sh does)"))
