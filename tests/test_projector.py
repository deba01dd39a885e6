"""OrthoLoRA in a training loop: .grad values, heads, accumulation, AMP, clipping, errors."""
import copy
import math

import pytest
import torch
from torch import nn

from models import make_batch, slice_batch, task_losses, tiny_multitask
from ortholora_kernels import LoRALayout, OrthoLoRA, per_task_mean_loss, project

T = 3


def _model(kind="roberta", **kw):
    kw.setdefault("lora_dropout", 0.0)
    m = tiny_multitask(kind, T, **kw)
    m.train()
    return m


def _lora(m):
    return [p for n, p in m.named_parameters() if "lora_" in n]


def test_project_sets_grad_to_projected_buffer_and_resets():
    m = _model()
    ortho = OrthoLoRA(m, T, granularity="layer", seed=7)
    b = make_batch([3, 2, 4])
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    buf = ortho.buffer.clone()
    assert all(buf[t].norm() > 0 for t in range(T))
    res = ortho.project_()
    want = project(buf, ortho.layout.segments("layer"), generator=torch.Generator().manual_seed(7))
    got = torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.count_nonzero(ortho.buffer) == 0  # reset for the next step
    assert ortho.last_stats is res
    # per-segment statistics as device tensors, matching the buffer's cosines
    assert res.conflict_fraction.shape == (4,) and res.mean_cosine.shape == (4,)
    offs = ortho.layout.segments("layer")
    for s in range(4):
        x = buf[:, offs[s]:offs[s + 1]].double()
        cos = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
        iu = torch.triu_indices(T, T, 1)
        torch.testing.assert_close(res.mean_cosine[s], cos[iu[0], iu[1]].mean(), rtol=1e-6, atol=1e-9)
        assert math.isclose(float(res.conflict_fraction[s]), float((cos[iu[0], iu[1]] < 0).float().mean()))
    d = ortho.stats_dict()
    assert len(d) == 4 * (3 + T + T * (T - 1) // 2) and all(isinstance(v, float) for v in d.values())
    assert len(ortho.stats_dict(per_task=False)) == 4 * 3
    with pytest.raises(RuntimeError, match="project_"):
        ortho.project_()  # nothing recorded since
    ortho.remove()


def test_heads_keep_their_ordinary_gradients():
    m = _model()
    ref = copy.deepcopy(m)
    b = make_batch([2, 3, 1])
    task_losses(ref, b).sum().backward()
    ortho = OrthoLoRA(m, T)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    for p, q in zip(m.heads.parameters(), ref.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in _lora(m))  # the summed LoRA gradient is never formed
    ortho.project_()
    assert all(p.grad is not None for p in _lora(m))
    # the buffer rows sum to the joint LoRA gradient
    joint = torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])  # projected
    ref_lora = {id(p): q for p, q in zip(_lora(m), _lora(ref))}
    ref_joint = torch.cat([ref_lora[id(p)].grad.reshape(-1) for p in ortho.layout.params])
    assert not torch.allclose(joint, ref_joint)  # projection changed something (conflicts exist)
    ortho.remove()


def test_buffer_rows_sum_to_joint_gradient_and_shuffled_batch():
    m = _model(lora_dropout=0.0)
    ref = copy.deepcopy(m)
    b = make_batch([2, 3, 2], shuffle=True, seed=3)
    assert not torch.equal(b["task_ids"], b["task_ids"].sort().values)  # the gather path
    task_losses(ref, b).sum().backward()
    ortho = OrthoLoRA(m, T)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    total = ortho.buffer.sum(0)
    ref_lora = {id(p): q for p, q in zip(_lora(m), _lora(ref))}
    want = torch.cat([ref_lora[id(p)].grad.reshape(-1) for p in ortho.layout.params])
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-7)
    ortho.remove()


def test_forward_outside_record_and_plain_backward_without_routing():
    m = _model()
    ortho = OrthoLoRA(m, T)
    b = make_batch([2, 2, 2])
    loss = task_losses(m, b).sum()  # forward before the context
    with ortho.record(b["task_ids"]):
        loss.backward()
    inside = ortho.buffer.clone()
    ortho.zero_grad()
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    torch.testing.assert_close(inside, ortho.buffer, rtol=0, atol=0)
    # outside any context the patched model trains jointly, like plain peft
    ref = copy.deepcopy(m)
    ortho.remove()
    ortho2 = OrthoLoRA(m, T)
    m.zero_grad(set_to_none=True)
    task_losses(m, b).sum().backward()
    task_losses(ref, b).sum().backward()
    for p, q in zip(_lora(m), _lora(ref)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    ortho2.remove()
    assert all("forward" not in e.module.__dict__ for e in ortho2.layout.entries)


def _train(mode, steps=3, kind="roberta", accum=1, amp=False, clip=None):
    """Train a fresh tiny model ``steps`` optimizer steps; returns the final parameters."""
    torch.manual_seed(0)
    m = _model(kind)
    ortho = OrthoLoRA(m, T, collect="grouped" if mode == "grouped" else "loop", seed=1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(steps):
        for micro in range(accum):
            b = make_batch([2, 3, 1], seed=100 * step + micro)
            if mode == "grouped":
                with ortho.record(b["task_ids"]):
                    (task_losses(m, b).sum() / accum).backward()
            elif mode == "loop_retain":
                ortho.backward(list(task_losses(m, b) / accum))
            else:  # separate forward and backward per task batch
                for t in range(T):
                    rows = b["task_ids"] == t
                    with ortho.task(t):
                        (task_losses(m, slice_batch(b, rows))[t] / accum).backward()
        ortho.project_()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(_lora(m), clip)
            assert torch.isfinite(norm)
            assert torch.cat([p.grad.reshape(-1) for p in _lora(m)]).norm() <= clip * (1 + 1e-5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("other", ["loop_retain", "loop_separate"])
def test_training_grouped_equals_loop(other):
    g = _train("grouped", clip=0.5)
    l = _train(other, clip=0.5)
    init = _train("grouped", steps=0)
    assert any(not torch.equal(a, b) for a, b in zip(g, init))
    for a, b in zip(g, l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_big_batch():
    # two micro-batches with equal per-task counts, loss / 2 == one batch of the union
    m = _model()
    ortho = OrthoLoRA(m, T, seed=3)
    b1, b2 = make_batch([2, 1, 2], seed=1), make_batch([2, 1, 2], seed=2)
    for b in (b1, b2):
        with ortho.record(b["task_ids"]):
            (task_losses(m, b).sum() / 2).backward()
    acc_buf = ortho.buffer.clone()
    ortho.project_()
    acc = [p.grad.clone() for p in ortho.layout.params]
    heads_acc = [p.grad.clone() for p in m.heads.parameters()]
    m.zero_grad(set_to_none=True)
    ortho.remove()
    ortho = OrthoLoRA(m, T, seed=3)
    union = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    with ortho.record(union["task_ids"]):
        task_losses(m, union).sum().backward()
    torch.testing.assert_close(acc_buf, ortho.buffer, rtol=1e-5, atol=1e-7)
    ortho.project_()
    for a, p in zip(acc, ortho.layout.params):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)
    for a, p in zip(heads_acc, m.heads.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)
    ortho.remove()


def test_layout_for_non_peft_module():
    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(6, 6)
            self.base.requires_grad_(False)
            self.a = nn.Linear(6, 2, bias=False)
            self.b = nn.Linear(2, 6, bias=False)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    torch.manual_seed(0)
    net = nn.Sequential(Adapter(), nn.Tanh(), Adapter())
    lay = LoRALayout.from_params([(str(i), net[i].a, net[i].b) for i in (0, 2)])
    x, y = torch.randn(7, 6), torch.randn(7, 6)
    tid = torch.tensor([0, 1, 1, 0, 2, 2, 1])
    ortho = OrthoLoRA(lay, T, collect="grouped")
    with ortho.record(tid):
        per_task_mean_loss(((net(x) - y) ** 2).mean(1), tid, T).sum().backward()
    grouped = ortho.buffer.clone()
    ortho.remove()
    loop = OrthoLoRA(lay, T, collect="loop")
    loop.backward(list(per_task_mean_loss(((net(x) - y) ** 2).mean(1), tid, T)))
    assert all(grouped[t].norm() > 0 for t in range(T))
    torch.testing.assert_close(grouped, loop.buffer, rtol=1e-5, atol=1e-7)


def test_amp_scaled_buffer_is_exactly_scaled_and_unscale_matches():
    b = make_batch([2, 3, 2])

    def run(scale):
        torch.manual_seed(0)
        m = _model()
        ortho = OrthoLoRA(m, T, seed=5)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with ortho.record(b["task_ids"]):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = task_losses(m, b).sum()
            scaler.scale(loss).backward()
        buf = ortho.buffer.clone()
        ortho.project_()
        scaler.unscale_(opt)
        grads = [p.grad.clone() for p in ortho.layout.params]
        ortho.remove()
        return buf, grads

    b1, g1 = run(1.0)
    b2, g2 = run(2.0 ** 12)
    assert b1.abs().sum() > 0
    torch.testing.assert_close(b2, b1 * 2.0 ** 12, rtol=1e-6, atol=0)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)


def test_amp_grouped_close_to_loop():
    b = make_batch([2, 3, 2])
    bufs = []
    for mode in ("grouped", "loop"):
        torch.manual_seed(0)
        m = _model()
        ortho = OrthoLoRA(m, T, collect=mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = task_losses(m, b)
        if mode == "grouped":
            with ortho.record(b["task_ids"]):
                losses.sum().backward()
        else:
            ortho.backward(list(losses))
        bufs.append(ortho.buffer.clone())
        ortho.remove()
    assert bufs[0].dtype == torch.float32
    rel = (bufs[0] - bufs[1]).norm(dim=1) / bufs[1].norm(dim=1)
    assert (rel < 2e-2).all(), rel


def test_overflow_reaches_grad_scaler_and_step_is_skipped():
    torch.manual_seed(0)
    m = _model()
    ortho = OrthoLoRA(m, T)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in ortho.layout.params]
    b = make_batch([2, 2, 2])
    with ortho.record(b["task_ids"]):
        losses = task_losses(m, b)
        losses = losses * torch.tensor([1.0, float("inf"), 1.0])  # task 1 overflows
        scaler.scale(losses.sum()).backward()
    ortho.project_()
    assert not torch.isfinite(torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 16
    for p, q in zip(ortho.layout.params, before):
        assert torch.equal(p.detach(), q)
    ortho.remove()


def test_errors():
    m = _model()
    with pytest.raises(ValueError, match="num_tasks"):
        OrthoLoRA(m, 0)
    with pytest.raises(ValueError, match="granularity"):
        OrthoLoRA(m, T, granularity="row")
    with pytest.raises(ValueError, match="collect"):
        OrthoLoRA(m, T, collect="vmap")
    with pytest.raises(ValueError, match="model"):
        OrthoLoRA(nn.Linear(3, 3), T)
    ortho = OrthoLoRA(m, T)
    with pytest.raises(RuntimeError, match="already"):
        OrthoLoRA(m, T)  # the same modules patched twice
    b = make_batch([2, 2, 2])
    with pytest.raises(ValueError, match="task_ids"):
        with ortho.record(torch.tensor([0, 1, 3, 0, 1, 2])):
            pass
    with pytest.raises(ValueError, match="task"):
        with ortho.task(3):
            pass
    with pytest.raises(TypeError, match="task_ids"):
        with ortho.record(torch.zeros(6)):
            pass
    with pytest.raises(RuntimeError, match="task_ids"):
        with ortho.record(torch.tensor([0, 1, 2])):  # 3 ids for a batch of 6
            task_losses(m, b).sum().backward()
    with pytest.raises(RuntimeError, match="nest"):
        with ortho.record(b["task_ids"]):
            with ortho.task(0):
                pass
    with pytest.raises(ValueError, match="task_losses"):
        ortho.backward([torch.tensor(1.0)])
    ortho.remove()
    loop = OrthoLoRA(m, T, collect="loop")
    with pytest.raises(RuntimeError, match="grouped"):
        with loop.record(b["task_ids"]):
            pass
    with pytest.raises(RuntimeError, match="project_"):
        loop.project_()


def test_dropped_projector_leaves_plain_layers_and_allows_a_new_one():
    import gc
    m = _model()
    ref = copy.deepcopy(m)
    ortho = OrthoLoRA(m, T)
    del ortho
    gc.collect()
    b = make_batch([2, 2, 2])
    task_losses(m, b).sum().backward()  # patched but orphaned: ordinary gradients
    task_losses(ref, b).sum().backward()
    for p, q in zip(_lora(m), _lora(ref)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    with OrthoLoRA(m, T) as again:  # may patch again; removed on exit
        with again.record(b["task_ids"]):
            task_losses(m, b).sum().backward()
        assert again.buffer.abs().sum() > 0
    assert all("forward" not in e.module.__dict__ for e in again.layout.entries)


def test_state_dict_resumes_the_order_stream():
    m = _model()
    b = make_batch([2, 2, 2])
    ortho = OrthoLoRA(m, T, seed=11, granularity="matrix")

    def step(o):
        with o.record(b["task_ids"]):
            task_losses(m, b).sum().backward()
        return o.project_().order.clone()

    step(ortho)
    state = ortho.state_dict()
    want = step(ortho)
    ortho.remove()
    fresh = OrthoLoRA(m, T, seed=11, granularity="matrix")
    first = step(fresh)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 1
    assert torch.equal(step(fresh), want) and not torch.equal(first, want)
    fresh.remove()
