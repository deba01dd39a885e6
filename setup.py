"""Build script. The compiled extension ``ortholora_kernels._C`` (csrc/) is optional.

What gets built (decided by :func:`build_plan`, unit-tested in tests/test_native.py):

- nothing (pure Python) when ``ORTHOLORA_SKIP_BUILD=1``, when torch is not importable at
  build time (a plain ``pip install .`` with build isolation: pyproject's build requires
  hold no torch on purpose), or when no C++ compiler is found;
- the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) otherwise, as a torch CppExtension;
- plus the CUDA kernels (csrc/cuda/*.cu and their torch glue) when torch is a CUDA build
  and nvcc is found (CUDA_HOME), unless ``ORTHOLORA_SKIP_CUDA_BUILD=1``.

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures and ``MAX_JOBS`` the parallel compile
jobs (both read by torch.utils.cpp_extension). The CPU kernels are compiled once per
instruction set (baseline, AVX2+FMA, AVX-512 through ``#pragma GCC target``) and chosen at
run time, so no -march flag is needed; ``ORTHOLORA_NATIVE_ARCH=1`` adds -march=native for a
local, non-distributed build. The CPU kernels use OpenMP (-fopenmp) with torch's thread
count; ``ORTHOLORA_NO_OPENMP=1`` builds them single-threaded. A failed compile prints why and leaves a pure-Python install
(``ORTHOLORA_REQUIRE_BUILD=1`` makes it an error instead).

Build the extension against an installed torch with:
``pip install -e . --no-build-isolation`` (or ``python setup.py build_ext --inplace``).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

EXT_NAME = "ortholora_kernels._C"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(environ, name):
    return environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _sources(root=ROOT):
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731  setuptools wants relative paths
    cpu = sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp")))
    return [rel(p) for p in cpu], [rel(p) for p in cuda]


def build_plan(environ, *, torch_version=None, torch_cuda=None, nvcc=None, cxx=None, machine=None,
               compiler_kind="unix", platform_name="linux", cpu_sources=("csrc/x.cpp",),
               cuda_sources=("csrc/cuda/x.cu",)):
    """Decide what to build. Pure function of its arguments (testable without a build).

    Args:
        environ: the environment variables (a mapping).
        torch_version: torch.__version__ at build time, None when torch is not importable.
        torch_cuda: torch.version.cuda (None for a CPU-only torch).
        nvcc: path of nvcc (None when not found).
        cxx: path of the C++ compiler (None when not found).
        machine: platform.machine().
        compiler_kind: "unix" (GCC/Clang) or "msvc".
        platform_name: sys.platform ("linux", "darwin", "win32").

    Returns a dict: ``build`` (bool), ``cuda`` (bool), ``message`` (why), ``cxx_flags``,
    ``nvcc_flags``, ``link_flags``, ``sources`` and ``define_macros``.
    """
    plan = {"build": False, "cuda": False, "message": "", "cxx_flags": [], "nvcc_flags": [], "link_flags": [],
            "sources": [], "define_macros": []}
    if _flag(environ, "ORTHOLORA_SKIP_BUILD"):
        plan["message"] = "ORTHOLORA_SKIP_BUILD=1: pure-Python install (backend='native' unavailable)"
        return plan
    if torch_version is None:
        plan["message"] = ("torch is not importable at build time: pure-Python install (backend='native' "
                           "unavailable). Install torch first, then `pip install . --no-build-isolation`.")
        return plan
    if not cpu_sources:
        plan["message"] = "no csrc/ sources: pure-Python install"
        return plan
    if cxx is None and compiler_kind != "msvc":
        plan["message"] = ("no C++ compiler found (set CXX or install g++/clang++): pure-Python install "
                           "(backend='native' unavailable)")
        return plan
    plan["build"] = True
    plan["sources"] = list(cpu_sources)
    # OpenMP: the CPU kernels run their chunks on torch's thread count. Without it (macOS'
    # Apple clang) they run on one thread, still correct. On Linux the extension's
    # libgomp.so.1 resolves to the copy torch already loaded (same soname).
    if compiler_kind == "msvc":
        cxx_flags = ["/O2", "/openmp"]
    else:
        cxx_flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]  # torch adds its -std
        if platform_name != "darwin" and not _flag(environ, "ORTHOLORA_NO_OPENMP"):
            cxx_flags.append("-fopenmp")
            plan["link_flags"] = ["-fopenmp"]
        if _flag(environ, "ORTHOLORA_NATIVE_ARCH"):
            cxx_flags.append("-march=native")   # opt-in: the binary then runs on this CPU type only
    plan["cxx_flags"] = cxx_flags
    msg = "building the CPU kernels"
    if _flag(environ, "ORTHOLORA_SKIP_CUDA_BUILD"):
        msg += "; CUDA skipped (ORTHOLORA_SKIP_CUDA_BUILD=1)"
    elif not torch_cuda:
        msg += "; CUDA skipped (torch is a CPU-only build)"
    elif nvcc is None:
        msg += "; CUDA skipped (nvcc not found: set CUDA_HOME)"
    elif not cuda_sources:
        msg += "; CUDA skipped (no csrc/cuda sources)"
    else:
        plan["cuda"] = True
        plan["sources"] += list(cuda_sources)
        plan["define_macros"] = [("ORTHOLORA_WITH_CUDA", "1")]
        # No -gencode here: torch adds the flags for TORCH_CUDA_ARCH_LIST (or the visible GPUs).
        plan["nvcc_flags"] = ["-O3", "-lineinfo"]
        msg += f" and the CUDA kernels (CUDA {torch_cuda}, arch list {environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})"
    plan["message"] = msg
    return plan


def _probe(environ):
    """The facts build_plan needs, gathered from this machine."""
    facts = {"machine": platform.machine(), "compiler_kind": "msvc" if sys.platform == "win32" else "unix",
             "platform_name": sys.platform}
    try:
        import torch
        facts["torch_version"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
    except ImportError:
        return facts
    cxx = environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    facts["cxx"] = shutil.which(cxx) if cxx else None
    if facts["torch_cuda"]:
        try:
            from torch.utils.cpp_extension import CUDA_HOME
        except Exception:  # noqa: BLE001  any failure means: no CUDA toolkit
            CUDA_HOME = None
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        facts["nvcc"] = nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")
    cpu, cuda = _sources()
    facts["cpu_sources"], facts["cuda_sources"] = cpu, cuda
    return facts


def _ext_modules():
    environ = os.environ
    plan = build_plan(environ, **_probe(environ))
    print(f"ortholora_kernels: {plan['message']}")
    if not plan["build"]:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        """A failing compiler (or its check) leaves a pure-Python install with a clear message."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001  compiler errors come as several types
                if _flag(os.environ, "ORTHOLORA_REQUIRE_BUILD"):
                    raise
                stale = self.get_ext_fullpath(EXT_NAME)   # an older build must not ship either
                if os.path.exists(stale):
                    os.remove(stale)
                self.extensions = []   # nothing half-built gets copied or installed
                print(f"ortholora_kernels: building {EXT_NAME} failed ({type(exc).__name__}: {exc}); "
                      "installing pure Python (backend='native' unavailable). Set ORTHOLORA_REQUIRE_BUILD=1 "
                      "to make this an error.", file=sys.stderr)

        def get_outputs(self):
            return [] if not self.extensions else super().get_outputs()

    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=plan["define_macros"],
                  extra_link_args=plan["link_flags"])
    if plan["cuda"]:
        ext = CUDAExtension(EXT_NAME, plan["sources"],
                            extra_compile_args={"cxx": plan["cxx_flags"], "nvcc": plan["nvcc_flags"]}, **kwargs)
    else:
        ext = CppExtension(EXT_NAME, plan["sources"], extra_compile_args={"cxx": plan["cxx_flags"]}, **kwargs)
    return [ext], {"build_ext": OptionalBuildExtension}


if __name__ == "__main__":
    ext_modules, cmdclass = _ext_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
