"""Custom op registration: gradcheck, manual solve VJP, opcheck, torch.compile."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels.ops import _project_backward_op, _project_op
from ortholora_kernels.solve import solve, solve_vjp, weights, weights_vjp

from cases import make_grads, random_order


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("t,segs", [(1, [0, 9]), (2, [0, 4, 9]), (4, [0, 3, 9]), (6, [0, 1, 2, 9])])
def test_gradcheck_float64(target, reduction, t, segs):
    x = target.grads(t, 9, dtype=torch.float64, seed=40 + t, shared=-0.6).requires_grad_()
    order = target.order(t, len(segs) - 1, seed=41 + t)
    fn = lambda v: target.project(v, segs, order=order, reduction=reduction)  # noqa: E731
    # fast_mode (one random direction) under the interpreter: the full Jacobian costs
    # 2 T N interpreted launches; the exact backward is checked in the next test.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=target.interpreted)


def test_gradient_matches_autograd_through_reference_formula():
    """The op's backward equals autograd through a pure-torch Gram formulation."""
    x = make_grads(5, 200, dtype=torch.float64, seed=42, shared=-0.7).requires_grad_()
    order = random_order(5, 2, seed=43)
    segs = [0, 80, 200]
    dy = torch.randn(200, dtype=torch.float64)
    (g_op,) = torch.autograd.grad(ok.project(x, segs, order=order), x, dy)
    parts = []
    for s, (lo, hi) in enumerate(zip(segs, segs[1:])):
        xs = x[:, lo:hi]
        c, _ = solve((xs @ xs.T).unsqueeze(0), order[s:s + 1])
        parts.append(weights(c, "sum")[0] @ xs)
    (g_ad,) = torch.autograd.grad(torch.cat(parts, dim=1)[0], x, dy)
    torch.testing.assert_close(g_op, g_ad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [2, 3, 7])
def test_solve_vjp_matches_autograd(t):
    x = make_grads(t, 50, dtype=torch.float64, seed=44 + t, shared=-0.8)
    gram = torch.stack([x @ x.T, x[:, :20] @ x[:, :20].T]).requires_grad_()
    order = random_order(t, 2, seed=45)
    c, _ = solve(gram, order)
    cbar = torch.randn_like(c)
    (expected,) = torch.autograd.grad(c, gram, cbar)
    torch.testing.assert_close(solve_vjp(gram.detach(), order, cbar), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_weights_vjp_is_the_adjoint(reduction):
    c = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = weights(c, reduction)
    wbar = torch.randn_like(w)
    (expected,) = torch.autograd.grad(w, c, wbar)
    torch.testing.assert_close(weights_vjp(wbar, 4, reduction), expected)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("t,dtype", [(1, torch.float32), (3, torch.float64), (8, torch.float32),
                                     (17, torch.float32), (5, torch.float16)])
def test_backward_matches_autograd_through_the_solve(target, reduction, t, dtype):
    """dX of the op (backend passes + hand-written solve VJP) == autograd through a
    pure-torch float64 Gram formulation, for every pair and input dtype."""
    x = target.grads(t, 150, seed=80 + t, shared=-0.6, dtype=dtype)
    segs = [0, 1, 60, 150]
    order = target.order(t, 3, seed=81)
    xx = x.clone().requires_grad_()
    out = target.project(xx, segs, order=order, reduction=reduction)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(82), dtype=torch.float64)
    (got,) = torch.autograd.grad(out, xx, dy.to(dtype=dtype, device=target.device))
    assert got.dtype == dtype and got.device == x.device
    x64 = x.detach().cpu().double().requires_grad_()
    parts = []
    for s, (lo, hi) in enumerate(zip(segs, segs[1:])):
        xs = x64[:, lo:hi]
        c, _ = solve((xs @ xs.T).unsqueeze(0), order[s:s + 1].cpu())
        parts.append(weights(c, reduction)[0] @ xs)
    want = torch.cat(parts, dim=1)
    (want,) = torch.autograd.grad(want if reduction == "none" else want[0], x64, dy.to(dtype).double())
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_opcheck(target, reduction):
    order = target.order(4, 2, seed=46)
    for x in (target.grads(4, 30, seed=47), target.grads(4, 30, seed=47, dtype=torch.float64).requires_grad_()):
        torch.library.opcheck(_project_op, (x, [0, 10, 30], order, reduction, target.backend))
    x = target.grads(4, 30, seed=48)
    g = torch.Generator().manual_seed(49)
    dout = torch.randn((30,) if reduction == "sum" else (4, 30), generator=g).to(target.device)
    gram = torch.randn(2, 4, 4, dtype=torch.float64, generator=g).to(target.device)
    torch.library.opcheck(_project_backward_op, (x, dout, gram, order, [0, 10, 30], reduction, target.backend))


def test_compile_fullgraph_forward_and_training_step(target):
    torch._dynamo.reset()
    x = target.grads(4, 64, seed=49, shared=-0.5)
    order = target.order(4, 2, seed=50)

    def fn(v):
        return target.project(v * 2.0, [0, 20, 64], order=order, return_stats=True).output + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x))

    def step(v):
        out = target.project(v, [0, 20, 64], order=order)
        return (out * out).sum()

    v1 = x.clone().requires_grad_()
    v2 = x.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(v1).backward()
    step(v2).backward()
    torch.testing.assert_close(v1.grad, v2.grad)


def test_compile_with_drawn_orders_has_no_graph_break():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(lambda v: ok.project(v, [0, 5, 16], backend="torch"), fullgraph=True)
    assert fn(make_grads(3, 16, seed=51)).shape == (16,)
    assert not counters["graph_break"]


def test_compile_fullgraph_with_a_changing_task_count(target):
    """T changes between calls (dynamic shapes): dispatch stays traceable, no graph break."""
    torch._dynamo.reset()
    fn = torch.compile(lambda v, o: target.project(v, [0, 5, 16], order=o) * 2.0, fullgraph=True)
    for t in (3, 4, 5):
        x = target.grads(t, 16, seed=52 + t, shared=-0.5)
        order = target.order(t, 2, seed=53 + t)
        torch.testing.assert_close(fn(x, order), target.project(x, [0, 5, 16], order=order) * 2.0)


def test_compile_fullgraph_auto_backend_with_a_changing_task_count():
    torch._dynamo.reset()
    fn = torch.compile(lambda v, o: ok.project(v, order=o), fullgraph=True)
    for t in (3, 4, 5):
        x = make_grads(t, 16, seed=54 + t, shared=-0.5)
        order = random_order(t, seed=55 + t)
        torch.testing.assert_close(fn(x, order), ok.project(x, order=order))
