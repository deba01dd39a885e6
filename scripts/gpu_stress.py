"""Stress checks of the GPU backends that unit tests do not reach (run by scripts/gpu_check.sh).

    python scripts/gpu_stress.py --out DIR            # on a CUDA machine
    python scripts/gpu_stress.py --dry-run --out DIR  # CPU: triton through the interpreter, small

Checks (each independent: a failure is recorded and the next one runs):

- ``determinism``: the triton forward, fused and unfused stage 2, is bitwise identical over
  hundreds of calls (a race in the ticket tree shows as a changing bit); fused and unfused
  agree within rounding (their partial sums are grouped differently) and with the reference;
- ``fp64``: float64 input at T = 16, 17, 33 (the tl.dot path Triton 3.6 once rejected),
  forward and backward, against the float64 reference / the torch backend;
- ``graphs_reverse``: per backend (each in its own try), after a warm-up call outside any
  capture (a kernel's first launch loads its module, which a capturing stream refuses), two
  CUDA graphs of the same shape captured on one stream (the first call of a fresh layout
  inside the capture), replayed in reverse order, then side by side on two streams, then
  an eager call of the same layout;
- ``two_streams``: eager calls of one layout on two streams at once;
- ``native_capture``: the native backend's first call of a layout inside a capture, then
  replays and eager calls;
- ``auto_choice``: what the automatic choice picks at T = 32 and 33, and both are right;
- ``int64_indexing``: T * N > 2**31 elements against the torch backend.

Writes ``stress.json`` (one record per check: status, seconds, detail) under ``--out``
after every check (a kill keeps what ran), synchronising the device inside each check's
try (an asynchronous fault is that check's failure); exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(dry_run: bool):
    if dry_run:   # the interpreter is picked when the kernels are defined: before the import
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))


class Skip(Exception):
    """A check that cannot run here (recorded as skipped, with the reason)."""


def rel_err(got, ref) -> float:
    ref = ref.double().cpu()
    return float((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def grads(t, n, dtype, device, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=gen, dtype=torch.float64)
    signs = torch.arange(t).remainder(2).mul(-2).add(1).unsqueeze(1)
    x = x + 0.5 * signs * torch.randn(1, n, generator=gen, dtype=torch.float64)   # conflicting tasks
    return x.to(dtype).to(device)


def orders(t, s, device, seed):
    import torch
    return torch.rand(s, t, t, generator=torch.Generator().manual_seed(seed)).argsort(-1).to(device)


def usable(name, device):
    import ortholora_kernels as ok
    return ok.backends.availability(name, device) is None


def check_determinism(ctx):
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    from ortholora_kernels.backends import triton_impl as impl
    if not usable("triton", ctx.device):
        raise Skip(ok.backends.availability("triton", ctx.device))
    notes = []
    # bf16 only on a GPU: the interpreter's bf16 arithmetic is not the GPU's (ARCHITECTURE.md, "Test matrix").
    cases = ((3, torch.float32), (17, torch.float16)) if ctx.device == "cpu" else \
        ((3, torch.float32), (8, torch.float32), (17, torch.bfloat16), (33, torch.float32))
    for t, dtype in cases:
        n = ctx.n
        segs = [0, 1, n // 3, n]
        x = grads(t, n, dtype, ctx.device, seed=t)
        order = orders(t, 3, ctx.device, seed=t + 1)
        results = {}
        saved = impl._FUSED
        try:
            for fused in (True, False):
                impl._FUSED = fused
                seg = ok._args.segments_for(segs, n)
                seg._device_cache.clear()
                first = ok.project(x, segs, order=order, reduction="mean", backend="triton", return_stats=True)
                for i in range(ctx.calls):
                    r = ok.project(x, segs, order=order, reduction="mean", backend="triton", return_stats=True)
                    if not (torch.equal(r.output, first.output) and torch.equal(r.gram, first.gram)
                            and torch.equal(r.coeffs, first.coeffs)):
                        raise AssertionError(f"T={t} {dtype} fused={fused}: call {i + 1} differs bitwise")
                results[fused] = first
                seg._device_cache.clear()
        finally:
            impl._FUSED = saved
        ref = reference.project(x.cpu(), segs, order=order.cpu(), reduction="mean")
        tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-4)
        for fused, r in results.items():
            e = rel_err(r.output, ref)
            assert e < tol, f"T={t} {dtype} fused={fused}: rel err {e:.2e} vs reference"
        e = rel_err(results[True].gram, results[False].gram)
        assert e < 1e-6, f"T={t}: fused and unfused Gram differ by {e:.2e}"
        notes.append(f"T={t}:{str(dtype)[6:]} ok")
    return f"{ctx.calls + 1} calls each, fused and unfused bitwise stable; " + ", ".join(notes)


def check_fp64(ctx):
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    names = [b for b in ("triton", "native") if usable(b, ctx.device)]
    if not names:
        raise Skip("neither triton nor native is usable here")
    notes = []
    for name in names:
        for t in (16, 17, 33):
            if name == "native" and ctx.device != "cpu" and t > 32:
                continue
            n = ctx.n
            segs = [0, n // 4, n]
            x = grads(t, n, torch.float64, ctx.device, seed=100 + t)
            order = orders(t, 2, ctx.device, seed=101 + t)
            for reduction in ("sum", "none"):
                xx = x.clone().requires_grad_()
                out = ok.project(xx, segs, order=order, reduction=reduction, backend=name)
                ref = reference.project(x.cpu(), segs, order=order.cpu(), reduction=reduction)
                e = rel_err(out.detach(), ref)
                assert e < 1e-10, f"{name} T={t} {reduction}: forward rel err {e:.2e}"
                dy = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
                dy = dy.to(ctx.device)
                (g,) = torch.autograd.grad(out, xx, dy)
                xt = x.clone().requires_grad_()
                (gt,) = torch.autograd.grad(ok.project(xt, segs, order=order, reduction=reduction, backend="torch"),
                                            xt, dy)
                e = rel_err(g, gt)
                assert e < 1e-9, f"{name} T={t} {reduction}: backward rel err {e:.2e} vs torch backend"
            notes.append(f"{name} T={t}")
    return "forward and backward match: " + ", ".join(notes)


def _needs_cuda(ctx):
    if ctx.device != "cuda":
        raise Skip("needs CUDA")


class CudaGraphs:
    """Streams and graph capture as :func:`graphs_reverse_one` uses them (the CPU test
    passes a stand-in whose capture flips ``triton_impl._capturing``)."""

    device = "cuda"

    def stream(self):
        import torch
        return torch.cuda.Stream()

    def on(self, stream):
        import torch
        return torch.cuda.stream(stream)

    def fork(self, stream):      # ``stream`` waits for the current stream's work
        import torch
        stream.wait_stream(torch.cuda.current_stream())

    def join(self, stream):      # the current stream waits for ``stream``'s work
        import torch
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn, stream):
        """``(replay, out)``: ``out = fn()`` captured on ``stream``."""
        import torch
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            out = fn()
        return g.replay, out

    def sync(self):
        import torch
        torch.cuda.synchronize()


def graphs_reverse_one(name, salt, kit, n=300_001):
    """One backend's part of :func:`check_graphs_reverse`; raises on a wrong result."""
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    t = 8
    segs = [0, 17, n // 3 + salt, n]                     # a layout no earlier call has seen
    xs = [grads(t, n, torch.float32, kit.device, seed=200 + i) for i in range(2)]
    order = orders(t, 3, kit.device, seed=202)
    # Warm-up outside the capture, on the same shapes and dtype but another layout: the
    # kernels' first launch in the process loads their modules, which a capturing stream
    # refuses ("operation not permitted when stream is capturing"). The captured calls
    # below still meet a layout of their own for the first time (tables, workspace).
    ok.project(xs[0], [0, 5, n], order=order[:2], backend=name)
    kit.sync()
    replays, outs = [], []
    s = kit.stream()
    kit.fork(s)
    with kit.on(s):
        for x in xs:                                     # the layout's first call is captured
            replay, out = kit.capture(lambda x=x: ok.project(x, segs, order=order, backend=name), s)
            replays.append(replay)
            outs.append(out)
    kit.join(s)
    refs = [reference.project(x.cpu(), segs, order=order.cpu()) for x in xs]
    for replay in reversed(replays):
        replay()
    kit.sync()
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert rel_err(out, ref) < 1e-4, f"{name}: graph {i} (replayed in reverse order) is wrong"
    first = [o.clone() for o in outs]
    for o in outs:
        o.fill_(float("nan"))
    streams = [kit.stream() for _ in replays]
    for st, replay in zip(streams, replays):              # both graphs at once, on two streams
        kit.fork(st)
        with kit.on(st):
            for _ in range(20 if kit.device == "cuda" else 1):
                replay()
    for st in streams:
        kit.join(st)
    kit.sync()
    for i, (o, f) in enumerate(zip(outs, first)):
        assert torch.equal(o, f), f"{name}: graph {i} replayed beside the other differs"
    eager = ok.project(xs[0], segs, order=order, backend=name)
    assert rel_err(eager, refs[0]) < 1e-4, f"{name}: an eager call after the captures is wrong"


def check_graphs_reverse(ctx):
    import torch
    import ortholora_kernels as ok
    _needs_cuda(ctx)
    notes, failed = [], []
    for salt, name in enumerate(("triton", "native")):
        if not usable(name, "cuda"):
            notes.append(f"{name}: skipped ({ok.backends.availability(name, 'cuda')})")
            continue
        try:   # one backend failing (or faulting) must not hide the other's result
            graphs_reverse_one(name, salt, CudaGraphs())
            torch.cuda.synchronize()
            notes.append(f"{name} ok")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            notes.append(f"{name} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            failed.append(name)
    if failed:
        raise AssertionError("; ".join(notes))
    return "; ".join(notes)


def check_two_streams(ctx):
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    _needs_cuda(ctx)
    notes = []
    for name in ("triton", "native"):
        if not usable(name, "cuda"):
            continue
        t, n = 16, 2_000_003
        segs = [0, 5, 1_000_000, n]
        xs = [grads(t, n, torch.float32, "cuda", seed=300 + i) for i in range(2)]
        order = orders(t, 3, "cuda", seed=302)
        ok.project(xs[0], segs, order=order, backend=name)   # warm-up on the default stream
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream() for _ in xs]
        outs = [[], []]
        for _ in range(10):
            for k, (st, x) in enumerate(zip(streams, xs)):
                with torch.cuda.stream(st):
                    outs[k].append(ok.project(x, segs, order=order, backend=name))
        torch.cuda.synchronize()
        for k, x in enumerate(xs):
            ref = reference.project(x.cpu(), segs, order=order.cpu())
            assert rel_err(outs[k][0], ref) < 1e-4, f"{name}: stream {k} wrong"
            assert all(torch.equal(o, outs[k][0]) for o in outs[k]), f"{name}: stream {k} not bitwise stable"
        notes.append(f"{name} ok")
    if not notes:
        raise Skip("neither triton nor native is usable on cuda")
    return "; ".join(notes)


def check_native_capture(ctx):
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    _needs_cuda(ctx)
    if not usable("native", "cuda"):
        raise Skip(ok.backends.availability("native", "cuda"))
    t, n = 12, 500_009
    segs = [0, 3, 250_000, n]                                 # fresh layout: table built inside capture
    x = grads(t, n, torch.float32, "cuda", seed=400)
    order = orders(t, 3, "cuda", seed=401)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        out = ok.project(x, segs, order=order, reduction="none", backend="native")
    torch.cuda.current_stream().wait_stream(s)
    ref = reference.project(x.cpu(), segs, order=order.cpu(), reduction="none")
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref) < 1e-4, "native: captured first call wrong on replay"
    eager = ok.project(x, segs, order=order, reduction="none", backend="native")
    assert rel_err(eager, ref) < 1e-4, "native: eager call after a captured first call wrong"
    x.copy_(grads(t, n, torch.float32, "cuda", seed=402))
    g.replay()
    torch.cuda.synchronize()
    ref2 = reference.project(x.cpu(), segs, order=order.cpu(), reduction="none")
    assert rel_err(out, ref2) < 1e-4, "native: replay on new data wrong"
    return "captured first call, replays and later eager calls match the reference"


def check_auto_choice(ctx):
    import torch
    import ortholora_kernels as ok
    from ortholora_kernels import reference
    _needs_cuda(ctx)
    picks = {}
    for t in (32, 33):
        picks[t] = ok.backends.select(None, torch.device("cuda"), t)
        x = grads(t, 100_003, torch.float32, "cuda", seed=500 + t)
        order = orders(t, 1, "cuda", seed=501)[0]
        out = ok.project(x, order=order)
        assert rel_err(out, reference.project(x.cpu(), order=order.cpu())) < 1e-4, f"auto at T={t} wrong"
    assert picks[33] != "native", "native (T <= 32 on CUDA) chosen at T=33"
    return f"T=32 -> {picks[32]}, T=33 -> {picks[33]}; both match the reference"


def check_int64_indexing(ctx):
    import torch
    import ortholora_kernels as ok
    _needs_cuda(ctx)
    t = 8
    n = (1 << 31) // t + 4099                                  # T * N > 2**31 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * t * n:
        raise Skip(f"needs about {24 * t * n / 2**30:.0f} GiB free, {free / 2**30:.0f} GiB free")
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    x[1::2] -= 0.5 * x[0]
    order = orders(t, 1, "cuda", seed=600)[0]
    segs = [0, 12345, n]
    ref = ok.project(x, segs, order=order, reduction="none", backend="torch")
    notes = []
    for name in ("triton", "native"):
        if not usable(name, "cuda"):
            continue
        out = ok.project(x, segs, order=order, reduction="none", backend=name)
        e = rel_err(out[-1, -1000:], ref[-1, -1000:])          # the far end of the last row
        e_all = float(((out.float() - ref.float()).abs().max()) / ref.float().abs().max())
        assert e < 2e-2 and e_all < 2e-2, f"{name}: rel err {e_all:.2e} (tail {e:.2e})"
        notes.append(f"{name}: rel err {e_all:.1e}")
        del out
    return f"T={t}, N={n} (T*N = {t * n:,}): " + "; ".join(notes)


CHECKS = [check_determinism, check_fp64, check_graphs_reverse, check_two_streams, check_native_capture,
          check_auto_choice, check_int64_indexing]


def _write(out_dir, device, dry_run, records):
    """``stress.json`` with every record so far (rewritten after each check: a kill keeps them)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "stress.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"device": device, "dry_run": dry_run, "checks": records}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "stress.json"))


def run_checks(ctx, only, out_dir, dry_run, checks=None):
    """Run each check in turn; ``[record]``. A check's failure (its exception, or a device
    fault that surfaces at the synchronisation after it) is recorded and the next check
    runs; ``stress.json`` is rewritten after every check."""
    import torch
    records = []
    for check in checks or CHECKS:
        name = check.__name__[len("check_"):]
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            detail, status = check(ctx), "passed"
            if ctx.device == "cuda":   # an asynchronous fault is this check's, not the next one's
                torch.cuda.synchronize()
        except Skip as exc:
            detail, status = f"skipped: {exc}", "skipped"
        except Exception as exc:  # noqa: BLE001  record it, run the next check
            detail, status = f"{type(exc).__name__}: {exc}", "FAILED"
            traceback.print_exc()
        if ctx.device == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001  a sticky fault: say so, keep the records
                detail = f"{detail}; then empty_cache: {type(exc).__name__}: {exc}"
        rec = dict(check=name, status=status, seconds=round(time.perf_counter() - t0, 2), detail=str(detail)[:500])
        records.append(rec)
        print(f"gpu_stress: {name:<16s} {status:<8s} {rec['seconds']:7.1f}s  {rec['detail']}", flush=True)
        _write(out_dir, ctx.device, dry_run, records)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, triton through the interpreter, small shapes")
    p.add_argument("--out", default=os.environ.get("OUT") or "stress_out")
    p.add_argument("--calls", type=int, default=None, help="repeated calls per determinism case")
    p.add_argument("--only", nargs="*", default=None, help="names of checks to run (e.g. fp64 auto_choice)")
    args = p.parse_args(argv)
    _setup(args.dry_run)
    import torch

    class Ctx:
        device = "cpu" if args.dry_run else "cuda"
        n = 400 if args.dry_run else 1_000_003
        calls = args.calls or (2 if args.dry_run else 300)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_stress: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    records = run_checks(Ctx, args.only, args.out, args.dry_run)
    failed = [r["check"] for r in records if r["status"] == "FAILED"]
    print(f"gpu_stress: {len(records) - len(failed)} of {len(records)} checks passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
