"""LoRI adapter (ortholora_kernels.adapters.lori) on tiny encoders."""
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ortholora_kernels.adapters import count_trainable  # noqa: E402
from ortholora_kernels.adapters.lori import (  # noqa: E402
    LoRILinear,
    apply_lori,
    apply_lori_mask,
    attach_lori_mask,
    enforce_lori_mask,
    load_lori,
    lori_mask,
    lori_modules,
    lori_param_count,
    lori_parameters,
    lori_state_dict,
    mask_lori_grads,
    default_merge_weights,
    merge_lori,
    official_keep_count,
    remove_lori_mask,
    save_lori,
    stack_lori_task,
)

from models import VOCAB, tiny_bert, tiny_roberta  # noqa: E402
from models import random_ids as batch  # noqa: E402  ([n, 7] random token ids)

H, LAYERS, SEQ = 32, 2, 7


@torch.no_grad()
def randomize_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _, m in lori_modules(model):
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def adapter(seed=0, r=4, b_seed=2, sparsity=None, targets=("query", "value")):
    model = tiny_roberta()
    apply_lori(model, targets, r=r, alpha=8, seed=seed)
    randomize_b(model, b_seed)
    if sparsity is not None:
        apply_lori_mask(model, lori_mask(model, sparsity), reset_b=False)
    return model


# ----------------------------------------------------------------------------- structure


def test_shapes_counts_and_frozen_a():
    r = 4
    model = tiny_roberta()
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    names = apply_lori(model, r=r, alpha=8, seed=0)
    assert len(names) == 2 * LAYERS
    for _, m in lori_modules(model):
        assert isinstance(m, LoRILinear)
        assert m.lora_A.shape == (r, H) and m.lora_B.shape == (H, r)
        assert not isinstance(m.lora_A, nn.Parameter) and not m.lora_A.requires_grad
        assert torch.equal(m.lora_B, torch.zeros(H, r))
        assert m.lora_A.abs().max() <= 1 / math.sqrt(H)
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == lori_param_count(H, r) == H * r
    assert all("lora_A" not in n for n, _ in model.named_parameters())
    assert count_trainable(model, adapter_only=True) == 2 * LAYERS * H * r
    assert count_trainable(model) == 2 * LAYERS * H * r + head


def test_init_equals_base_and_forward_formula():
    base, model = tiny_roberta(), tiny_roberta()
    apply_lori(model, r=4, seed=0)
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    seq = nn.Sequential()
    seq.add_module("proj", nn.Linear(10, 6))
    apply_lori(seq, ("proj",), r=3, alpha=6, seed=1)
    m = seq.proj
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 10)
    torch.testing.assert_close(seq(x), x @ (m.weight + 2.0 * m.lora_B @ m.lora_A).T + m.bias)
    torch.testing.assert_close(m.delta_weight(), 2.0 * m.lora_B @ m.lora_A)


def test_same_seed_same_a_across_adapters():
    torch.manual_seed(11)
    a = tiny_roberta(seed=0)
    apply_lori(a, r=4, seed=7)
    torch.manual_seed(99)  # different global RNG state, different base weights
    b = tiny_roberta(seed=5)
    torch.randn(100)
    apply_lori(b, ("value", "query", "key"), r=4, seed=7)  # a superset of modules, other order
    c = tiny_roberta()
    apply_lori(c, r=4, seed=8)
    ma, mb, mc = dict(lori_modules(a)), dict(lori_modules(b)), dict(lori_modules(c))
    for name in ma:
        assert torch.equal(ma[name].lora_A, mb[name].lora_A)
        assert not torch.equal(ma[name].lora_A, mc[name].lora_A)
    # every module draws its own A
    assert not torch.equal(*[m.lora_A for m in list(ma.values())[:2]])


def test_a_gets_no_gradient_and_stays_fixed():
    model = tiny_roberta().train()
    apply_lori(model, r=4, seed=0)
    a0 = {n: m.lora_A.clone() for n, m in lori_modules(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        loss = model(input_ids=batch(4), labels=torch.tensor([0, 1, 0, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, m in lori_modules(model):
        assert m.lora_A.grad is None and torch.equal(m.lora_A, a0[n])
        assert m.lora_B.abs().sum() > 0


# ----------------------------------------------------------------------------- masks


def authors_model_mask(model, sparsity, previous=None):
    """Transcription of the authors' src/extract_mask.py ``get_model_mask`` (global mask over
    every lora_B; ``previous``: their "lora_B.mask" of earlier tasks), on LoRI modules."""
    all_params_abs = []
    for name, m in lori_modules(model):
        param_values = m.effective_b().detach().clone().view(-1)
        if previous is not None:
            param_values[previous[name].view(-1)] = 0
        all_params_abs.append(torch.abs(param_values).cpu())
    all_params_abs = torch.cat(all_params_abs)
    total_num = all_params_abs.numel()
    k = int((1 - sparsity) * total_num)
    threshold = torch.topk(all_params_abs, k).values[-1]
    out = {}
    for name, m in lori_modules(model):
        b = m.effective_b().detach().clone()
        if previous is not None:
            b[previous[name]] = 0
        out[name] = torch.abs(b) >= threshold
        if previous is not None:
            out[name] = out[name] & ~previous[name]
    return out


@pytest.mark.parametrize("r,sparsity", [(4, 0.0), (4, 0.5), (4, 0.9), (4, 0.97), (10, 0.9), (3, 0.9)])
def test_mask_is_the_authors_global_mask(r, sparsity):
    model = adapter(r=r)
    masks = lori_mask(model, sparsity)
    n = 2 * LAYERS * H * r
    k = int((1 - sparsity) * n)
    assert official_keep_count(sparsity, n) == k
    assert sum(int(m.sum()) for m in masks.values()) == k   # random B: no ties
    ref = authors_model_mask(model, sparsity)
    assert masks.keys() == ref.keys() and all(torch.equal(masks[n_], ref[n_]) for n_ in masks)
    assert all(m.dtype == torch.bool and m.shape == (H, r) for m in masks.values())
    allb = torch.cat([m.lora_B.detach().abs().reshape(-1) for _, m in lori_modules(model)])
    kept = torch.cat([masks[name].reshape(-1) for name, _ in lori_modules(model)])
    if 0 < k < n:
        assert allb[kept].min() >= allb[~kept].max()
    apply_lori_mask(model, masks)
    assert count_trainable(model, adapter_only=True) == k


def test_mask_count_is_int_not_round():
    # N = 1280: (1 - 0.9) * 1280 = 127.99999999999997 in floats; the authors keep 127, round() 128
    assert official_keep_count(0.9, 1280) == 127 and round((1 - 0.9) * 1280) == 128
    model = adapter(r=10)
    assert sum(int(m.sum()) for m in lori_mask(model, 0.9).values()) == 127


def test_mask_is_global_not_per_module():
    model = adapter(r=4)
    with torch.no_grad():
        lori_modules(model)[0][1].lora_B.mul_(100.0)
    masks = lori_mask(model, 0.9)
    first = lori_modules(model)[0][0]
    # the 51 kept entries (int(0.1 x 512)) all come from the scaled-up B (128 entries)
    assert int(masks[first].sum()) == int((1 - 0.9) * 2 * LAYERS * H * 4) == 51
    assert all(int(m.sum()) == 0 for k, m in masks.items() if k != first)


def test_mask_ties_keep_every_entry_at_the_threshold():
    """The authors keep |B| >= threshold: ties at the k-th value are all kept."""
    model = tiny_roberta()
    apply_lori(model, r=4, seed=0)
    with torch.no_grad():
        for i, (_, m) in enumerate(lori_modules(model)):
            m.lora_B.fill_(1.0 if i < 2 else 0.5)   # 256 entries at 1.0, 256 at 0.5
    masks = lori_mask(model, 0.9)   # k = 51: threshold 1.0, all 256 ones kept
    assert sum(int(m.sum()) for m in masks.values()) == 256
    ref = authors_model_mask(model, 0.9)
    assert all(torch.equal(masks[n], ref[n]) for n in masks)
    with torch.no_grad():
        lori_modules(model)[0][1].lora_B[:2] = 0.0   # 248 ones, 256 halves, 8 zeros
    masks = lori_mask(model, 0.1)   # k = int(0.9 x 512) = 460: threshold 0.5, every half kept: 504
    assert sum(int(m.sum()) for m in masks.values()) == 504 and torch.equal(
        masks[lori_modules(model)[0][0]], authors_model_mask(model, 0.1)[lori_modules(model)[0][0]])


def test_mask_excludes_earlier_entries_like_the_authors():
    model = adapter(r=4)
    prev = lori_mask(adapter(r=4, b_seed=7), 0.9)
    masks = lori_mask(model, 0.9, exclude=prev)
    ref = authors_model_mask(model, 0.9, previous=prev)
    assert all(torch.equal(masks[n], ref[n]) for n in masks)
    assert all(not (masks[n] & prev[n]).any() for n in masks)
    assert sum(int(m.sum()) for m in masks.values()) == 51   # k free entries (no ties)
    with pytest.raises(ValueError, match="exclude"):
        lori_mask(model, 0.9, exclude={})


@pytest.mark.parametrize("reset_b", [True, False])
def test_masked_entries_stay_zero_through_adamw(reset_b):
    model = tiny_roberta().train()
    apply_lori(model, r=4, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5)
    x, y = batch(8), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    # LoRI-D: two steps, so the optimizer carries momentum into LoRI-S
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
    masks = lori_mask(model, 0.9)
    apply_lori_mask(model, masks, reset_b=reset_b)
    handles = attach_lori_mask(opt, model)
    b_masked0 = {n: m.lora_B.detach().clone() for n, m in lori_modules(model)}
    for _ in range(4):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        for name, m in lori_modules(model):
            assert torch.all(m.lora_B.grad[~masks[name]] == 0)
        opt.step()
    for name, m in lori_modules(model):
        assert torch.all(m.lora_B[~masks[name]] == 0)
        assert not torch.equal(m.lora_B, b_masked0[name])  # kept entries trained
    for h in handles:
        h.remove()


def test_fresh_optimizer_keeps_zeros_without_hooks():
    """Masking the forward is enough with a fresh AdamW: zero grads, zero moments, decay of 0."""
    model = adapter(r=4)
    masks = lori_mask(model, 0.8)
    apply_lori_mask(model, masks)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=1.0)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=batch(4), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
    for name, m in lori_modules(model):
        assert torch.all(m.lora_B[~masks[name]] == 0)


def test_manual_mask_helpers_and_remove():
    model = adapter(r=4)
    masks = lori_mask(model, 0.9)
    apply_lori_mask(model, masks, reset_b=False)
    for _, m in lori_modules(model):
        with torch.no_grad():
            m.lora_B.add_(1.0)  # e.g. an optimizer with stale state
        m.lora_B.grad = torch.ones_like(m.lora_B)
    mask_lori_grads(model)
    enforce_lori_mask(model)
    for name, m in lori_modules(model):
        assert torch.equal(m.lora_B.grad, masks[name].float())
        assert torch.all(m.lora_B[~masks[name]] == 0)
    remove_lori_mask(model)
    assert all(m.lora_mask is None for _, m in lori_modules(model))
    assert count_trainable(model, adapter_only=True) == 2 * LAYERS * H * 4


def test_mask_errors():
    model = adapter()
    for bad in (-0.1, 1.0, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match="sparsity"):
            lori_mask(model, bad)
    masks = lori_mask(model, 0.5)
    first = next(iter(masks))
    with pytest.raises(ValueError, match="masks"):
        apply_lori_mask(model, {k: v for k, v in masks.items() if k != first})
    with pytest.raises(ValueError, match="shape"):
        apply_lori_mask(model, {**masks, first: masks[first][:, :2]})
    with pytest.raises(ValueError, match="no LoRI modules"):
        lori_mask(tiny_roberta(), 0.9)


def test_apply_errors():
    with pytest.raises(ValueError, match="target_modules"):
        apply_lori(tiny_roberta(), ("nope",), r=4)
    for bad_r in (0, -2, 1.5):
        with pytest.raises(ValueError, match="r must"):
            apply_lori(tiny_roberta(), r=bad_r)
    with pytest.raises(ValueError, match="seed"):
        apply_lori(tiny_roberta(), seed="0")
    model = tiny_roberta()
    apply_lori(model, r=2)
    with pytest.raises(ValueError, match="already adapted"):
        apply_lori(model, r=2)


# ----------------------------------------------------------------------------- merging


def _deltas(model):
    return {n: m.delta_weight().detach() for n, m in lori_modules(model)}


def test_merge_same_seed_is_weighted_sum_of_b_and_keeps_zeros():
    t1 = adapter(seed=3, b_seed=10, sparsity=0.9)
    t2 = adapter(seed=3, b_seed=20, sparsity=0.9)
    t3 = adapter(seed=3, b_seed=30, sparsity=0.9)
    ads = [lori_state_dict(m) for m in (t1, t2, t3)]
    merged = merge_lori(ads)
    assert merged["config"]["r"] == 4 and merged["config"]["merge"] == "sum_B"
    fresh = tiny_roberta()
    load_lori(fresh, merged)
    d1, d2, d3, dm = _deltas(t1), _deltas(t2), _deltas(t3), _deltas(fresh)
    for n in dm:
        torch.testing.assert_close(dm[n], (d1[n] + d2[n] + d3[n]) / 3, rtol=1e-5, atol=1e-6)
    for name, m in lori_modules(fresh):
        union = torch.stack([a["state"][f"{name}.lora_mask"] for a in ads]).any(0)
        assert torch.equal(m.lora_mask, union)
        assert torch.all(m.lora_B[~union] == 0)
        assert torch.all(merged["state"][f"{name}.lora_B"][~union] == 0)
    w = merge_lori(ads, weights=[1.0, 0.0, 2.0])
    m3 = dict(lori_modules(t3))
    for n, m in lori_modules(t1):
        ref = (m.effective_b() + 2 * m3[n].effective_b()).detach()
        torch.testing.assert_close(w["state"][f"{n}.lora_B"], ref)


def test_merge_different_seeds_concatenates_rank():
    t1, t2 = adapter(seed=1, b_seed=10), adapter(seed=2, b_seed=20)
    merged = merge_lori([lori_state_dict(t1), lori_state_dict(t2)], weights=[0.5, 1.5])
    assert merged["config"]["r"] == 8 and merged["config"]["merge"] == "concat"
    fresh = tiny_roberta()
    load_lori(fresh, merged)
    d1, d2, dm = _deltas(t1), _deltas(t2), _deltas(fresh)
    for n in dm:
        torch.testing.assert_close(dm[n], 0.5 * d1[n] + 1.5 * d2[n], rtol=1e-5, atol=1e-6)
    x = batch()
    with torch.no_grad():
        assert fresh(input_ids=x).logits.shape == (6, 2)


def _peft_cat_merge(adapters, weights, r=4, alpha=8):
    """peft's own add_weighted_adapter(..., combination_type="cat") on LoRA adapters holding
    the LoRI adapters' A and (effective) B: the authors' merge."""
    from peft import LoraConfig, get_peft_model

    names = [f"t{i}" for i in range(len(adapters))]
    model = get_peft_model(tiny_roberta(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"]),
                           adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"]))
    layers = {k: m for k, m in model.named_modules() if hasattr(m, "lora_A") and names[0] in m.lora_A}
    with torch.no_grad():
        for n, ad in zip(names, adapters):
            for key, layer in layers.items():
                mod = key.split("base_model.model.", 1)[1]
                layer.lora_A[n].weight.copy_(ad["state"][f"{mod}.lora_A"])
                layer.lora_B[n].weight.copy_(ad["state"][f"{mod}.lora_B"])
    model.add_weighted_adapter(names, list(weights), "merged", combination_type="cat")
    return {key.split("base_model.model.", 1)[1]: (layer.lora_A["merged"].weight.detach(),
                                                   layer.lora_B["merged"].weight.detach(),
                                                   layer.get_delta_weight("merged").detach())
            for key, layer in layers.items()}


@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_merge_is_peft_cat_with_the_authors_weights(sparsity):
    """Independent A per task (the default): merge_lori equals peft's "cat" merge tensor for
    tensor (A scaled by w_t s_t, B concatenated, scaling 1) and dW = sum_t w_t s_t B_t A_t."""
    ts = [adapter(seed=s, b_seed=10 + s, sparsity=sparsity) for s in range(3)]
    ads = [lori_state_dict(m) for m in ts]
    w, rule = default_merge_weights(3, "lori_s" if sparsity else "lori_d")
    assert w == ([0.4] * 3 if sparsity else [0.5] * 3) and rule == "official (T=3)"
    merged = merge_lori(ads, w)
    assert merged["config"]["merge"] == "concat" and merged["config"]["r"] == 12
    assert merged["config"]["scaling"] == 1.0 and merged["config"]["merge_weights"] == w
    ref = _peft_cat_merge(ads, w)
    fresh = tiny_roberta()
    load_lori(fresh, merged)
    dm, ds = _deltas(fresh), [_deltas(m) for m in ts]
    for mod, (a, b, dw) in ref.items():
        torch.testing.assert_close(merged["state"][f"{mod}.lora_A"], a)
        torch.testing.assert_close(merged["state"][f"{mod}.lora_B"], b)
        torch.testing.assert_close(dm[mod], dw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dm[mod], sum(wt * d[mod] for wt, d in zip(w, ds)), rtol=1e-5, atol=1e-6)
        if sparsity:   # masks concatenated: the merged B keeps every task's zeros
            mask = merged["state"][f"{mod}.lora_mask"]
            assert mask.shape == (H, 12) and torch.all(merged["state"][f"{mod}.lora_B"][~mask] == 0)


def test_default_merge_weights_rule():
    assert default_merge_weights(3, "lori_d")[0] == [0.5] * 3
    assert default_merge_weights(4, "lori_d")[0] == [0.4] * 4
    assert default_merge_weights(3, "lori_s")[0] == [0.4] * 3
    assert default_merge_weights(4, "lori_s")[0] == [0.3] * 4
    # other T: the total weight of the nearest official T (1.5 / 1.6 for LoRI-D, 1.2 for LoRI-S), at most 1
    assert default_merge_weights(1, "lori_d")[0] == [1.0] and default_merge_weights(1, "lori_s")[0] == [1.0]
    assert default_merge_weights(2, "lori_d")[0] == [0.75] * 2
    assert default_merge_weights(2, "lori_s")[0] == pytest.approx([0.6] * 2)
    assert default_merge_weights(8, "lori_d")[0] == pytest.approx([0.2] * 8)
    assert default_merge_weights(8, "lori_s")[0] == pytest.approx([0.15] * 8)
    assert "1.6/T" in default_merge_weights(5, "lori_d")[1]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_tasks"):
            default_merge_weights(bad, "lori_d")
    with pytest.raises(ValueError, match="stage"):
        default_merge_weights(3, "d")


def test_stack_lori_task_keeps_earlier_entries_exactly():
    """Continual learning: the earlier tasks' B is frozen in the forward; B trains from zero
    on the new mask; AdamW with weight decay never touches the earlier entries."""
    first = adapter(seed=0, b_seed=3, sparsity=0.9)
    prev = lori_state_dict(first)
    model = tiny_roberta().train()
    apply_lori(model, r=4, alpha=8, seed=0)
    randomize_b(model, 5)   # task 2's LoRI-D
    taken = {n: prev["state"][f"{n}.lora_mask"] for n, _ in lori_modules(model)}
    masks = lori_mask(model, 0.9, exclude=taken)
    stack_lori_task(model, prev, masks)
    for n, m in lori_modules(model):
        assert torch.all(m.lora_B == 0)
        torch.testing.assert_close(m.delta_weight(), 2.0 * prev["state"][f"{n}.lora_B"] @ m.lora_A)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=batch(4), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
    st = lori_state_dict(model)["state"]
    for n, m in lori_modules(model):
        old = taken[n]
        assert torch.equal(st[f"{n}.lora_B"][old], prev["state"][f"{n}.lora_B"][old])   # kept exactly
        assert torch.all(st[f"{n}.lora_B"][~(old | masks[n])] == 0)
        assert torch.equal(st[f"{n}.lora_mask"], old | masks[n])
    assert any((m.lora_B != 0).any() for _, m in lori_modules(model))
    assert count_trainable(model, adapter_only=True) == sum(int(v.sum()) for v in masks.values())
    other = tiny_roberta()
    apply_lori(other, r=4, alpha=8, seed=1)
    with pytest.raises(ValueError, match="A differs"):
        stack_lori_task(other, prev, masks)


def test_merge_errors(tmp_path):
    a = lori_state_dict(adapter())
    with pytest.raises(ValueError, match="weights"):
        merge_lori([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="adapters"):
        merge_lori([])
    other = lori_state_dict(adapter(targets=("query",)))
    with pytest.raises(ValueError, match="adapters\\[1\\]"):
        merge_lori([a, other])
    with pytest.raises(ValueError, match="not a LoRI adapter"):
        merge_lori([{"method": "mtl_lora"}])


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_save_load_round_trip(tmp_path, sparsity):
    model = adapter(seed=4, sparsity=sparsity)
    path = tmp_path / "lori.pt"
    save_lori(model, path)
    x = batch()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    fresh = tiny_roberta()
    load_lori(fresh, path)  # adapts from the saved config
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, ref)
    assert count_trainable(fresh) == count_trainable(model)
    for (_, a), (_, b) in zip(lori_modules(model), lori_modules(fresh)):
        assert torch.equal(a.lora_A, b.lora_A)
        assert (a.lora_mask is None) == (b.lora_mask is None)
    pre = tiny_roberta()
    apply_lori(pre, r=4, alpha=8, seed=4)
    load_lori(pre, path)
    with torch.no_grad():
        assert torch.equal(pre(input_ids=x).logits, ref)
    wrong = tiny_roberta()
    apply_lori(wrong, r=2, alpha=8, seed=4)
    with pytest.raises(ValueError, match="rank"):
        load_lori(wrong, path)


# ----------------------------------------------------------------------------- Ortho-LoRA


def test_shared_parameters_only_b():
    model = tiny_bert()
    apply_lori(model, ("query", "value"), r=4, seed=0)
    p = lori_parameters(model)
    assert list(p.shared) == ["encoder.layer.0", "encoder.layer.1"]
    assert all(s["A"] == [] and len(s["B"]) == 2 for s in p.shared.values())
    assert p.task_specific == []
    assert {e[1] for e in p.entries()} == {"B"}
    assert p.num_shared() == 2 * LAYERS * H * 4
    layout = p.layout()
    assert layout.numel == p.num_shared()


def test_two_stage_training_tiny_roberta_with_projection():
    from ortholora_kernels import OrthoLoRA

    T = 2
    model = tiny_roberta().train()
    apply_lori(model, r=4, seed=0)
    x, ids, y = batch(8), torch.tensor([0, 1] * 4), torch.tensor([0, 1, 1, 0, 1, 1, 0, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    for _ in range(2):  # LoRI-D, plain
        opt.zero_grad()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    masks = lori_mask(model, 0.9)
    apply_lori_mask(model, masks)
    assert count_trainable(model, adapter_only=True) == int((1 - 0.9) * 2 * LAYERS * H * 4)
    params = lori_parameters(model)
    ortho = OrthoLoRA(params.layout(), num_tasks=T, collect="loop", granularity="layer", seed=0)
    attach_lori_mask(opt, model)
    shared = params.shared_parameters()
    head = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in shared)]
    for _ in range(2):  # LoRI-S, with Ortho-LoRA on the shared B's
        opt.zero_grad()
        logits = model(input_ids=x).logits
        losses = [nn.functional.cross_entropy(logits[ids == t], y[ids == t]) for t in range(T)]
        grads = torch.autograd.grad(sum(losses), head, retain_graph=True)
        ortho.backward(losses)
        ortho.project_()
        for p, g in zip(head, grads):
            p.grad = g
        opt.step()
    for name, m in lori_modules(model):
        assert torch.all(m.lora_B[~masks[name]] == 0)
    assert any(m.lora_B.abs().sum() > 0 for _, m in lori_modules(model))


@pytest.mark.gpu
def test_cuda_same_a_as_cpu_and_masks():
    cpu = adapter(seed=3, sparsity=0.9)
    gpu = tiny_roberta().cuda()
    apply_lori(gpu, r=4, alpha=8, seed=3)  # A drawn on the CPU generator: device-independent
    for (_, a), (_, b) in zip(lori_modules(cpu), lori_modules(gpu)):
        assert torch.equal(a.lora_A, b.lora_A.cpu())
    load_lori(gpu, lori_state_dict(cpu))
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(gpu(input_ids=x.cuda()).logits.cpu(), cpu(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    masks = lori_mask(gpu, 0.9)
    assert sum(int(m.sum()) for m in masks.values()) == int((1 - 0.9) * 2 * LAYERS * H * 4)
