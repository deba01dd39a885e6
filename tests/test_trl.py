"""OrthoLoRASFTTrainer (TRL's SFTTrainer): per-token task ids through packing; per-task
gradients equal one backward per task on the same documents; steps equal a hand loop."""
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from ortholora_kernels import OrthoLoRA, per_task_mean_loss  # noqa: E402
from ortholora_kernels.integrations import OrthoLoRASFTTrainer, OrthoLoRATrainer, PackedCausalLMCollator  # noqa: E402

TASKS = ["sst", "mrpc", "rte"]
WORDS = [f"w{i}" for i in range(24)]


def tokenizer():
    """A word-level tokenizer built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *TASKS, "unused", ":", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(seed=0):
    """A peft LoRA model over a tiny LlamaForCausalLM from a LlamaConfig (random weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TASKS) + 5 + len(WORDS), hidden_size=32, intermediate_size=40,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def rows(n=18, seed=0, tasks=("sst", "mrpc")):
    """Prompt/completion rows of ragged lengths; the prompt's first word names the task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = tasks[i % len(tasks)]
        k = int(torch.randint(1, 6, (1,), generator=g))
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (k + 2,), generator=g).tolist()]
        out.append({"prompt": " ".join([t, *words[:k], ":"]), "completion": " " + " ".join(words[k:]), "task": t})
    return out


def config(tmp_path, **kw):
    from trl import SFTConfig
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                max_grad_norm=0.1, logging_steps=1, max_steps=2, save_strategy="no", seed=0,
                dataloader_num_workers=0, max_length=24, packing=True, train_sampling_strategy="sequential",
                bf16=False)  # SFTConfig defaults to bf16 (autocast, also on CPU): fp32 for exact comparisons
    base.update(kw)
    return SFTConfig(**base)


def lora_flat(layout, grads):
    return torch.cat([g.reshape(-1) for g in grads])


def buffer_rows(ortho, buf):
    """``[T, N]`` in the order of ``ortho.layout.params``."""
    return torch.stack([torch.cat([v.reshape(-1) for v in ortho.layout.views(buf[t])])
                        for t in range(buf.shape[0])])


def split_documents(batch):
    """The documents of a batch: (row, start, end) from position ids restarting at 0, or one
    per row (attention-mask span) when there are none."""
    docs = []
    ids = batch["input_ids"]
    if "position_ids" in batch and "attention_mask" not in batch:
        pos = batch["position_ids"]
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().squeeze(1).tolist() + [ids.shape[1]]
            docs += [(r, a, b) for a, b in zip(starts[:-1], starts[1:])]
    else:
        for r in range(ids.shape[0]):
            docs.append((r, 0, int(batch["attention_mask"][r].sum())))
    return docs


def per_task_reference(m, ortho, batch, names):
    """``[T, N]``: task t's LoRA gradient from one backward of its mean completion-token loss,
    every document run alone (no packing), its task read from its first word."""
    vocab = tokenizer().get_vocab()
    first = {vocab[t]: i for i, t in enumerate(names)}
    params = ortho.layout.params
    docs = split_documents(batch)
    out = []
    for t in range(len(names)):
        mine = [(r, a, b) for r, a, b in docs if first.get(int(batch["input_ids"][r, a])) == t]
        n = sum(int((batch["labels"][r, a + 1:b] != -100).sum()) for r, a, b in mine)
        if n == 0:
            out.append(torch.zeros(sum(p.numel() for p in params)))
            continue
        for p in params:
            p.grad = None
        total = 0.0
        for r, a, b in mine:
            x = batch["input_ids"][r:r + 1, a:b]
            lab = batch["labels"][r:r + 1, a:b]
            logits = m(input_ids=x).logits
            total = total + torch.nn.functional.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100,
                                                              reduction="sum")
        (total / n).backward()
        out.append(torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                              for p in params]))
        for p in params:
            p.grad = None
    return torch.stack(out)


def captured_step(trainer):
    """One training step of the trainer on its first batch; the per-task buffer it projects."""
    seen = {}
    project = trainer.ortho.project_

    def spy():
        seen["buf"] = trainer.ortho.buffer.detach().clone()
        return project()
    trainer.ortho.project_ = spy
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1   # set by train(); one micro-batch here
    trainer.training_step(trainer.model, dict(batch))
    trainer.ortho.project_ = project
    return batch, buffer_rows(trainer.ortho, seen["buf"])


CASES = {
    "bfd packing, completion only": dict(packing=True, packing_strategy="bfd"),
    "bfd_split packing, full sequence loss": dict(packing=True, packing_strategy="bfd_split",
                                                   completion_only_loss=False, max_length=10),
    "unpacked, padded": dict(packing=False),
    "unpacked, padding-free": dict(packing=False, padding_free=True, max_length=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_task_gradients_equal_one_backward_per_task(tmp_path, case):
    m = model()
    names = ["mrpc", "sst", "unused"]   # "unused": a task absent from every batch
    tr = OrthoLoRASFTTrainer(model=m, args=config(tmp_path, **CASES[case]), processing_class=tokenizer(),
                             train_dataset=datasets.Dataset.from_list(rows()), task_names=names, ortho_seed=3)
    assert tr.num_tasks == 3 and tr.task_names == names
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no cross-document warning here
        batch, got = captured_step(tr)
    ids = batch["task_ids"]
    assert ids.shape == batch["input_ids"].shape
    if "attention_mask" in batch:
        assert torch.equal(ids >= 0, batch["attention_mask"].bool())
    assert (ids == 2).sum() == 0 and {0, 1} <= set(ids.unique().tolist())
    m.eval()
    want = per_task_reference(m, tr.ortho, {k: v for k, v in batch.items()}, names)
    assert want[0].abs().sum() > 0 and want[1].abs().sum() > 0 and want[2].abs().sum() == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    tr.ortho.remove()


def test_wrapped_packing_warns_documents_attend_across(tmp_path):
    m = model()
    with pytest.warns(UserWarning, match="wrapped.*ill-defined"):   # at configuration
        tr = OrthoLoRASFTTrainer(model=m, args=config(tmp_path, packing_strategy="wrapped", max_length=16),
                                 train_dataset=datasets.Dataset.from_list(rows()), processing_class=tokenizer())
    batch = next(iter(tr.get_train_dataloader()))
    # and the batches show it: documents of both tasks in one attention span
    from ortholora_kernels.integrations.trainer import documents_mix_tasks
    assert documents_mix_tasks(batch["task_ids"], batch.get("position_ids"), batch.get("attention_mask"))
    tr._mixed_warned = False
    with pytest.warns(UserWarning, match="ill-defined"):              # at the first such batch
        captured_step(tr)
    tr.ortho.remove()


def _hand_loop(batches, names, steps, acc, lr=0.5, clip=0.1):
    """OrthoLoRA by hand on the trainer's batches: per-token task ids from each document's
    first word, next-token losses from the logits, per-task means over labelled tokens."""
    m = model()
    m.train()
    vocab = tokenizer().get_vocab()
    first = {vocab[t]: i for i, t in enumerate(names)}
    ortho = OrthoLoRA(m, len(names), seed=3)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    it = iter(batches)
    for _ in range(steps):
        for _ in range(acc):
            b = next(it)
            route = torch.full_like(b["input_ids"], -1)
            for r, a, e in split_documents(b):
                route[r, a:e] = first[int(b["input_ids"][r, a])]
            # use_cache=False: with a KV cache transformers does not separate documents by position ids
            kw = {k: b[k] for k in ("position_ids", "attention_mask") if k in b}
            kw["use_cache"] = False
            with ortho.record(route):
                logits = m(input_ids=b["input_ids"], **kw).logits
                tok = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:],
                                                        ignore_index=-100, reduction="none")
                lid = torch.where(b["labels"][:, 1:] != -100, route[:, 1:], -1)
                (per_task_mean_loss(tok, lid, len(names)).sum() / acc).backward()
        ortho.project_()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    return m


@pytest.mark.parametrize("collect", ["grouped", "loop"])
def test_steps_equal_hand_written_loop(tmp_path, collect):
    names = ["mrpc", "rte", "sst"]
    ds = datasets.Dataset.from_list(rows(60, tasks=("sst", "mrpc", "rte")))
    m = model()
    tr = OrthoLoRASFTTrainer(model=m, args=config(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                    per_device_train_batch_size=3),
                             train_dataset=ds, processing_class=tokenizer(), ortho_seed=3, ortho_collect=collect)
    batches = list(tr.get_train_dataloader())
    tr.train()
    tr.ortho.remove()
    assert tr.task_names == names and tr.ortho.num_steps == 2
    ref = _hand_loop(batches, names, 2, 2)
    init = dict(model().named_parameters())
    moved = [n for n, p in m.named_parameters() if "lora_" in n and not torch.equal(p, init[n])]
    assert moved
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
    logged = [h for h in tr.state.log_history if "loss/sst" in h]
    assert len(logged) == 2 and all(k in logged[0] for k in ("loss/mrpc", "loss/rte", "mean_token_accuracy",
                                                             "ortho/conflict_fraction/A", "ortho/grad_norm/B/rte"))


def test_datasets_by_source_int_tasks_eval_losses_and_errors(tmp_path):
    a = datasets.Dataset.from_list([{"text": " ".join(["sst", *WORDS[i:i + 4]])} for i in range(8)])
    b = datasets.Dataset.from_list([{"text": " ".join(["rte", *WORDS[i:i + 6]])} for i in range(8)])
    m = model()
    tr = OrthoLoRASFTTrainer(model=m, args=config(tmp_path, max_steps=1, eval_strategy="no"),
                             train_dataset={"sst": a, "rte": b}, eval_dataset={"sst": a.select(range(3)), "rte": b},
                             processing_class=tokenizer())
    assert tr.task_names == ["sst", "rte"]
    tr.train()
    ev = tr.evaluate()
    assert {"eval_loss/sst", "eval_loss/rte"} <= set(ev)
    # per-task eval loss = the mean next-token loss over the task's tokens, each document alone
    tok, m_eval = tokenizer(), tr.model.eval()
    for name, d in (("sst", a.select(range(3))), ("rte", b)):
        tot, n = 0.0, 0
        with torch.no_grad():
            for text in d["text"]:
                ids = torch.tensor([tok(text + tok.eos_token)["input_ids"]])
                logits = m_eval(input_ids=ids).logits
                tot += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
                n += ids.shape[1] - 1
        assert ev[f"eval_loss/{name}"] == pytest.approx(tot / n, rel=1e-5)
    tr.ortho.remove()
    ints = datasets.Dataset.from_list([{**r, "task": TASKS.index(r["task"])} for r in rows(8)])
    tr2 = OrthoLoRASFTTrainer(model=model(), args=config(tmp_path / "i", max_steps=1), train_dataset=ints,
                              processing_class=tokenizer())
    assert tr2.task_names == ["0", "1"]
    tr2.ortho.remove()
    with pytest.raises(KeyError, match="task_field"):
        OrthoLoRASFTTrainer(model=model(), args=config(tmp_path / "k"), processing_class=tokenizer(),
                            train_dataset=datasets.Dataset.from_list(rows(4)), task_field="dataset")
    with pytest.raises(ValueError, match="unknown task"):
        OrthoLoRASFTTrainer(model=model(), args=config(tmp_path / "u"), processing_class=tokenizer(),
                            train_dataset=datasets.Dataset.from_list(rows(4)), task_names=["sst"])


def test_resume_is_bit_exact(tmp_path):
    def make(out):
        return OrthoLoRASFTTrainer(model=model(), args=config(out, max_steps=4, save_strategy="steps", save_steps=2),
                                   train_dataset=datasets.Dataset.from_list(rows(40)), processing_class=tokenizer(),
                                   ortho_seed=3)
    full = make(tmp_path / "a")
    full.train()
    full.ortho.remove()
    res = make(tmp_path / "b")
    res.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    res.ortho.remove()
    assert res.ortho.num_steps == 4
    for (n, p), q in zip(full.model.named_parameters(), res.model.parameters()):
        assert torch.equal(p, q), n


def test_ortholoratrainer_packed_collator_per_token(tmp_path):
    """OrthoLoRATrainer with per-token ids (PackedCausalLMCollator): per-task gradients equal
    one backward per task on the documents alone; the loop collector gives the same."""
    from transformers import TrainingArguments
    tok = tokenizer()
    docs = [{"input_ids": tok(r["prompt"] + r["completion"])["input_ids"], "task_id": ["sst", "mrpc"].index(r["task"])}
            for r in rows(8)]
    coll = PackedCausalLMCollator(num_tasks=3)
    batch = coll(docs[:4])
    assert batch["input_ids"].shape[0] == 1 and batch["task_ids"].shape == batch["input_ids"].shape
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                             max_steps=1, learning_rate=0.5, optim="sgd", save_strategy="no", logging_steps=1,
                             train_sampling_strategy="sequential", max_grad_norm=0.1)
    got = {}
    for collect in ("grouped", "loop"):
        m = model()
        tr = OrthoLoRATrainer(model=m, args=args, train_dataset=docs, data_collator=coll, num_tasks=3,
                              task_names=["sst", "mrpc", "rte"], ortho_collect=collect)
        _, got[collect] = captured_step(tr)
        m.eval()
        b = {k: v for k, v in batch.items()}
        want = per_task_reference(m, tr.ortho, b, ["sst", "mrpc", "rte"])
        tr.ortho.remove()
    torch.testing.assert_close(got["grouped"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["loop"], want, rtol=1e-4, atol=1e-6)


def test_docs_page_runs_as_written(tmp_path, monkeypatch):
    """The python blocks of docs/trl.md, in order, in one namespace."""
    import os
    import re
    monkeypatch.chdir(tmp_path)
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "trl.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 2
    ns = {}
    for b in blocks:
        exec(compile(b, "docs/trl.md", "exec"), ns)
    assert ns["trainer"].task_names == ["sentiment", "paraphrase"]
    assert ns["trainer"].state.global_step == 2


def test_refused_configurations(tmp_path):
    ds = datasets.Dataset.from_list(rows(4))
    with pytest.raises(ValueError, match="compute_loss_func"):
        OrthoLoRASFTTrainer(model=model(), args=config(tmp_path), train_dataset=ds, processing_class=tokenizer(),
                            compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(TypeError, match="IterableDataset"):
        OrthoLoRASFTTrainer(model=model(), args=config(tmp_path), train_dataset=ds.to_iterable_dataset(),
                            processing_class=tokenizer())
    with pytest.raises(ValueError, match="task_names"):
        OrthoLoRASFTTrainer(model=model(), args=config(tmp_path), train_dataset=ds, processing_class=tokenizer(),
                            task_names=["sst", "mrpc", "sst"])
