"""No silent gradient loss: non-per-task gradients inside record(), use after remove(), the
state dict's layout signature, statistics over the tasks present in the step."""
import copy

import pytest
import torch

from models import make_batch, task_losses, tiny_multitask
from ortholora_kernels import OrthoLoRA, project

T = 3


def _model(**kw):
    kw.setdefault("lora_dropout", 0.0)
    m = tiny_multitask("roberta", T, **kw)
    m.train()
    return m


def _flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("start", ["none", "zeros"])
def test_regulariser_inside_record_is_added_unprojected(start):
    """An L2 regulariser on the LoRA weights (x100) inside record(): .grad = projected sum +
    its gradient, whether .grad starts as None or zeros (main dropped it with zeros and raised
    the DoRA error with None)."""
    m = _model()
    b = make_batch([2, 3, 2])
    ortho = OrthoLoRA(m, T, seed=3)
    params = ortho.layout.params
    if start == "zeros":
        for p in params:
            p.grad = torch.zeros_like(p)
    with ortho.record(b["task_ids"]):
        reg = 100 * sum(p.pow(2).sum() for p in params)
        (task_losses(m, b).sum() + reg).backward()
    buf = ortho.buffer.clone()
    ortho.project_()
    got = _flat_grad(params)
    ortho.remove()
    # the per-task rows are those of the run without the regulariser
    m2 = copy.deepcopy(m)
    m2.zero_grad(set_to_none=True)
    o2 = OrthoLoRA(m2, T, seed=3)
    with o2.record(b["task_ids"]):
        task_losses(m2, b).sum().backward()
    torch.testing.assert_close(buf, o2.buffer, rtol=1e-6, atol=1e-8)
    o2.remove()
    projected = project(buf, ortho.offsets, generator=torch.Generator().manual_seed(3))
    reg_grad = torch.cat([200 * p.detach().reshape(-1) for p in params])
    assert reg_grad.norm() > projected.norm()  # big enough that dropping it cannot pass
    torch.testing.assert_close(got, projected + reg_grad, rtol=1e-5, atol=1e-6)


def test_gradient_before_record_and_loop_leftovers_are_kept():
    """A .grad present before the collection (a plain backward outside any context) survives
    both collectors: project_ adds the projected sum to it."""
    b = make_batch([2, 2, 2])
    for collect in ("grouped", "loop"):
        m = _model()
        ortho = OrthoLoRA(m, T, collect=collect, seed=1)
        params = ortho.layout.params
        aux = 3 * sum(p.sum() for p in params)  # a backward outside any context
        aux.backward()
        before = _flat_grad(params).clone()
        assert before.abs().sum() > 0
        if collect == "grouped":
            with ortho.record(b["task_ids"]):
                task_losses(m, b).sum().backward()
        else:
            ortho.backward(list(task_losses(m, b)))
        buf = ortho.buffer.clone()
        assert all(buf[t].norm() > 0 for t in range(T))
        ortho.project_()
        want = before + project(buf, ortho.offsets, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(_flat_grad(params), want, rtol=1e-5, atol=1e-6)
        ortho.remove()


def test_example_of_no_task_keeps_its_gradient():
    """Id -1 (an example of no task): its LoRA gradient reaches .grad unprojected, so the
    buffer rows plus .grad equal the joint gradient."""
    m = _model()
    ref = copy.deepcopy(m)
    b = make_batch([2, 2, 2])
    ids = b["task_ids"].clone()
    ids[1] = -1
    logits = ref(b["input_ids"], b["attention_mask"], b["task_ids"])
    per_ex = torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none")
    per_ex.sum().backward()
    ortho = OrthoLoRA(m, T)
    with ortho.record(ids):
        logits = m(b["input_ids"], b["attention_mask"], b["task_ids"])
        per_ex = torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none")
        per_ex.sum().backward()
    rest = _flat_grad(ortho.layout.params)
    assert rest.norm() > 0
    lora_ref = {id(p): q for p, q in zip([p for n, p in m.named_parameters() if "lora_" in n],
                                         [q for n, q in ref.named_parameters() if "lora_" in n])}
    joint = torch.cat([lora_ref[id(p)].grad.reshape(-1) for p in ortho.layout.params])
    torch.testing.assert_close(ortho.buffer.sum(0) + rest, joint, rtol=1e-5, atol=1e-7)
    ortho.remove()


def test_use_after_remove_raises():
    m = _model()
    b = make_batch([2, 2, 2])
    ortho = OrthoLoRA(m, T)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    ortho.remove()
    with pytest.raises(RuntimeError, match="removed"):
        ortho.project_()
    with pytest.raises(RuntimeError, match="removed"):
        with ortho.record(b["task_ids"]):
            pass
    loop = OrthoLoRA(m, T, collect="loop")
    loop.remove()
    with pytest.raises(RuntimeError, match="removed"):
        with loop.task(0):
            pass
    with pytest.raises(RuntimeError, match="removed"):
        loop.backward([torch.tensor(1.0, requires_grad=True)] * T)


def test_load_state_dict_refuses_another_layout():
    m = _model()
    ortho = OrthoLoRA(m, T, granularity="ab", seed=2)
    state = ortho.state_dict()
    assert state["signature"]["num_tasks"] == T and state["signature"]["granularity"] == "ab"
    ortho.remove()
    cases = [(dict(num_tasks=T + 1), "num_tasks"), (dict(granularity="layer"), "granularity"),
             (dict(collect="loop"), "collect")]
    for kw, what in cases:
        kw = {"num_tasks": T, **kw}
        o = OrthoLoRA(m, kw.pop("num_tasks"), seed=2, **kw)
        with pytest.raises(ValueError, match=what):
            o.load_state_dict(state)
        o.remove()
    other_rank = tiny_multitask("roberta", T, r=2)
    o = OrthoLoRA(other_rank, T, seed=2)
    with pytest.raises(ValueError, match="shape"):
        o.load_state_dict(state)
    o.remove()
    other_targets = tiny_multitask("roberta", T, target_modules=("query",))
    o = OrthoLoRA(other_targets, T, seed=2)
    with pytest.raises(ValueError, match="only in the state"):
        o.load_state_dict(state)
    with pytest.raises(ValueError, match="signature"):
        o.load_state_dict({k: v for k, v in state.items() if k != "signature"})
    o.remove()
    same = OrthoLoRA(m, T, seed=2)
    same.load_state_dict(state)  # the matching layout loads
    same.remove()


def test_statistics_leave_out_a_task_absent_from_the_step():
    """Task 2 absent from the batch: conflict fraction and mean cosine over the one pair (0, 1)
    present (main divided by 3 pairs); per-task norms and cosines in stats_dict."""
    m = _model()
    b = make_batch([3, 2, 0])
    ortho = OrthoLoRA(m, T, granularity="global")
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    buf = ortho.buffer.clone().double()
    ortho.project_()
    cos01 = float(torch.nn.functional.cosine_similarity(buf[0], buf[1], dim=0))
    d = ortho.stats_dict(task_names=["sst2", "mrpc", "stsb"])
    ortho.remove()
    assert d["ortho/tasks_present/all"] == 2.0
    assert abs(d["ortho/mean_cosine/all"] - cos01) < 1e-6
    assert d["ortho/conflict_fraction/all"] == float(cos01 < 0)
    assert abs(d["ortho/cosine/all/sst2~mrpc"] - cos01) < 1e-6
    assert d["ortho/cosine/all/sst2~stsb"] == 0.0 and d["ortho/grad_norm/all/stsb"] == 0.0
    assert abs(d["ortho/grad_norm/all/sst2"] - float(buf[0].norm())) < 1e-6 * float(buf[0].norm())
    with pytest.raises(ValueError, match="task_names"):
        ortho.stats_dict(task_names=["a"])
