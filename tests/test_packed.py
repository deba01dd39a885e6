"""Packed sequences: per-token task ids ``[batch, seq]`` (-1 = no task) on a tiny causal LM.

Documents of different tasks share a row; a block-diagonal causal mask keeps them apart, so
each task's LoRA gradient comes from its own tokens only and grouped == loop exactly.
"""
import pytest
import torch

pytest.importorskip("transformers")
from ortholora_kernels import OrthoLoRA, per_task_mean_loss  # noqa: E402

VOCAB = 40


def tiny_llama_lora(seed=0, lora_dropout=0.1):
    """A peft LoRA model over a tiny LlamaForCausalLM built from a LlamaConfig."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.train()
    return m


def pack(rows, seq, seed=0):
    """``rows``: per row a list of (task, length) documents (task -1: padding at the end).

    Returns input ids, a block-diagonal causal bool mask [B, 1, S, S], position ids, the
    per-token task ids (-1 on padding) and the per-token loss task ids (-1 where there is no
    next token in the same document)."""
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    ids = torch.randint(0, VOCAB, (b, seq), generator=g)
    doc = torch.full((b, seq), -1, dtype=torch.long)
    tok_task = torch.full((b, seq), -1, dtype=torch.long)
    pos = torch.zeros(b, seq, dtype=torch.long)
    for r, docs in enumerate(rows):
        start = 0
        for k, (t, n) in enumerate(docs):
            doc[r, start:start + n] = k
            tok_task[r, start:start + n] = t
            pos[r, start:start + n] = torch.arange(n)
            start += n
        assert start <= seq
        doc[r, start:] = 10_000 + torch.arange(seq - start)  # padding attends only to itself
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    same_next = torch.zeros_like(tok_task, dtype=torch.bool)
    same_next[:, :-1] = (doc[:, 1:] == doc[:, :-1]) & (tok_task[:, :-1] >= 0)
    loss_task = torch.where(same_next, tok_task, torch.full_like(tok_task, -1))
    return ids, mask, pos, tok_task, loss_task


def token_losses(model, ids, mask, pos):
    """``[B, S]`` next-token cross-entropy (the last position gets 0)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.cat([ce, ce.new_zeros(ce.shape[0], 1)], 1)


LAYOUTS = {
    "ragged, task 1 has no tokens": ([[(0, 5), (2, 4), (-1, 3)], [(2, 7), (0, 5)], [(0, 3), (2, 2), (0, 4), (-1, 3)]], 3),
    "every task, one doc per row": ([[(1, 12)], [(0, 9), (-1, 3)], [(2, 6), (1, 6)]], 3),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_equals_loop_on_packed_batches(name):
    rows, t = LAYOUTS[name]
    model = tiny_llama_lora()
    ids, mask, pos, tok_task, loss_task = pack(rows, 12, seed=1)
    present = sorted({k for r in rows for k, _ in r if k >= 0})
    bufs, grads = [], []
    for collect in ("grouped", "loop"):
        model.zero_grad(set_to_none=True)
        ortho = OrthoLoRA(model, t, collect=collect, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(7)  # the same LoRA dropout masks in both runs
            losses = per_task_mean_loss(token_losses(model, ids, mask, pos), loss_task, t)
        if collect == "grouped":
            with ortho.record(tok_task):
                losses.sum().backward()
        else:
            ortho.backward([losses[k] if k in present else None for k in range(t)])
        bufs.append(ortho.buffer.clone())
        ortho.project_()
        grads.append(torch.cat([p.grad.reshape(-1) for p in ortho.layout.params]))
        ortho.remove()
    g, l = bufs
    for k in range(t):
        if k in present:
            assert g[k].norm() > 0
            torch.testing.assert_close(g[k], l[k], rtol=1e-5, atol=1e-6 * float(l[k].abs().max()))
        else:
            assert torch.count_nonzero(g[k]) == 0 and torch.count_nonzero(l[k]) == 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_per_token_ids_against_per_document_runs():
    """Each task's row equals the gradient of that task's documents run on their own (unpacked):
    an independent reference that does not use OrthoLoRA's loop collector."""
    model = tiny_llama_lora(lora_dropout=0.0)
    rows = [[(0, 4), (1, 5)], [(1, 3), (0, 6)]]
    ids, mask, pos, tok_task, loss_task = pack(rows, 9, seed=2)
    ortho = OrthoLoRA(model, 2)
    with ortho.record(tok_task):
        per_task_mean_loss(token_losses(model, ids, mask, pos), loss_task, 2).sum().backward()
    buf = ortho.buffer.clone()
    ortho.remove()
    params = ortho.layout.params
    for t in range(2):
        docs = []  # (row, start, length) of task t
        for r, drow in enumerate(rows):
            s = 0
            for k, n in drow:
                if k == t:
                    docs.append((r, s, n))
                s += n
        model.zero_grad(set_to_none=True)
        total_tokens = sum(n - 1 for _, _, n in docs)
        loss = 0
        for r, s, n in docs:
            x = ids[r:r + 1, s:s + n]
            logits = model(input_ids=x).logits
            loss = loss + torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        (loss / total_tokens).backward()
        want = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(buf[t], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_prompt_tokens_of_no_task_keep_their_gradient():
    """Prompt tokens marked -1 (no loss on them, but answers attend to them): their LoRA
    gradient is not dropped: buffer rows + .grad == the joint gradient."""
    model = tiny_llama_lora(lora_dropout=0.0)
    rows = [[(0, 6), (1, 5)], [(1, 8), (-1, 3)]]
    ids, mask, pos, tok_task, loss_task = pack(rows, 11, seed=3)
    rec = tok_task.clone()
    rec[0, :2] = -1   # the first two tokens of each document are a prompt of no task
    rec[0, 6:8] = -1
    rec[1, :2] = -1
    model.zero_grad(set_to_none=True)
    per_task_mean_loss(token_losses(model, ids, mask, pos), loss_task, 2).sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    joint = {id(p): p.grad.clone() for p in lora}
    model.zero_grad(set_to_none=True)
    ortho = OrthoLoRA(model, 2)
    with ortho.record(rec):
        per_task_mean_loss(token_losses(model, ids, mask, pos), loss_task, 2).sum().backward()
    rest = torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])
    assert rest.norm() > 0
    want = torch.cat([joint[id(p)].reshape(-1) for p in ortho.layout.params])
    torch.testing.assert_close(ortho.buffer.sum(0) + rest, want, rtol=1e-5, atol=1e-7)
    ortho.remove()


def test_per_task_mean_loss_per_token_and_errors():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    ids = torch.tensor([[0, 0, 2, -1], [2, 2, -1, 0]])
    torch.testing.assert_close(per_task_mean_loss(loss, ids, 3), torch.tensor([11 / 3, 0.0, 14 / 3]))
    with pytest.raises(ValueError, match="per_example_loss"):
        per_task_mean_loss(loss[:, :3], ids, 3)
    model = tiny_llama_lora(lora_dropout=0.0)
    ortho = OrthoLoRA(model, 3)
    x = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(RuntimeError, match="task_ids"):
        with ortho.record(torch.zeros(2, 4, dtype=torch.long)):  # 4 ids per row for 5 tokens
            model(input_ids=x).logits.sum().backward()
    with pytest.raises(ValueError, match="task_ids"):
        with ortho.record(torch.full((2, 5), -2)):
            pass
    with pytest.raises(ValueError, match="task_ids"):
        with ortho.record(torch.zeros(2, 5, 1, dtype=torch.long)):
            pass
    ortho.remove()
