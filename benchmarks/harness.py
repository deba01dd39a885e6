"""What the benchmarks and the GPU checks share: timers and the kernel-launch recorder.

- :func:`host_us_per_call`: host wall time per call (``time.perf_counter``), after one
  warm-up call: Python and dispatch cost, or CPU kernels;
- :func:`cuda_median_us`: the median of a GPU call by ``triton.testing.do_bench`` (CUDA
  events, L2 flushed between calls, warm-up first);
- :class:`LaunchRecorder` and :func:`recorded_launches`: the triton backend's kernels
  replaced by stand-ins that record ``kernel[grid](*args, **kwargs)`` instead of running
  it, so its host code runs on CPU tensors with no GPU and no interpreter
  (scripts/compile_gpu.py compiles what was recorded, benchmarks/bench_host_overhead.py
  times the host code, the tests count launches).
"""
from __future__ import annotations

import contextlib
import time

KERNELS = ("_gram_kernel", "_reduce_solve_kernel", "_combine_kernel", "_solve_vjp_kernel")


def host_us_per_call(fn, calls: int) -> float:
    """Mean host microseconds per call of ``fn()`` over ``calls`` calls, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def cuda_median_us(fn, rep_ms: float) -> float:
    """Median microseconds of ``fn()`` on the GPU (``triton.testing.do_bench``: CUDA
    events, L2 flushed between calls; warm-up of about a quarter of ``rep_ms``)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(5, int(rep_ms // 4)), rep=rep_ms, return_mode="median") * 1e3


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` appends
    ``(name, args, kwargs)`` to ``log`` and runs nothing."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, args, kwargs))
        return launch


@contextlib.contextmanager
def recorded_launches(impl, log: list, names=KERNELS):
    """Inside the block, the kernels ``names`` of module ``impl`` (the triton backend) are
    :class:`LaunchRecorder` s writing to ``log``; restored on exit."""
    saved = {k: getattr(impl, k) for k in names}
    try:
        for k in names:
            setattr(impl, k, LaunchRecorder(k, log))
        yield log
    finally:
        for k, v in saved.items():
            setattr(impl, k, v)
