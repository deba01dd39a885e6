"""The public op against the float64 reference, on every CPU backend."""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference

from cases import RTOL, assert_matches_reference, make_grads, random_order, random_segments

SHAPES = [  # (T, N, max segments)
    (1, 7, 2), (2, 1, 1), (2, 64, 3), (3, 1000, 5), (5, 17, 17), (8, 4096, 6),
    (16, 2000, 4), (33, 300, 3), (8, 100_000, 4),
]


@pytest.mark.parametrize("t,n,s", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_reference_random_shapes(backend, t, n, s, reduction):
    seed = t * 1000 + n + s
    x = make_grads(t, n, seed=seed, shared=-0.5)
    segs = random_segments(n, s, seed=seed)
    order = random_order(t, len(segs) - 1, seed=seed)
    out = ok.project(x, segs, order=order, reduction=reduction, backend=backend)
    assert_matches_reference(out, x, segs, order=order, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dtypes(backend, dtype, reduction):
    x = make_grads(5, 3000, dtype=dtype, seed=3, shared=-0.7)
    segs = [0, 1000, 1001, 3000]
    order = random_order(5, 3, seed=4)
    out = ok.project(x, segs, order=order, reduction=reduction, backend=backend)
    assert_matches_reference(out, x, segs, order=order, reduction=reduction)


def test_two_dimensional_order_applies_to_every_segment(backend):
    x = make_grads(4, 500, seed=5, shared=-0.6)
    order = random_order(4, seed=6)
    segs = [0, 200, 500]
    a = ok.project(x, segs, order=order, backend=backend)
    b = ok.project(x, segs, order=order.expand(2, 4, 4).contiguous(), backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drawn_orders_are_reproducible_and_seed_dependent(backend):
    x = make_grads(6, 2000, seed=7, shared=-0.8)
    segs = [0, 500, 2000]
    runs = [ok.project(x, segs, generator=torch.Generator().manual_seed(s), backend=backend, return_stats=True)
            for s in (11, 11, 12)]
    torch.testing.assert_close(runs[0].output, runs[1].output, rtol=0, atol=0)
    assert not torch.equal(runs[0].order, runs[2].order)
    assert not torch.equal(runs[0].output, runs[2].output)
    # the reference draws the very same orders from the same generator
    ref = reference.project(x, segs, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(runs[0].output.double(), ref, rtol=1e-5, atol=1e-5)


def test_two_tasks_closed_form(backend):
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    d = g1 @ g2                      # -1: a conflict
    p1 = g1 - d / (g2 @ g2) * g2
    p2 = g2 - d / (g1 @ g1) * g1
    out = ok.project(torch.stack([g1, g2]), reduction="none", backend=backend)
    torch.testing.assert_close(out, torch.stack([p1, p2]), rtol=1e-12, atol=1e-12)
    assert abs(float(out[0] @ g2)) < 1e-12 and abs(float(out[1] @ g1)) < 1e-12


def test_single_task_is_returned_unchanged(backend):
    x = make_grads(1, 513, seed=8)
    for reduction, expect in [("sum", x[0]), ("mean", x[0]), ("none", x)]:
        out = ok.project(x, [0, 13, 513], reduction=reduction, backend=backend)
        assert torch.equal(out, expect)


def test_zero_gradient_tasks_are_never_divided_by(backend):
    x = make_grads(4, 300, seed=9, shared=-0.9)
    x[1] = 0
    x[3, 100:] = 0                  # zero only in the second segment
    segs = [0, 100, 300]
    order = random_order(4, 2, seed=10)
    out = ok.project(x, segs, order=order, reduction="none", backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(300))
    assert_matches_reference(out, x, segs, order=order, reduction="none")


def test_exactly_antiparallel_pairs(backend):
    g = make_grads(1, 256, seed=11, dtype=torch.float64)[0]
    x = torch.stack([g, -g, 2 * g])
    order = random_order(3, seed=12)
    out = ok.project(x, order=order, reduction="none", backend=backend)
    assert_matches_reference(out, x, order=order, reduction="none")
    # task 1 is antiparallel to both others: its projection removes it entirely
    assert out[1].abs().max() < 1e-12


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_scales(backend, scale, dtype):
    base = make_grads(5, 2000, seed=13, shared=-0.6, dtype=torch.float64)
    order = random_order(5, 2, seed=14)
    segs = [0, 700, 2000]
    x = (base * scale).to(dtype)
    out = ok.project(x, segs, order=order, backend=backend)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, x, segs, order=order)


def test_nan_and_inf_propagate_and_check_finite_raises(backend):
    x = make_grads(3, 100, seed=15)
    x[1, 5] = float("nan")
    x[2, 60] = float("inf")
    segs = [0, 50, 100]
    out = ok.project(x, segs, backend=backend)
    assert torch.isnan(out[5])                       # never silently zeroed
    assert not torch.isfinite(out[50:]).all()
    with pytest.raises(FloatingPointError, match="grads"):
        ok.project(x, segs, backend=backend, check_finite=True)


def test_non_contiguous_input_is_copied(backend):
    x = make_grads(4, 600, seed=16, shared=-0.5)
    xt = x.T.contiguous().T                          # same values, column-major strides
    assert not xt.is_contiguous()
    order = random_order(4, seed=17)
    torch.testing.assert_close(ok.project(xt, order=order, backend=backend),
                               ok.project(x, order=order, backend=backend), rtol=0, atol=0)


def test_segments_as_tensor(backend):
    x = make_grads(3, 90, seed=18, shared=-0.5)
    order = random_order(3, seed=19)
    a = ok.project(x, torch.tensor([0, 30, 90]), order=order, backend=backend)
    b = ok.project(x, [0, 30, 90], order=order, backend=backend)
    assert torch.equal(a, b)


def test_segments_project_independently(backend):
    x = make_grads(4, 400, seed=20, shared=-0.7)
    order = random_order(4, 2, seed=21)
    whole = ok.project(x, [0, 150, 400], order=order, backend=backend, reduction="none")
    first = ok.project(x[:, :150], order=order[0], backend=backend, reduction="none")
    second = ok.project(x[:, 150:], order=order[1], backend=backend, reduction="none")
    torch.testing.assert_close(whole, torch.cat([first, second], dim=1), rtol=1e-6, atol=1e-6)


def test_rtol_table_covers_all_dtypes():
    from ortholora_kernels._args import FLOAT_DTYPES
    assert set(RTOL) == set(FLOAT_DTYPES)
