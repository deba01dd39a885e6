"""Every aggregator of ``ortholora_kernels.aggregate`` against TorchJD's, same process, interleaved.

For each T and method: ``reps`` rounds, each timing ONE call of ours then ONE call of
TorchJD's on the same fp32 ``[T, N]`` matrix (so machine load hits both alike); prints the
best (minimum: on a shared, loaded machine the noise only ever adds time) and median times
and the ratio of the best times, TorchJD / ours. TorchJD computes the Gram, solves on the CPU (quadprog,
cvxpy, scipy or a Python loop) and combines; ours is Gram, device solve, combine.

    .venv/bin/python benchmarks/bench_aggregate.py --tasks 2 8 16 --numel 295000 --reps 15

Needs TorchJD with its solver extras (``pip install -e '.[bench]'``).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import ortholora_kernels as ok
from ortholora_kernels import solvers


def _torchjd(method: str, t: int):
    from torchjd import aggregation as A
    return {
        "pcgrad": A.PCGrad, "upgrad": A.UPGrad, "dualproj": A.DualProj, "mgda": A.MGDA,
        "cagrad": lambda: A.CAGrad(c=0.5), "imtlg": A.IMTLG, "alignedmtl": A.AlignedMTL,
        "config": A.ConFIG, "nashmtl": lambda: A.NashMTL(n_tasks=t), "fairgrad": lambda: A.FairGrad(alpha=1.0),
        "sum": A.Sum, "mean": A.Mean, "gradvac": A.GradVac,
    }[method]()


def _ours(method: str, backend):
    if method == "gradvac":
        agg = ok.GradVac(backend=backend)
        return agg
    opts = {"c": 0.5} if method == "cagrad" else {"alpha": 1.0} if method == "fairgrad" else {}
    return lambda x: ok.aggregate(x, method=method, backend=backend, **opts)


def _time(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--numel", type=int, default=295_000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (1: a shared, loaded machine makes thread pools spin)")
    parser.add_argument("--methods", nargs="+", default=list(solvers.METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")                  # cvxpy's DPP / accuracy chatter
    gen = torch.Generator().manual_seed(0)
    print(f"threads={torch.get_num_threads()} N={args.numel} fp32 reps={args.reps} "
          f"backend={args.backend or 'auto'}")
    print(f"{'T':>3} {'method':<11} {'ours ms':>9} {'torchjd ms':>11} {'ratio':>7}   "
          f"{'(medians: ours':>15} {'torchjd)':>9}")
    for t in args.tasks:
        x = torch.randn(t, args.numel, generator=gen)
        x[: t // 2] -= 0.5 * x[t // 2:].mean(0)        # conflicting tasks
        for method in args.methods:
            ours, ref = _ours(method, args.backend), _torchjd(method, t)
            ours(x), ref(x)                             # warm-up (cvxpy builds its problem)
            a, b = [], []
            for _ in range(args.reps):
                a.append(_time(ours, x))
                b.append(_time(ref, x))
            ba, bb = min(a) * 1e3, min(b) * 1e3
            ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"{t:>3} {method:<11} {ba:>9.3f} {bb:>11.3f} {bb / ba:>6.1f}x   {ma:>15.3f} {mb:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
