"""GPU benchmark of the projection op: triton and torch backends, the per-pair loop, TorchJD.

One command on a CUDA machine (no internet needed):

    python benchmarks/bench_project_gpu.py [--out DIR] [--quick]

For every T x N x dtype it times, with ``triton.testing.do_bench`` (medians, CUDA events,
L2 flushed between calls):

- ``triton``: ``project(x, order=order, backend="triton")``, eager (what a training loop pays);
- ``triton graph``: the same call replayed from a CUDA graph (GPU time without launch cost);
- ``triton kernels``: the backend's ``forward`` alone (no validation, no dispatcher);
- ``native``, ``native graph``: the compiled CUDA extension, eager and replayed (T <= 32);
- ``torch``: ``backend="torch"``;
- ``per-pair loop``: the common PCGrad loop (one host sync per pair);
- ``torchjd PCGrad``: TorchJD's aggregator, or a "skipped: torchjd not installed" row.

Bandwidth counts the physical floor: 2 reads of T x N plus 1 write of N, in the input
dtype; ``frac_copy`` divides it by a measured device-to-device copy (``copy_`` of 1 GiB).
Results: a table printed last, ``results.csv`` and ``results.json`` under ``--out``
(default ``$OUT`` or ``./bench_out``). ``--sweep`` instead times the triton forward over
a grid of its tile and chunk constants (``sweep.csv``), to tune them on a new GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
import traceback

import torch

import ortholora_kernels as ok

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_project import pcgrad_loop  # noqa: E402  (the same loop as the CPU benchmark)
from harness import cuda_median_us  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = [2, 4, 8, 16, 32]
NUMELS = [295_000, 3_000_000, 16_000_000]
FIELDS = ["T", "N", "dtype", "impl", "median_us", "GBps", "frac_copy", "speedup_vs_loop", "max_rel_err", "note"]


def torchjd_pcgrad():
    """TorchJD's PCGrad aggregator, or None when torchjd is not installed."""
    try:
        from torchjd.aggregation import PCGrad
    except ImportError:
        return None
    return PCGrad()


def floor_bytes(t: int, n: int, dtype: torch.dtype) -> int:
    """The physical floor of one call: two reads of T x N and one write of N."""
    return (2 * t * n + n) * torch.finfo(dtype).bits // 8


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


do_bench = cuda_median_us   # median microseconds of fn() (CUDA events, L2 flushed between calls)


def copy_bandwidth(rep_ms: float) -> float:
    """Device-to-device GB/s of ``copy_`` on a 1 GiB buffer (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = do_bench(lambda: dst.copy_(src), rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return gbps(2 << 30, us)


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call), returned as a replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def candidates(x: torch.Tensor, order: torch.Tensor):
    """``[(label, fn or None, note)]`` for one input; ``fn`` None marks a skipped row."""
    out = []
    reason = ok.backends.availability("triton", x.device)
    if reason is None:
        tri = lambda: ok.project(x, order=order, backend="triton")  # noqa: E731
        out.append(("triton", tri, ""))
        out.append(("triton graph", "graph", ""))
        # The backend's forward alone (no op validation or dispatcher): the launch floor.
        seg = ok._args.segments_for(None, x.shape[1])
        order3 = order.unsqueeze(0).contiguous()
        out.append(("triton kernels", lambda: ok.ops.forward(x, seg, order3, "sum", "triton")[0], ""))
    else:
        out.append(("triton", None, f"skipped: {reason}"))
    reason = ok.backends.availability("native", x.device)
    if reason is None and x.shape[0] <= 32:
        out.append(("native", lambda: ok.project(x, order=order, backend="native"), ""))
        out.append(("native graph", "graph", ""))
    else:
        out.append(("native", None, f"skipped: {reason or 'T > 32'}"))
    out.append(("torch", lambda: ok.project(x, order=order, backend="torch"), ""))
    out.append(("per-pair loop", lambda: pcgrad_loop(x), ""))
    jd = torchjd_pcgrad()
    if jd is None:
        out.append(("torchjd PCGrad", None, "skipped: torchjd not installed"))
    else:
        out.append(("torchjd PCGrad", lambda: jd(x), ""))
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|``, in float64 on the CPU (the two may sit on different devices)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def bench_one(t, n, dtype_name, copy_bw, rep_ms, skip_loop_above):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(1000 * t + n % 997)
    x = torch.randn(t, n, device="cuda", generator=gen)
    # a shared direction with alternating signs: tasks conflict, so projections happen
    signs = torch.arange(t, device="cuda").remainder(2).mul(-2).add(1).unsqueeze(1)
    x = (x + 0.5 * signs * torch.randn(1, n, device="cuda", generator=gen)).to(dtype)
    order = torch.rand(t, t, device="cuda", generator=gen).argsort(-1)
    ref = ok.project(x, order=order, backend="torch")               # same order: comparable
    nbytes = floor_bytes(t, n, dtype)
    rows, times = [], {}
    for label, fn, note in candidates(x, order):
        row = {"T": t, "N": n, "dtype": dtype_name, "impl": label, "median_us": None, "GBps": None,
               "frac_copy": None, "speedup_vs_loop": None, "max_rel_err": None, "note": note}
        rows.append(row)
        if fn is None:
            continue
        if label == "per-pair loop" and skip_loop_above and t * n > skip_loop_above:
            row["note"] = f"skipped: T*N > {skip_loop_above}"
            continue
        try:
            if fn == "graph":   # "triton graph" / "native graph": that backend's call, replayed
                backend = label.split()[0]
                fn = graph_of(lambda: ok.project(x, order=order, backend=backend))
                result = None
            else:
                result = fn()
            torch.cuda.synchronize()
            if result is not None and label not in ("per-pair loop", "torchjd PCGrad"):
                # The loop and TorchJD draw their own random orders: no exact comparison.
                row["max_rel_err"] = f"{rel_err(result, ref):.2e}"
            us = do_bench(fn, rep_ms)
        except Exception as exc:  # one failing implementation must not lose the others
            row["note"] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            traceback.print_exc(limit=2)
            continue
        times[label] = us
        row["median_us"] = round(us, 2)
        row["GBps"] = round(gbps(nbytes, us), 1)
        row["frac_copy"] = round(gbps(nbytes, us) / copy_bw, 3)
    base = times.get("per-pair loop")
    for row in rows:
        if base and row["median_us"]:
            row["speedup_vs_loop"] = round(base / row["median_us"], 1)
    del x, ref
    torch.cuda.empty_cache()
    return rows


def check_correctness(device="cuda", n=20_000, names=("triton", "native"), tasks=None):
    """Each usable backend against the float64 reference (forward) and the torch backend
    (backward) on ragged segments, T across the kernels' classes (guards the figures).

    ``device="cpu"`` runs the same check through the Triton interpreter (the CPU test).
    Raises AssertionError on a disagreement; ``main`` records it and benches on.
    """
    notes = []
    big = device != "cpu"        # T = 33 (T_PAD 64) and 65 (the backward's torch reverse solve)
    for name in names:
        reason = ok.backends.availability(name, device)
        if reason is not None:
            notes.append(f"{name} not checked ({reason})")
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        worst = 0.0
        for t in tasks or (2, 8, 17) + ((33, 65) if big else ()):
            if name == "native" and device != "cpu" and t > 32:
                continue                      # native's CUDA kernels: T <= 32
            x = torch.randn(t, n, device=device, generator=gen)
            x[1::2] -= 0.5 * x[0]             # conflicting tasks: projections happen
            segs = [0, 1, n // 3, n]
            order = torch.rand(3, t, t, device=device, generator=gen).argsort(-1)
            for reduction in ("sum", "none"):
                xx = x.clone().requires_grad_()
                got = ok.project(xx, segs, order=order, reduction=reduction, backend=name)
                ref = ok.reference.project(x, segs, order=order, reduction=reduction)   # on x's device
                worst = max(worst, rel_err(got, ref))
                dy = torch.randn(got.shape, device=device, generator=gen)
                (g,) = torch.autograd.grad(got, xx, dy)
                xt = x.clone().requires_grad_()
                (gt,) = torch.autograd.grad(ok.project(xt, segs, order=order, reduction=reduction,
                                                       backend="torch"), xt, dy)
                worst = max(worst, rel_err(g, gt))
        assert worst < 1e-4, f"{name} disagrees with the reference: rel err {worst:.2e}"
        notes.append(f"{name} vs reference: max rel err {worst:.1e}")
    return "; ".join(notes)
SWEEP = {  # triton_impl constants worth tuning on a new GPU (the defaults are untuned guesses)
    "_TILE_ELEMS": [8192, 16384, 32768],
    "_PROGRAMS_PER_SM": [2, 4, 8, 16],
}


def sweep(ts, ns, rep_ms, device="cuda"):
    """Time the triton forward alone over the SWEEP grid; rows sorted fastest first per shape."""
    import itertools
    from ortholora_kernels.backends import triton_impl as impl
    saved = {k: getattr(impl, k) for k in SWEEP}
    rows, segs = [], []
    try:
        for t, n in itertools.product(ts, ns):
            x = torch.randn(t, n, device=device)
            order3 = torch.rand(1, t, t, device=device).argsort(-1)
            seg = ok._args.segments_for(None, n)
            segs.append(seg)
            ref = ok.ops.forward(x, seg, order3, "sum", "triton")[0]
            shape_rows = []
            for values in itertools.product(*SWEEP.values()):
                for k, v in zip(SWEEP, values):
                    setattr(impl, k, v)
                seg._device_cache.clear()            # plans and tables depend on the constants
                fn = lambda: ok.ops.forward(x, seg, order3, "sum", "triton")[0]  # noqa: E731
                err = rel_err(fn(), ref)
                us = do_bench(fn, rep_ms)
                shape_rows.append({"T": t, "N": n, **dict(zip(SWEEP, values)), "median_us": round(us, 2),
                                   "GBps": round(gbps(floor_bytes(t, n, x.dtype), us), 1),
                                   "max_rel_err": f"{err:.1e}"})
            rows += sorted(shape_rows, key=lambda r: r["median_us"])
            del x
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        for k, v in saved.items():
            setattr(impl, k, v)
        for seg in segs:
            seg._device_cache.clear()
    return rows


def fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def print_table(rows, copy_bw):
    print(f"\ncopy bandwidth (copy_ of 1 GiB): {copy_bw:.0f} GB/s; GB/s counts 2 reads of T x N + 1 write of N")
    print(f"{'T':>3} {'N':>9} {'dtype':>5} {'implementation':<15} {'median us':>11} {'GB/s':>8} "
          f"{'of copy':>8} {'x loop':>8} {'rel err':>9}  note")
    for r in rows:
        print(f"{r['T']:>3} {r['N']:>9} {r['dtype']:>5} {r['impl']:<15} {fmt(r['median_us'], '11.2f')} "
              f"{fmt(r['GBps'], '8.1f')} {fmt(r['frac_copy'], '8.1%')} {fmt(r['speedup_vs_loop'], '8.1f')} "
              f"{r['max_rel_err'] or '-':>9}  {r['note']}")


def write_results(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only T=8, N=295k and 16M, fp32")
    p.add_argument("--tasks", type=int, nargs="+", default=TASKS, help="values of T")
    p.add_argument("--numel", type=int, nargs="+", default=NUMELS, help="values of N")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time per measurement")
    p.add_argument("--skip-loop-above", type=int, default=0,
                   help="skip the per-pair loop when T*N exceeds this (0: never skip)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time the triton forward over a grid of tile/chunk constants (T=8 unless --tasks)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="directory for results.csv/json")
    p.add_argument("--check-only", action="store_true",
                   help="only the correctness check (forward and backward of each backend); exit 1 on a failure")
    p.add_argument("--device", default="cuda", help="for --check-only: cpu runs triton through the interpreter")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.numel, args.dtypes = [8], [295_000, 16_000_000], ["fp32"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.check_only:
        try:
            cpu = args.device == "cpu"      # the interpreter: small and few
            print(check_correctness(args.device, n=600 if cpu else 20_000, tasks=(2, 9) if cpu else None))
        except AssertionError as exc:
            print(f"FAILED: {exc}")
            return 1
        return 0
    if not torch.cuda.is_available():
        print("bench_project_gpu: no CUDA device; use benchmarks/bench_project.py on CPU", file=sys.stderr)
        return 2
    import triton
    random.seed(0)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "ortholora_kernels": getattr(ok, "__version__", "?"),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "backends": {k: v[1] for k, v in ok.backends_available("cuda").items()},
            "torchjd": torchjd_pcgrad() is not None}
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    print("backends:", meta["backends"])
    try:   # a failed check is recorded, and the figures still come (marked by it)
        meta["check"] = check_correctness()
    except Exception as exc:  # noqa: BLE001
        meta["check"] = f"FAILED: {type(exc).__name__}: {exc}"
        traceback.print_exc(limit=3)
    print(meta["check"])
    if args.sweep:
        ts = args.tasks if args.tasks != TASKS else [8]
        ns = args.numel if args.numel != NUMELS else [295_000, 16_000_000]
        rows = sweep(ts, ns, args.rep_ms)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            print(" ".join(f"{k}={v}" for k, v in r.items()))
        return 0
    copy_bw = copy_bandwidth(args.rep_ms)
    meta["copy_GBps"] = round(copy_bw, 1)
    rows = []
    for dtype_name in args.dtypes:
        for n in args.numel:
            for t in args.tasks:
                rows += bench_one(t, n, dtype_name, copy_bw, args.rep_ms, args.skip_loop_above)
                print(f"done T={t} N={n} {dtype_name}", flush=True)
                write_results(rows, meta, args.out)   # partial results survive a time limit
    print_table(rows, copy_bw)
    print(f"\nwrote {os.path.join(args.out, 'results.csv')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
