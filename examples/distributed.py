"""Ortho-LoRA under DDP: every rank projects the same global per-task gradients.

    torchrun --nproc_per_node 2 examples/distributed.py                 # gloo on CPU, 30 steps
    torchrun --nproc_per_node 2 examples/distributed.py --steps 2       # the smallest run (the tests run it)
    torchrun --nproc_per_node 8 examples/distributed.py --backend nccl  # GPUs

Two rules make W ranks train exactly like one process on the union of their batches: an int
``seed`` (every rank draws the same projection orders) and per-task means over the GLOBAL
per-task counts (``global_task_counts``: one ``[T]`` all-reduce per batch). ``project_()``
all-reduces the ``[T, N]`` per-task LoRA buffer before projecting; DDP reduces the rest (the
heads) as usual, and OrthoLoRA keeps the LoRA parameters away from DDP's own reduction.
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from toy import NUM_TASKS, MultiTaskModel, lora_encoder, make_rows

from ortholora_kernels import OrthoLoRA, per_task_mean_loss
from ortholora_kernels.distributed import global_task_counts
from ortholora_kernels.integrations import MultiTaskCollator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backend", default="gloo", help="process group backend (default: %(default)s)")
    a = ap.parse_args(argv)

    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if a.backend == "nccl" else torch.device("cpu")

    model = MultiTaskModel(lora_encoder(seed=0)).to(device)            # the same initial weights on every rank
    ortho = OrthoLoRA(model, num_tasks=NUM_TASKS, seed=0)              # an int seed: the same orders everywhere
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rows = make_rows(64)
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=world, rank=rank, seed=0)
    loader = torch.utils.data.DataLoader(rows, batch_size=12, sampler=sampler,
                                         collate_fn=MultiTaskCollator(num_tasks=NUM_TASKS))

    for _, batch in zip(range(a.steps), itertools.cycle(loader)):
        batch = {k: v.to(device) for k, v in batch.items()}
        task_ids = batch["task_ids"]
        counts = global_task_counts(task_ids, NUM_TASKS)               # [T], summed over ranks / W
        with ortho.record(task_ids):
            logits = ddp(batch["input_ids"], batch["attention_mask"], task_ids)["logits"]
            per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
            per_task_mean_loss(per_example, task_ids, NUM_TASKS, counts=counts).sum().backward()
        ortho.project_()                                               # reduces the LoRA part over ranks
        optimizer.step()
        optimizer.zero_grad()

    # every rank holds the same parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first = flat.clone()
    dist.broadcast(first, src=0)
    same = torch.tensor([float(torch.equal(flat, first))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"{world} ranks, {a.steps} steps: parameters identical on every rank: {bool(same.item())}")
    ortho.remove()
    dist.destroy_process_group()
    if not same.item():
        raise SystemExit("ranks diverged")


if __name__ == "__main__":
    main()
