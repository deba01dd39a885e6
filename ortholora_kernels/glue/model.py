"""Encoder + LoRA (peft) + one head per task.

* :func:`load_tokenizer` / :func:`load_encoder`: any Hugging Face encoder by hub name or
  local path (``roberta-base`` in the paper), or ``tiny-roberta``: a 2-layer random
  RoBERTa built from a config with an offline word-level tokenizer trained on the data
  (saved in the run directory, so a resumed run reuses it exactly).
* :class:`MultiTaskModel`: the shared encoder (LoRA adapter from peft on the target
  modules, backbone frozen) and one RoBERTa-style head per task (dense-tanh-out on the
  first token; one output for STS-B regression). Forward takes the concatenated
  multi-task batch plus ``task_ids`` and returns one mean loss per task.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F

TINY = "tiny-roberta"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class ModelError(ValueError):
    """A user-facing model problem (path missing, not loadable)."""


def is_tiny(name: str) -> bool:
    """Is ``name`` the offline tiny random RoBERTa (``tiny-roberta``)?"""
    return name == TINY


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1 or name.endswith(os.sep)


def check_model_name(name: str) -> None:
    """Refuse a local-looking model path that does not exist (before any download)."""
    if is_tiny(name):
        return
    if _looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelError(f"model path {name!r} does not exist")


# ----------------------------------------------------------------------------- tokenizer

def build_tiny_tokenizer(texts, vocab_size: int = 1000, model_max_length: int = 512):
    """An offline word-level tokenizer (RoBERTa special tokens and templates)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=model_max_length)


def load_tokenizer(name: str, run_dir: str | None = None, texts=None, vocab_size: int = 1000):
    """Tokenizer of ``name``; for ``tiny-roberta``, the one saved in ``run_dir`` or a new one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if is_tiny(name):
        saved = os.path.join(run_dir, "tokenizer") if run_dir else None
        if saved and os.path.isfile(os.path.join(saved, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(saved)
        tok = build_tiny_tokenizer(texts or [""], vocab_size)
        if saved:
            tok.save_pretrained(saved)
        return tok
    check_model_name(name)
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as e:
        raise ModelError(f"could not load tokenizer of {name!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


# ----------------------------------------------------------------------------- encoder

def tiny_config(vocab_size: int, max_length: int, hidden: int = 32, layers: int = 2, heads: int = 2,
                init_range: float = 0.2):
    """The RobertaConfig of ``tiny-roberta`` (``heads`` must divide ``hidden``)."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=2 * hidden,
                         max_position_embeddings=max_length + 4, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, type_vocab_size=1, hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, initializer_range=init_range)


def load_encoder(name: str, tokenizer, max_length: int, seed: int = 0, tiny_hidden: int = 32,
                 tiny_layers: int = 2):
    """The encoder ``name`` without pooler (``tiny-roberta``: random, seeded by ``seed``)."""
    from transformers import AutoModel, RobertaModel

    if is_tiny(name):
        cfg = tiny_config(len(tokenizer), max_length, hidden=tiny_hidden, layers=tiny_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return RobertaModel(cfg, add_pooling_layer=False)
    check_model_name(name)
    try:
        return AutoModel.from_pretrained(os.path.expanduser(name), add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(os.path.expanduser(name))
    except Exception as e:
        raise ModelError(f"could not load model {name!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def add_lora(encoder, r: int = 8, alpha: float = 16, dropout: float = 0.1, target_modules=("query", "value")):
    """Wrap ``encoder`` with a peft LoRA adapter (backbone frozen). Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(encoder, cfg)
    except ValueError as e:
        raise ModelError(f"LoRA: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- heads

class Head(nn.Module):
    """RoBERTa classification head: dropout-dense-tanh-dropout-out on the first token
    (``pooling="cls"``, RoBERTa's) or on the mean over the non-padding tokens ("mean")."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features, mask=None):
        if self.pooling == "mean" and mask is not None:
            m = mask.unsqueeze(-1).to(features.dtype)
            x = (features * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            x = features[:, 0]
        x = self.dropout(x)
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


class MultiTaskModel(nn.Module):
    """Shared (LoRA-adapted) encoder and one head per task."""

    def __init__(self, encoder, tasks, head_dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.task_names = [t.name for t in tasks]
        self.regression = [t.is_regression for t in tasks]
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t.name: Head(hidden, t.num_labels, head_dropout, pooling) for t in tasks})

    def features(self, input_ids, attention_mask):
        """Last hidden states ``[batch, tokens, hidden]`` of the (LoRA-adapted) encoder."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask, task_slices):
        """``task_slices``: list of (start, stop) rows of each task in the batch.

        Returns the list of per-task outputs (logits, or scores [B] for regression).
        """
        h = self.features(input_ids, attention_mask)
        outs = []
        for name, (a, b) in zip(self.task_names, task_slices):
            out = self.heads[name](h[a:b], attention_mask[a:b])
            outs.append(out.squeeze(-1) if out.shape[-1] == 1 else out)
        return outs

    def task_losses(self, outs, labels):
        """Per-task mean losses (cross-entropy, MSE for regression) of :meth:`forward`'s outputs."""
        losses = []
        for reg, o, y in zip(self.regression, outs, labels):
            losses.append(F.mse_loss(o, y) if reg else F.cross_entropy(o, y))
        return losses

    def trainable_state_dict(self):
        """LoRA and head parameters only (what training changes)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def lora_parameters(self):
        """(name, parameter) of the trainable LoRA parameters of the encoder."""
        return [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad and "lora_" in n]
