"""OrthoLoRATrainer: one class changed in a Trainer script; equal to a hand-written loop."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from models import VOCAB, task_rows, tiny_peft_classifier  # noqa: E402
from ortholora_kernels import OrthoLoRA, per_task_mean_loss  # noqa: E402
from ortholora_kernels.integrations import MultiTaskCollator, OrthoLoRATrainer  # noqa: E402

T, N_ROWS, BS, ACC, STEPS = 3, 24, 6, 2, 2


def _model():
    return tiny_peft_classifier("roberta", num_labels=2)


def _rows(seed=0):
    return task_rows(N_ROWS, T, seed=seed)


def _args(tmp_path, **kw):
    kw = {**dict(max_steps=STEPS, save_strategy="no"), **kw}
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=BS,
                             gradient_accumulation_steps=ACC, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.1, logging_steps=1,
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


# ---------------------------------------------------------------------------- checkpoints / resume

def _resume_args(tmp_path, max_steps, **kw):
    return _args(tmp_path, **{**dict(max_steps=max_steps, save_strategy="steps", save_steps=2), **kw})


def test_resumed_run_is_bit_exact_at_three_tasks(tmp_path):
    """T=3: train 4 steps; resume a fresh Trainer from checkpoint-2: the same parameters bit for
    bit (main restarted the projection orders from the seed: ~5e-4 apart)."""
    import os

    from ortholora_kernels.integrations import ORTHO_STATE_NAME
    full = _model()
    t1 = OrthoLoRATrainer(model=full, args=_resume_args(tmp_path / "a", 4), train_dataset=_rows(),
                          data_collator=MultiTaskCollator(num_tasks=T), num_tasks=T, ortho_seed=4)
    t1.train()
    t1.ortho.remove()
    ckpt_dir = tmp_path / "a" / "checkpoint-2"
    state = torch.load(ckpt_dir / ORTHO_STATE_NAME, weights_only=True)
    assert state["num_steps"] == 2 and state["signature"]["num_tasks"] == T
    resumed = _model()
    t2 = OrthoLoRATrainer(model=resumed, args=_resume_args(tmp_path / "b", 4), train_dataset=_rows(),
                          data_collator=MultiTaskCollator(num_tasks=T), num_tasks=T, ortho_seed=4)
    t2.train(resume_from_checkpoint=str(ckpt_dir))
    assert t2.ortho.num_steps == 4
    t2.ortho.remove()
    init = dict(_model().named_parameters())
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), (n, float((p - q).abs().max()))
    assert any("lora_" in n and not torch.equal(p, init[n]) for n, p in full.named_parameters())
    # a checkpoint of another layout is refused, naming the difference
    os.makedirs(tmp_path / "c", exist_ok=True)
    t3 = OrthoLoRATrainer(model=_model(), args=_resume_args(tmp_path / "c", 4), train_dataset=_rows(),
                          data_collator=MultiTaskCollator(num_tasks=T), num_tasks=T, ortho_seed=4,
                          ortho_granularity="layer")
    with pytest.raises(ValueError, match="granularity"):
        t3.train(resume_from_checkpoint=str(ckpt_dir))
    t3.ortho.remove()


def test_per_example_loss_receives_task_ids(tmp_path):
    seen = []

    class Recording(OrthoLoRATrainer):
        def per_example_loss(self, outputs, labels, task_ids):
            seen.append(task_ids.clone())
            # task 1's loss x3: the run must differ from the default loss
            base = super().per_example_loss(outputs, labels)
            return base * torch.where(task_ids == 1, 3.0, 1.0)

    model = _model()
    tr = Recording(model=model, args=_args(tmp_path), train_dataset=_rows(), data_collator=MultiTaskCollator(num_tasks=T),
                   num_tasks=T, ortho_seed=4)
    tr.train()
    tr.ortho.remove()
    assert len(seen) == STEPS * ACC
    rows = _rows()
    want = sorted(r["task_id"] for r in rows[:BS])
    assert seen[0].tolist() == want
    _, plain = _train_with_trainer(tmp_path / "plain", "grouped")
    assert any(not torch.equal(p, plain[n]) for n, p in model.named_parameters() if "lora_" in n)


def _head_rows(seed=1, n=N_ROWS):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        t = i % 2
        ids = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        label = float(torch.randint(0, 2, (1,), generator=g)) if t == 0 else float(torch.rand(1, generator=g) * 5)
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": label, "task_id": t})
    return rows


def test_readme_per_task_heads_recipe_with_peft(tmp_path):
    """The README recipe (heads outside peft, classification + regression) trains with the
    Trainer and equals a hand-written OrthoLoRA loop with the same losses."""
    from models import tiny_lora_backbone
    from readme import run_readme_block
    ns = run_readme_block("Per-task heads with the Trainer")

    def build():
        enc = tiny_lora_backbone("roberta", lora_dropout=0.0)
        torch.manual_seed(5)
        return ns["MultiHead"](enc, 32, [2, 1])

    model = build()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=2)
    tr = ns["MixedTrainer"](model=model, args=args, train_dataset=_head_rows(),
                            data_collator=MultiTaskCollator(num_tasks=2), num_tasks=2, pass_task_ids=True,
                            ortho_seed=4)
    tr.train()
    tr.ortho.remove()
    for n in ("heads.0.weight", "heads.1.weight"):
        assert not torch.equal(dict(model.named_parameters())[n], init[n]), n
    # by hand
    ref = build()
    ortho = OrthoLoRA(ref.encoder, 2, seed=4)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    coll, rows = MultiTaskCollator(num_tasks=2), _head_rows()
    for step in range(2):
        for micro in range(ACC):
            k = (step * ACC + micro) * BS
            b = coll(rows[k:k + BS])
            with ortho.record(b["task_ids"]):
                out = ref(b["input_ids"], b["attention_mask"], b["task_ids"])
                per_ex = _mixed_loss(out["logits"], b["labels"], b["task_ids"], [2, 1])
                (per_task_mean_loss(per_ex, b["task_ids"], 2).sum() / ACC).backward()
        ortho.project_()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _mixed_loss(logits, labels, task_ids, num_labels):
    """An independent per-example loss: CE for classification tasks, squared error for n=1."""
    out = []
    for i in range(labels.shape[0]):
        t = int(task_ids[i])
        n = num_labels[t]
        if n == 1:
            out.append((logits[i, 0] - labels[i]) ** 2)
        else:
            out.append(torch.nn.functional.cross_entropy(logits[i:i + 1, :n], labels[i:i + 1].long())[()])
    return torch.stack(out)


def test_documents_mix_tasks_and_token_loss_ids():
    from ortholora_kernels.integrations.trainer import documents_mix_tasks, token_loss_task_ids
    ids = torch.tensor([[0, 0, 1, 1, -1]])
    pos = torch.tensor([[0, 1, 0, 1, 0]])
    assert not documents_mix_tasks(ids, pos)                                    # padding-free, positions restart
    assert documents_mix_tasks(ids, torch.arange(5)[None])                      # no restart: one span
    assert documents_mix_tasks(ids, None, torch.tensor([[1, 1, 1, 1, 0]]))      # a 2-D mask: the row is a span
    assert documents_mix_tasks(ids, pos, torch.tensor([[1, 1, 1, 1, 0]]))      # the mask wins over positions
    assert not documents_mix_tasks(ids, None, torch.tensor([[1, 1, 2, 2, 0]]))  # document-index mask
    assert documents_mix_tasks(ids, None, torch.tensor([[1, 1, 1, 2, 0]]))
    assert not documents_mix_tasks(ids, None, torch.ones(1, 1, 5, 5))           # a 4-D mask is the caller's
    assert not documents_mix_tasks(torch.tensor([[2, 2, -1], [0, 0, 0]]), None, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not documents_mix_tasks(torch.tensor([1, 0]))                        # per-example ids
    labels = torch.tensor([[-100, 5, 6, -100, 7]])
    assert token_loss_task_ids(ids, labels).tolist() == [[0, 1, -1, -1]]
    with pytest.raises(ValueError, match="task_ids"):
        token_loss_task_ids(ids[:, :3], labels)


def test_per_token_batch_that_mixes_tasks_in_a_row_warns(tmp_path):
    """A padded batch of rows that each hold two tasks' tokens (no separation): warned once."""
    from test_trl import model as llama   # the tiny Llama (skips without trl)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "task_ids": [0, 0, 1, 1]} for _ in range(4)]

    def coll(feats):
        return {k: torch.tensor([f[k] for f in feats]) for k in ("input_ids", "labels", "task_ids")}
    tr = OrthoLoRATrainer(model=llama(), args=_args(tmp_path, max_steps=1), train_dataset=rows, data_collator=coll,
                          num_tasks=2)
    with pytest.warns(UserWarning, match="ill-defined"):
        tr.train()
    tr.ortho.remove()
