"""Compile every Triton kernel configuration the dispatcher can choose, for a GPU, without one.

    python scripts/compile_gpu.py --arch sm_90            # the full matrix
    python scripts/compile_gpu.py --arch sm_90 --quick    # one T per specialisation class
    PYTHONPATH=/path/to/triton36 python scripts/compile_gpu.py   # another Triton

The Triton interpreter (the CPU tests) never runs Triton's GPU compiler, so a kernel that a
given Triton version rejects for a GPU, or that spills there, passes every CPU test. This
script runs the real host code (``ortholora_kernels.ops.forward`` / ``backward`` with the
triton backend, and its Gram pass alone) on small CPU tensors with the kernel launches
*recorded* instead of run, then specialises each recorded launch exactly as Triton's
launcher would (its own binder: integer arguments equal to 1 become constants, 16-divisible
integers and 16-byte aligned pointers get their hints) and compiles it with
``triton.compile`` for the target (Triton's bundled ptxas; no driver, no GPU).

The matrix: T = 1..64, 65 and 128 (T_PAD 128: the largest the automatic choice sends to
triton on CUDA; ``--quick``, what CI runs: a subset, see ``QUICK_TASKS``), fp32 / bf16 / fp16
/ fp64, fused and unfused stage 2, forward (Gram + PCGrad solve), backward, and the Gram
pass alone (the path of solves the kernels do not fuse), reductions sum / mean / none
(which select the combine variants: one output row, T rows, and the backward's two-input
combine). One row per configuration: the kernels it launches with registers per thread,
spill bytes (stores + loads, from ``ptxas -v``) and static shared memory; identical
launches are compiled once. The last line is ``N configurations compiled, M failed``; the
exit status is 1 when any configuration failed (or with ``--max-spills`` exceeded).
``--csv FILE`` writes one row per (configuration, kernel).
"""
from __future__ import annotations

import argparse
import atexit
import concurrent.futures as cf
import contextlib
import csv
import io
import os
import re
import shutil
import sys
import tempfile
import time

# A fresh Triton cache: a cached kernel skips ptxas, and ptxas' report is what we read.
# (Spawned workers inherit it through the environment; the parent removes it at exit.)
if "ORTHOLORA_COMPILE_GPU_CACHE" not in os.environ:
    os.environ["ORTHOLORA_COMPILE_GPU_CACHE"] = os.environ["TRITON_CACHE_DIR"] = \
        tempfile.mkdtemp(prefix="ortholora_compile_gpu_")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_gpu.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]

import torch  # noqa: E402

from harness import KERNELS, recorded_launches  # noqa: E402  (benchmarks/harness.py)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
REDUCTIONS = ("sum", "mean", "none")
# --quick (what CI runs, twice: two Tritons on 2 cores): T == 1 (a constant), T = 8 (the
# largest software-pipelined outer-product tile), T = 16 (the first tl.dot size, the
# register solve), 17 (padded to 32: the solve reads G from memory), 64 (the largest tile
# of the fused reverse solve), 65 (T_PAD 128: the backward's torch reverse solve) and 128
# (the largest T the automatic choice sends to triton on CUDA); every dtype fused, the
# unfused stage 2 in fp32 and fp64 only.
QUICK_TASKS = (1, 8, 16, 17, 64, 65, 128)
# Layouts the host code is run on: an aligned one (N and every offset 16-divisible, the
# usual LoRA case) and, with --ragged, odd sizes and a 1-column segment.
LAYOUTS = {"aligned": [0, 4096, 12288], "ragged": [0, 1, 1000, 3001]}


def _impl():
    from ortholora_kernels.backends import triton_impl
    return triton_impl


def record(t: int, dtype: torch.dtype, fused: bool, direction: str, reduction: str, layout: str):
    """The launches ``(kernel name, args, kwargs)`` of one configuration, in order."""
    from ortholora_kernels import backends, ops
    from ortholora_kernels._args import draw_orders, segments_for
    impl = _impl()
    offsets = LAYOUTS[layout]
    n = offsets[-1]
    seg = segments_for(offsets, n)
    seg._device_cache.clear()
    gen = torch.Generator().manual_seed(t)
    x = torch.randn((t, n), generator=gen).to(dtype)
    order = draw_orders(seg.num_segments, t, "cpu", gen)
    log = []
    saved = impl._FUSED
    try:
        with recorded_launches(impl, log, KERNELS):
            impl._FUSED = fused
            if direction == "fwd":        # the built-in PCGrad solve, fused into the Gram launch
                ops.forward(x, seg, order, reduction, "triton")
            elif direction == "gram":     # a solve the kernels do not fuse: the Gram pass alone
                backends.get("triton").gram(x, seg)
            else:
                xd = x.double()
                g = torch.stack([xd[:, a:b] @ xd[:, a:b].T for a, b in zip(offsets, offsets[1:])])
                dout = torch.randn((t, n) if reduction == "none" else (n,), generator=gen).to(dtype)
                ops.backward(x, dout, g, order, seg, reduction, "triton")
    finally:
        impl._FUSED = saved
        seg._device_cache.clear()
    return log


_BINDERS: dict = {}


def specialise(name, args, kwargs, target):
    """``(signature, constexprs, attrs, options)`` exactly as Triton's launcher builds them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = getattr(_impl(), name)
    if (name, target) not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[name, target] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[name, target]
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options.__dict__


def _key(name, signature, constexprs, attrs, options):
    return repr((name, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.items())))


def _target(arch: str):
    from triton.backends.compiler import GPUTarget
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise SystemExit(f"--arch: expected sm_NN (e.g. sm_90), got {arch!r}")
    return GPUTarget("cuda", int(m.group(1)), 32)


def compile_one(job):
    """Compile one specialised launch; ``{regs, spills, smem, error}`` (run in a worker)."""
    name, signature, constexprs, attrs, options, arch = job
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    fn = getattr(_impl(), name)
    knobs.nvidia.dump_ptxas_log = True    # ptxas -v's report is printed: capture it
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(arch), options=options)
    except Exception as exc:  # noqa: BLE001  any compiler error is a failed configuration
        # The compiler's message ends with the cause (it starts with the source excerpt).
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return dict(error=f"{type(exc).__name__}: {' | '.join(lines[-2:])}"[:600], secs=time.perf_counter() - t0)
    log = buf.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return dict(regs=int(regs.group(1)) if regs else -1, spills=sum(spills), smem=int(k.metadata.shared),
                error=None, secs=time.perf_counter() - t0, **ptx_facts(k.asm.get("ptx", "")))


PTX_FACTS = ("ld_v4", "ld_scalar", "cp16", "cp4", "wgmma", "mma", "ffma")


def ptx_facts(ptx: str) -> dict:
    """Counts of the PTX instructions that say how a kernel loads and multiplies: 16-byte
    global loads (``ld.global.v4`` of 4-byte words, ``v2`` of 8-byte ones) against scalar
    ones, 16- and 4-byte ``cp.async`` copies, tensor-core ``wgmma``/``mma`` and fp32 FMAs."""
    loads = re.findall(r"\bld\.global((?:\.\w+)*)", ptx)
    wide = sum(1 for q in loads if ".v4" in q or (".v2" in q and ("64" in q)))
    cps = [int(v, 0) for v in re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*?\],\s*(0x[0-9a-f]+|\d+)", ptx)]
    return dict(ld_v4=wide, ld_scalar=sum(1 for q in loads if ".v" not in q),
                cp16=cps.count(16), cp4=cps.count(4), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\bmma\.sync", ptx)), ffma=len(re.findall(r"\bfma\.rn\.f32", ptx)))


DIRECTIONS = ("fwd", "bwd", "gram")


def configurations(tasks, dtypes, quick=False, directions=DIRECTIONS):
    for t in tasks:
        for dt in dtypes:
            for fused in (True, False) if not quick or dt in ("fp32", "fp64") else (True,):
                for direction in directions:
                    for reduction in REDUCTIONS if direction != "gram" else ("-",):
                        yield t, dt, fused, direction, reduction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (H100/H200), sm_80")
    p.add_argument("--tasks", type=int, nargs="+", default=list(range(1, 65)) + [65, 128],
                   help="values of T (default 1..64, 65, 128)")
    p.add_argument("--quick", action="store_true",
                   help=f"the CI subset: T in {QUICK_TASKS}, unfused stage 2 for fp32/fp64 only")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS,
                   help="fwd (Gram + fused PCGrad solve, combine), bwd, gram (the Gram pass alone)")
    p.add_argument("--ragged", action="store_true", help="also the ragged layout (odd N, unaligned pointers)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    p.add_argument("--max-spills", type=int, default=None,
                   help="fail a configuration whose kernels spill more than this many bytes")
    p.add_argument("--csv", default=None, help="write one row per (configuration, kernel) here")
    p.add_argument("--ptx", action="store_true",
                   help="also print the PTX facts per kernel (wide/scalar loads, cp.async sizes, mma, fp32 FMAs; "
                        "always in --csv; maxima over the configuration's launches)")
    p.add_argument("--pipeline-stages", type=int, default=None,
                   help="override triton_impl._PIPELINE_STAGES (the T <= 8 Gram loops' num_stages) to compare")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton
    if args.pipeline_stages is not None:
        _impl()._PIPELINE_STAGES = args.pipeline_stages
    target = _target(args.arch)
    tasks = QUICK_TASKS if args.quick else args.tasks
    layouts = ["aligned"] + (["ragged"] if args.ragged else [])
    print(f"compile_gpu: triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch "
          f"{torch.__version__}, target {args.arch}, T in {list(tasks)[:8]}{'...' if len(tasks) > 8 else ''}, "
          f"dtypes {args.dtypes}, layouts {layouts}", flush=True)
    # 1. Record every configuration's launches and specialise them (cheap, host only).
    configs, jobs = [], {}
    for cfg in configurations(tasks, args.dtypes, args.quick, args.directions):
        t, dt, fused, direction, reduction = cfg
        launches, err = [], None
        try:
            for layout in layouts:
                for name, a, kw in record(t, DTYPES[dt], fused, direction, reduction, layout):
                    sig, const, attrs, opts = specialise(name, a, kw, target)
                    key = _key(name, sig, const, attrs, opts)
                    jobs.setdefault(key, (name, sig, const, attrs, opts, args.arch))
                    launches.append((name, key))
        except Exception as exc:  # noqa: BLE001  the host code itself failed for this config
            err = f"host code: {type(exc).__name__}: {exc}"
        configs.append((cfg, launches, err))
    print(f"compile_gpu: {len(configs)} configurations, {len(jobs)} distinct kernel compilations", flush=True)
    # 2. Compile each distinct launch once.
    t0 = time.perf_counter()
    results = {}
    keys = list(jobs)
    if args.jobs > 1:
        import multiprocessing
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for key, res in zip(keys, pool.map(compile_one, [jobs[k] for k in keys], chunksize=1)):
                results[key] = res
    else:
        for key in keys:
            results[key] = compile_one(jobs[key])
    # 3. One row per configuration.
    failed = 0
    rows = []
    for (t, dt, fused, direction, reduction), launches, err in configs:
        per_kernel = {}
        errors = [err] if err else []
        for name, key in launches:
            res = results[key]
            if res["error"]:
                errors.append(f"{name}: {res['error']}")
                continue
            cur = per_kernel.setdefault(name, dict(regs=0, spills=0, smem=0, **dict.fromkeys(PTX_FACTS, 0)))
            for f in ("regs", "spills", "smem") + PTX_FACTS:
                cur[f] = max(cur[f], res[f])
        if args.max_spills is not None:
            errors += [f"{k}: {v['spills']} bytes spilled > {args.max_spills}" for k, v in per_kernel.items()
                       if v["spills"] > args.max_spills]
        status = "FAILED" if errors else "ok"
        failed += bool(errors)
        parts = "  ".join(f"{k.strip('_').replace('_kernel', '')}: regs={v['regs']} spills={v['spills']} "
                          f"smem={v['smem']}" + (" " + " ".join(f"{f}={v[f]}" for f in PTX_FACTS) if args.ptx else "")
                          for k, v in per_kernel.items())
        print(f"T={t:<3d} dtype={dt:<4s} {'fused  ' if fused else 'unfused'} {direction:<4s} {reduction:<4s} "
              f"{status:<6s} {parts}" + (f"  ERROR {'; '.join(errors)}" if errors else ""))
        for k, v in per_kernel.items():
            rows.append(dict(T=t, dtype=dt, fused=fused, direction=direction, reduction=reduction, kernel=k, **v))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["T", "dtype", "fused", "direction", "reduction", "kernel", "regs",
                                              "spills", "smem", *PTX_FACTS])
            w.writeheader()
            w.writerows(rows)
    worst = max(rows, key=lambda r: (r["spills"], r["regs"]), default=None)
    if worst:
        print(f"compile_gpu: most registers/spills: {worst['kernel']} at T={worst['T']} {worst['dtype']} "
              f"{worst['direction']} {worst['reduction']}: regs={worst['regs']} spills={worst['spills']}; "
              f"{len(jobs)} compilations in {time.perf_counter() - t0:.0f} s with {args.jobs} jobs")
    print(f"{len(configs) - failed} configurations compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
