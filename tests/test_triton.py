"""The triton backend against the reference: CPU tensors through TRITON_INTERPRET=1.

Shapes stay small (the interpreter is ~1000x slower than a GPU). GPU-only tests (bf16,
CUDA graph capture, large shapes) are marked ``gpu``; each has a CPU twin just above it.
"""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference
from ortholora_kernels.ops import _project_op

from cases import assert_matches_reference, make_grads, random_order, random_segments

interpreter = pytest.mark.interpreter
gpu = pytest.mark.gpu

SHAPES = [  # (T, N, max segments): N below one block, ragged, 1-element segments, T padded
    (1, 7, 2), (2, 1, 1), (2, 64, 3), (3, 300, 4), (5, 17, 17), (8, 1000, 3), (17, 200, 3),
]


def _impl():
    from ortholora_kernels.backends import triton_impl
    return triton_impl


def _project(x, segs=None, **kw):
    return ok.project(x, segs, backend="triton", **kw)


@interpreter
@pytest.mark.parametrize("t,n,s", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference(t, n, s, reduction, dtype):
    seed = 7 * t + n + s
    x = make_grads(t, n, seed=seed, shared=-0.5, dtype=dtype)
    segs = random_segments(n, s, seed=seed)
    order = random_order(t, len(segs) - 1, seed=seed)
    assert_matches_reference(_project(x, segs, order=order, reduction=reduction), x, segs,
                             order=order, reduction=reduction)


@interpreter
@pytest.mark.parametrize("t", [1, 2, 3, 8, 17])
def test_stats_match_reference(t):
    x = make_grads(t, 500, seed=60 + t, shared=-0.6)
    # Segments wider than T: with fewer columns than tasks, residual inner products are
    # zero in exact arithmetic and their sign (hence the count) is rounding noise.
    segs = [0, 40, 200, 500]
    order = random_order(t, 3, seed=61)
    got = _project(x, segs, order=order, return_stats=True)
    ref = reference.project(x, segs, order=order, return_stats=True)
    assert got.gram.dtype == got.coeffs.dtype == torch.float64 and got.num_projections.dtype == torch.int32
    scale = float(ref.gram.abs().max())
    torch.testing.assert_close(got.gram, ref.gram, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got.coeffs, ref.coeffs, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.num_projections.long(), ref.num_projections)


@interpreter
@pytest.mark.parametrize("t", [6, 17])
def test_gram_is_float64_accurate_for_float64_input(t):
    x = make_grads(t, 700, seed=62, dtype=torch.float64, shared=-0.3)
    segs = [0, 300, 700]
    got = _impl().BACKEND.gram(x, ok._args.segments_for(segs, 700))
    ref = reference.project(x, segs, order=random_order(t, 2, seed=0), return_stats=True).gram
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


@interpreter
@pytest.mark.parametrize("t", [5, 17])
def test_out_of_range_order_values_are_skipped_not_read(t):
    """Device orders are not validated (no host sync): a j outside [0, T) must be skipped
    (like the native CUDA kernel), never used as an address (T > 16: G rows are loaded)."""
    from ortholora_kernels._args import segments_for
    x = make_grads(t, 300, seed=64, shared=-0.5)
    v = torch.ones(100)
    x[:, :100] = v                          # segment 0: tasks 0..T-3 along +v ...
    x[t - 2:, :100] = -v                    # ... the last two along -v: G0[T-1, i] < 0
    order = random_order(t, 2, seed=65)
    bad = order.clone()
    bad[1] = torch.where(bad[1] == torch.arange(t)[:, None], bad[1], torch.full_like(bad[1], -1))
    out, _, _, nproj = ok.ops.forward(x, segments_for([0, 100, 300], 300), bad, "none", "triton")
    assert int(nproj[1]) == 0                                   # nothing visited in segment 1
    assert torch.equal(out[:, 100:], x[:, 100:])
    ref = reference.project(x[:, :100], order=order[0], reduction="none", return_stats=True)
    assert int(nproj[0]) == int(ref.num_projections[0])
    assert_matches_reference(out[:, :100], x[:, :100], order=order[0], reduction="none")


@interpreter
def test_drawn_orders_match_reference():
    x = make_grads(6, 400, seed=63, shared=-0.8)
    segs = [0, 150, 400]
    out = _project(x, segs, generator=torch.Generator().manual_seed(5))
    ref = reference.project(x, segs, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@interpreter
def test_two_dimensional_order_and_t64():
    x = make_grads(64, 40, seed=64, shared=-0.4)
    order = random_order(64, seed=65)
    out = _project(x, [0, 9, 40], order=order, reduction="none")
    assert_matches_reference(out, x, [0, 9, 40], order=order, reduction="none")


@interpreter
def test_deterministic_bitwise_with_many_chunks(monkeypatch):
    impl = _impl()
    monkeypatch.setattr(impl, "_TARGET_PROGRAMS", 2)   # force multi-block chunks on a small N
    x = make_grads(8, 5000, seed=66, shared=-0.5)
    segs = [0, 37, 5000]
    order = random_order(8, 2, seed=67)
    runs = [_project(x, segs, order=order, return_stats=True) for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r.output, runs[0].output)
        assert torch.equal(r.gram, runs[0].gram) and torch.equal(r.coeffs, runs[0].coeffs)
    assert_matches_reference(runs[0].output, x, segs, order=order)


@interpreter
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_float32(scale):
    base = make_grads(5, 900, seed=68, shared=-0.6, dtype=torch.float64)
    order = random_order(5, 2, seed=69)
    segs = [0, 300, 900]
    x = (base * scale).to(torch.float32)
    r = _project(x, segs, order=order, return_stats=True)
    assert torch.isfinite(r.output).all() and torch.isfinite(r.gram).all()
    assert_matches_reference(r.output, x, segs, order=order)
    ref = reference.project(x, segs, order=order, return_stats=True)
    torch.testing.assert_close(r.gram, ref.gram, rtol=1e-5, atol=1e-6 * float(ref.gram.abs().max()))


@interpreter
def test_mixed_scales_in_one_block():
    """Rows scale independently: a 1e-30 task next to a 1e30 task keeps its Gram entries."""
    x = make_grads(3, 200, seed=70, shared=-0.6, dtype=torch.float64)
    x[0] *= 1e-30
    x[2] *= 1e30
    x = x.float()
    order = random_order(3, seed=71)
    r = _project(x, order=order, reduction="none", return_stats=True)
    ref = reference.project(x, order=order, reduction="none", return_stats=True)
    torch.testing.assert_close(r.gram, ref.gram, rtol=1e-5, atol=0)
    assert_matches_reference(r.output, x, order=order, reduction="none")


@interpreter
def test_zero_gradient_tasks_are_never_divided_by():
    x = make_grads(4, 300, seed=72, shared=-0.9)
    x[1] = 0
    x[3, 100:] = 0
    segs = [0, 100, 300]
    order = random_order(4, 2, seed=73)
    out = _project(x, segs, order=order, reduction="none")
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(300))
    assert_matches_reference(out, x, segs, order=order, reduction="none")


@interpreter
def test_nan_and_inf_propagate():
    x = make_grads(3, 100, seed=74)
    x[1, 5] = float("nan")
    x[2, 60] = float("inf")
    out = _project(x, [0, 50, 100])
    assert torch.isnan(out[5])                       # never silently zeroed
    assert not torch.isfinite(out[50:]).all()
    assert torch.isfinite(_project(make_grads(3, 100, seed=74), [0, 50, 100])).all()


@interpreter
@pytest.mark.parametrize("t", [3, 17])
def test_nan_stays_in_its_segment(t):
    """A NaN poisons its own segment's output, never silently zeroed, never another segment."""
    x = make_grads(t, 120, seed=78, shared=-0.5)
    x[1, 5] = float("nan")
    segs = [0, 40, 120]
    order = random_order(t, 2, seed=79)
    out = _project(x, segs, order=order)
    ref = reference.project(x, segs, order=order)
    assert torch.isnan(out[torch.isnan(ref)]).all()
    assert_matches_reference(out[40:], x[:, 40:], order=order[1], reduction="sum")


@interpreter
def test_single_task_unchanged_and_noncontiguous_copied():
    x = make_grads(1, 513, seed=75)
    for reduction, expect in [("sum", x[0]), ("mean", x[0]), ("none", x)]:
        assert torch.equal(_project(x, [0, 13, 513], reduction=reduction), expect)
    y = make_grads(4, 600, seed=76, shared=-0.5)
    yt = y.T.contiguous().T
    order = random_order(4, seed=77)
    assert torch.equal(_project(yt, order=order), _project(y, order=order))


@interpreter
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("t,dtype", [(1, torch.float32), (3, torch.float64), (8, torch.float32),
                                     (17, torch.float32), (5, torch.float16)])
def test_backward_matches_torch_backend(reduction, t, dtype):
    x = make_grads(t, 150, seed=80 + t, shared=-0.6, dtype=dtype)
    segs = [0, 1, 60, 150]
    order = random_order(t, 3, seed=81)
    grads = []
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        out = ok.project(xx, segs, order=order, reduction=reduction, backend=backend)
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(82), dtype=torch.float64).to(dtype)
        grads.append(torch.autograd.grad(out, xx, dy)[0])
    assert grads[0].dtype == dtype
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3}[dtype]
    scale = float(grads[1].double().abs().max())
    torch.testing.assert_close(grads[0].double(), grads[1].double(), rtol=rtol, atol=rtol * scale)


@interpreter
def test_opcheck():
    order = random_order(3, 2, seed=83)
    x = make_grads(3, 40, seed=84, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(_project_op, (x, [0, 10, 40], order, "sum", "triton"))


@interpreter
@pytest.mark.parametrize("fused,group,target", [(True, 16, 3), (True, 2, 10_000), (True, 1, 10_000),
                                                (False, 16, 10_000)])
def test_fused_and_unfused_stage2_agree(monkeypatch, fused, group, target):
    """Both levels of the ticket tree (groups of chunks, then segments) and the unfused path."""
    impl = _impl()
    monkeypatch.setattr(impl, "_TARGET_PROGRAMS", target)
    monkeypatch.setattr(impl, "_GROUP", group)
    monkeypatch.setattr(impl, "_FUSED", fused)
    x = make_grads(5, 3000, seed=85, shared=-0.6)
    segs = [0, 1, 900, 3000]
    order = random_order(5, 3, seed=86)
    seg = ok._args.segments_for(segs, 3000)
    seg._device_cache.clear()          # tables depend on the patched constants
    r = _project(x, segs, order=order, reduction="mean", return_stats=True)
    assert_matches_reference(r.output, x, segs, order=order, reduction="mean")
    ref = reference.project(x, segs, order=order, return_stats=True)
    torch.testing.assert_close(r.gram, ref.gram, rtol=1e-6, atol=1e-6 * float(ref.gram.abs().max()))
    torch.testing.assert_close(r.coeffs, ref.coeffs, rtol=1e-5, atol=1e-6)
    tickets = [v[1] for k, v in seg._device_cache.items() if k[0] == "triton_ws"]
    assert tickets and all(int(tk.abs().sum()) == 0 for tk in tickets)   # reset for the next call
    again = _project(x, segs, order=order, reduction="mean", return_stats=True)
    assert torch.equal(again.output, r.output) and torch.equal(again.gram, r.gram)
    seg._device_cache.clear()


@interpreter
def test_compile_fullgraph():
    """No graph break around the op: the backend does no host sync dynamo would trip on."""
    torch._dynamo.reset()
    x = make_grads(3, 64, seed=87, shared=-0.5)
    order = random_order(3, 2, seed=88)
    fn = lambda v: _project(v * 2.0, [0, 20, 64], order=order) + 1.0  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x), rtol=0, atol=0)


@interpreter
def test_layout_tables_are_cached(monkeypatch):
    """Per-call host work does not grow with N: the chunk tables are built once per layout."""
    impl = _impl()
    monkeypatch.setattr(impl, "_GROUP", 4)
    seg = ok._args.segments_for([0, 100, 3000], 3000)
    seg._device_cache.clear()
    lay = impl._table(seg, torch.device("cpu"), 256, True)
    assert impl._table(seg, torch.device("cpu"), 256, True) is lay
    assert lay.chunk_off.tolist() == [0, 1, 13] and lay.n_prog == 13     # chunks never straddle segments
    assert lay.table[1].tolist() == [1, 100, 356, 1] and lay.table[-1].tolist() == [1, 2916, 3000, 3]
    assert lay.group_off.tolist() == [0, 1, 5, 9, 13] and lay.seg_group_off.tolist() == [0, 1, 4]
    assert [int(v) for v in lay.table[:, 3]] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    seg._device_cache.clear()


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = ok.backends.availability("triton", "cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ok.project(make_grads(2, 10), backend="triton")
    assert ok.backends.select(None, torch.device("cpu")) != "triton"   # never chosen automatically


def test_import_without_triton_gives_a_reason():
    """The module imports without triton (a fresh interpreter with triton blocked)."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from ortholora_kernels.backends import triton_impl as ti\n"
        "print(ti.availability(torch.device('cuda')))\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "triton is not importable" in out.stdout


def test_availability_other_devices():
    impl = _impl()
    if impl._IMPORT_ERROR is None:
        assert impl.availability(torch.device("meta")) is not None
    else:
        assert "triton" in impl.availability(torch.device("cpu"))


def _compile_for_sm90(fn, types, consts, num_warps):
    """Compile ``fn`` to a cubin for an H100 (sm_90) without a GPU: Triton's bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@pytest.mark.slow
@pytest.mark.parametrize("t,dtype", [(8, "fp32"), (32, "bf16")])
def test_kernels_compile_for_gpu_without_one(t, dtype):
    """The interpreter cannot see GPU-only compile errors: build the real cubins (sm_90)."""
    impl = _impl()
    if impl._IMPORT_ERROR is not None or impl._INTERPRETED:
        pytest.skip("needs triton, without TRITON_INTERPRET=1")
    pytest.importorskip("triton.backends.nvidia")
    seg = ok._args.segments_for([0, 5000], 5000)
    consts = dict(impl._gram_plan(seg, torch.device("cpu"), t, t, False, True, "sum")[-1])
    warps = consts.pop("num_warps")
    types = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", part_ptr="*fp64", table_ptr="*i64", N="i32", R="i32",
                 T="i32", group_off_ptr="*i64", seg_group_off_ptr="*i64", gpart_ptr="*fp64", gticket_ptr="*i32",
                 sticket_ptr="*i32", g_ptr="*fp64", order_ptr="*i64", c_ptr="*fp64", w_ptr="*fp64", nproj_ptr="*i32")
    try:
        _compile_for_sm90(impl._gram_kernel, types, {**consts, "FUSED": True}, warps)
    except RuntimeError as exc:  # no ptxas for this platform: nothing to check here
        if "ptxas" in str(exc).lower():
            pytest.skip(str(exc)[:200])
        raise
    r_pad, block = impl._combine_config(1)
    types = dict(table_ptr="*i64", x_ptr=f"*{dtype}", K1="i32", a_ptr="*fp64", a_ss="i32", a_sr="i32", a_sk="i32",
                 y_ptr=f"*{dtype}", K2="i32", b_ptr="*fp64", b_ss="i32", b_sr="i32", b_sk="i32",
                 out_ptr=f"*{dtype}", N="i32", R="i32")
    _compile_for_sm90(impl._combine_kernel, types, dict(R_PAD=r_pad, BLOCK=block, HAS_Y=True, FP64=False), 4)


# ---------------------------------------------------------------- GPU tests and CPU twins

@interpreter
def test_twin_of_bf16_on_gpu():
    x = make_grads(6, 700, seed=90, shared=-0.5, dtype=torch.float16)
    order = random_order(6, 2, seed=91)
    assert_matches_reference(_project(x, [0, 200, 700], order=order), x, [0, 200, 700], order=order)


@gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_on_gpu(reduction):
    x = make_grads(6, 70_000, seed=90, shared=-0.5, dtype=torch.bfloat16, device="cuda")
    order = random_order(6, 2, seed=91, device="cuda")
    out = _project(x, [0, 20_000, 70_000], order=order, reduction=reduction)
    assert_matches_reference(out, x, [0, 20_000, 70_000], order=order, reduction=reduction)


@interpreter
def test_twin_of_cuda_graph_capture():
    """What capture needs, checked on CPU: repeat calls reuse the tables and give the same bits."""
    x = make_grads(4, 300, seed=92, shared=-0.5)
    order = random_order(4, 2, seed=93)
    seg = ok._args.segments_for([0, 100, 300], 300)
    a = _project(x, [0, 100, 300], order=order)
    keys = set(seg._device_cache)
    b = _project(x, [0, 100, 300], order=order)
    assert set(seg._device_cache) == keys and torch.equal(a, b)


@gpu
def test_cuda_graph_capture():
    x = make_grads(8, 100_000, seed=92, shared=-0.5, device="cuda")
    order = random_order(8, 3, seed=93, device="cuda")
    segs = [0, 1000, 40_000, 100_000]
    expect = _project(x, segs, order=order)               # warm-up: compiles, builds tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _project(x, segs, order=order)
    x.copy_(make_grads(8, 100_000, seed=94, shared=-0.5, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, expect)
    assert_matches_reference(out, x, segs, order=order)


@interpreter
def test_twin_of_large_shapes():
    x = make_grads(32, 600, seed=95, shared=-0.3)
    order = random_order(32, 2, seed=96)
    assert_matches_reference(_project(x, [0, 250, 600], order=order), x, [0, 250, 600], order=order)


@gpu
@pytest.mark.parametrize("t,n", [(8, 295_000), (16, 1_000_000), (64, 50_000)])
def test_large_shapes_on_gpu(t, n):
    x = make_grads(t, n, seed=95, shared=-0.3, device="cuda")
    segs = random_segments(n, 12, seed=97)
    order = random_order(t, len(segs) - 1, seed=96, device="cuda")
    assert ok.backends.select(None, x.device) in ("triton", "native")
    for reduction in ("sum", "none"):
        out = _project(x, segs, order=order, reduction=reduction)
        assert_matches_reference(out, x, segs, order=order, reduction=reduction)
    runs = [_project(x, segs, order=order) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(_project(xx, segs, order=order), xx, torch.ones(n, device="cuda"))
    xt = x.clone().requires_grad_()
    (gt,) = torch.autograd.grad(ok.project(xt, segs, order=order, backend="torch"), xt, torch.ones(n, device="cuda"))
    torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-4 * float(gt.abs().max()))
