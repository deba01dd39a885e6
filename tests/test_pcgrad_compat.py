"""PCGrad: Pytorch-PCGrad's API (pc_backward / step / zero_grad) over OrthoLoRA."""
import copy

import pytest
import torch

from models import make_batch, task_losses, tiny_multitask
from ortholora_kernels import OrthoLoRA, PCGrad, reference
from readme import run_readme_block


def test_readme_recipe_runs_and_trains():
    ns = run_readme_block("Coming from Pytorch-PCGrad")
    opt = ns["optimizer"]
    assert opt.ortho.num_steps == 3 and opt.ortho.num_tasks == 2
    assert opt.ortho.last_stats is not None


def test_all_parameters_projected_like_pcgrad():
    """model=None: every parameter is one vector; .grad is the reference PCGrad (mean) of the
    per-task gradients computed independently with autograd.grad."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(10, 5), torch.randn(10, 3)
    params = list(net.parameters())

    def losses():
        out = net(x)
        return [((out[:, t] - y[:, t]) ** 2).mean() for t in range(3)]

    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, params, retain_graph=True)]) for l in losses()])
    opt = PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), seed=4)
    opt.zero_grad()
    res = opt.pc_backward(losses())
    got = torch.cat([p.grad.reshape(-1) for p in params])
    order = res.order
    want = reference.project(grads.double(), order=order, reduction="mean")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, grads.mean(0))  # conflicts were projected
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_peft_model_equals_ortholora_loop():
    m = tiny_multitask("roberta", 3, lora_dropout=0.0)
    m.train()
    ref = copy.deepcopy(m)
    b = make_batch([2, 3, 2])
    opt = PCGrad(torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1), m,
                 reduction="sum", granularity="ab", seed=2)
    opt.zero_grad()
    opt.pc_backward(list(task_losses(m, b)))
    ortho = OrthoLoRA(ref, 3, collect="loop", granularity="ab", seed=2)
    ortho.backward(list(task_losses(ref, b)))
    ortho.project_()
    for p, q in zip(m.parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)  # LoRA projected, heads summed
    state = opt.state_dict()
    torch.save(state, "/dev/null")
    with pytest.raises(ValueError, match="objectives"):
        opt.pc_backward(list(task_losses(m, b))[:2])
    with pytest.raises(TypeError, match="optimizer"):
        PCGrad(object())
    opt.ortho.remove()
    ortho.remove()
