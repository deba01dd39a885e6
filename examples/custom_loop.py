"""Ortho-LoRA in your own training loop: one forward, one backward, one projection per step.

    python examples/custom_loop.py                 # 60 steps, a few seconds on a CPU
    python examples/custom_loop.py --steps 2       # the smallest run (the tests run it)

Every step: the batch mixes the tasks (``task_ids`` per row); inside ``ortho.record`` the
grouped collector writes each task's LoRA gradient into its own row of a ``[T, N]`` buffer
during the ONE backward of the summed per-task mean losses; ``ortho.project_()`` projects
them (PCGrad, A and B apart) and adds the sum to the LoRA ``.grad``. Clipping, the optimizer
and the scheduler are the usual ones. The heads keep their ordinary gradients.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from toy import NUM_TASKS, MultiTaskModel, lora_encoder, make_rows

from ortholora_kernels import OrthoLoRA, per_task_mean_loss
from ortholora_kernels.integrations import MultiTaskCollator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=24, help="rows per step, all tasks mixed")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=20)
    a = ap.parse_args(argv)

    model = MultiTaskModel(lora_encoder(seed=0))
    loader = torch.utils.data.DataLoader(make_rows(64), batch_size=a.batch_size, shuffle=True,
                                         collate_fn=MultiTaskCollator(num_tasks=NUM_TASKS),
                                         generator=torch.Generator().manual_seed(0))
    # the LoRA matrices of model.encoder are projected; the heads are left alone
    ortho = OrthoLoRA(model, num_tasks=NUM_TASKS, granularity="ab", collect="grouped", seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))   # warm-up

    for step, batch in zip(range(1, a.steps + 1), itertools.cycle(loader)):
        task_ids = batch["task_ids"]                                   # [B] long, from the collator
        with ortho.record(task_ids):                                   # the forward runs inside too
            logits = model(batch["input_ids"], batch["attention_mask"], task_ids)["logits"]
            per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
            loss = per_task_mean_loss(per_example, task_ids, NUM_TASKS).sum()   # sum of per-task means
            loss.backward()
        ortho.project_()                                               # projected sum -> LoRA .grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % a.log_every == 0 or step == a.steps:
            stats = ortho.stats_dict()                                 # the one host sync
            print(f"step {step}: loss {loss.item():.3f}, conflicting pairs "
                  f"A {stats['ortho/conflict_fraction/A']:.2f} B {stats['ortho/conflict_fraction/B']:.2f}")
    ortho.remove()
    return loss.item()


if __name__ == "__main__":
    main()
