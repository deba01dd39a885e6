"""Native CPU forward + backward with the compiled reverse solve vs the torch one.

    python benchmarks/bench_native_solve_vjp.py [--tasks 8 16] [--n 295000] [--segments 4]
        [--threads 1] [--repeat 5]

The native backend's backward runs the PCGrad solve and its reverse mode either as one
compiled call (``ortholora_C::solve_vjp``, ``native_impl._FUSED_VJP = True``) or as
solve.py's torch ops (~35 T small ops, ``_FUSED_VJP = False``, the baseline). Rows: the
stage alone (``(M, W)`` from G, order, dL/dW) and a whole ``project()`` forward + backward
(fp32, reduction "sum"). Interleaved in one process: each repeat times baseline and
compiled in turn (torch.utils.benchmark, blocked_autorange); medians over repeats, and the
median of the per-repeat ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import ortholora_kernels as ok  # noqa: E402
from ortholora_kernels import _args  # noqa: E402
from ortholora_kernels.backends import native_impl  # noqa: E402
from ortholora_kernels.solve import get_solve  # noqa: E402


def _stage(gram, order, v, seg, fused):
    if fused:
        return native_impl.BACKEND.solve_vjp(gram, order, "sum", v, seg)
    sol = get_solve("pcgrad")
    w = sol.forward(gram, order, "sum").weights
    gbar = sol.vjp(gram, order, "sum", v)
    return gbar + gbar.transpose(-1, -2), w


def _step(x, offsets, order, dy):
    xx = x.detach().requires_grad_()
    out = ok.project(xx, offsets, order=order, reduction="sum", backend="native")
    return torch.autograd.grad(out, xx, dy)[0]


def _time(fn, fused, min_run):
    native_impl._FUSED_VJP = fused
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run).median


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--n", type=int, default=295_000)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--min-run", type=float, default=0.3, help="seconds per blocked_autorange")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if native_impl.availability(torch.device("cpu")) is not None:
        sys.exit(f"native backend unavailable: {native_impl.availability(torch.device('cpu'))}")
    offsets = [round(k * a.n / a.segments) for k in range(a.segments + 1)]
    seg = _args.segments_for(offsets, a.n)
    print(f"N={a.n} S={a.segments} threads={a.threads} fp32 reduction=sum; median of {a.repeat} interleaved repeats")
    print("| T | row | torch reverse solve (ms) | compiled (ms) | speed-up |")
    print("|---|-----|-------------------------|---------------|----------|")
    g = torch.Generator().manual_seed(0)
    saved = native_impl._FUSED_VJP
    try:
        for t in a.tasks:
            x = torch.randn(t, a.n, generator=g) + 0.5 * torch.randn(1, a.n, generator=g)
            order = torch.stack([torch.stack([torch.randperm(t, generator=g) for _ in range(t)])
                                 for _ in range(a.segments)])
            dy = torch.randn(a.n, generator=g)
            gram = native_impl.BACKEND.gram(x, seg)
            v = torch.randn(a.segments, 1, t, dtype=torch.float64, generator=g)
            rows = {"solve + reverse solve": lambda f: (lambda: _stage(gram, order, v, seg, f)),
                    "forward + backward": lambda f: (lambda: _step(x, offsets, order, dy))}
            for name, make in rows.items():
                base, new, ratio = [], [], []
                for _ in range(a.repeat):
                    b = _time(make(False), False, a.min_run)
                    n = _time(make(True), True, a.min_run)
                    base.append(b)
                    new.append(n)
                    ratio.append(b / n)
                print(f"| {t} | {name} | {statistics.median(base) * 1e3:.3f} | {statistics.median(new) * 1e3:.3f} "
                      f"| {statistics.median(ratio):.2f}x |", flush=True)
    finally:
        native_impl._FUSED_VJP = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
