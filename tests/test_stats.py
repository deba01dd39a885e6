"""``return_stats=True``: Gram, coefficients, projection counts, cosine, conflicts."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference

from cases import make_grads, random_order


def test_stats_match_reference(backend):
    x = make_grads(6, 3000, seed=30, shared=-0.6)
    segs = [0, 1000, 1500, 3000]
    order = random_order(6, 3, seed=31)
    got = ok.project(x, segs, order=order, backend=backend, return_stats=True)
    ref = reference.project(x, segs, order=order, return_stats=True)
    assert got.gram.shape == got.coeffs.shape == (3, 6, 6)
    assert got.gram.dtype == got.coeffs.dtype == torch.float64
    torch.testing.assert_close(got.gram.double(), ref.gram, rtol=1e-6, atol=1e-6 * float(ref.gram.abs().max()))
    torch.testing.assert_close(got.coeffs.double(), ref.coeffs, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.num_projections.long(), ref.num_projections)
    assert torch.equal(got.order, order)
    assert got.offsets == tuple(segs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", ["backend", "reference"])
def test_stats_dtype_contract(backend, fn, dtype):
    """Every backend and the reference: G and C float64 [S, T, T], nproj int32 [S]."""
    x = make_grads(3, 40, seed=33, shared=-0.6, dtype=dtype)
    project = reference.project if fn == "reference" else ok.project
    r = project(x, [0, 1, 40], backend=backend, return_stats=True)
    assert r.gram.dtype == r.coeffs.dtype == torch.float64 and r.gram.shape == r.coeffs.shape == (2, 3, 3)
    assert r.num_projections.dtype == torch.int32 and r.num_projections.shape == (2,)
    assert r.order.dtype == torch.int64 and r.order.shape == (2, 3, 3)


def test_cosine_and_conflict_fraction():
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    r = ok.project(x, backend="torch", return_stats=True)
    cos = r.cosine[0]
    torch.testing.assert_close(cos[0, 1], torch.tensor(-1 / 2 ** 0.5, dtype=torch.float64))
    assert cos[2].abs().sum() == 0                   # a zero task has cosine 0, not NaN
    assert r.conflicts.tolist() == [1]               # only (0, 1) conflicts among 3 pairs
    torch.testing.assert_close(r.conflict_fraction, torch.tensor([1 / 3]))
    # task 0 and task 1 each project once against the other
    assert r.num_projections.tolist() == [2]
    torch.testing.assert_close(r.projection_fraction, torch.tensor([2 / 6]))
    torch.testing.assert_close(r.mean_cosine, torch.tensor([-1 / 2 ** 0.5 / 3], dtype=torch.float64))


def test_stats_stay_on_device_as_tensors(backend):
    r = ok.project(make_grads(3, 50, seed=32), backend=backend, return_stats=True)
    for value in (r.gram, r.coeffs, r.num_projections, r.cosine, r.conflict_fraction, r.mean_cosine):
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu"
