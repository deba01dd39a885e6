"""MTL-LoRA adapter (ortholora_kernels.adapters.mtl_lora) on tiny encoders."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ortholora_kernels.adapters import count_trainable, layer_key  # noqa: E402
from ortholora_kernels.adapters.mtl_lora import (  # noqa: E402
    MTLLoRALinear,
    apply_mtl_lora,
    load_mtl_lora,
    mtl_lora_modules,
    mtl_lora_param_count,
    mtl_lora_parameters,
    mtl_task_ids,
    save_mtl_lora,
    set_mtl_task_ids,
    route_task_slices,
    task_ids_from_slices,
)

from models import VOCAB, tiny_bert, tiny_roberta  # noqa: E402
from models import random_ids as batch  # noqa: E402  ([n, 7] random token ids)

H, LAYERS, SEQ = 32, 2, 7


@torch.no_grad()
def randomize_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _, m in mtl_lora_modules(model):
        for b in m.lora_B:
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("diagonal", [False, True])
def test_shapes_and_parameter_counts(diagonal):
    T, r, nb = 3, 4, 2
    model = tiny_roberta()
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    names = apply_mtl_lora(model, r=r, alpha=8, num_tasks=T, num_b=nb, diagonal=diagonal)
    assert len(names) == 2 * LAYERS and all(n.endswith(("query", "value")) for n in names)
    for _, m in mtl_lora_modules(model):
        assert isinstance(m, MTLLoRALinear)
        assert m.lora_A.weight.shape == (r, H)
        assert m.lora_lambdas.shape == ((T, r) if diagonal else (T, r, r))
        assert len(m.lora_B) == nb and all(b.weight.shape == (H, r) for b in m.lora_B)
        assert m.lora_B_w.shape == (T, nb)
        assert m.scaling == 8 / r
        own = sum(p.numel() for p in m.parameters() if p.requires_grad)
        lam = T * r if diagonal else T * r * r
        assert own == r * H + lam + nb * H * r + T * nb == mtl_lora_param_count(H, H, r, T, nb, diagonal)
        assert not m.weight.requires_grad and not m.bias.requires_grad
    per = mtl_lora_param_count(H, H, r, T, nb, diagonal)
    assert count_trainable(model, adapter_only=True) == 2 * LAYERS * per
    # the whole encoder is frozen, the classification head stays trainable
    assert count_trainable(model) == 2 * LAYERS * per + head


def test_base_state_dict_names_unchanged():
    model = tiny_roberta()
    before = set(model.state_dict())
    apply_mtl_lora(model, num_tasks=2, r=2)
    after = set(model.state_dict())
    assert before <= after
    assert all(".lora_" in k for k in after - before)


def test_init_equals_base_model_in_mixed_batch():
    base, model = tiny_roberta(), tiny_roberta()
    apply_mtl_lora(model, num_tasks=3, r=4, num_b=3)
    x = batch()
    with torch.no_grad(), mtl_task_ids(model, torch.tensor([0, 1, 2, 2, 1, 0])):
        out = model(input_ids=x).logits
    ref = base(input_ids=x).logits.detach()
    assert torch.equal(out, ref)


def test_forward_matches_formula_on_a_linear():
    torch.manual_seed(0)
    T, r, nb, tau = 3, 4, 2, 0.5
    seq = nn.Sequential()
    seq.add_module("proj", nn.Linear(10, 6))
    apply_mtl_lora(seq, target_modules=("proj",), r=r, alpha=6, num_tasks=T, num_b=nb, temperature=tau)
    m = seq.proj
    with torch.no_grad():
        for b in m.lora_B:
            b.weight.normal_()
        m.lora_lambdas.normal_()
    x = torch.randn(5, 3, 10)
    ids = torch.tensor([2, 0, 1, 1, 2])
    with mtl_task_ids(seq, ids):
        y = seq(x)
    for i in range(5):
        t = int(ids[i])
        w = torch.softmax(m.lora_B_w[t] / tau, -1)
        bt = sum(w[k] * m.lora_B[k].weight for k in range(nb))
        dw = (6 / r) * bt @ m.lora_lambdas[t] @ m.lora_A.weight
        ref = x[i] @ (m.weight + dw).T + m.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.delta_weight(t), dw)


def test_diagonal_ones_equals_dense_identity():
    a, b = tiny_roberta(), tiny_roberta()
    torch.manual_seed(5)
    apply_mtl_lora(a, num_tasks=2, r=4, diagonal=False)
    torch.manual_seed(5)
    apply_mtl_lora(b, num_tasks=2, r=4, diagonal=True)
    randomize_b(a)
    randomize_b(b)
    x, ids = batch(4), torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), mtl_task_ids(a, ids), mtl_task_ids(b, ids):
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("what", ["lambdas", "mixture"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_task_routing_changes_only_that_task(what, diagonal):
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=3, r=4, num_b=3, diagonal=diagonal)
    randomize_b(model)
    x, ids = batch(6), torch.tensor([0, 1, 2, 1, 0, 2])
    with torch.no_grad(), mtl_task_ids(model, ids):
        before = model(input_ids=x).logits
        for _, m in mtl_lora_modules(model):
            p = m.lora_lambdas if what == "lambdas" else m.lora_B_w
            p[1] += 0.3 * torch.randn_like(p[1])
        after = model(input_ids=x).logits
    changed = (before - after).abs().amax(-1) > 1e-6
    assert changed.tolist() == (ids == 1).tolist()


def test_mixed_batch_equals_per_task_batches():
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=3, r=4)
    randomize_b(model)
    with torch.no_grad():
        for _, m in mtl_lora_modules(model):
            m.lora_lambdas.add_(0.2 * torch.randn_like(m.lora_lambdas))
    x, ids = batch(6), torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        with mtl_task_ids(model, ids):
            mixed = model(input_ids=x).logits
        for t in range(3):
            with mtl_task_ids(model, t):
                single = model(input_ids=x[ids == t]).logits
            torch.testing.assert_close(mixed[ids == t], single, rtol=1e-5, atol=1e-6)


def test_task_id_context_restores_and_helper():
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=2, r=2)
    mods = mtl_lora_modules(model)
    assert all(m.task_ids is None for _, m in mods)
    with mtl_task_ids(model, [0, 1]):
        assert all(m.task_ids.tolist() == [0, 1] for _, m in mods)
        with mtl_task_ids(model, 1):
            assert all(int(m.task_ids) == 1 for _, m in mods)
        assert all(m.task_ids.tolist() == [0, 1] for _, m in mods)
    assert all(m.task_ids is None for _, m in mods)
    set_mtl_task_ids(model, torch.tensor([1, 1]))
    model(input_ids=batch(2))
    set_mtl_task_ids(model, None)
    with pytest.raises(RuntimeError, match="mtl_task_ids"):
        model(input_ids=batch(2))


def test_bert_encoder_and_layer_keys():
    model = tiny_bert()
    apply_mtl_lora(model, target_modules=("query", "key", "value"), num_tasks=2, r=2, num_b=2)
    params = mtl_lora_parameters(model)
    assert list(params.shared) == ["encoder.layer.0", "encoder.layer.1"]
    assert layer_key("roberta.encoder.layer.11.attention.self.query") == "roberta.encoder.layer.11"
    assert layer_key("pooler.dense") == "pooler.dense"
    with mtl_task_ids(model, [0, 1, 0]):
        assert model(input_ids=batch(3)).last_hidden_state.shape == (3, SEQ, H)


# ----------------------------------------------------------------------------- errors


def test_bad_input_errors():
    with pytest.raises(ValueError, match="target_modules"):
        apply_mtl_lora(tiny_roberta(), target_modules=("nope",), num_tasks=2)
    with pytest.raises(ValueError, match="target_modules.*not nn.Linear"):
        apply_mtl_lora(tiny_roberta(), target_modules=("attention",), num_tasks=2)
    with pytest.raises(ValueError, match="target_modules"):
        apply_mtl_lora(tiny_roberta(), target_modules=(), num_tasks=2)
    for bad_r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="r must"):
            apply_mtl_lora(tiny_roberta(), r=bad_r, num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
        apply_mtl_lora(tiny_roberta(), num_tasks=0)
    with pytest.raises(ValueError, match="num_b"):
        apply_mtl_lora(tiny_roberta(), num_tasks=2, num_b=0)
    with pytest.raises(ValueError, match="temperature"):
        apply_mtl_lora(tiny_roberta(), num_tasks=2, temperature=0.0)
    with pytest.raises(ValueError, match="dropout"):
        apply_mtl_lora(tiny_roberta(), num_tasks=2, dropout=1.0)
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=2, r=2)
    with pytest.raises(ValueError, match="already adapted"):
        apply_mtl_lora(model, num_tasks=2, r=2)
    with pytest.raises(ValueError, match="task_ids out of range"):
        with mtl_task_ids(model, torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match="task_ids out of range"):
        set_mtl_task_ids(model, -1)
    with pytest.raises(ValueError, match="task_ids must be integers"):
        set_mtl_task_ids(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids has 3 entries"):
        with mtl_task_ids(model, [0, 1, 1]):
            model(input_ids=batch(2))
    with pytest.raises(ValueError, match="no MTL-LoRA modules"):
        mtl_lora_parameters(tiny_roberta())


# ----------------------------------------------------------------------------- Ortho-LoRA split


def test_shared_and_task_specific_split():
    T, r, nb = 3, 4, 2
    model = tiny_roberta()
    names = apply_mtl_lora(model, num_tasks=T, r=r, num_b=nb)
    p = mtl_lora_parameters(model)
    assert list(p.shared) == ["roberta.encoder.layer.0", "roberta.encoder.layer.1"]
    for key, sides in p.shared.items():
        assert len(sides["A"]) == 2 and len(sides["B"]) == 2 * nb  # query and value
        assert all(a.shape == (r, H) for a in sides["A"]) and all(b.shape == (H, r) for b in sides["B"])
    assert len(p.task_specific) == 2 * len(names)
    assert {n.rsplit(".", 1)[1] for n, _ in p.task_specific} == {"lora_lambdas", "lora_B_w"}
    shared_ids = {id(q) for q in p.shared_parameters()}
    assert not shared_ids & {id(q) for q in p.task_parameters()}
    adapter = {id(q) for n, q in model.named_parameters() if "lora_" in n}
    assert shared_ids | {id(q) for q in p.task_parameters()} == adapter
    ent = p.entries()
    assert all(len(e) == 4 and e[1] in ("A", "B") for e in ent)
    assert p.num_shared() == len(names) * (r * H + nb * H * r)
    layout = p.layout()
    assert layout.numel == p.num_shared()
    assert len(layout.segments("ab")) == 3


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("diagonal", [False, True])
def test_save_load_round_trip(tmp_path, diagonal):
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=3, r=4, num_b=2, temperature=0.2, diagonal=diagonal, alpha=12)
    randomize_b(model)
    with torch.no_grad():
        for _, m in mtl_lora_modules(model):
            m.lora_lambdas.add_(0.1 * torch.randn_like(m.lora_lambdas))
    path = tmp_path / "mtl.pt"
    save_mtl_lora(model, path)
    x, ids = batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad(), mtl_task_ids(model, ids):
        ref = model(input_ids=x).logits

    fresh = tiny_roberta()  # same base weights and head, new adapter
    load_mtl_lora(fresh, path)  # adapts from the saved config
    with torch.no_grad(), mtl_task_ids(fresh, ids):
        assert torch.equal(fresh(input_ids=x).logits, ref)

    other = tiny_roberta()
    torch.manual_seed(123)
    apply_mtl_lora(other, num_tasks=3, r=4, num_b=2, temperature=0.2, diagonal=diagonal, alpha=12)
    load_mtl_lora(other, path)
    with torch.no_grad(), mtl_task_ids(other, ids):
        assert torch.equal(other(input_ids=x).logits, ref)

    wrong = tiny_roberta()
    apply_mtl_lora(wrong, num_tasks=2, r=4, num_b=2, diagonal=diagonal)
    with pytest.raises(ValueError, match="num_tasks"):
        load_mtl_lora(wrong, path)


# ----------------------------------------------------------------------------- training


def _per_task_losses(logits, labels, ids, T):
    losses = []
    for t in range(T):
        sel = ids == t
        losses.append(nn.functional.cross_entropy(logits[sel], labels[sel]) if sel.any() else None)
    return losses


def test_two_training_steps_tiny_roberta():
    T = 2
    model = tiny_roberta().train()
    apply_mtl_lora(model, num_tasks=T, r=4, num_b=2, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    x, ids, labels = batch(8), torch.tensor([0, 1] * 4), torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])
    for _ in range(2):
        with mtl_task_ids(model, ids):
            logits = model(input_ids=x).logits
        loss = sum(_per_task_losses(logits, labels, ids, T))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        opt.step()
    for _, m in mtl_lora_modules(model):
        assert all(b.weight.abs().sum() > 0 for b in m.lora_B)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_two_training_steps_with_ortho_lora_projection():
    from ortholora_kernels import OrthoLoRA

    T = 2
    model = tiny_roberta().train()
    apply_mtl_lora(model, num_tasks=T, r=4, num_b=2)
    params = mtl_lora_parameters(model)
    ortho = OrthoLoRA(params.layout(), num_tasks=T, granularity="ab", collect="loop", seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, ids, labels = batch(8), torch.tensor([0, 1] * 4), torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])
    for _ in range(2):
        opt.zero_grad()
        with mtl_task_ids(model, ids):
            losses = _per_task_losses(model(input_ids=x).logits, labels, ids, T)
        # task-specific parameters and the head: ordinary gradients of the summed loss
        shared = params.shared_parameters()
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in shared)]
        grads = torch.autograd.grad(sum(losses), rest, retain_graph=True)
        ortho.backward(losses)
        ortho.project_()
        for p, g in zip(rest, grads):
            p.grad = g
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
        opt.step()
    assert all(b.weight.abs().sum() > 0 for _, m in mtl_lora_modules(model) for b in m.lora_B)


def test_task_ids_from_slices():
    assert task_ids_from_slices([(0, 2), (2, 3), (3, 6)]).tolist() == [0, 0, 1, 2, 2, 2]
    assert task_ids_from_slices([(0, 2), (2, 2), (2, 4)]).tolist() == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="task_slices"):
        task_ids_from_slices([(0, 2), (3, 4)])


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_with_cpu_task_ids():
    model = tiny_roberta()
    apply_mtl_lora(model, num_tasks=3, r=4)
    randomize_b(model)
    x, ids = batch(), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad(), mtl_task_ids(model, ids):
        ref = model(input_ids=x).logits
    model.cuda()
    with torch.no_grad(), mtl_task_ids(model, ids):  # CPU ids, moved once on entry
        out = model(input_ids=x.cuda()).logits
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("diagonal", [False, True])
def test_grouped_collector_matches_loop(diagonal):
    """One grouped backward gives the same per-task gradients (and projection) as T passes."""
    from ortholora_kernels import OrthoLoRA

    T = 3
    x, ids = batch(6), torch.tensor([0, 1, 2, 2, 1, 0])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    grads = {}
    for collect in ("loop", "grouped"):
        model = tiny_roberta().train()
        torch.manual_seed(3)
        apply_mtl_lora(model, num_tasks=T, r=4, num_b=2, diagonal=diagonal)
        randomize_b(model)
        params = mtl_lora_parameters(model)
        ortho = OrthoLoRA(params.layout(), num_tasks=T, collect=collect, seed=0)
        with mtl_task_ids(model, ids):
            losses = _per_task_losses(model(input_ids=x).logits, labels, ids, T)
        if collect == "loop":
            ortho.backward(losses)
        else:
            with ortho.record(ids):
                sum(losses).backward()
        buf = ortho.buffer.clone()
        ortho.project_()
        grads[collect] = (buf, [p.grad.clone() for p in params.shared_parameters()],
                          [p.grad.clone() for p in params.task_parameters()])
        ortho.remove()
    (b1, s1, t1), (b2, s2, t2) = grads["loop"], grads["grouped"]
    assert b1.abs().sum() > 0
    torch.testing.assert_close(b2, b1, rtol=1e-4, atol=1e-6)
    for a, b in zip(s1 + t1, s2 + t2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


class _TwoHeads(nn.Module):
    """The harness's MultiTaskModel calling convention: forward(ids, mask, task_slices)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList([nn.Linear(H, 2), nn.Linear(H, 3)])

    def features(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask, task_slices):
        h = self.features(input_ids, attention_mask)
        return [head(h[a:b, 0]) for head, (a, b) in zip(self.heads, task_slices)]


def test_route_task_slices_hooks():
    enc = tiny_bert()
    apply_mtl_lora(enc, num_tasks=2, r=4)
    randomize_b(enc)
    model = _TwoHeads(enc)
    handles = route_task_slices(model, enc)
    x = batch(5)
    mask = torch.ones_like(x)
    with torch.no_grad():
        outs = model(x, mask, [(0, 2), (2, 5)])
        outs_kw = model(x, mask, task_slices=[(0, 2), (2, 5)])
        assert all(m.task_ids is None for _, m in mtl_lora_modules(enc))  # cleared after the forward
        with mtl_task_ids(enc, torch.tensor([0, 0, 1, 1, 1])):
            ref = model.features(x, mask)
        with pytest.raises(RuntimeError, match="mtl_task_ids"):
            model.features(x, mask)
    torch.testing.assert_close(outs[0], model.heads[0](ref[:2, 0]))
    torch.testing.assert_close(outs[1], model.heads[1](ref[2:, 0]))
    torch.testing.assert_close(outs_kw[1], outs[1])
    with pytest.raises(ValueError, match="task_slices"):
        model(x, mask, [(0, 2), (3, 5)])
    assert all(m.task_ids is None for _, m in mtl_lora_modules(enc))
    for h in handles:
        h.remove()
