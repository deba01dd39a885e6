"""OrthoLoRATrainer: one class changed in a Trainer script; equal to a hand-written loop."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from models import VOCAB, tiny_peft_classifier  # noqa: E402
from ortholora_kernels import OrthoLoRA, per_task_mean_loss  # noqa: E402
from ortholora_kernels.integrations import MultiTaskCollator, OrthoLoRATrainer  # noqa: E402

T, N_ROWS, BS, ACC, STEPS = 3, 24, 6, 2, 2


def _model():
    return tiny_peft_classifier("roberta", num_labels=2)


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(N_ROWS):
        t = int(torch.randint(0, T, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": int(torch.randint(0, 2, (1,), generator=g)),
                     "task_id": t})
    return rows


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=BS,
                             gradient_accumulation_steps=ACC, max_steps=STEPS, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.1, logging_steps=1, save_strategy="no",
                             train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0, **kw)


def _train_with_trainer(tmp_path, collect):
    model = _model()
    trainer = OrthoLoRATrainer(model=model, args=_args(tmp_path), train_dataset=_rows(),
                               data_collator=MultiTaskCollator(num_tasks=T), num_tasks=T, ortho_collect=collect,
                               ortho_seed=4)
    trainer.train()
    return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_by_hand():
    model = _model()
    model.train()
    ortho = OrthoLoRA(model, T, seed=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    coll = MultiTaskCollator(num_tasks=T)
    rows = _rows()
    for step in range(STEPS):
        for micro in range(ACC):
            k = (step * ACC + micro) * BS
            batch = coll(rows[k:k + BS])
            with ortho.record(batch["task_ids"]):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_ex = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                (per_task_mean_loss(per_ex, batch["task_ids"], T).sum() / ACC).backward()
        ortho.project_()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_equals_hand_written_loop(tmp_path):
    trainer, got = _train_with_trainer(tmp_path, "grouped")
    want = _train_by_hand()
    init = dict(_model().named_parameters())
    lora = [n for n in got if "lora_" in n]
    assert lora and all(not torch.allclose(got[n], init[n]) for n in lora)
    assert any("classifier" in n and not torch.allclose(got[n], init[n]) for n in got)  # modules_to_save trained
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert trainer.ortho.num_steps == STEPS  # one projection per optimizer step, not per micro-batch
    logged = [h for h in trainer.state.log_history if "ortho/mean_cosine/A" in h]
    assert len(logged) == STEPS and 0.0 <= logged[0]["ortho/conflict_fraction/B"] <= 1.0
    trainer.ortho.remove()


def test_trainer_loop_equals_grouped(tmp_path):
    t1, g = _train_with_trainer(tmp_path / "g", "grouped")
    t2, l = _train_with_trainer(tmp_path / "l", "loop")
    for n in g:
        torch.testing.assert_close(g[n], l[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    t1.ortho.remove()
    t2.ortho.remove()


def test_collator_sorts_and_checks():
    rows = [{"input_ids": [5, 6], "labels": 0, "task_id": 2}, {"input_ids": [7, 8], "labels": 1, "task_id": 0},
            {"input_ids": [9, 9], "labels": 1, "task_id": 2}]
    b = MultiTaskCollator(num_tasks=3)(rows)
    assert b["task_ids"].tolist() == [0, 2, 2]
    assert b["input_ids"].tolist() == [[7, 8], [5, 6], [9, 9]]
    assert "task_id" not in b
    with pytest.raises(ValueError, match="task_ids"):
        MultiTaskCollator(num_tasks=2)(rows)
    with pytest.raises(KeyError, match="task_key"):
        MultiTaskCollator()([{"input_ids": [1], "labels": 0}])


def test_trainer_bf16_autocast_runs_and_stays_close(tmp_path):
    model = _model()
    args = _args(tmp_path, bf16=True)
    trainer = OrthoLoRATrainer(model=model, args=args, train_dataset=_rows(), data_collator=MultiTaskCollator(num_tasks=T),
                               num_tasks=T, ortho_seed=4)
    trainer.train()
    got = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.ortho.remove()
    want = _train_by_hand()
    init = dict(_model().named_parameters())
    for n in got:
        if "lora_" in n:
            assert torch.isfinite(got[n]).all()
            step_fp32 = (want[n] - init[n]).norm()
            # the bf16 run moves the same way as the fp32 run (to bf16 accuracy)
            assert (got[n] - want[n]).norm() <= 0.1 * step_fp32 + 1e-6, n
