"""Distributed reduction + projection per optimizer step: all-reduce mode vs sharded mode.

    python benchmarks/bench_distributed.py                      # 2 and 4 gloo processes on CPU
    python benchmarks/bench_distributed.py --world 2 --tasks 4 --numel 294912 --repeat 5

What one step does on every rank, from the local ``[T, N]`` per-task buffer to the projected
``[N]`` gradient every rank needs under DDP (``OrthoLoRA.project_``'s distributed part):

* all_reduce: all-reduce of ``[T, N]`` (sum, / R), then the projection of the whole buffer;
* sharded:    reduce-scatter of ``[T, N]``, partial Gram of the own ``N/R`` columns,
              all-reduce of ``[S, T, T]`` float64, solve, combine of the own shard,
              all-gather of ``[N]`` (:mod:`ortholora_kernels.distributed.sharded`).

Layouts (segments "ab", fp32): N = 294,912 is RoBERTa-base's LoRA r=8 on query/value (12
layers x 2 modules x 2 x 8 x 768); N = 3,981,312 is r=24 on every linear layer of the same
12-layer, 768-wide encoder (q, k, v, o, 768->3072, 3072->768).

Bytes per rank: "model" is counted from the collectives the step issues (``CommCounter``: the
ring algorithm's bytes, 2 B (R-1)/R for an all-reduce of B bytes, B (R-1)/R for a
reduce-scatter or all-gather of B bytes in total: what NCCL sends); "sent" is measured, the
bytes this process wrote to its gloo sockets during the step (``wchar`` of /proc/self/io;
gloo's own reduce-scatter sends 2 B (R-1)/R, so on gloo the sharded mode uses an all-to-all,
which sends B (R-1)/R, and sums the pieces locally). Time: per step, the max over ranks of the
wall time between two barriers, median over ``--repeat`` steps after ``--warmup``, the two
modes interleaved step by step so load changes on a shared machine hit both alike;
"sharded/all_reduce" is the median over steps of the per-step ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUTS = {  # numel -> (rank r, [(in, out)] of the LoRA'd linears of one layer), 12 layers
    294912: (8, [(768, 768)] * 2),
    3981312: (24, [(768, 768)] * 4 + [(768, 3072), (3072, 768)]),
}


def _layout(numel):
    from torch import nn

    from ortholora_kernels import LoRALayout
    r, mods = LAYOUTS[numel]
    entries = []
    for layer in range(12):
        for m, (fin, fout) in enumerate(mods):
            a = nn.Parameter(torch.empty(r, fin))
            b = nn.Parameter(torch.empty(fout, r))
            entries += [(f"l{layer}", "A", f"l{layer}.m{m}.A", a), (f"l{layer}", "B", f"l{layer}.m{m}.B", b)]
    lay = LoRALayout.from_params(entries)
    assert lay.numel == numel, lay.numel
    return lay


def _step(mode, buf, lay, offsets, plan, gen, ref):
    from ortholora_kernels import project
    from ortholora_kernels.distributed import all_reduce_task_grads
    from ortholora_kernels.distributed import sharded_project
    x = ref.clone()  # the step consumes its buffer (all-reduce is in place)
    if mode == "all_reduce":
        all_reduce_task_grads(x, average=True)
        return project(x, offsets, generator=gen, backend="torch")
    res, _ = sharded_project(x, plan, offsets, reduction="sum", generator=gen)
    return res.output


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar"):
                return int(line.split()[1])
    return 0


def _worker(rank, world, port, cases, warmup, repeat, out):
    from ortholora_kernels.distributed import CommCounter, ShardPlan
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for t, n in cases:
        lay = _layout(n)
        offsets = lay.segments("ab")
        plan = ShardPlan(lay, offsets, world, rank)
        ref = torch.randn(t, n, generator=torch.Generator().manual_seed(rank))
        times = {"all_reduce": [], "sharded": []}
        sent = {}
        outs = {}
        for i in range(warmup + repeat):
            for mode in (("all_reduce", "sharded") if i % 2 == 0 else ("sharded", "all_reduce")):
                gen = torch.Generator().manual_seed(i)
                dist.barrier()
                with CommCounter() as c:
                    w0 = _wchar()
                    t0 = time.perf_counter()
                    outs[mode] = _step(mode, None, lay, offsets, plan, gen, ref)
                    el = torch.tensor([time.perf_counter() - t0])
                    w1 = _wchar()
                dist.all_reduce(el, op=dist.ReduceOp.MAX)
                sent[mode] = (c.bytes, w1 - w0)
                if i >= warmup:
                    times[mode].append(el.item())
        err = ((outs["sharded"] - outs["all_reduce"]).norm() / outs["all_reduce"].norm()).item()
        ratios = [s / a for s, a in zip(times["sharded"], times["all_reduce"])]
        rows.append(dict(world=world, tasks=t, numel=n, bytes_all_reduce=sent["all_reduce"][0],
                         bytes_sharded=sent["sharded"][0], sent_all_reduce=sent["all_reduce"][1],
                         sent_sharded=sent["sharded"][1], ms_all_reduce=1e3 * statistics.median(times["all_reduce"]),
                         ms_sharded=1e3 * statistics.median(times["sharded"]), time_ratio=statistics.median(ratios),
                         rel_diff=err))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tasks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--numel", type=int, nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    args = ap.parse_args(argv)
    cases = [(t, n) for n in args.numel for t in args.tasks]
    allrows = []
    print("MB per rank per step: model (ring) / sent (measured on the gloo sockets)")
    print(f"{'R':>2} {'T':>2} {'N':>9} {'MB all_reduce':>15} {'MB sharded':>15} {'ratio':>6} "
          f"{'ms all_reduce':>14} {'ms sharded':>11} {'t ratio':>8} {'rel diff':>9}")
    for world in args.world:
        tmp = f"/tmp/bench_distributed_{os.getpid()}_{world}.json"
        mp.start_processes(_worker, args=(world, _port(), cases, args.warmup, args.repeat, tmp), nprocs=world,
                           start_method="spawn")
        with open(tmp) as f:
            rows = json.load(f)
        os.remove(tmp)
        for r in rows:
            ar = f"{r['bytes_all_reduce'] / 1e6:.1f}/{r['sent_all_reduce'] / 1e6:.1f}"
            sh = f"{r['bytes_sharded'] / 1e6:.1f}/{r['sent_sharded'] / 1e6:.1f}"
            print(f"{r['world']:>2} {r['tasks']:>2} {r['numel']:>9} {ar:>15} {sh:>15} "
                  f"{r['sent_sharded'] / r['sent_all_reduce']:>6.3f} "
                  f"{r['ms_all_reduce']:>14.1f} {r['ms_sharded']:>11.1f} {r['time_ratio']:>8.2f} {r['rel_diff']:>9.1e}")
        allrows += rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(allrows, f, indent=1)


if __name__ == "__main__":
    main()
