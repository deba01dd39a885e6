"""Tiny multi-task LoRA models built from configs (never downloaded), shared by tests.

    model, heads = tiny_multitask("roberta", num_tasks=3)   # peft model + per-task heads
    batch = make_batch([4, 2, 3], seq_len=8)               # concatenated, sorted by task
    loss_vec = task_losses(model, heads, batch)            # [T] per-task mean losses

Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 100


def tiny_config(kind: str = "roberta", *, layers: int = 2, hidden: int = 32, heads: int = 2,
                intermediate: int = 37, dropout: float = 0.0, vocab: int = VOCAB):
    """A tiny RobertaConfig / BertConfig (dropout 0 in the backbone unless asked)."""
    from transformers import BertConfig, RobertaConfig
    cls = {"roberta": RobertaConfig, "bert": BertConfig}[kind]
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=intermediate, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
              max_position_embeddings=64)
    if kind == "roberta":
        kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return cls(**kw)


def tiny_lora_backbone(kind: str = "roberta", *, seed: int = 0, r: int = 4, lora_dropout: float = 0.1,
                       target_modules=("query", "value"), layers: int = 2, hidden: int = 32, heads: int = 2,
                       intermediate: int = 37, dropout: float = 0.0):
    """A peft LoRA model over a tiny RoBERTa/BERT encoder (AutoModel, no head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel, RobertaModel
    torch.manual_seed(seed)
    cfg = tiny_config(kind, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate, dropout=dropout)
    base = {"roberta": RobertaModel, "bert": BertModel}[kind](cfg, add_pooling_layer=False)
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, target_modules=list(target_modules))
    model = get_peft_model(base, lcfg)
    # peft initialises B = 0, which makes every task's B-gradient... fine, but A-gradients
    # zero: give B small random values so every LoRA gradient is non-trivial.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


class MultiTaskModel(nn.Module):
    """A shared (LoRA) encoder plus one linear classification head per task (CLS token)."""

    def __init__(self, encoder: nn.Module, num_tasks: int, hidden: int, num_labels: int = 3):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(hidden, num_labels) for _ in range(num_tasks))
        self.num_tasks = num_tasks

    def forward(self, input_ids, attention_mask, task_ids):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        stacked = torch.stack([head(h) for head in self.heads], 1)  # [B, T, C]
        return stacked[torch.arange(h.shape[0], device=h.device), task_ids.to(h.device)]


def tiny_multitask(kind: str = "roberta", num_tasks: int = 3, *, seed: int = 0, **kw) -> MultiTaskModel:
    """A :class:`MultiTaskModel` over :func:`tiny_lora_backbone` (heads are trainable, not LoRA)."""
    enc = tiny_lora_backbone(kind, seed=seed, **kw)
    torch.manual_seed(seed + 1)
    return MultiTaskModel(enc, num_tasks, enc.config.hidden_size if hasattr(enc, "config") else kw.get("hidden", 32))


def make_batch(sizes, *, seq_len: int = 8, seed: int = 0, num_labels: int = 3, shuffle: bool = False, pad: bool = True):
    """A concatenated batch: ``sizes[t]`` examples of task t (0 = task absent), sorted by task.

    Returns a dict with ``input_ids``, ``attention_mask`` (some padding), ``labels``, ``task_ids``.
    """
    g = torch.Generator().manual_seed(seed)
    b = int(sum(sizes))
    ids = torch.randint(3, VOCAB, (b, seq_len), generator=g)
    mask = torch.ones(b, seq_len, dtype=torch.long)
    if pad and seq_len > 3:
        lens = torch.randint(seq_len - 3, seq_len + 1, (b,), generator=g)
        for i, l in enumerate(lens.tolist()):
            mask[i, l:] = 0
            ids[i, l:] = 1
    task_ids = torch.cat([torch.full((n,), t, dtype=torch.long) for t, n in enumerate(sizes)])
    labels = torch.randint(0, num_labels, (b,), generator=g)
    if shuffle:
        perm = torch.randperm(b, generator=g)
        ids, mask, labels, task_ids = ids[perm], mask[perm], labels[perm], task_ids[perm]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids}


def slice_batch(batch, rows):
    """The sub-batch of ``rows`` (a slice or index tensor)."""
    return {k: v[rows] for k, v in batch.items()}


def task_losses(model: MultiTaskModel, batch, num_tasks: int | None = None) -> torch.Tensor:
    """``[T]`` per-task mean cross-entropy losses of ``batch`` (0 for absent tasks)."""
    from ortholora_kernels import per_task_mean_loss
    logits = model(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    per_ex = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return per_task_mean_loss(per_ex, batch["task_ids"], num_tasks or model.num_tasks)


def tiny_peft_classifier(kind: str = "roberta", *, num_labels: int = 2, seed: int = 0, r: int = 4,
                         lora_dropout: float = 0.0, dropout: float = 0.0, target_modules=("query", "value")):
    """A peft ``SEQ_CLS`` LoRA model over a tiny RoBERTa/BERT classifier (one shared head,
    in ``modules_to_save``); B initialised to small random values so gradients are non-trivial."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, RobertaForSequenceClassification
    torch.manual_seed(seed)
    cfg = tiny_config(kind, dropout=dropout)
    cfg.num_labels = num_labels
    base = {"roberta": RobertaForSequenceClassification, "bert": BertForSequenceClassification}[kind](cfg)
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout,
                                        target_modules=list(target_modules), task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def tiny_eval_model(kind: str = "roberta", *, seed: int = 0, num_labels: int = 2):
    """A tiny plain encoder in eval mode for adapter tests (no LoRA, backbone dropout 0).

    ``kind="roberta"``: a RobertaForSequenceClassification with ``num_labels``;
    ``kind="bert"``: a BertModel.
    """
    from transformers import BertModel, RobertaForSequenceClassification
    torch.manual_seed(seed)
    cfg = tiny_config(kind, intermediate=64)
    if kind == "roberta":
        cfg.num_labels = num_labels
        return RobertaForSequenceClassification(cfg).eval()
    return BertModel(cfg).eval()


def random_ids(n: int = 6, seq_len: int = 7, *, seed: int = 1) -> torch.Tensor:
    """``[n, seq_len]`` random token ids (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=g)


def tiny_roberta(seed: int = 0, num_labels: int = 2):
    """:func:`tiny_eval_model` for RoBERTa with a sequence-classification head."""
    return tiny_eval_model("roberta", seed=seed, num_labels=num_labels)


def tiny_bert(seed: int = 0):
    """:func:`tiny_eval_model` for a plain BERT encoder."""
    return tiny_eval_model("bert", seed=seed)


def task_rows(n: int, num_tasks: int, *, seed: int = 0, seq_len: int = 8) -> list[dict]:
    """``n`` dataset rows for a Trainer: random ``input_ids``, full ``attention_mask``, a binary
    ``labels`` and a random ``task_id`` in ``[0, num_tasks)``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        t = int(torch.randint(0, num_tasks, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (seq_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len,
                     "labels": int(torch.randint(0, 2, (1,), generator=g)), "task_id": t})
    return rows
