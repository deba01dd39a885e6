"""Train-step time and peak memory: joint LoRA vs Ortho-LoRA loop vs Ortho-LoRA grouped.

    python benchmarks/bench_train_step.py                       # CPU (and CUDA if present)
    python benchmarks/bench_train_step.py --tasks 4 --batch 8 --device cpu --out results.json

Model: a BERT-like encoder built from a config (4 layers, hidden 256, 4 heads, intermediate
1024, vocab 2000, sequence length 32 by default), peft LoRA r=8 on query/value, one linear
head per task on the CLS token. One optimizer step (AdamW) per measured step:

* joint:   one forward/backward of ``sum_t mean-loss_t`` over the concatenated batch, plain
           peft LoRA gradients (no projection): the cost floor;
* loop:    per task a forward and a backward of its own batch (the paper's method, the fair
           baseline), per-task gradients copied into the buffer, projection;
* grouped: one forward and one backward over the concatenated batch, per-task LoRA weight
           gradients as grouped products written into the buffer, projection.

Timing: for each (T, batch) one subprocess builds a model per method (same weights) and
runs their steps interleaved in a rotating order, ``--warmup`` rounds then ``--repeat``
rounds, so that load changes on a shared machine hit every method alike. The step time is
the median over rounds; "x joint" is the median over rounds of (method time / joint time
of the same round). "cpu ms" is the process CPU time of a step (``time.process_time``, all
threads), less sensitive to other processes on a shared machine than wall time (run with
``--threads 1`` for the cleanest comparison of work done).

Peak memory: every (method, T, batch) runs ``warmup + 1`` steps in a fresh subprocess,
starting after the model and optimizer are built (so optimizer-state creation and the
``[T, N]`` buffer are included, identically for every method):

* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the first step
  (allocator-exact);
* CPU: the peak of the bytes allocated through glibc malloc (``mallinfo2``: heap chunks in
  use + mmapped chunks; every CPU tensor, autograd buffer and Python object comes from
  there) sampled after every aten op of forward and backward by a ``TorchDispatchMode``,
  minus the value before the first step. Unlike RSS it does not count freed memory the
  allocator keeps cached, so it is comparable across methods (temporaries that live only
  inside one op are not seen, for every method alike). The JSON also holds ``rss_peak_mib``:
  the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
  minus the resident set before the steps, which does include allocator caching.

Ratios are against joint for the same (T, batch).

Reference run (2026-11-22, shared 2-core CPU VM, torch 2.13 CPU, native projection backend):
``python benchmarks/bench_train_step.py --threads 1 --repeat 11 --warmup 2``. With the
default 2 threads on that (oversubscribed) VM every step was 3-5x slower and the ratios
noisy (grouped 1.08-1.17x joint at T=4, bs=8; loop up to 3x); single-thread figures:

    device  T  bs method    median ms  x joint   cpu ms  x joint  peak MiB  x joint
    -------------------------------------------------------------------------------
    cpu     2   8 joint          91.3    1.000     91.3    1.000      47.0    1.000
    cpu     2   8 loop          101.8    1.103    101.8    1.104      29.2    0.622
    cpu     2   8 grouped        93.9    1.023     93.9    1.024      47.5    1.011
    cpu     2  32 joint         359.4    1.000    359.4    1.000     155.4    1.000
    cpu     2  32 loop          355.7    0.992    355.6    0.992      83.7    0.538
    cpu     2  32 grouped       361.6    1.003    361.6    1.003     156.0    1.003
    cpu     4   8 joint         180.8    1.000    180.8    1.000      83.1    1.000
    cpu     4   8 loop          206.8    1.140    206.8    1.140      29.5    0.354
    cpu     4   8 grouped       187.8    1.028    187.8    1.027      83.9    1.009
    cpu     4  32 joint         739.0    1.000    738.9    1.000     300.1    1.000
    cpu     4  32 loop          715.1    0.970    714.8    0.969      84.0    0.280
    cpu     4  32 grouped       747.0    1.012    746.8    1.012     300.9    1.003
    cpu     8   8 joint         354.5    1.000    354.5    1.000     155.5    1.000
    cpu     8   8 loop          417.8    1.180    417.8    1.179      30.0    0.193
    cpu     8   8 grouped       361.1    1.012    361.0    1.012     156.8    1.008
    cpu     8  32 joint        1481.9    1.000   1481.8    1.000     589.4    1.000
    cpu     8  32 loop         1413.3    0.957   1413.2    0.957      84.5    0.143
    cpu     8  32 grouped      1608.0    1.133   1607.9    1.133     590.6    1.002

Grouped stays within a few percent of joint and within 1% of its peak memory. Repeat runs
of T=8, bs=32 alone gave 1.00x, 0.996x and 1.09x: noise of this VM; a microbenchmark of the
per-task weight-gradient products against joint's single product at these shapes shows
both under 1.2 ms per LoRA layer, i.e. ~1% of the step. Loop's peak memory is lower
(each forward holds one task's activations), its time higher for small per-task batches.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

METHODS = ("joint", "loop", "grouped")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(args, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                     max_position_embeddings=max(64, args.seq_len), hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    enc = get_peft_model(BertModel(cfg, add_pooling_layer=False),
                         LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1,
                                    target_modules=list(args.targets)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc
            self.heads = nn.ModuleList(nn.Linear(args.hidden, 3) for _ in range(args.tasks))

        def forward(self, ids, mask, task_ids, labels, num_tasks):
            from ortholora_kernels import per_task_mean_loss
            h = self.enc(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            logits = torch.stack([hd(h) for hd in self.heads], 1)[torch.arange(h.shape[0], device=h.device), task_ids]
            per_ex = nn.functional.cross_entropy(logits, labels, reduction="none")
            return per_task_mean_loss(per_ex, task_ids, num_tasks)

    net = Net().to(device)
    net.train()
    return net


def make_step(args, method, device):
    """A fresh model (same weights for every method) and a closure running one optimizer step.

    ``method`` is joint/loop/grouped, or the same with ``-compiled``: the model then runs
    through ``torch.compile(net)`` (forward and its backward compiled; the grouped forward
    runs inside ``record``, as a compiled model needs); project_ and the optimizer stay eager.
    """
    import torch
    from ortholora_kernels import OrthoLoRA

    compiled = method.endswith("-compiled")
    method = method.removesuffix("-compiled")
    plain = build(args, device)
    net = torch.compile(plain) if compiled else plain
    t, bs, L = args.tasks, args.batch, args.seq_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (t * bs, L), generator=g).to(device)
    mask = torch.ones(t * bs, L, dtype=torch.long, device=device)
    labels = torch.randint(0, 3, (t * bs,), generator=g).to(device)
    task_ids_cpu = torch.arange(t).repeat_interleave(bs)
    task_ids = task_ids_cpu.to(device)
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ortho = None
    if method != "joint":
        ortho = OrthoLoRA(plain.enc, t, granularity="ab", collect="loop" if method == "loop" else "grouped",
                          seed=0, backend=args.backend)

    def step():
        if method == "joint":
            net(ids, mask, task_ids, labels, t).sum().backward()
        elif method == "grouped":
            with ortho.record(task_ids_cpu):
                net(ids, mask, task_ids, labels, t).sum().backward()
            ortho.project_()
        else:
            for k in range(t):
                sl = slice(k * bs, (k + 1) * bs)
                with ortho.task(k):
                    net(ids[sl], mask[sl], task_ids[sl], labels[sl], t)[k].backward()
            ortho.project_()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_time(args) -> list[dict]:
    """All methods in one process, steps interleaved (rotating order), so that load drift on
    a shared machine hits every method alike. Ratios are medians of per-round ratios."""
    import torch
    device = torch.device(args.device)
    steps = {m: make_step(args, m, device) for m in args.methods}
    for _ in range(args.warmup):
        for m in args.methods:
            steps[m]()
    _sync(device)
    times = {m: [] for m in args.methods}
    cpu_times = {m: [] for m in args.methods}
    for rep in range(args.repeat):
        order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
        for m in order:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[m]()
            _sync(device)
            times[m].append(time.perf_counter() - t0)
            cpu_times[m].append(time.process_time() - c0)
    out = []
    for m in args.methods:
        r = {"method": m, "device": args.device, "tasks": args.tasks, "batch": args.batch, "seq_len": args.seq_len,
             "median_ms": 1e3 * statistics.median(times[m]), "min_ms": 1e3 * min(times[m]),
             "cpu_ms": 1e3 * statistics.median(cpu_times[m]),
             "threads": torch.get_num_threads()}
        if "joint" in times:
            r["time_vs_joint"] = statistics.median(a / b for a, b in zip(times[m], times["joint"]))
            r["cpu_vs_joint"] = statistics.median(a / b for a, b in zip(cpu_times[m], cpu_times["joint"]))
        if m.endswith("-compiled"):  # the targets: against compiled joint and against itself eager
            for key, base in (("vs_joint_compiled", "joint-compiled"), ("vs_eager", m.removesuffix("-compiled"))):
                if base in times:
                    r[key] = statistics.median(a / b for a, b in zip(times[m], times[base]))
        out.append(r)
    return out


def _malloc_in_use():
    """Bytes currently allocated through glibc malloc (heap + mmapped chunks), or None."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def now():
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd
    return now


def _peak_tracker(now):
    """A dispatch mode sampling ``now()`` after every aten op (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            v = now()
            if v > self.peak:
                self.peak = v
            return out
    return Peak()


def worker_mem(args) -> dict:
    """Peak memory of ``warmup + 1`` steps of one method in a fresh process (see module doc)."""
    import gc
    import torch
    device = torch.device(args.device)
    step = make_step(args, args.method, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        now = _malloc_in_use()
        tracker = _peak_tracker(now) if now is not None else None
        hwm_ok = _reset_hwm()
        base_rss = _status_kb("VmRSS") * 1024
        base = now() if now is not None else 0
    if device.type == "cpu" and tracker is not None:
        tracker.peak = base
        with tracker:
            for _ in range(max(args.warmup, 1) + 1):
                step()
    else:
        for _ in range(max(args.warmup, 1) + 1):
            step()
    _sync(device)
    out = {"method": args.method}
    if device.type == "cuda":
        out.update(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2 ** 20, mem="cuda max_memory_allocated delta")
    else:
        out["rss_peak_mib"] = (_status_kb("VmHWM") * 1024 - base_rss) / 2 ** 20 if hwm_ok else float("nan")
        if tracker is not None:
            out.update(peak_mib=(tracker.peak - base) / 2 ** 20, mem="cpu malloc in-use peak (mallinfo2 after every op)")
        else:
            out.update(peak_mib=out["rss_peak_mib"], mem="cpu VmHWM-VmRSS delta")
    return out


def _run_worker(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="per-task batch sizes")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    choices=list(METHODS) + [m + "-compiled" for m in METHODS])
    ap.add_argument("--compile", action="store_true",
                    help="also time every method on torch.compile(model), interleaved with the eager ones")
    ap.add_argument("--device", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["query", "value"])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in the workers")
    ap.add_argument("--out", default=None, help="write results to this .json or .csv")
    ap.add_argument("--no-mem", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--worker", choices=["time", "mem"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        args.tasks, args.batch, args.device = args.tasks[0], args.batch[0], args.device[0]
        print(json.dumps(worker_time(args) if args.worker == "time" else worker_mem(args)))
        return

    if args.compile:
        args.methods = [m for m in args.methods if not m.endswith("-compiled")]
        args.methods += [m + "-compiled" for m in args.methods]
    devices = args.device
    if devices is None:
        import torch
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    passthrough = ["--seq-len", str(args.seq_len), "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--heads", str(args.heads), "--vocab", str(args.vocab), "--rank", str(args.rank),
                   "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--targets", *args.targets]
    if args.backend:
        passthrough += ["--backend", args.backend]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    for dev in devices:
        for t in args.tasks:
            for bs in args.batch:
                base = [sys.executable, os.path.abspath(__file__), "--tasks", str(t), "--batch", str(bs),
                        "--device", dev, *passthrough]
                res = _run_worker(base + ["--worker", "time", "--methods", *args.methods])
                for r in res:
                    if not args.no_mem:
                        r.update(_run_worker(base + ["--worker", "mem", "--method", r["method"]]))
                    rows.append(r)
                    print(f"  done {dev} T={t} bs={bs} {r['method']}: {r['median_ms']:.1f} ms "
                          f"{r.get('peak_mib', float('nan')):.1f} MiB", file=sys.stderr, flush=True)
    joint = {(r["device"], r["tasks"], r["batch"]): r for r in rows if r["method"] == "joint"}
    for r in rows:
        j = joint.get((r["device"], r["tasks"], r["batch"]))
        r.setdefault("time_vs_joint", float("nan"))
        r.setdefault("cpu_vs_joint", float("nan"))
        r.setdefault("peak_mib", float("nan"))
        r["mem_vs_joint"] = r["peak_mib"] / j["peak_mib"] if j and j.get("peak_mib", 0) > 0 else float("nan")
    hdr = (f"{'device':6} {'T':>2} {'bs':>3} {'method':17} {'median ms':>10} {'x joint':>8} {'cpu ms':>8} {'x joint':>8} "
           f"{'peak MiB':>9} {'x joint':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['device']:6} {r['tasks']:>2} {r['batch']:>3} {r['method']:17} {r['median_ms']:>10.1f} "
              f"{r['time_vs_joint']:>8.3f} {r['cpu_ms']:>8.1f} {r['cpu_vs_joint']:>8.3f} {r['peak_mib']:>9.1f} "
              f"{r['mem_vs_joint']:>8.3f}")
    for r in rows:
        if "vs_joint_compiled" in r or "vs_eager" in r:
            print(f"{r['device']:6} {r['tasks']:>2} {r['batch']:>3} {r['method']:17} "
                  f"x joint-compiled {r.get('vs_joint_compiled', float('nan')):.3f}   "
                  f"x eager {r['method'].removesuffix('-compiled')} {r.get('vs_eager', float('nan')):.3f}")
    if rows:
        print(f"memory: {sorted(set(r.get('mem', 'not measured') for r in rows))}; x joint (time) = median of per-round ratios; "
              f"seq_len={args.seq_len}, hidden={args.hidden}, layers={args.layers}, r={args.rank}, threads={rows[0]['threads']}")
    if args.out:
        if args.out.endswith(".csv"):
            with open(args.out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
