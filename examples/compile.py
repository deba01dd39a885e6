"""The whole Ortho-LoRA step under ``torch.compile(fullgraph=True)``, checked against eager.

    python examples/compile.py                          # inductor; the first step compiles (~a minute on 2 cores)
    python examples/compile.py --steps 2 --backend aot_eager   # the smallest run (the tests run it)

The forward, the backward of the summed per-task losses and ``project_()`` are ONE graph
(``rng="counter"`` puts the projection orders' generator on the device, in the graph;
``trace_autograd_ops`` lets Dynamo trace ``loss.backward()``); the optimizer step is compiled
on its own (torch's ``Optimizer.step`` breaks graphs on purpose). A second copy of the model
trains eagerly on the same batches: the compiled step equals it step by step ONLY with
dropout off (``lora_dropout=0`` and no dropout in the model): the compiled graph draws its
dropout masks from another random stream than eager, so with dropout on both train
correctly but differently.
"""
from __future__ import annotations

import argparse
import copy
import itertools

import torch
import torch.nn.functional as F
from toy import NUM_TASKS, MultiTaskModel, lora_encoder, make_rows

from ortholora_kernels import OrthoLoRA, per_task_mean_loss
from ortholora_kernels.integrations import MultiTaskCollator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    a = ap.parse_args(argv)

    model = MultiTaskModel(lora_encoder(seed=0, dropout=0.0))          # dropout off: compiled == eager
    eager = copy.deepcopy(model)
    ortho = OrthoLoRA(model, NUM_TASKS, collect="grouped", seed=0, rng="counter")
    ortho_eager = OrthoLoRA(eager, NUM_TASKS, collect="grouped", seed=0, rng="counter")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    opt_eager = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=3e-3)

    def step(m, o, batch):
        logits = m(batch["input_ids"], batch["attention_mask"], batch["task_ids"])["logits"]
        per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
        loss = per_task_mean_loss(per_example, batch["task_ids"], NUM_TASKS).sum()
        loss.backward()
        return loss.detach(), o.project_().conflict_fraction

    loader = torch.utils.data.DataLoader(make_rows(32), batch_size=24, shuffle=True,
                                         collate_fn=MultiTaskCollator(num_tasks=NUM_TASKS),
                                         generator=torch.Generator().manual_seed(0))
    torch._dynamo.config.trace_autograd_ops = True                      # lets Dynamo trace loss.backward()
    compiled_step = torch.compile(lambda batch: step(model, ortho, batch), fullgraph=True, backend=a.backend)
    compiled_opt_step = torch.compile(opt.step, backend=a.backend)
    worst = 0.0
    for i, batch in zip(range(1, a.steps + 1), itertools.cycle(loader)):
        with ortho.record(batch["task_ids"]):                          # the forward runs inside record()
            loss, conflicts = compiled_step(batch)
        compiled_opt_step()
        opt.zero_grad()
        with ortho_eager.record(batch["task_ids"]):
            loss_eager, _ = step(eager, ortho_eager, batch)
        opt_eager.step()
        opt_eager.zero_grad()
        diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), eager.parameters()))
        worst = max(worst, diff)
        print(f"step {i}: loss compiled {loss.item():.5f} eager {loss_eager.item():.5f}, "
              f"conflicting pairs {conflicts.tolist()}, max parameter difference {diff:.1e}")
    assert worst < 1e-4, f"compiled and eager steps differ by {worst}"
    ortho.remove(), ortho_eager.remove()
    return worst


if __name__ == "__main__":
    main()
