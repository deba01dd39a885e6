"""Every aggregator of ``ortholora_kernels.aggregate`` against our pcgrad and TorchJD's, same process.

For each T: ``reps`` rounds; each round times ONE call of every method of ours (pcgrad
included) and, when TorchJD is installed, ONE call of TorchJD's same method, on the same
fp32 ``[T, N]`` matrix (round-robin, so machine load hits all alike). Prints the best
(minimum: on a shared, loaded machine the noise only ever adds time) and median times,
ours / our pcgrad (the family's target: within 1.3x) and TorchJD / ours, both from the
best times. TorchJD computes the Gram, solves on the CPU (quadprog, cvxpy, scipy or a
Python loop) and combines; ours is Gram, solve, combine on the chosen backend.

    .venv/bin/python benchmarks/bench_aggregate.py --tasks 8 32 --numel 295000 --reps 15

TorchJD with its solver extras (``pip install -e '.[bench]'``) is optional: without it
(or with ``--no-torchjd``) only ours/pcgrad is printed.
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


def _has_torchjd() -> bool:
    try:
        import torchjd.aggregation  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--numel", type=int, default=295_000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (1: a shared, loaded machine makes thread pools spin)")
    parser.add_argument("--methods", nargs="+", default=list(solvers.METHODS))
    parser.add_argument("--no-torchjd", action="store_true", help="skip TorchJD even when it is installed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")                  # cvxpy's DPP / accuracy chatter
    jd = _has_torchjd() and not args.no_torchjd
    methods = ["pcgrad"] + [m for m in args.methods if m != "pcgrad"]
    gen = torch.Generator().manual_seed(0)
    print(f"threads={torch.get_num_threads()} N={args.numel} fp32 reps={args.reps} "
          f"backend={args.backend or 'auto'} torchjd={'yes' if jd else 'not installed/skipped'}")
    print(f"{'T':>3} {'method':<11} {'ours ms':>9} {'/pcgrad':>8} {'torchjd ms':>11} {'jd/ours':>8}   "
          f"{'(medians: ours':>15} {'torchjd)':>9}")
    for t in args.tasks:
        x = torch.randn(t, args.numel, generator=gen)
        x[: t // 2] -= 0.5 * x[t // 2:].mean(0)        # conflicting tasks
        ours = {m: _ours(m, args.backend) for m in methods}
        refs = {m: _torchjd(m, t) for m in methods} if jd else {}
        for m in methods:                               # warm-up (cvxpy builds its problem)
            ours[m](x)
            if jd:
                refs[m](x)
        a = {m: [] for m in methods}
        b = {m: [] for m in methods}
        for _ in range(args.reps):
            for m in methods:
                a[m].append(_time(ours[m], x))
                if jd:
                    b[m].append(_time(refs[m], x))
        base = min(a["pcgrad"])
        for m in methods:
            ba, ma = min(a[m]) * 1e3, statistics.median(a[m]) * 1e3
            rel = min(a[m]) / base
            if jd:
                bb, mb = min(b[m]) * 1e3, statistics.median(b[m]) * 1e3
                print(f"{t:>3} {m:<11} {ba:>9.3f} {rel:>7.2f}x {bb:>11.3f} {bb / ba:>7.1f}x   {ma:>15.3f} {mb:>9.3f}",
                      flush=True)
            else:
                print(f"{t:>3} {m:<11} {ba:>9.3f} {rel:>7.2f}x {'-':>11} {'-':>8}   {ma:>15.3f} {'-':>9}", flush=True)


if __name__ == "__main__":
    main()
