"""Packed sequences: train-step time of grouped per-token collection vs the loop vs joint.

    python benchmarks/bench_packed.py --threads 1 --repeat 9

Model: a Llama-like causal LM from a ``LlamaConfig`` (``--layers`` 4, ``--hidden`` 256,
vocab 2000), peft LoRA r=8 on q/v/down projections. Batch: ``--rows`` rows of ``--seq``
tokens, each packed with documents of random tasks and lengths (a block-diagonal causal
mask keeps documents apart; the tail of a row is padding, task id -1). One step = forward,
backward, (projection), SGD step:

* joint:   one backward of ``sum_t mean-loss_t``, plain LoRA gradients (the cost floor);
* loop:    one forward, T backwards with ``retain_graph`` (per-token ids cannot split one
           backward any other way), projection;
* grouped: one forward, one backward in ``record(token_task_ids)``, projection.

The methods run interleaved in a rotating order in one process (``--warmup`` rounds, then
``--repeat`` rounds); "x joint" is the median over rounds of (method time / joint time of
the same round), so machine load hits every method alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    m.train()
    return m


def packed_batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = args.rows, args.seq
    ids = torch.randint(0, 2000, (b, s), generator=g)
    doc = torch.empty(b, s, dtype=torch.long)
    task = torch.full((b, s), -1, dtype=torch.long)
    pos = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        start, k = 0, 0
        while start < s - 8:
            n = int(torch.randint(8, s // 2, (1,), generator=g))
            n = min(n, s - 8 - start) if start + n > s - 8 else n
            doc[r, start:start + n] = k
            task[r, start:start + n] = int(torch.randint(0, args.tasks, (1,), generator=g))
            pos[r, start:start + n] = torch.arange(n)
            start, k = start + n, k + 1
        doc[r, start:] = 10_000 + torch.arange(s - start)
    mask = (torch.tril(torch.ones(s, s, dtype=torch.bool)) & (doc[:, :, None] == doc[:, None, :]))[:, None]
    nxt = torch.zeros(b, s, dtype=torch.bool)
    nxt[:, :-1] = (doc[:, 1:] == doc[:, :-1]) & (task[:, :-1] >= 0)
    return ids, mask, pos, task, torch.where(nxt, task, torch.full_like(task, -1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ortholora_kernels import OrthoLoRA, per_task_mean_loss
    ids, mask, pos, task, loss_task = packed_batch(args)
    t = args.tasks
    present = sorted(set(task[task >= 0].tolist()))

    def losses(m):
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return per_task_mean_loss(ce, loss_task[:, :-1], t)

    runs = {}
    for name in ("joint", "loop", "grouped"):
        m = build(args)
        ortho = None if name == "joint" else OrthoLoRA(m, t, collect=name, seed=0)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, ortho=ortho, opt=opt, name=name):
            if name == "joint":
                losses(m).sum().backward()
            elif name == "loop":
                ls = losses(m)
                ortho.backward([ls[k] if k in present else None for k in range(t)])
                ortho.project_()
            else:
                with ortho.record(task):
                    losses(m).sum().backward()
                ortho.project_()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[name] = step
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(args.warmup + args.repeat):
        order = names[r % 3:] + names[:r % 3]
        for n in order:
            t0 = time.perf_counter()
            runs[n]()
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    print(f"T={t} rows={args.rows} seq={args.seq} layers={args.layers} hidden={args.hidden} "
          f"threads={torch.get_num_threads()} tasks present={len(present)}")
    print(f"{'method':8s} {'median ms':>10s} {'x joint':>8s}")
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], times["joint"]))
        print(f"{n:8s} {1000 * statistics.median(times[n]):10.1f} {ratio:8.3f}")


if __name__ == "__main__":
    main()
