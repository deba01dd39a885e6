"""Shared input builders and checks for every backend's tests (TorchJD style)."""
from __future__ import annotations

import torch

from ortholora_kernels import backends, ops, reference

# Relative tolerances against the float64 reference, by input dtype. The output is
# rounded to the input dtype once, after fp32 (or fp64) accumulation.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_grads(t: int, n: int, *, dtype=torch.float32, seed: int = 0, device="cpu", shared: float = 0.0):
    """``[T, N]`` Gaussian task gradients; ``shared`` mixes in a common direction.

    A negative ``shared`` makes tasks conflict more often (alternating signs).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64)
    if shared:
        common = torch.randn(1, n, generator=g, dtype=torch.float64)
        signs = torch.tensor([1.0 if k % 2 == 0 else -1.0 for k in range(t)], dtype=torch.float64).unsqueeze(1)
        x = x + abs(shared) * (signs if shared < 0 else 1.0) * common
    return x.to(dtype=dtype, device=device)


def random_segments(n: int, s: int, *, seed: int = 0) -> list[int]:
    """Ragged offsets ``[0, ..., n]`` with at most ``s`` segments (sizes down to 1)."""
    s = max(1, min(s, n))
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g)[: s - 1] + 1 if n > 1 else torch.empty(0, dtype=torch.int64)
    return [0, *sorted(int(c) for c in cuts), n]


def random_order(t: int, s: int | None = None, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """A random ``[T, T]`` (or ``[S, T, T]``) order of permutations."""
    g = torch.Generator().manual_seed(seed)
    shape = (t, t) if s is None else (s, t, t)
    return torch.rand(shape, generator=g).argsort(-1).to(device)


def tolerance_scale(x: torch.Tensor) -> float:
    """Absolute error scale: coefficients reach ~T, so errors scale with T * max|x|."""
    return float(x.shape[0] * x.detach().abs().max().to(torch.float64)) + 1e-300


def assert_matches_reference(out, x, segments=None, *, order, reduction="sum", rtol=None):
    """``out`` (a backend's result for ``x``) equals the reference within ``rtol``."""
    ref = reference.project(x, segments, order=order, reduction=reduction)
    rtol = RTOL[x.dtype] if rtol is None else rtol
    assert out.dtype == x.dtype, f"output dtype {out.dtype} != input dtype {x.dtype}"
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.detach().cpu().to(torch.float64) - ref.cpu()).abs()
    bound = rtol * (ref.cpu().abs() + tolerance_scale(x))
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"max error is {worst:.3g}x the bound (rtol={rtol}, dtype={x.dtype})"
    return ref


# Largest N the Triton interpreter gets in matrix cases (it runs ~1000x slower than a GPU).
INTERP_MAX_N = 1000


class Target:
    """One (backend, device) pair of the test matrix; builds inputs on its device."""

    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, device

    @property
    def interpreted(self) -> bool:
        """Triton kernels on CPU tensors: the interpreter."""
        return self.backend == "triton" and self.device == "cpu"

    @property
    def id(self) -> str:
        """``native-cpu``, ``triton-interp``, ``torch-cuda``, ..."""
        return "triton-interp" if self.interpreted else f"{self.backend}-{self.device}"

    def __repr__(self) -> str:
        return self.id

    def unavailable(self) -> str | None:
        """None when the pair can run here, else the backend's reason."""
        return backends.availability(self.backend, self.device)

    @property
    def max_tasks(self) -> int | None:
        """The backend's limit on T on this device (native on CUDA: 32), None if none."""
        return backends._MAX_TASKS.get(self.device, {}).get(self.backend)

    def too_many_tasks(self, t: int) -> bool:
        """Whether ``t`` tasks exceed :attr:`max_tasks` (an explicit choice then raises)."""
        return self.max_tasks is not None and t > self.max_tasks

    def size(self, n: int) -> int:
        """``n`` columns, capped for the interpreter (the case keeps its id and its structure)."""
        return min(n, INTERP_MAX_N) if self.interpreted else n

    def segments(self, n: int, s: int, *, seed: int = 0) -> list[int]:
        """Ragged offsets over ``n`` columns (``n`` already sized with :meth:`size`)."""
        return random_segments(n, s, seed=seed)

    def grads(self, t: int, n: int, **kw) -> torch.Tensor:
        """:func:`make_grads` on this pair's device."""
        return make_grads(t, n, device=self.device, **kw)

    def order(self, t: int, s: int | None = None, *, seed: int = 0) -> torch.Tensor:
        """:func:`random_order` on this pair's device."""
        return random_order(t, s, seed=seed, device=self.device)

    def project(self, x, segments=None, **kw):
        """``ortholora_kernels.project`` on this pair's backend."""
        return ops.project(x, segments, backend=self.backend, **kw)
