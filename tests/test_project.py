"""The public op against the float64 reference, on every (backend, device) pair."""
import pytest
import torch

from ortholora_kernels import ops, reference
from ortholora_kernels._args import segments_for

from cases import RTOL, assert_matches_reference

SHAPES = [  # (T, N, max segments); N is capped for the interpreter
    (1, 7, 2), (2, 1, 1), (2, 64, 3), (3, 1000, 5), (5, 17, 17), (8, 4096, 6),
    (16, 2000, 4), (17, 200, 3), (33, 300, 3), (8, 100_000, 4),
]


@pytest.mark.parametrize("t,n,s", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_reference(target, t, n, s, reduction):
    seed = t * 1000 + n + s
    n = target.size(n)
    x = target.grads(t, n, seed=seed, shared=-0.5)
    segs = target.segments(n, s, seed=seed)
    order = target.order(t, len(segs) - 1, seed=seed)
    if target.too_many_tasks(t):       # native on CUDA: T <= 32, an explicit choice raises
        with pytest.raises(RuntimeError, match=str(target.max_tasks)):
            target.project(x, segs, order=order, reduction=reduction)
        return
    out = target.project(x, segs, order=order, reduction=reduction)
    assert out.device == x.device
    assert_matches_reference(out, x, segs, order=order, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dtypes(target, dtype, reduction):
    if target.interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong (ARCHITECTURE.md: bf16 runs on triton-cuda)")
    n = target.size(3000)
    x = target.grads(5, n, dtype=dtype, seed=3, shared=-0.7)
    segs = [0, n // 3, n // 3 + 1, n]
    order = target.order(5, 3, seed=4)
    out = target.project(x, segs, order=order, reduction=reduction)
    assert_matches_reference(out, x, segs, order=order, reduction=reduction)


def test_many_tasks(target):
    t = 32 if target.too_many_tasks(64) else 64
    x = target.grads(t, 40, seed=64, shared=-0.4)
    order = target.order(t, seed=65)
    out = target.project(x, [0, 9, 40], order=order, reduction="none")
    assert_matches_reference(out, x, [0, 9, 40], order=order, reduction="none")


def test_two_dimensional_order_applies_to_every_segment(target):
    x = target.grads(4, 500, seed=5, shared=-0.6)
    order = target.order(4, seed=6)
    segs = [0, 200, 500]
    a = target.project(x, segs, order=order)
    b = target.project(x, segs, order=order.expand(2, 4, 4).contiguous())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drawn_orders_are_reproducible_and_seed_dependent(target):
    x = target.grads(6, 600, seed=7, shared=-0.8)
    segs = [0, 150, 600]

    def gen(seed):
        return torch.Generator(device=target.device).manual_seed(seed)
    runs = [target.project(x, segs, generator=gen(s), return_stats=True) for s in (11, 11, 12)]
    torch.testing.assert_close(runs[0].output, runs[1].output, rtol=0, atol=0)
    assert not torch.equal(runs[0].order, runs[2].order)
    assert not torch.equal(runs[0].output, runs[2].output)
    # the reference draws the very same orders from the same generator
    ref = reference.project(x, segs, generator=gen(11))
    torch.testing.assert_close(runs[0].output.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def test_repeated_calls_are_bitwise_identical(target):
    x = target.grads(8, target.size(5000), seed=66, shared=-0.5)
    n = x.shape[1]
    segs = [0, 37, n]
    order = target.order(8, 2, seed=67)
    runs = [target.project(x, segs, order=order, return_stats=True) for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r.output, runs[0].output)
        assert torch.equal(r.gram, runs[0].gram) and torch.equal(r.coeffs, runs[0].coeffs)
    assert_matches_reference(runs[0].output, x, segs, order=order)


def test_two_tasks_closed_form(target):
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, device=target.device)
    g2 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64, device=target.device)
    d = g1 @ g2                      # -1: a conflict
    p1 = g1 - d / (g2 @ g2) * g2
    p2 = g2 - d / (g1 @ g1) * g1
    out = target.project(torch.stack([g1, g2]), reduction="none")
    torch.testing.assert_close(out, torch.stack([p1, p2]), rtol=1e-12, atol=1e-12)
    assert abs(float(out[0] @ g2)) < 1e-12 and abs(float(out[1] @ g1)) < 1e-12


def test_single_task_is_returned_unchanged(target):
    x = target.grads(1, 513, seed=8)
    for reduction, expect in [("sum", x[0]), ("mean", x[0]), ("none", x)]:
        out = target.project(x, [0, 13, 513], reduction=reduction)
        assert torch.equal(out, expect)


def test_zero_gradient_tasks_are_never_divided_by(target):
    x = target.grads(4, 300, seed=9, shared=-0.9)
    x[1] = 0
    x[3, 100:] = 0                  # zero only in the second segment
    segs = [0, 100, 300]
    order = target.order(4, 2, seed=10)
    out = target.project(x, segs, order=order, reduction="none")
    assert torch.isfinite(out).all()
    assert torch.equal(out[1].cpu(), torch.zeros(300))
    assert_matches_reference(out, x, segs, order=order, reduction="none")


def test_exactly_antiparallel_pairs(target):
    g = target.grads(1, 256, seed=11, dtype=torch.float64)[0]
    x = torch.stack([g, -g, 2 * g])
    order = target.order(3, seed=12)
    out = target.project(x, order=order, reduction="none")
    assert_matches_reference(out, x, order=order, reduction="none")
    # task 1 is antiparallel to both others: its projection removes it entirely
    assert out[1].abs().max() < 1e-12


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_scales(target, scale, dtype):
    n = target.size(2000)
    base = target.grads(5, n, seed=13, shared=-0.6, dtype=torch.float64)
    order = target.order(5, 2, seed=14)
    segs = [0, n // 3, n]
    x = (base * scale).to(dtype)
    r = target.project(x, segs, order=order, return_stats=True)
    assert torch.isfinite(r.output).all() and torch.isfinite(r.gram).all()
    assert_matches_reference(r.output, x, segs, order=order)
    ref = reference.project(x, segs, order=order, return_stats=True)
    torch.testing.assert_close(r.gram.cpu(), ref.gram.cpu(), rtol=1e-5, atol=1e-6 * float(ref.gram.abs().max()))


def test_mixed_scales_in_one_block(target):
    """Rows scale independently: a 1e-30 task next to a 1e30 task keeps its Gram entries."""
    x = target.grads(3, 200, seed=70, shared=-0.6, dtype=torch.float64)
    x[0] *= 1e-30
    x[2] *= 1e30
    x = x.float()
    order = target.order(3, seed=71)
    r = target.project(x, order=order, reduction="none", return_stats=True)
    ref = reference.project(x, order=order, reduction="none", return_stats=True)
    torch.testing.assert_close(r.gram.cpu(), ref.gram.cpu(), rtol=1e-5, atol=0)
    assert_matches_reference(r.output, x, order=order, reduction="none")


def test_nan_and_inf_propagate_and_check_finite_raises(target):
    x = target.grads(3, 100, seed=15)
    x[1, 5] = float("nan")
    x[2, 60] = float("inf")
    segs = [0, 50, 100]
    out = target.project(x, segs)
    assert torch.isnan(out[5])                       # never silently zeroed
    assert not torch.isfinite(out[50:]).all()
    with pytest.raises(FloatingPointError, match="grads"):
        target.project(x, segs, check_finite=True)


@pytest.mark.parametrize("t", [3, 17])
def test_nan_stays_in_its_segment(target, t):
    """A NaN poisons its own segment's output, never silently zeroed, never another segment."""
    x = target.grads(t, 120, seed=78, shared=-0.5)
    x[1, 5] = float("nan")
    segs = [0, 40, 120]
    order = target.order(t, 2, seed=79)
    out = target.project(x, segs, order=order).cpu()
    ref = reference.project(x, segs, order=order).cpu()
    assert torch.isnan(out[torch.isnan(ref)]).all()
    assert_matches_reference(out[40:], x[:, 40:].cpu(), order=order[1].cpu(), reduction="sum")


def test_non_contiguous_input_is_copied(target):
    x = target.grads(4, 600, seed=16, shared=-0.5)
    xt = x.T.contiguous().T                          # same values, column-major strides
    assert not xt.is_contiguous()
    order = target.order(4, seed=17)
    torch.testing.assert_close(target.project(xt, order=order), target.project(x, order=order), rtol=0, atol=0)


def test_segments_as_tensor(target):
    x = target.grads(3, 90, seed=18, shared=-0.5)
    order = target.order(3, seed=19)
    a = target.project(x, torch.tensor([0, 30, 90]), order=order)
    b = target.project(x, [0, 30, 90], order=order)
    assert torch.equal(a, b)


def test_segments_project_independently(target):
    x = target.grads(4, 400, seed=20, shared=-0.7)
    order = target.order(4, 2, seed=21)
    whole = target.project(x, [0, 150, 400], order=order, reduction="none")
    first = target.project(x[:, :150], order=order[0], reduction="none")
    second = target.project(x[:, 150:], order=order[1], reduction="none")
    torch.testing.assert_close(whole, torch.cat([first, second], dim=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [5, 17])
def test_out_of_range_order_values_are_skipped(target, t):
    """The documented behaviour (ARCHITECTURE.md): an order entry outside [0, T) is a
    visit to nothing, exactly like a task's visit to itself, on every backend; never an
    address. project() rejects it up front only where that costs no sync (CPU, eager),
    so the composed op is called directly here, as a device or compiled call reaches it."""
    x = target.grads(t, 300, seed=64, shared=-0.5)
    v = torch.ones(100, device=target.device)
    x[:, :100] = v                          # segment 0: tasks 0..T-3 along +v ...
    x[t - 2:, :100] = -v                    # ... the last two along -v: conflicts
    order = target.order(t, 2, seed=65)
    tasks = torch.arange(t, device=target.device)[:, None]
    bad = order.clone()
    bad[0, :, 0] = torch.where(bad[0, :, 0] == tasks[:, 0], bad[0, :, 0], torch.full_like(bad[0, :, 0], t))
    bad[1] = torch.where(bad[1] == tasks, bad[1], torch.full_like(bad[1], -1))
    as_self = torch.where((bad < 0) | (bad >= t), tasks.expand(2, t, t), bad)   # skipped like a self-visit
    seg = segments_for([0, 100, 300], 300)
    for reduction in ("sum", "none"):
        got = ops.forward(x, seg, bad, reduction, target.backend)
        want = ops.forward(x, seg, as_self, reduction, target.backend)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    out, _, _, nproj = ops.forward(x, seg, bad, "none", target.backend)
    assert int(nproj[1]) == 0 and torch.equal(out[:, 100:], x[:, 100:])  # nothing visited in segment 1
    assert int(nproj[0]) > 0


def test_rtol_table_covers_all_dtypes():
    from ortholora_kernels._args import FLOAT_DTYPES
    assert set(RTOL) == set(FLOAT_DTYPES)


# ----------------------------------------------------------- what exists only on a GPU

def test_cuda_graph_capture(cuda_target):
    """The op captures into a CUDA graph: no host sync, tables and workspaces built before."""
    x = cuda_target.grads(8, 100_000, seed=92, shared=-0.5)
    order = cuda_target.order(8, 3, seed=93)
    segs = [0, 1000, 40_000, 100_000]
    expect = cuda_target.project(x, segs, order=order)        # warm-up: compiles, builds tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_target.project(x, segs, order=order)
    x.copy_(cuda_target.grads(8, 100_000, seed=94, shared=-0.5))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, expect)
    assert_matches_reference(out, x, segs, order=order)


@pytest.mark.parametrize("t,n", [(8, 295_000), (16, 1_000_000), (32, 50_000)])
def test_gpu_sized_shapes(cuda_target, t, n):
    x = cuda_target.grads(t, n, seed=95, shared=-0.3)
    segs = cuda_target.segments(n, 12, seed=97)
    order = cuda_target.order(t, len(segs) - 1, seed=96)
    for reduction in ("sum", "none"):
        out = cuda_target.project(x, segs, order=order, reduction=reduction)
        assert_matches_reference(out, x, segs, order=order, reduction=reduction)
    runs = [cuda_target.project(x, segs, order=order) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
