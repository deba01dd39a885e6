"""Host time per eager call of the triton path, measured on CPU with the kernels recorded, not run.

    python benchmarks/bench_host_overhead.py [--tasks 8 32] [--calls 200] [--repeat 7]

What one GPU call costs the host besides the kernels: the custom-op
dispatch, the Python composition, allocations, and the backward's T x T solve and reverse
solve. The triton backend's host code runs on small CPU tensors with its kernel launches
recorded (as in scripts/compile_gpu.py), so the times are Python + aten dispatch only;
Triton's own launcher (a few us per launch on a GPU) is not included. Rows:

- ``project()`` through the custom op ``ortholora::project`` (``ops._EAGER_FAST_PATH =
  False``) vs its eager fast path (an autograd.Function, same forward and backward), and
  ``ops.forward`` alone (the composition: the floor);
- ``ops.backward`` with the solve and its reverse mode as torch ops
  (``triton_impl._FUSED_VJP = False``; here they run on CPU tensors, on a GPU each is a
  kernel launch) vs the fused reverse solve (one launch);
- a whole eager forward + backward, before (custom op, torch reverse solve) and after.

Interleaved in one process: each repeat times every row in turn; medians over repeats,
ratios against the baseline of the same repeat. Also the launches and aten ops per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench_host_overhead.py: unset TRITON_INTERPRET (kernels are recorded, not run)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ortholora_kernels import _args, ops  # noqa: E402
from ortholora_kernels.backends import triton_impl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import host_us_per_call, recorded_launches  # noqa: E402



class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _setup(t: int, n: int = 4096, segments: int = 2):
    offsets = [n * k // segments for k in range(segments + 1)]
    seg = _args.segments_for(offsets, n)
    g = torch.Generator().manual_seed(t)
    x = torch.randn((t, n), generator=g)
    order = _args.draw_orders(segments, t, "cpu", g)
    xd = x.double()
    gram = torch.stack([xd[:, a:b] @ xd[:, a:b].T for a, b in zip(offsets, offsets[1:])])
    dout = torch.randn((n,), generator=g)
    return seg, offsets, x, order, gram, dout


def _rows(t: int):
    """``{row: (fn, baseline row)}``; each fn sets the switches it needs (rows interleave)."""
    import ortholora_kernels as ok
    seg, offsets, x, order, gram, dout = _setup(t)
    xg = x.clone().requires_grad_()

    def use(fast, fused):
        ops._EAGER_FAST_PATH, triton_impl._FUSED_VJP = fast, fused

    def project(fast):
        def run():
            use(fast, True)
            ok.project(x, offsets, order=order, backend="triton")
        return run

    def forward():
        use(True, True)
        ops.forward(x, seg, order, "sum", "triton")

    def step(fast, fused):
        def run():
            use(fast, fused)
            ok.project(xg, offsets, order=order, backend="triton").backward(dout)
        return run

    def backward(fused):
        def run():
            use(True, fused)
            ops.backward(x, dout, gram, order, seg, "sum", "triton")
        return run
    return {
        "fwd: project() through the custom op": (project(False), None),
        "fwd: project(), eager fast path": (project(True), "fwd: project() through the custom op"),
        "fwd: ops.forward alone": (forward, "fwd: project() through the custom op"),
        "bwd: ops.backward, torch reverse solve": (backward(False), None),
        "bwd: ops.backward, fused reverse solve": (backward(True), "bwd: ops.backward, torch reverse solve"),
        "fwd+bwd before (custom op, torch reverse solve)": (step(False, False), None),
        "fwd+bwd after (fast path, fused reverse solve)": (step(True, True),
                                                           "fwd+bwd before (custom op, torch reverse solve)"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    p.add_argument("--repeat", type=int, default=7, help="interleaved repeats (median)")
    args = p.parse_args(argv)
    if triton_impl._IMPORT_ERROR is not None:
        sys.exit(f"triton: {triton_impl._IMPORT_ERROR}")
    log: list = []
    fused_vjp = triton_impl._FUSED_VJP
    fast = ops._EAGER_FAST_PATH
    recording = recorded_launches(triton_impl, log)
    recording.__enter__()
    # project() checks the backend can run: on CPU it needs the interpreter, unused here.
    triton_impl.BACKEND.availability = lambda device: None
    torch.set_num_threads(1)
    try:
        print(f"torch {torch.__version__}, 1 thread, N=4096, 2 segments, fp32, reduction sum; "
              f"{args.calls} calls x {args.repeat} interleaved repeats, median us per call; ratio = median "
              f"over repeats of row / baseline row of the same repeat")
        print("| T | row | us per call | ratio | launches | aten ops |")
        print("|---|---|---|---|---|---|")
        for t in args.tasks:
            rows = _rows(t)
            times = {name: [] for name in rows}
            for _ in range(args.repeat):
                for name, (fn, _) in rows.items():
                    times[name].append(host_us_per_call(fn, args.calls))
            for name, (fn, base) in rows.items():
                ratio = statistics.median(a / b for a, b in zip(times[name], times[base or name]))
                log.clear()
                fn()
                launches = len(log)
                ops_count = "-"     # project() under a dispatch mode takes the custom op path: not counted
                if name.startswith(("fwd: ops", "bwd:")):
                    with _Count() as c:
                        fn()
                    ops_count = c.n
                print(f"| {t} | {name} | {statistics.median(times[name]):.1f} | "
                      f"{'' if base is None else f'{ratio:.3f}'} | {launches} | {ops_count} |")
    finally:
        recording.__exit__(None, None, None)
        triton_impl._FUSED_VJP = fused_vjp
        del triton_impl.BACKEND.availability
        ops._EAGER_FAST_PATH = fast
    return 0


if __name__ == "__main__":
    sys.exit(main())
