"""Build script. The compiled extension (csrc/) is optional: see README, "Install".

Without torch in the build environment (plain ``pip install .`` with build isolation)
or with ``ORTHOLORA_SKIP_BUILD=1`` this is a pure-Python install.
"""
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("ORTHOLORA_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        print("ortholora_kernels: torch is not importable at build time; installing pure Python "
              "(use `pip install . --no-build-isolation` after installing torch for the extension)")
        return [], {}
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    ext = CppExtension("ortholora_kernels._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
