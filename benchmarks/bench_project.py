"""Benchmark the projection op on CPU: every usable backend vs the common per-pair loop.

    python benchmarks/bench_project.py            # T in {2, 8, 16}, N in {295k, 3M}
    python benchmarks/bench_project.py --quick    # T=8, N=295k only (the README demo)

Medians from torch.utils.benchmark (blocked_autorange), fp32, sum reduction, one
segment, drawn orders. Ratios are against the per-pair loop measured in the same run.
295k = RoBERTa-base LoRA r=8 on query and value (12 layers x 2 modules x 2 x 768 x 8).
TorchJD's PCGrad joins when `torchjd` is installed (the `bench` extra).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
from datetime import date

import torch
import torch.utils.benchmark as tbench

import ortholora_kernels as ok


def pcgrad_loop(grads: torch.Tensor) -> torch.Tensor:
    """The common per-pair loop (Pytorch-PCGrad's `_project_conflicting`, sum reduction).

    One host sync per pair (`if g_i_g_j < 0`), a fresh random order per task.
    """
    originals = list(grads)
    pc_grad = [g.clone() for g in originals]
    for g_i in pc_grad:
        random.shuffle(originals)
        for g_j in originals:
            g_i_g_j = torch.dot(g_i, g_j)
            if g_i_g_j < 0:
                g_i -= g_i_g_j * g_j / (g_j.norm() ** 2)
    return torch.stack(pc_grad).sum(dim=0)


def _torchjd():
    try:
        from torchjd.aggregation import PCGrad
    except ImportError:
        return None
    return PCGrad()


def candidates(device="cpu"):
    """``{label: fn(x)}`` of everything measured: usable backends, the loop, TorchJD."""
    fns = {}
    for name, (usable, _) in ok.backends_available(device).items():
        if usable and not (name == "triton" and torch.device(device).type == "cpu"):
            fns[name] = lambda x, _n=name: ok.project(x, backend=_n)
    fns["per-pair loop"] = pcgrad_loop
    jd = _torchjd()
    if jd is not None:
        fns["torchjd PCGrad"] = jd
    return fns


def check_agreement(device="cpu"):
    """All backends give the loop's answer with a fixed order (guards the figures)."""
    x = torch.randn(8, 5000, device=device)
    order = torch.rand(8, 8).argsort(-1).to(device)
    ref = ok.reference.project(x, order=order)
    for name, (usable, _) in ok.backends_available(device).items():
        if usable and name != "triton":
            out = ok.project(x, order=order, backend=name).double()
            err = float((out - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, f"{name} disagrees with the reference: rel err {err:.2e}"


def measure(fn, x, min_run_time):
    # Timer defaults to one thread; measure with the threads torch would really use.
    timer = tbench.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3  # ms


def run(ts, ns, min_run_time=0.5, skip_loop_above=None):
    torch.manual_seed(0)
    random.seed(0)
    check_agreement()
    rows = []
    for n in ns:
        for t in ts:
            x = torch.randn(t, n)
            fns = candidates()
            times = {}
            for label, fn in fns.items():
                if label == "per-pair loop" and skip_loop_above and t * n > skip_loop_above:
                    continue
                times[label] = measure(fn, x, min_run_time)
            base = times.get("per-pair loop")
            for label, ms in times.items():
                rows.append({"T": t, "N": n, "impl": label, "median_ms": round(ms, 4),
                             "speedup_vs_loop": round(base / ms, 2) if base else None})
    return rows


def print_table(rows):
    print(f"\n{'T':>3} {'N':>9} {'implementation':<16} {'median ms':>10} {'x vs loop':>10}")
    for r in rows:
        sp = f"{r['speedup_vs_loop']:.2f}" if r["speedup_vs_loop"] else "-"
        print(f"{r['T']:>3} {r['N']:>9} {r['impl']:<16} {r['median_ms']:>10.3f} {sp:>10}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only T=8, N=295k (a few seconds)")
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 16], help="values of T")
    p.add_argument("--numel", type=int, nargs="+", default=[295_000, 3_000_000], help="values of N")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--out", default=None, help="directory for results.json and results.csv")
    args = p.parse_args(argv)
    ts, ns = ([8], [295_000]) if args.quick else (args.tasks, args.numel)
    print(f"ortholora_kernels {ok.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {date.today()}")
    print("backends:", {k: v[1] for k, v in ok.backends_available("cpu").items()})
    rows = run(ts, ns, args.min_run_time)
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
