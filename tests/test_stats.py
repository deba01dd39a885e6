"""``return_stats=True``: Gram, coefficients, projection counts, cosine, conflicts."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference



@pytest.mark.parametrize("t", [1, 2, 6, 17])
def test_stats_match_reference(target, t):
    n = target.size(3000)
    x = target.grads(t, n, seed=30 + t, shared=-0.6)
    # Segments wider than T: with fewer columns than tasks, residual inner products are
    # zero in exact arithmetic and their sign (hence the count) is rounding noise.
    segs = [0, n // 3, n // 2, n]
    order = target.order(t, 3, seed=31)
    got = target.project(x, segs, order=order, return_stats=True)
    ref = reference.project(x, segs, order=order, return_stats=True)
    assert got.gram.shape == got.coeffs.shape == (3, t, t)
    assert got.gram.dtype == got.coeffs.dtype == torch.float64
    torch.testing.assert_close(got.gram.cpu(), ref.gram.cpu(), rtol=1e-6, atol=1e-6 * float(ref.gram.abs().max()))
    torch.testing.assert_close(got.coeffs.cpu(), ref.coeffs.cpu(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.num_projections.cpu(), ref.num_projections.cpu())
    assert torch.equal(got.order, order)
    assert got.offsets == tuple(segs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", ["op", "reference"])
def test_stats_dtype_contract(target, fn, dtype):
    """Every backend and the reference: G and C float64 [S, T, T], nproj int32 [S]."""
    if target.interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong (ARCHITECTURE.md: bf16 runs on triton-cuda)")
    x = target.grads(3, 40, seed=33, shared=-0.6, dtype=dtype)
    project = reference.project if fn == "reference" else target.project
    r = project(x, [0, 1, 40], return_stats=True)
    assert r.gram.dtype == r.coeffs.dtype == torch.float64 and r.gram.shape == r.coeffs.shape == (2, 3, 3)
    assert r.num_projections.dtype == torch.int32 and r.num_projections.shape == (2,)
    assert r.order.dtype == torch.int64 and r.order.shape == (2, 3, 3)


def test_cosine_and_conflict_fraction():
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    r = ok.project(x, backend="torch", return_stats=True)
    cos = r.cosine[0]
    torch.testing.assert_close(cos[0, 1], torch.tensor(-1 / 2 ** 0.5, dtype=torch.float64))
    assert cos[2].abs().sum() == 0                   # a zero task has cosine 0, not NaN
    assert r.conflicts.tolist() == [1]               # only (0, 1) conflicts
    # task 2 (all zeros: absent from the step) is left out of the pair counts
    assert r.present.tolist() == [[True, True, False]]
    torch.testing.assert_close(r.conflict_fraction, torch.tensor([1.0]))
    # task 0 and task 1 each project once against the other: 2 of the 2 ordered present pairs
    assert r.num_projections.tolist() == [2]
    torch.testing.assert_close(r.projection_fraction, torch.tensor([1.0]))
    torch.testing.assert_close(r.mean_cosine, torch.tensor([-1 / 2 ** 0.5], dtype=torch.float64))
    torch.testing.assert_close(r.grad_norm, torch.tensor([[1.0, 2 ** 0.5, 0.0]], dtype=torch.float64))


def test_pair_statistics_over_present_tasks_match_a_direct_count():
    """Random gradients with some all-zero tasks: the statistics equal those of the present
    tasks alone (every pair of present tasks counted once)."""
    g = torch.Generator().manual_seed(5)
    for t, absent in [(4, [1]), (5, [0, 3]), (3, [0, 1, 2]), (3, [2, 0])]:
        x = torch.randn(t, 30, generator=g, dtype=torch.float64)
        x[absent] = 0
        r = ok.project(x, [0, 10, 30], backend="torch", return_stats=True)
        keep = [i for i in range(t) if i not in absent]
        for s, (lo, hi) in enumerate([(0, 10), (10, 30)]):
            y = x[keep, lo:hi]
            pairs = [(i, j) for i in range(len(keep)) for j in range(i + 1, len(keep))]
            cos = [float(torch.nn.functional.cosine_similarity(y[i], y[j], dim=0)) for i, j in pairs]
            want_cf = sum(c < 0 for c in cos) / max(len(pairs), 1)
            want_mc = sum(cos) / max(len(pairs), 1)
            assert abs(float(r.conflict_fraction[s]) - want_cf) < 1e-6
            assert abs(float(r.mean_cosine[s]) - want_mc) < 1e-9
            assert int(r.present[s].sum()) == len(keep)


def test_stats_stay_on_device_as_tensors(target):
    r = target.project(target.grads(3, 50, seed=32), return_stats=True)
    for value in (r.gram, r.coeffs, r.num_projections, r.order, r.cosine, r.conflict_fraction, r.mean_cosine):
        assert isinstance(value, torch.Tensor) and value.device.type == target.device


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_show_in_the_statistics(bad):
    """A NaN/Inf task gradient makes its segment's statistics NaN (never a plausible 0.0);
    the other segments keep their numbers."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, dtype=torch.float64, generator=g)
    clean = ok.project(x, [0, 20, 40], return_stats=True)
    x[1, 25] = bad                                   # segment 1 only
    res = ok.project(x, [0, 20, 40], return_stats=True)
    for name in ("conflict_fraction", "projection_fraction", "mean_cosine"):
        v = getattr(res, name)
        assert torch.isnan(v[1]), name
        torch.testing.assert_close(v[0], getattr(clean, name)[0])
    assert torch.isnan(res.cosine[1, 1, 0]) and torch.isnan(res.cosine[1, 0, 1])
    assert torch.isfinite(res.cosine[1, 0, 2]) and res.present[1].all()
    assert not torch.isfinite(res.grad_norm[1, 1]) and torch.isfinite(res.grad_norm[1, 0])


def test_explicit_presence_drives_the_pair_statistics():
    x = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    res = ok.aggregate(x, method="upgrad", present=torch.tensor([True, False, True]), return_stats=True)
    assert res.present.tolist() == [[True, False, True]]
    cos = res.cosine[0, 0, 2]
    torch.testing.assert_close(res.mean_cosine[0], cos)        # one pair of present tasks
    assert res.conflict_fraction[0] == float(res.gram[0, 0, 2] < 0)
