"""What only the triton backend has: the fused ticket tree, chunk tables, the import and
availability paths, GPU compilation without a GPU.

Everything the op promises (reference, statistics, autograd, opcheck, properties, bad
input) runs on triton-interp and triton-cuda through the test matrix (conftest.py).
"""
import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import reference

from cases import assert_matches_reference, make_grads, random_order

interpreter = pytest.mark.interpreter


def _impl():
    from ortholora_kernels.backends import triton_impl
    return triton_impl


def _project(x, segs=None, **kw):
    return ok.project(x, segs, backend="triton", **kw)


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
@pytest.mark.parametrize("fused,group,programs", [(True, 16, 3), (True, 2, 10_000), (True, 1, 10_000),
                                                (False, 16, 10_000)])
def test_fused_and_unfused_stage2_agree(monkeypatch, fused, group, programs):
    """Both levels of the ticket tree (groups of chunks, then segments) and the unfused path."""
    impl = _impl()
    monkeypatch.setattr(impl, "_TARGET_PROGRAMS", programs)
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
    lowp = {"bf16": 2, "fp16": 1}.get(dtype, 0)
    consts = dict(impl._gram_plan(seg, t, t, False, True, "sum", True, lowp)[1])
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
    types = dict(table_ptr="*i64", x_ptr=f"*{dtype}", K1="i32", a_ptr="*fp64", a_ss="i32", a_sr="i32", a_sk="i32",
                 y_ptr=f"*{dtype}", K2="i32", b_ptr="*fp64", b_ss="i32", b_sr="i32", b_sk="i32",
                 out_ptr=f"*{dtype}", N="i32", R="i32")
    consts = impl._combine_plan(1, torch.float32, True, True)
    warps = consts.pop("num_warps")
    _compile_for_sm90(impl._combine_kernel, types, consts, warps)





@interpreter
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_backward_past_the_fused_reverse_solve_uses_the_torch_one(monkeypatch, reduction):
    """T > 64: the fused reverse solve's shared memory grows as T_PAD^2 (T_PAD = 256 needs
    512 KiB, sm_90 has 227), so the backward runs the solve's torch reverse mode instead:
    no ``_solve_vjp_kernel`` launch, the same gradient as the torch backend."""
    impl = _impl()
    launched = []
    real = impl._solve_vjp

    def spy(*a, **k):
        launched.append(a[0].shape[-1])
        return real(*a, **k)
    monkeypatch.setattr(impl, "_solve_vjp", spy)
    t, n = 65, 96
    x = make_grads(t, n, dtype=torch.float64, seed=650, shared=-0.5)
    segs = [0, 40, n]
    order = random_order(t, 2, seed=651)
    grads = []
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        out = ok.project(xx, segs, order=order, reduction=reduction, backend=backend)
        dy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(652))
        grads.append(torch.autograd.grad(out, xx, dy)[0])
    assert launched == []
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9 * float(grads[1].abs().max()))
    x = make_grads(17, n, dtype=torch.float64, seed=653, shared=-0.5)   # T_PAD = 32: the limit decides
    order = random_order(17, 2, seed=654)
    for limit, calls in ((16, []), (32, [17])):
        monkeypatch.setattr(impl, "_VJP_MAX_T_PAD", limit)
        xx = x.clone().requires_grad_()
        ok.project(xx, segs, order=order, reduction=reduction, backend="triton").sum().backward()
        assert launched == calls


def _gram_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """The error bound of the dot path's Gram: exact products summed in fp32 over one tile
    of ``block`` columns (rounding-to-nearest or truncation: (block + 1) 2^-23 relative to
    the sum of |products|), tiles summed in fp64 (negligible here)."""
    a = x.double().abs()
    return (block + 1) * 2.0 ** -23 * (a @ a.T) + 1e-300


@interpreter
@pytest.mark.parametrize("scale", [1.0, 5e3, 1e-4])
def test_fp16_gram_on_the_tensor_core_path_is_within_its_bound_of_fp64(scale):
    """fp16 operands go to tl.dot unscaled (fp16 x fp16 products are exact in fp32 and stay
    in its range), each tile's fp32 sum is flushed to fp64: the Gram is within the tile
    bound of the exact fp64 Gram of the same fp16 values, at any scale fp16 holds
    (values near fp16's maximum, and subnormal ones)."""
    impl = _impl()
    n = 3000
    x = make_grads(16, n, seed=700, shared=-0.5) * scale
    x[3, :100] = 6e4 if scale > 1 else 3e-7         # fp16's extremes: near its max, subnormal
    x = x.to(torch.float16)
    seg = ok._args.segments_for([0, 1000, n], n)
    g = impl.BACKEND.gram(x, seg)
    xd = x.double()
    block, consts = impl._gram_plan(seg, 16, 16, False, True, "sum", False, 1)
    assert consts["LOWP"] == 1 and consts["USE_DOT"]
    for s, (lo, hi) in enumerate(((0, 1000), (1000, n))):
        exact = xd[:, lo:hi] @ xd[:, lo:hi].T
        err = (g[s] - exact).abs()
        assert torch.isfinite(g[s]).all()
        assert (err <= _gram_bound(x[:, lo:hi], block)).all(), float((err / _gram_bound(x[:, lo:hi], block)).max())
    seg._device_cache.clear()


def test_bf16_operands_scaled_by_powers_of_two_give_exact_fp32_products():
    """What the bf16 tensor-core path rests on, checked in torch: scaling bf16 rows by
    the power of two that brings their max into [1, 2) is exact (the scaled values are
    still bf16), and bf16 x bf16 products are exact in fp32 (8 + 8 significant bits),
    at scales fp32 products alone would overflow or flush (1e30, 1e-30)."""
    g = torch.Generator().manual_seed(5)
    for scale in (1.0, 1e30, 1e-30):
        x = (torch.randn(8, 4096, generator=g, dtype=torch.float64) * scale).to(torch.bfloat16)
        m = x.float().abs().amax(1, keepdim=True)
        e = torch.frexp(m)[1] - 1                                   # m in [2^e, 2^(e+1))
        scaled = x.float() * torch.pow(2.0, -e.float())
        assert torch.equal(scaled.to(torch.bfloat16).float(), scaled)          # the cast loses nothing
        assert scaled.abs().max() < 2 and scaled.abs().amax(1).min() >= 1
        a, b = scaled[0].to(torch.bfloat16).float(), scaled[1].to(torch.bfloat16).float()
        assert torch.equal((a * b).double(), a.double() * b.double())          # exact in fp32
        # un-scaled in fp64: the products of the original values, exactly
        ua, ub = torch.pow(2.0, e[0].double()), torch.pow(2.0, e[1].double())
        assert torch.equal((a * b).double() * ua * ub, x[0].double() * x[1].double())


def test_gram_programs_stay_a_few_per_sm_whatever_n(monkeypatch):
    """The chunk table holds about _PROGRAMS_PER_SM x SMs programs (plus one per segment at
    most), so the fp64 partials are a fixed few MiB, not a fraction of X that grows with
    N (16 tiles per program at most gave 15,625 programs at T = 64, N = 16M)."""
    impl = _impl()
    monkeypatch.setattr(impl, "_SM_COUNT", {0: 132})
    cuda0 = torch.device("cuda", 0)
    assert impl._target_programs(cuda0) == impl._PROGRAMS_PER_SM * 132
    block, t_pad = 64, 64
    for n in (295_000, 16_000_000, 1_000_000_000):
        segs = [0, 1, n // 3, n]
        seg = ok._args.segments_for(segs, n)
        lay = impl._Layout(seg, torch.device("cpu"), -(-n // block // impl._target_programs(cuda0)) * block)
        assert lay.n_prog <= impl._target_programs(cuda0) + len(segs), (n, lay.n_prog)
        partial_bytes = (lay.n_prog + lay.n_groups) * t_pad * t_pad * 8
        assert partial_bytes < 32 << 20                      # whatever N: under 32 MiB at T = 64
    seg = ok._args.segments_for([0, 7, 1_000_000_000], 1_000_000_000)
    monkeypatch.setattr(impl, "_TARGET_PROGRAMS", 500)
    lay = impl._table(seg, torch.device("cpu"), 64, True)
    assert lay.n_prog <= 502 and lay.table[-1].tolist()[2] == 1_000_000_000
    seg._device_cache.clear()


def test_cached_workspaces_are_capped_least_recently_used_first(monkeypatch):
    impl = _impl()
    monkeypatch.setattr(impl, "_MAX_WORKSPACES", 3)
    seg = ok._args.segments_for([0, 5, 100], 100)
    seg._device_cache.clear()
    built = []

    def ws(tile):
        return impl._cached_capped(seg, ("triton_ws", "cpu", None, tile), lambda: built.append(tile) or [tile])
    first = ws(1)
    ws(2), ws(3)
    assert ws(1) is first                        # a hit: now the most recently used
    ws(4)                                        # drops 2, the least recently used
    assert [k[3] for k in seg._device_cache if k[0] == "triton_ws"] == [3, 1, 4]
    assert ws(1) is first and built == [1, 2, 3, 4]
    ws(2)
    assert built == [1, 2, 3, 4, 2] and len([k for k in seg._device_cache if k[0] == "triton_ws"]) == 3
    seg._device_cache.clear()


def test_alignment_hint_only_where_every_offset_is_16_divisible():
    impl = _impl()
    for segs, n, want in (([0, 4096, 12288], 12288, True), ([0, 16, 48], 48, True),
                          ([0, 1, 1000, 3001], 3001, False), ([0, 8, 32], 32, False)):
        seg = ok._args.segments_for(segs, n)
        assert impl._aligned(seg) is want
        assert impl._gram_plan(seg, 16, 16, False, True, "sum")[1]["ALIGNED"] is want        # tl.dot path
        assert impl._gram_plan(seg, 4, 4, False, True, "sum")[1]["ALIGNED"] is False       # outer products
        assert impl._combine_plan(1, torch.float32, False, impl._aligned(seg))["ALIGNED"] is want
        seg._device_cache.clear()
