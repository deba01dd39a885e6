"""The solve stage of every Gram-based aggregator: float64 Gram ``[S, T, T]`` -> weights ``[S, T]``.

One small module per method, each a pure torch function batched over segments, on the
device of the Gram, with a fixed amount of work (no ``.item()``, no data-dependent Python
control flow; :func:`weights` runs under ``torch.compile(fullgraph=True)``): closed forms
where they exist (sum, mean, imtlg, alignedmtl, config), exact active-set solvers for the
quadratic programs (upgrad, dualproj, mgda, cagrad), Newton for the root problems
(nashmtl, fairgrad). On CPU, with the native extension built and outside
``torch.compile``, the iterative kernels and the eigendecomposition-based methods are one
compiled call each (``csrc/weights.h``; :mod:`._lcp` has their torch twins, which the
tests compare). pcgrad is the projection op itself (:func:`ortholora_kernels.project`);
gradvac needs state across steps (:mod:`.gradvac`, used by :class:`ortholora_kernels.GradVac`;
its whole step is one compiled call on CPU too, the torch loop its twin).

Absent tasks: ``weights(method, gram, present)`` with a bool ``[S, T]`` mask gives an
absent task weight 0 and the others exactly the method's weights on the present rows.
Degenerate geometry (zero, duplicate, colinear rows, extreme scales) gives finite
weights; the rules where a definition breaks down are in each module's docstring.

Host syncs: none in this code (checked under FakeTensorMode in tests/test_aggregate.py);
linear solves use ``torch.linalg.solve_ex`` (its info is not checked on the host). But
torch's ``eigh`` (imtlg, alignedmtl, config on CUDA) checks its info on the host on CUDA
(one sync per call, per torch's documentation), so those three are not CUDA-graph
capturable on GPUs; the others are fixed sequences of device ops.

Each definition follows TorchJD 0.18's aggregator of the same name (see each module for
the differences in the solver or in a threshold, never in the definition).
"""
from __future__ import annotations

import functools
import importlib
import inspect

import torch

from ._common import check_present

#: methods whose solve is ``weights(gram, **options) -> [S, T]``.
WEIGHTINGS = ("upgrad", "dualproj", "mgda", "cagrad", "imtlg", "alignedmtl", "config", "nashmtl",
              "fairgrad", "sum", "mean")
#: every method accepted by ``aggregate`` (pcgrad: the projection op; gradvac: stateful).
METHODS = ("pcgrad",) + WEIGHTINGS + ("gradvac",)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


#: accepted spellings: any case, "-", "_" and spaces ignored ("IMTL-G", "Nash-MTL", "nash_mtl").
ALIASES = {_key(m): m for m in METHODS}


def check_method(method) -> str:
    """The canonical name of ``method`` (e.g. "IMTL-G", "imtl_g" -> "imtlg"; "Nash-MTL" ->
    "nashmtl"): case, "-", "_" and spaces are ignored. Else a ValueError listing the names."""
    if method in METHODS:
        return method
    canonical = ALIASES.get(_key(method)) if isinstance(method, str) else None
    if canonical is None:
        raise ValueError(f"method: expected one of {METHODS} (any case; '-' and '_' ignored), got {method!r}")
    return canonical


_MODULES = {m: importlib.import_module(f"{__name__}.{m}") for m in WEIGHTINGS + ("gradvac",)}


def module(method: str):
    """The solve module of ``method`` (a plain dict lookup: torch.compile traces it)."""
    return _MODULES[check_method(method)]


@functools.lru_cache(maxsize=None)
def option_names(method: str) -> tuple[str, ...]:
    """The keyword options of ``method``'s solve (e.g. ``("c", "norm_eps", "iters")`` for cagrad)."""
    if method == "pcgrad":
        return ()
    if method == "gradvac":
        return ("beta", "eps")
    method = check_method(method)
    params = inspect.signature(module(method).weights).parameters
    return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_options(method: str, options: dict) -> dict:
    """Raise a TypeError naming any option ``method`` does not take; return ``options``."""
    method = check_method(method)
    allowed = option_names(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method={method!r} has no option {unknown[0]!r}; its options are {allowed or 'none'}")
    return options


def weights(method: str, gram: torch.Tensor, present: torch.Tensor | None = None, **options) -> torch.Tensor:
    """``[S, T]`` weights of a weighting ``method`` for float64 Gram matrices ``[S, T, T]``.

    ``present``: None (every task present) or a bool ``[S, T]`` tensor. An absent task
    gets weight exactly 0 and the present ones exactly what the method gives on the
    present rows of G alone (per segment, batched, on the device, no host sync; its
    gradient row is not read). A segment with no present task gets zero weights.
    """
    method = check_method(method)
    if method not in WEIGHTINGS:
        raise ValueError(f"method: {method!r} has no stateless weighting; expected one of {WEIGHTINGS}")
    if options:
        check_options(method, options)
    gram = gram.to(torch.float64)
    if present is None:
        return module(method).weights(gram, **options)
    present = check_present(present, gram)
    return module(method).weights(gram, present, **options)
