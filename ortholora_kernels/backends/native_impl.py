"""The native backend: the compiled extension ``ortholora_kernels._C`` (csrc/).

``torch.ops.ortholora_C.project`` runs Gram, solve and combine over all segments in ONE
call; the dispatcher picks the CPU or the CUDA implementation by the device of the input.

CPU: fixed column chunks (independent of the thread count, so results are bitwise
reproducible for any ``torch.set_num_threads``) on torch's OpenMP threads; vector kernels
compiled for baseline, AVX2+FMA and AVX-512 and chosen at run time
(``torch.ops.ortholora_C.cpu_isa()``; force one with ``$ORTHOLORA_CPU_ISA`` or
``torch.ops.ortholora_C.set_cpu_isa``). The Gram of fp32 (and fp16/bf16, widened once)
input uses fp32 products summed per L1 tile and flushed to float64, with an exact float64
fallback per tile at extreme scales; float64 input is float64 throughout. The backward's
solve and reverse solve are one compiled call too (``ortholora_C::solve_vjp``, CPU only).
CUDA (when built): per-piece Gram partials, one block per segment for the solve, combine;
T <= 32.

The extension is loaded lazily on first use, so ``import ortholora_kernels`` never fails
when it is missing; ``availability`` then says why (not built, built without CUDA, or
the import error).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .base import Backend, empty_outputs

NAME = "native"

_state: dict = {}


def _load():
    """The extension module, or None (the import error is kept for ``availability``).

    When ``ortholora_kernels._C`` is not installed but the sources (a source checkout's
    csrc/), torch's headers and a C++ compiler are there, it is built once at first use
    with ``torch.utils.cpp_extension.load`` (the way DeepSpeed builds its ops) and cached
    (:func:`_jit_dir`); one line on stderr says so. ``ORTHOLORA_JIT=0`` turns that off.
    """
    if "module" not in _state:
        try:
            module = importlib.import_module("ortholora_kernels._C")
            _state["origin"] = "prebuilt"
        except ModuleNotFoundError as exc:
            module = None
            _state["error"] = f"{type(exc).__name__}: {exc}"
            if os.environ.get("ORTHOLORA_JIT", "1").strip().lower() not in ("0", "false", "no", "off"):
                module = _jit_build()
        except Exception as exc:  # noqa: BLE001  ImportError, OSError (ABI mismatch), ...
            module = None
            _state["error"] = f"{type(exc).__name__}: {exc}"
        if module is not None:
            _register_fakes()
            _state["error"] = None
        _state["module"] = module
    return _state["module"]


def origin() -> str | None:
    """How the extension came: "prebuilt", "JIT-built at first use (DIR)", or None."""
    return _state.get("origin") if _load() is not None else None


def _jit_dir() -> str:
    """Cache of JIT builds, one folder per torch / CUDA / Python version."""
    import sys
    root = os.environ.get("ORTHOLORA_JIT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ortholora_kernels")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, tag.replace("+", "_"))


def _jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load (cached); None with a reason if not."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    setup_py = os.path.join(root, "setup.py")
    if not (os.path.isdir(os.path.join(root, "csrc")) and os.path.isfile(setup_py)):
        _state["error"] += "; no csrc/ sources beside the package to build it at first use"
        return None
    try:
        spec = importlib.util.spec_from_file_location("_ortholora_setup", setup_py)
        setup_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(setup_mod)   # setup() only runs under __main__
        facts = setup_mod._probe(os.environ)
        plan = setup_mod.build_plan(os.environ, **facts)
        if not plan["build"]:
            _state["error"] += f"; not built at first use: {plan['message']}"
            return None
        from torch.utils.cpp_extension import load
        build_dir = _jit_dir()
        os.makedirs(build_dir, exist_ok=True)
        print(f"ortholora_kernels: the compiled extension is missing; building it once with "
              f"torch.utils.cpp_extension.load into {build_dir} ({plan['message']}; ORTHOLORA_JIT=0 turns this off)",
              file=sys.stderr, flush=True)
        macros = [f"-D{k}={v}" for k, v in plan["define_macros"]]
        module = load(name="_C", sources=[os.path.join(root, src) for src in plan["sources"]],
                      extra_cflags=plan["cxx_flags"] + macros, extra_cuda_cflags=plan["nvcc_flags"] + macros,
                      extra_ldflags=plan["link_flags"], extra_include_paths=[os.path.join(root, "csrc")],
                      build_directory=build_dir, with_cuda=plan["cuda"], verbose=False)
    except Exception as exc:  # noqa: BLE001  a compiler error must leave a reason, not a crash
        _state["error"] += f"; building it at first use failed: {type(exc).__name__}: {str(exc)[-300:]}"
        return None
    _state["origin"] = f"JIT-built at first use ({build_dir})"
    return module


def _has_op(name: str) -> bool:
    """Whether the loaded extension defines ``ortholora_C::name`` (an extension built before an
    op was added lacks it; the callers then fall back to the older path)."""
    try:
        getattr(torch.ops.ortholora_C, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _fake(name: str):
    """``register_fake`` for ``ortholora_C::name`` where the loaded extension defines it."""
    def deco(fn):
        if _has_op(name):
            torch.library.register_fake(f"ortholora_C::{name}")(fn)
        return fn
    return deco


def _register_fakes():
    """Shape functions of the compiled ops (torch.compile / FakeTensor can trace them)."""
    if _state.get("fakes"):
        return
    _state["fakes"] = True

    @_fake("project")
    def _(grads, offsets, order, reduction):
        return empty_outputs(grads, len(offsets) - 1, reduction)

    @_fake("gram")
    def _(grads, offsets):
        t = grads.shape[0]
        return grads.new_empty((len(offsets) - 1, t, t), dtype=torch.float64)

    @_fake("combine")
    def _(grads, w, offsets):
        return grads.new_empty((w.shape[1], grads.shape[1]))

    @_fake("box_qp")
    def _(h, q, lower, iters):
        return torch.empty_like(q, dtype=torch.float64)

    @_fake("simplex_qp")
    def _(g, mask, iters):
        return g.new_empty(g.shape[:-1], dtype=torch.float64)

    @_fake("cagrad_kkt")
    def _(g, b, phi2, mask, iters, norm_eps):
        return g.new_empty(g.shape[:-1], dtype=torch.float64)

    @_fake("spectral")
    def _(g, mask, u, mode, scale):
        return g.new_empty(g.shape[:-1], dtype=torch.float64)

    @_fake("gradvac")
    def _(gram, order, phi_hat, mask, beta, eps):
        return (gram.new_empty(gram.shape[:-1], dtype=torch.float64),
                phi_hat.new_empty(phi_hat.shape, dtype=torch.float64))

    @_fake("power_root")
    def _(g, mask, alpha, iters):
        return g.new_empty(g.shape[:-1], dtype=torch.float64)

    @_fake("cross")
    def _(y, x, offsets):
        return x.new_empty((len(offsets) - 1, y.shape[0], x.shape[0]), dtype=torch.float64)

    @_fake("backward_combine")
    def _(dy, x, w, m, offsets):
        return torch.empty_like(x)

    @_fake("solve_vjp")
    def _(gram, order, reduction, weights_grad):
        s, t = gram.shape[0], gram.shape[-1]
        return (gram.new_empty((s, t, t), dtype=torch.float64),
                gram.new_empty((s, t if reduction == "none" else 1, t), dtype=torch.float64))


def built_with_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels (False when it is not built)."""
    mod = _load()
    return bool(mod is not None and getattr(mod, "WITH_CUDA", 0)
                and torch._C._dispatch_has_kernel_for_dispatch_key("ortholora_C::project", "CUDA"))


def availability(device: torch.device) -> str | None:
    """None when the extension has kernels for ``device``'s type, else the reason."""
    device = torch.device(device)
    if _load() is None:
        err = _state["error"] or ""
        if "No module named" in err and "_C" in err:
            return ("the compiled extension ortholora_kernels._C is not built (install with "
                    "`pip install -e . --no-build-isolation` after torch, without ORTHOLORA_SKIP_BUILD)"
                    + (err[err.index(";"):] if ";" in err else ""))
        return f"the compiled extension ortholora_kernels._C failed to load: {err}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not built_with_cuda():
            return ("ortholora_kernels._C was built without CUDA (CPU-only torch, no nvcc, or "
                    "ORTHOLORA_SKIP_CUDA_BUILD=1 at build time)")
        return None
    return f"ortholora_kernels._C has no kernels for device type {device.type!r}"


_FUSED_VJP = True   # CPU: the backward's solve + reverse solve in one compiled call (False: torch ops, ~35 T)


def _ops():
    if _load() is None:
        raise RuntimeError(f"backend 'native': {availability(torch.device('cpu'))}")
    return torch.ops.ortholora_C


class NativeBackend(Backend):
    """The compiled ops: the whole PCGrad forward in one call; cross, the reverse solve
    (CPU) and the two-operand combine of the backward; the Gram of another solve."""

    name = NAME

    def availability(self, device: torch.device) -> str | None:
        """None when the extension has kernels for ``device``'s type, else the reason."""
        return availability(device)

    def gram(self, x, seg):
        """``[S, T, T]`` float64 Gram matrices: on CPU the Gram-only compiled pass
        (``ortholora_C::gram``: the fused call's chunks and kernels, bitwise its Gram); on
        CUDA the Gram of the fused call (its solve and combine unused)."""
        if x.device.type == "cpu" and hasattr(_ops(), "gram"):   # (absent from builds before it)
            return _ops().gram(x, list(seg.offsets))
        s, t = seg.num_segments, x.shape[0]
        order = torch.arange(t, device=x.device).expand(s, t, t)
        return _ops().project(x, list(seg.offsets), order, "sum")[1]

    def cross(self, y, x, seg):
        """``[S, R, T]`` float64 ``Y_s X_s^T`` (compiled)."""
        return _ops().cross(y, x, list(seg.offsets))

    def combine(self, seg, x, a, y=None, b=None, out_dtype=None):
        """Compiled ``A_s X_s + B_s Y_s`` (``backward_combine``); with one operand (the
        combine of every solve but the fused PCGrad) the compiled one-pass ``W_s X_s``
        (``ortholora_C::combine``) on CPU, the torch backend's combine on CUDA."""
        if y is None:
            if x.device.type == "cpu" and hasattr(_ops(), "combine"):
                out = _ops().combine(x, a, list(seg.offsets))
                return out if out_dtype is None else out.to(out_dtype)
            from .torch_impl import BACKEND as torch_backend
            return torch_backend.combine(seg, x, a, out_dtype=out_dtype)
        out = _ops().backward_combine(y, x, b.transpose(-1, -2), a, list(seg.offsets))
        return out if out_dtype is None else out.to(out_dtype)

    def solve_vjp(self, gram, order, reduction, weights_grad, seg):
        """``(Gbar + Gbar^T, W)`` on CPU: the PCGrad solve replayed and its reverse mode in
        one compiled call (``ortholora_C::solve_vjp``); None on CUDA (no kernel there yet:
        the op runs the torch reverse solve)."""
        if not _FUSED_VJP or gram.device.type != "cpu":
            return None
        return _ops().solve_vjp(gram, order, reduction, weights_grad)

    def fused_forward(self, x, seg, order, reduction):
        """``(out, G, C, nproj)``: one compiled call for all three stages and all segments."""
        return _ops().project(x, list(seg.offsets), order, reduction)


BACKEND = NativeBackend()
