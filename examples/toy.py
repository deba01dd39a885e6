"""The toy setting every example trains: swap in your model and data.

A tiny random RoBERTa (built from a config: nothing is downloaded) with a peft LoRA adapter
on ``query``/``value``, one classification head per task outside peft, and three tasks on
random tokens whose labels read different token positions, so the tasks pull the shared
adapter in different directions. Rows are dicts with a ``task_id`` key: the key
:class:`~ortholora_kernels.integrations.MultiTaskCollator` reads (it turns them into a
``task_ids`` LongTensor of the batch).
"""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import RobertaConfig, RobertaModel

NUM_TASKS = 3
VOCAB = 64
SEQ_LEN = 12
HIDDEN = 32


def lora_encoder(seed: int = 0, r: int = 8, dropout: float = 0.0):
    """A peft LoRA model over a 2-layer RoBERTa with hidden size 32 (random weights)."""
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ_LEN + 4, pad_token_id=1,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    encoder = RobertaModel(cfg, add_pooling_layer=False)
    return get_peft_model(encoder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                              target_modules=["query", "value"]))


class MultiTaskModel(nn.Module):
    """The LoRA encoder and one linear head per task (ordinary parameters: not projected)."""

    def __init__(self, encoder, num_tasks: int = NUM_TASKS, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, num_labels) for _ in range(num_tasks))

    def forward(self, input_ids, attention_mask, task_ids):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        logits = torch.stack([head(h) for head in self.heads], dim=1)          # [B, T, labels]
        return {"logits": logits[torch.arange(h.shape[0], device=h.device), task_ids]}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows per task: ``input_ids``, ``attention_mask``, ``labels`` and ``task_id``.
    Task t's label: is the token at position t + 1 in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(NUM_TASKS):
        ids = torch.randint(3, VOCAB, (n, SEQ_LEN), generator=g)
        for row in ids:
            rows.append({"input_ids": row, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                         "labels": int(row[t + 1] >= VOCAB // 2), "task_id": t})
    return rows
