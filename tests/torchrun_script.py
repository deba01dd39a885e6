"""Launched by tests/test_distributed_launch.py: ``torchrun --nproc_per_node 2 torchrun_script.py OUT``
(or plainly, ``python torchrun_script.py OUT``, for the one-process reference on the union batch).

Trains the same tiny peft classifier twice, with OrthoLoRATrainer and with a hand-written loop
under accelerate's ``Accelerator.prepare`` (OrthoLoRA built on the prepared, DDP-wrapped
model), and saves rank 0's parameters to ``OUT/{trainer,accelerate}-world{W}.pt``.
Per-device batch ``BS`` on W ranks equals one process with ``W * BS`` (sequential data; the
ranks take batches round-robin, and the per-task means use the global counts).
"""
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # tests/ (models.py) and this checkout's package
from models import task_rows, tiny_peft_classifier  # noqa: E402

T, N_ROWS, BS, ACC, STEPS = 3, 48, 4, 2, 3


def _rows(seed=0):
    return task_rows(N_ROWS, T, seed=seed)


def _params(model):
    model = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainer_run(out, world):
    from transformers import TrainingArguments

    from ortholora_kernels.integrations import MultiTaskCollator, OrthoLoRATrainer
    model = tiny_peft_classifier("roberta", num_labels=2)
    args = TrainingArguments(output_dir=out, report_to="none", use_cpu=True, per_device_train_batch_size=BS * (2 // world),
                             gradient_accumulation_steps=ACC, max_steps=STEPS, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                             train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0,
                             ddp_backend="gloo" if world > 1 else None)
    trainer = OrthoLoRATrainer(model=model, args=args, train_dataset=_rows(), num_tasks=T, ortho_seed=4,
                               data_collator=MultiTaskCollator(num_tasks=T))
    trainer.train()
    return _params(model)


def accelerate_run(out, world):
    from accelerate import Accelerator

    from ortholora_kernels import OrthoLoRA, per_task_mean_loss
    from ortholora_kernels.distributed import global_task_counts
    from ortholora_kernels.integrations import MultiTaskCollator
    acc = Accelerator(cpu=True)
    model = tiny_peft_classifier("roberta", num_labels=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    ortho = OrthoLoRA(model, T, seed=4)  # built on the prepared (DDP) model
    coll, rows, rank = MultiTaskCollator(num_tasks=T), _rows(1), acc.process_index
    for step in range(STEPS):
        k = step * 2 * BS
        mine = rows[k:k + 2 * BS] if world == 1 else rows[k + rank * BS:k + (rank + 1) * BS]
        batch = coll(mine)
        with ortho.record(batch["task_ids"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_ex = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            counts = global_task_counts(batch["task_ids"], T)
            acc.backward(per_task_mean_loss(per_ex, batch["task_ids"], T, counts=counts).sum())
        ortho.project_()
        opt.step()
        opt.zero_grad()
    return _params(model)


if __name__ == "__main__":
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    res = {"trainer": trainer_run(out, world), "accelerate": accelerate_run(out, world)}
    if int(os.environ.get("RANK", "0")) == 0:
        for k, v in res.items():
            torch.save(v, os.path.join(out, f"{k}-world{world}.pt"))
