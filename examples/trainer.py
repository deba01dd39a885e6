"""Ortho-LoRA with the Hugging Face ``Trainer``: change the class, add ``num_tasks``.

    python examples/trainer.py                     # 60 steps on a CPU
    python examples/trainer.py --steps 2           # the smallest run (the tests run it)

What to know:

* rows carry their task in a ``task_id`` key; :class:`MultiTaskCollator` turns it into the
  batch's ``task_ids`` (and sorts the rows by task);
* the model here has one head per task, so it needs the task ids: ``pass_task_ids=True``;
* the ``loss`` the Trainer logs is the SUM of the per-task mean losses of the batch (T tasks
  of loss ~0.69 log ~2.1), the quantity whose per-task gradients are projected; the
  ``ortho/...`` entries beside it are the projection's statistics;
* checkpoints hold ``ortholora_state.pt``: ``train(resume_from_checkpoint=...)`` continues
  exactly.
"""
from __future__ import annotations

import argparse
import tempfile

from toy import NUM_TASKS, MultiTaskModel, lora_encoder, make_rows
from transformers import TrainingArguments

from ortholora_kernels.integrations import MultiTaskCollator, OrthoLoRATrainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    a = ap.parse_args(argv)

    out = a.out or tempfile.mkdtemp(prefix="ortholora_trainer_")
    args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=24, learning_rate=3e-3,
                             warmup_steps=5, logging_steps=max(1, a.steps // 3), save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = OrthoLoRATrainer(model=MultiTaskModel(lora_encoder(seed=0)), args=args, train_dataset=make_rows(64),
                               data_collator=MultiTaskCollator(num_tasks=NUM_TASKS), num_tasks=NUM_TASKS,
                               pass_task_ids=True, log_ortho_stats="summary")
    result = trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print({k: round(v, 3) for k, v in entry.items() if k == "loss" or k.startswith("ortho/conflict")})
    trainer.ortho.remove()
    return result


if __name__ == "__main__":
    main()
