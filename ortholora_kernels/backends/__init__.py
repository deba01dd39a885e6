"""Backend registry and dispatch.

A backend is a module whose ``BACKEND`` is a :class:`~.base.Backend` (the contract: the
passes over memory and availability); :mod:`ortholora_kernels.ops` composes the
algorithm from them. A limit on T goes into ``_MAX_TASKS`` (the automatic choice then
skips that backend past it).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .base import Backend

# Automatic choice walks this list: native if built for the device, else triton on GPUs,
# else torch. Modules are imported lazily so a missing optional dependency never breaks
# `import ortholora_kernels`.
_MODULES = {
    "native": "ortholora_kernels.backends.native_impl",
    "triton": "ortholora_kernels.backends.triton_impl",
    "torch": "ortholora_kernels.backends.torch_impl",
}
_AUTO_ORDER = ("native", "triton", "torch")
# On CUDA, triton first until native is measured faster on a GPU (no GPU has
# timed the native CUDA kernels yet; their stage 2 sums the pieces serially). Per device type.
_AUTO_ORDER_BY_DEVICE = {"cuda": ("triton", "native", "torch")}
# Largest T per device type and backend, where there is one: native's CUDA kernels solve
# in shared memory (csrc/cuda/kernels.cuh, kMaxTasks); triton's Gram + solve program holds
# T_PAD x T_PAD fp64 tiles per thread block (sm_90: T = 129 spills ~54 KB per thread;
# triton_impl._MAX_TASKS_CUDA), past which the torch backend's matrix products win.
_MAX_TASKS = {"cuda": {"native": 32, "triton": 128}}
BACKENDS = tuple(_MODULES)


def get(name: str) -> Backend:
    """The :class:`~.base.Backend` called ``name`` (raises ImportError when it cannot load)."""
    return importlib.import_module(_MODULES[name]).BACKEND


def availability(name: str, device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a one-line reason."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    try:
        impl = get(name)
    except Exception as exc:  # an optional dependency or the extension is missing
        return f"cannot be loaded: {type(exc).__name__}: {exc}"
    return impl.availability(torch.device(device))


def backends_available(device="cpu") -> dict[str, tuple[bool, str]]:
    """``{name: (usable, reason)}`` for every backend on ``device`` (default CPU); for a usable
    native backend the reason says how the extension came ("ok (prebuilt)" or JIT-built)."""
    out = {}
    for name in BACKENDS:
        reason = availability(name, device)
        # native: how the extension came (prebuilt or JIT-built at first use)
        how = getattr(importlib.import_module(_MODULES[name]), "origin", None) if reason is None else None
        out[name] = (reason is None, reason or (f"ok ({how()})" if how and how() else "ok"))
    return out


def select(requested: str | None, device: torch.device, tasks: int | None = None) -> str:
    """Resolve ``backend=`` (or ``$ORTHOLORA_BACKEND``) to a usable backend name.

    An explicit choice that cannot run raises; the automatic one falls back silently,
    also past a backend that cannot handle ``tasks`` (T) tasks on ``device`` (native on
    CUDA: T <= 32). ``tasks`` may be symbolic under torch.compile (a guard on the limit).
    """
    limits = _MAX_TASKS.get(device.type, {})
    skip = () if tasks is None else tuple(name for name, cap in limits.items() if tasks > cap)
    return _select(requested, device, skip)


_WARNED: set = set()


def _warn_slow_fallback(device: torch.device, skip: tuple) -> None:
    """Say once per device type that the automatic choice fell back to the torch backend
    (on CPU the native one is 10-20x faster): a failed build must not go unnoticed."""
    if device.type in _WARNED:
        return
    _WARNED.add(device.type)
    why = "; ".join(f"{n}: {'too many tasks' if n in skip else availability(n, device)}" for n in _AUTO_ORDER_BY_DEVICE.get(device.type, _AUTO_ORDER)
                    if n != "torch" and not (n == "triton" and device.type == "cpu"))
    warnings.warn(f"ortholora_kernels: no compiled backend on {device.type} ({why}); using the torch backend, "
                  f"several times slower. Rebuild with `pip install --no-build-isolation .` where a C++ "
                  f"compiler and torch's headers are present, or pass backend='torch' (or set "
                  f"ORTHOLORA_BACKEND=torch) to choose it and silence this warning.", RuntimeWarning, stacklevel=3)


@torch.compiler.assume_constant_result
def _select(requested: str | None, device: torch.device, skip: tuple) -> str:
    if requested is None:
        requested = os.environ.get("ORTHOLORA_BACKEND") or None
    if requested is None or requested == "auto":
        for name in _AUTO_ORDER_BY_DEVICE.get(device.type, _AUTO_ORDER):
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is for tests only: never chosen automatically
            if name not in skip and availability(name, device) is None:
                if name == "torch":
                    _warn_slow_fallback(device, skip)
                return name
        _warn_slow_fallback(device, skip)
        return "torch"
    if requested not in _MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)} or None, got {requested!r}")
    reason = availability(requested, device)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run on {device}: {reason}")
    return requested
