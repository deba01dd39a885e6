"""The backend contract and the solve interface: every backend's unfused primitives
(Gram alone, one-operand combine) and a plug-in solve, against the fused path and closed forms."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import backends
from ortholora_kernels.backends.base import Backend
from ortholora_kernels.ops import _project_op
from ortholora_kernels.solve import PCGradSolve, Solve, get_solve, register_solve, weighting_solution



class StagedPCGrad(PCGradSolve):
    """PCGradSolve with fusion off: the op must compose Gram, solve and combine itself."""

    name = "test-staged-pcgrad"
    fusable = False


class EqualWeights(Solve):
    """A weighting solve (the shape of UPGrad, MGDA, ...): w_i = scale for every task."""

    name = "test-equal-weights"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, gram, order, reduction):
        s, t, _ = gram.shape
        return weighting_solution(torch.full((s, t), self.scale, dtype=torch.float64, device=gram.device), reduction)

    def vjp(self, gram, order, reduction, weights_grad):
        return torch.zeros_like(gram)       # the weights do not depend on G


register_solve(StagedPCGrad())
register_solve(EqualWeights(0.5))


def test_every_registered_backend_implements_the_contract():
    for name in backends.BACKENDS:
        try:
            impl = backends.get(name)
        except ImportError:
            continue
        assert isinstance(impl, Backend) and impl.name == name


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_unfused_composition_matches_the_fused_path(target, reduction):
    backend = target.backend
    x = target.grads(5, 700, seed=1, shared=-0.6)
    segs = [0, 1, 300, 700]
    order = target.order(5, 3, seed=2)
    fused = _project_op(x, segs, order, reduction, backend)
    staged = _project_op(x, segs, order, reduction, backend, "test-staged-pcgrad")
    scale = float(fused[1].abs().max())
    torch.testing.assert_close(staged[1], fused[1], rtol=1e-6, atol=1e-6 * scale)      # Gram
    torch.testing.assert_close(staged[2], fused[2], rtol=1e-5, atol=1e-6)              # coefficients
    assert torch.equal(staged[3], fused[3])
    torch.testing.assert_close(staged[0], fused[0], rtol=2e-5, atol=2e-5 * float(x.abs().max()) * 5)


def test_unfused_backward_matches_the_fused_path(target):
    backend = target.backend
    x = target.grads(4, 90, seed=3, shared=-0.6, dtype=torch.float64).requires_grad_()
    order = target.order(4, 2, seed=4)
    dy = target.grads(1, 90, seed=5, dtype=torch.float64)[0]
    (a,) = torch.autograd.grad(_project_op(x, [0, 40, 90], order, "sum", backend)[0], x, dy)
    (b,) = torch.autograd.grad(_project_op(x, [0, 40, 90], order, "sum", backend, "test-staged-pcgrad")[0], x, dy)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_weighting_solve_plugs_in(target):
    """A solve that maps G to weights [S, T]: out = sum_i w_i g_i, "none" = w_i g_i, dX = w dY."""
    backend = target.backend
    x = target.grads(3, 200, seed=5, shared=-0.5, dtype=torch.float64).requires_grad_()
    order = target.order(3, 2, seed=6)
    out, gram, coeffs, nproj = _project_op(x, [0, 50, 200], order, "sum", backend, "test-equal-weights")
    torch.testing.assert_close(out, 0.5 * x.detach().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram[0], x.detach()[:, :50] @ x.detach()[:, :50].T, rtol=1e-12, atol=1e-12)
    assert torch.equal(coeffs.cpu(), torch.diag_embed(torch.full((2, 3), 0.5, dtype=torch.float64)))
    none = _project_op(x.detach(), [0, 50, 200], order, "none", backend, "test-equal-weights")[0]
    torch.testing.assert_close(none, 0.5 * x.detach(), rtol=1e-12, atol=1e-12)
    mean = _project_op(x.detach(), [0, 50, 200], order, "mean", backend, "test-equal-weights")[0]
    torch.testing.assert_close(mean, 0.5 * x.detach().mean(0), rtol=1e-12, atol=1e-12)
    dy = target.grads(1, 200, seed=7, dtype=torch.float64)[0]
    (dx,) = torch.autograd.grad(out, x, dy)
    torch.testing.assert_close(dx, 0.5 * dy.expand(3, 200), rtol=1e-12, atol=1e-12)


def test_solve_registry_errors():
    assert isinstance(get_solve("pcgrad"), PCGradSolve)
    with pytest.raises(ValueError, match="solve: expected one of"):
        get_solve("no-such-solve")
    with pytest.raises(TypeError, match="solve: expected a Solve"):
        register_solve(object())
