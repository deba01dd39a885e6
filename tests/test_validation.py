"""Bad input gets a clear error that names the argument."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference

X = torch.randn(3, 10)


BAD = pytest.mark.parametrize("kwargs,exc,match", [
    (dict(grads=torch.randn(10)), ValueError, "grads: expected a 2-D"),
    (dict(grads=torch.randn(2, 3, 4)), ValueError, "grads: expected a 2-D"),
    (dict(grads=torch.ones(3, 10, dtype=torch.int64)), TypeError, "grads: expected a float"),
    (dict(grads=torch.ones(3, 10, dtype=torch.complex64)), TypeError, "grads: expected a float"),
    (dict(grads=torch.empty(0, 10)), ValueError, "grads: expected T >= 1"),
    (dict(grads=[[1.0]]), TypeError, "grads: expected a torch.Tensor"),
    (dict(segments=[0, 5, 5, 10]), ValueError, "segments: offsets must be strictly increasing"),
    (dict(segments=[0, 7, 4, 10]), ValueError, "segments: offsets must be strictly increasing"),
    (dict(segments=[0, 5, 9]), ValueError, "segments: the last offset must equal N"),
    (dict(segments=[1, 10]), ValueError, "segments: the first offset must be 0"),
    (dict(segments=[10]), ValueError, "segments: expected at least two"),
    (dict(segments=[0, 2.5, 10]), TypeError, "segments: expected a sequence of ints"),
    (dict(segments=torch.tensor([0.0, 10.0])), TypeError, "segments: expected a 1-D int64"),
    (dict(segments="0,10"), TypeError, "segments: expected None"),
    (dict(order=torch.zeros(4, 4, dtype=torch.int64)), ValueError, "order: grads has T = 3"),
    (dict(order=torch.zeros(2, 3, 3, dtype=torch.int64)), ValueError, "order: expected shape"),
    (dict(order=torch.zeros(3, 3)), TypeError, "order: expected an int64"),
    (dict(order=torch.zeros(3, 3, dtype=torch.int64)), ValueError, "order: every row must be a permutation"),
    (dict(order=torch.tensor([[0, 1, 3], [0, 1, 2], [0, 1, 2]])), ValueError, "order: every row must be a permutation"),
    (dict(order=[[0, 1, 2]] * 3), TypeError, "order: expected an int64 tensor"),
    (dict(reduction="max"), ValueError, "reduction: expected one of"),
])


def _call(fn, kwargs, device="cpu"):
    kwargs = {"grads": X, **kwargs}
    for key in ("grads", "order"):           # inputs on the pair's device
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].to(device)
    grads = kwargs.pop("grads")
    segments = kwargs.pop("segments", None)
    return fn(grads, segments, **kwargs)


@BAD
def test_bad_arguments_are_named(target, kwargs, exc, match):
    if match.startswith("order: every row") and target.device != "cpu":
        # Order values on a device are not read (a host sync): out-of-range entries are
        # skipped (ARCHITECTURE.md), in-range repeats are visits as written. No error.
        assert torch.isfinite(_call(target.project, kwargs, target.device)).all()
        return
    with pytest.raises(exc, match=match):
        _call(target.project, kwargs, target.device)


@BAD
def test_reference_names_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(reference.project, kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ok.project(X, backend="cuda-magic")


def test_unavailable_explicit_backend_raises_but_auto_falls_back(monkeypatch):
    from ortholora_kernels import backends
    monkeypatch.setattr(backends, "availability", lambda name, device: None if name == "torch" else "not built")
    with pytest.raises(RuntimeError, match="backend='native' cannot run on cpu: not built"):
        backends.select("native", torch.device("cpu"))
    assert backends.select("auto", torch.device("cpu")) == "torch"


def test_auto_fallback_to_torch_warns_once_with_the_reason(monkeypatch):
    """A failed extension build must not silently cost 10-20x: the automatic choice says
    once per device type why it fell back to the torch backend; an explicit choice is quiet."""
    import warnings
    from ortholora_kernels import backends
    monkeypatch.delenv("ORTHOLORA_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(backends, "availability", lambda name, device: None if name == "torch" else "not built")
    with pytest.warns(RuntimeWarning, match=r"no compiled backend on cpu \(native: not built\); using the torch"):
        assert backends.select(None, torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", torch.device("cpu")) == "torch"    # once per device type
        assert backends.select("torch", torch.device("cuda", 0)) == "torch"  # explicit: no warning
    with pytest.warns(RuntimeWarning, match=r"on cuda \(triton: not built; native: not built\)"):
        assert backends.select(None, torch.device("cuda", 0), 8) == "torch"


def test_auto_skips_native_on_cuda_beyond_its_task_limit(monkeypatch):
    """native's CUDA kernels take T <= 32: the automatic choice must fall back, not raise."""
    from ortholora_kernels import backends
    monkeypatch.delenv("ORTHOLORA_BACKEND", raising=False)
    monkeypatch.setattr(backends, "availability", lambda name, device: None)
    cuda = torch.device("cuda", 0)
    assert backends.select(None, cuda, 32) == "triton"   # triton first on CUDA (native CUDA is untimed)
    assert backends.select(None, cuda, 33) == "triton"
    assert backends.select("auto", cuda, 64) == "triton"
    monkeypatch.setattr(backends, "availability", lambda name, device: None if name != "triton" else "no triton")
    assert backends.select(None, cuda, 32) == "native"
    assert backends.select(None, cuda, 33) == "torch"
    assert backends.select(None, torch.device("cpu"), 1000) == "native"   # no limit on CPU


def test_environment_variable_selects_backend(monkeypatch):
    from ortholora_kernels import backends
    monkeypatch.setenv("ORTHOLORA_BACKEND", "torch")
    assert backends.select(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("ORTHOLORA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend: expected one of"):
        backends.select(None, torch.device("cpu"))


def test_order_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="order: expected a tensor on the device of grads"):
        ok.project(X, order=torch.zeros(3, 3, dtype=torch.int64, device="meta"))


def test_backends_available_reports_reasons():
    info = ok.backends_available("cpu")
    assert info["torch"] == (True, "ok")
    assert set(info) == {"torch", "triton", "native"}
    for usable, reason in info.values():
        assert isinstance(usable, bool) and isinstance(reason, str) and reason
