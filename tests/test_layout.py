"""LoRALayout: order, contiguous segments, views aliasing the buffer, what is left out."""
import pytest
import torch
from torch import nn

from models import tiny_lora_backbone, tiny_multitask
from ortholora_kernels import LoRALayout


def _lin(i, o):
    return nn.Linear(i, o, bias=False)


def test_from_params_order_and_segments():
    a0, b0, a1, b1 = _lin(5, 2), _lin(2, 3), _lin(4, 2), _lin(2, 6)
    lay = LoRALayout.from_params([("l0", a0, b0), ("l1", a1, b1)])
    assert lay.params == [a0.weight, a1.weight, b0.weight, b1.weight]
    n = [10, 8, 6, 12]
    assert lay.numel == sum(n)
    assert lay.segments("global") == [0, 36]
    assert lay.segments("ab") == [0, 18, 36]
    assert lay.segments("layer") == [0, 10, 18, 24, 36]
    assert lay.segments("matrix") == [0, 10, 18, 24, 36]
    assert lay.segment_names("ab") == ["A", "B"]
    assert [e.module for e in lay.entries] == [a0, a1, b0, b1]


def test_multiple_b_per_module_and_frozen_a_side():
    # MTL-LoRA style: several shared B_k per module; LoRI style: a frozen A is left out.
    a0 = nn.Parameter(torch.randn(2, 5))
    bs0 = [nn.Parameter(torch.randn(3, 2)) for _ in range(3)]
    a1 = nn.Parameter(torch.randn(2, 5), requires_grad=False)
    bs1 = [nn.Parameter(torch.randn(4, 2)) for _ in range(2)]
    entries = [("L0", "A", "a0", a0)] + [("L0", "B", f"b0{k}", b) for k, b in enumerate(bs0)]
    entries += [("L1", "A", "a1", a1)] + [("L1", "B", f"b1{k}", b) for k, b in enumerate(bs1)]
    lay = LoRALayout.from_params(entries)
    assert lay.params == [a0, *bs0, *bs1]
    assert lay.numel == 10 + 3 * 6 + 2 * 8
    assert lay.segments("ab") == [0, 10, 44]
    assert lay.segments("layer") == [0, 10, 28, 44]  # A:L0 | B:L0 (3 matrices) | B:L1 (2)
    assert len(lay.segments("matrix")) == 7
    assert lay.segment_names("layer") == ["A:L0", "B:L0", "B:L1"]
    # entries given interleaved are still grouped side-major, layer by layer
    lay2 = LoRALayout.from_params([entries[i] for i in (5, 4, 0, 1, 2, 3)])
    assert lay2.params == [a0, bs1[0], *bs0]  # layers in order of first appearance: L1 (b10), L0
    assert lay2.segment_names("layer") == ["A:L0", "B:L1", "B:L0"]
    for gran in ("global", "ab", "layer", "matrix"):
        offs = lay2.segments(gran)
        assert offs[0] == 0 and offs[-1] == lay2.numel and offs == sorted(set(offs))


def test_only_a_frozen_everywhere_gives_one_ab_segment():
    a = nn.Parameter(torch.randn(2, 3), requires_grad=False)
    b = nn.Parameter(torch.randn(3, 2))
    lay = LoRALayout.from_params([("m", a, b)])
    assert lay.segments("ab") == [0, 6]


def test_views_alias_buffer_rows():
    lay = LoRALayout.from_params([("l0", _lin(5, 2), _lin(2, 3)), ("l1", _lin(4, 2), _lin(2, 6))])
    buf = lay.new_buffer(3, torch.float64, "cpu")
    assert buf.shape == (3, 36) and buf.dtype == torch.float64 and torch.count_nonzero(buf) == 0
    views = lay.views(buf[1])
    assert [v.shape for v in views] == [p.shape for p in lay.params]
    for k, v in enumerate(views):
        v.fill_(k + 1)
    assert torch.count_nonzero(buf[0]) == 0 and torch.count_nonzero(buf[2]) == 0
    for k, e in enumerate(lay.entries):
        assert torch.all(buf[1, e.offset:e.offset + e.numel] == k + 1)
    tviews = lay.views(buf)
    assert tviews[2].shape == (3, 3, 2) and torch.equal(tviews[2][1], views[2])
    assert torch.equal(lay.flatten(views), buf[1])


def test_from_peft_excludes_heads_and_orders_by_layer():
    model = tiny_multitask("roberta", 2, layers=3, target_modules=("query", "value", "dense"))
    lay = LoRALayout.from_peft(model)
    names = lay.names
    assert all("lora_" in n for n in names)
    head_ids = {id(p) for p in model.heads.parameters()}
    assert not head_ids & {id(p) for p in lay.params}
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {id(p) for p in lora_params} == {id(p) for p in lay.params}
    sides = [e.side for e in lay.entries]
    assert sides == sorted(sides)  # all A's then all B's
    layers_a = [e.layer for e in lay.entries if e.side == "A"]
    assert layers_a == sorted(layers_a, key=lambda s: int(s.rsplit(".", 1)[1]))
    assert len(lay.segments("layer")) - 1 == 2 * 3
    assert all(isinstance(e.module, nn.Linear) for e in lay.entries)


def test_from_peft_modules_to_save_not_in_buffer():
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaForSequenceClassification
    from models import tiny_config
    torch.manual_seed(0)
    base = RobertaForSequenceClassification(tiny_config("roberta"))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    lay = LoRALayout.from_peft(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert not any("classifier" in n for n in lay.names)
    assert len(lay) == 4  # 2 layers x (A, B)


def test_errors():
    with pytest.raises(ValueError, match="model"):
        LoRALayout.from_peft(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="granularity"):
        LoRALayout.from_params([("m", _lin(3, 2), _lin(2, 3))]).segments("row")
    with pytest.raises(ValueError, match="side"):
        LoRALayout.from_params([("m", "C", "x", nn.Parameter(torch.ones(2)))])
    with pytest.raises(ValueError, match="twice"):
        p = nn.Parameter(torch.ones(2, 2))
        LoRALayout.from_params([("m", p, p)])
    with pytest.raises(ValueError, match="no trainable"):
        LoRALayout.from_params([("m", "A", "x", nn.Parameter(torch.ones(2), requires_grad=False))])
    with pytest.raises(ValueError, match="num_tasks"):
        LoRALayout.from_params([("m", _lin(3, 2), _lin(2, 3))]).new_buffer(0)
    with pytest.raises(TypeError, match="entries"):
        LoRALayout.from_params([("m", 1)])
    with pytest.raises(ValueError, match="buffer_row"):
        LoRALayout.from_params([("m", _lin(3, 2), _lin(2, 3))]).views(torch.zeros(5))
