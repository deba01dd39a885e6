"""The native backend (compiled extension ortholora_kernels._C): what the test matrix
(native-cpu, native-cuda through the ``target`` fixture) does not already cover.

Determinism, thread counts, every CPU instruction-set variant, large N, the registered
ops called directly, the availability reasons, the CUDA registration, the compiled
backward passes and setup.py's build decisions.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import ops, reference
from ortholora_kernels.backends import native_impl, torch_impl
from ortholora_kernels._args import segments_for

from cases import assert_matches_reference, make_grads, random_order, random_segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = native_impl.availability(torch.device("cpu")) is None
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native backend unavailable: "
                                  f"{native_impl.availability(torch.device('cpu'))}")


def _ops():
    return torch.ops.ortholora_C


def _isas():
    """The CPU kernel variants this machine can run (always includes 'baseline')."""
    names = []
    previous = _ops().cpu_isa()
    try:
        for name in ("baseline", "avx2", "avx512"):
            try:
                _ops().set_cpu_isa(name)
                names.append(name)
            except (RuntimeError, ValueError):
                pass
    finally:
        _ops().set_cpu_isa(previous)
    return names


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def isa():
    previous = _ops().cpu_isa() if NATIVE else None
    yield _ops().set_cpu_isa
    if NATIVE:
        _ops().set_cpu_isa(previous)


def _assert_gram_close(gram, exact, dtype):
    """fp64 input: float64 exact; fp32/16/bf16: the fp32 fast path (fp32 sums over a tile
    of at most 32 terms per lane, flushed to float64) is ~1e-7 relative to the row norms."""
    d = torch.diagonal(exact, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    scale = d.unsqueeze(-1) * d.unsqueeze(-2) + 1e-300
    worst = float(((gram - exact).abs() / scale).max())
    assert worst <= (1e-12 if dtype == torch.float64 else 2e-6), worst


def _run(x, segs, order, reduction):
    return _ops().project(x, segs, order, reduction)


def _assert_identical(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u.view(torch.uint8) if u.is_floating_point() else u,
                           v.view(torch.uint8) if v.is_floating_point() else v)


# --------------------------------------------------------------------------------------
# Determinism and threads
# --------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_repeated_calls_are_bitwise_identical(dtype, reduction):
    x = make_grads(8, 200_003, dtype=dtype, seed=60, shared=-0.4)
    segs = [0, 70_001, 70_002, 200_003]
    order = random_order(8, 3, seed=61)
    first = _run(x, segs, order, reduction)
    for _ in range(3):
        _assert_identical(first, _run(x, segs, order, reduction))


@needs_native
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_one_and_two_threads_match_reference_and_each_other(threads, reduction):
    x = make_grads(8, 150_000, seed=62, shared=-0.5)
    segs = random_segments(150_000, 5, seed=63)
    order = random_order(8, len(segs) - 1, seed=64)
    results = []
    for n in (1, 2):
        threads(n)
        out = ok.project(x, segs, order=order, reduction=reduction, backend="native", return_stats=True)
        assert_matches_reference(out.output, x, segs, order=order, reduction=reduction)
        results.append((out.output, out.gram, out.coeffs, out.num_projections))
    # The column chunks never depend on the thread count: bitwise equal, not just close.
    _assert_identical(results[0], results[1])


# --------------------------------------------------------------------------------------
# Instruction-set variants
# --------------------------------------------------------------------------------------

@needs_native
def test_isa_reporting_and_bad_name(isa):
    assert _ops().cpu_isa() in ("baseline", "avx2", "avx512")
    assert "baseline" in _isas()
    with pytest.raises((RuntimeError, ValueError), match="set_cpu_isa"):
        isa("sse9000")


@needs_native
def test_isa_environment_variable():
    code = "import torch, ortholora_kernels._C; print(torch.ops.ortholora_C.cpu_isa())"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = {}
    for value in ("auto", "baseline", "no-such-isa"):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env=dict(env, ORTHOLORA_CPU_ISA=value))
        assert res.returncode == 0, res.stderr
        got[value] = res.stdout.strip()
    assert got["baseline"] == "baseline"
    assert got["no-such-isa"] == got["auto"] in _isas()          # unknown names fall back to the best


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t,n,s", [(1, 33, 2), (3, 1001, 3), (8, 20_000, 4), (13, 3_001, 2), (33, 517, 3)])
def test_every_cpu_variant_matches_reference(isa, dtype, t, n, s):
    x = make_grads(t, n, dtype=dtype, seed=65 + t, shared=-0.5)
    segs = random_segments(n, s, seed=66 + t)
    order = random_order(t, len(segs) - 1, seed=67 + t)
    for name in _isas():
        isa(name)
        for reduction in ("sum", "none"):
            out, gram, coeffs, nproj = _run(x, segs, order, reduction)
            assert_matches_reference(out, x, segs, order=order, reduction=reduction)
            ref = reference.project(x, segs, order=order, return_stats=True)
            _assert_gram_close(gram, ref.gram, dtype)
            assert torch.equal(nproj.long(), ref.num_projections)


# --------------------------------------------------------------------------------------
# Large N and many segments
# --------------------------------------------------------------------------------------

@needs_native
def test_large_n_target_shape():
    x = make_grads(8, 295_000, seed=68, shared=-0.3)
    order = random_order(8, seed=69)
    out = ok.project(x, order=order, backend="native")
    assert_matches_reference(out, x, order=order)


@needs_native
def test_many_ragged_segments_across_chunk_boundaries():
    n = 100_000
    segs = random_segments(n, 400, seed=70)
    x = make_grads(5, n, seed=71, shared=-0.6)
    order = random_order(5, len(segs) - 1, seed=72)
    for reduction in ("mean", "none"):
        out = ok.project(x, segs, order=order, reduction=reduction, backend="native")
        assert_matches_reference(out, x, segs, order=order, reduction=reduction)


@needs_native
def test_fp32_gram_is_float64_accurate_at_extreme_scales():
    base = make_grads(4, 50_000, dtype=torch.float64, seed=73, shared=-0.5)
    for scale in (1e-30, 1e30):
        x = (base * scale).to(torch.float32)
        _, gram, _, _ = _run(x, [0, 50_000], random_order(4, 1, seed=74), "sum")
        exact = x.double() @ x.double().T
        torch.testing.assert_close(gram[0], exact, rtol=1e-12, atol=0)


@needs_native
def test_fp32_gram_mixed_scales_take_the_exact_path_where_needed(isa):
    """Rows at 1e-30 and 1e30 next to ordinary rows, and a tile-local tiny block."""
    base = make_grads(6, 40_000, dtype=torch.float64, seed=89, shared=-0.5)
    base[1] *= 1e-30
    base[4] *= 1e30
    base[2, 5000:5600] *= 1e-25
    x = base.to(torch.float32)
    exact = (x.double() @ x.double().T).unsqueeze(0)
    for name in _isas():
        isa(name)
        _, gram, _, _ = _run(x, [0, 40_000], random_order(6, 1, seed=90), "sum")
        _assert_gram_close(gram, exact, torch.float32)
        assert torch.isfinite(gram).all()


# --------------------------------------------------------------------------------------
# The registered ops, called directly
# --------------------------------------------------------------------------------------

@needs_native
def test_op_direct_shapes_dtypes_and_stats():
    x = make_grads(6, 3000, dtype=torch.float16, seed=75, shared=-0.6)
    segs = [0, 1000, 1500, 3000]
    order = random_order(6, 3, seed=76)
    out, gram, coeffs, nproj = _run(x, segs, order, "sum")
    assert out.shape == (3000,) and out.dtype == torch.float16
    assert gram.shape == coeffs.shape == (3, 6, 6) and gram.dtype == coeffs.dtype == torch.float64
    assert nproj.shape == (3,) and nproj.dtype == torch.int32
    ref = reference.project(x, segs, order=order, return_stats=True)
    _assert_gram_close(gram, ref.gram, torch.float16)
    torch.testing.assert_close(coeffs, ref.coeffs, rtol=1e-5, atol=1e-5)
    assert torch.equal(nproj.long(), ref.num_projections)
    none, *_ = _run(x, segs, order, "none")
    assert none.shape == (6, 3000) and none.dtype == torch.float16
    # a [T, T] order applies to every segment
    _assert_identical(_run(x, segs, order[0], "sum"), _run(x, segs, order[0].expand(3, 6, 6).contiguous(), "sum"))


@needs_native
@pytest.mark.parametrize("args,exc,match", [
    (lambda x, o: (x[0], [0, 10], o, "sum"), ValueError, "grads: expected a 2-D"),
    (lambda x, o: (x.long(), [0, 10], o, "sum"), TypeError, "grads: expected a float"),
    (lambda x, o: (x, [0, 5, 5, 10], o, "sum"), ValueError, "strictly increasing"),
    (lambda x, o: (x, [0, 9], o, "sum"), ValueError, "last offset"),
    (lambda x, o: (x, [1, 10], o, "sum"), ValueError, "first offset"),
    (lambda x, o: (x, [0, 10], o, "max"), ValueError, "reduction"),
    (lambda x, o: (x, [0, 10], o.float(), "sum"), TypeError, "order: expected an int64"),
    (lambda x, o: (x, [0, 10], torch.zeros(4, 4, dtype=torch.int64), "sum"), ValueError, "order: expected shape"),
])
def test_op_direct_errors(args, exc, match):
    x = torch.randn(3, 10)
    order = random_order(3, seed=77)
    with pytest.raises(exc, match=match):
        _run(*args(x, order))


@needs_native
def test_ops_opcheck_and_compile():
    x = make_grads(4, 40, seed=78)
    order = random_order(4, 2, seed=79)
    torch.library.opcheck(_ops().project.default, (x, [0, 10, 40], order, "none"))
    torch.library.opcheck(_ops().cross.default, (x[:2], x, [0, 10, 40]))
    w, m = torch.randn(2, 2, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    torch.library.opcheck(_ops().backward_combine.default, (x[:2], x, w, m, [0, 10, 40]))
    for reduction, rows in (("mean", 1), ("none", 4)):   # the fake's shapes for both R
        torch.library.opcheck(_ops().solve_vjp.default,
                              (m, order, reduction, torch.randn(2, rows, 4, dtype=torch.float64)))
    torch._dynamo.reset()
    fn = torch.compile(lambda v: _ops().project(v, [0, 10, 40], order, "sum")[0] * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), _run(x, [0, 10, 40], order, "sum")[0] * 2)


# --------------------------------------------------------------------------------------
# Backward passes (compiled)
# --------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_compiled_backward_passes_match_torch(dtype):
    x = make_grads(5, 20_011, dtype=dtype, seed=80, shared=-0.6)
    seg = segments_for([0, 7000, 7001, 20_011], 20_011)
    order = random_order(5, 3, seed=81)
    y = make_grads(5, 20_011, dtype=dtype, seed=82)
    v = _ops().cross(y, x, list(seg.offsets))
    torch.testing.assert_close(v, torch_impl.BACKEND.cross(y, x, seg), rtol=1e-10, atol=1e-9)
    gram = torch_impl.BACKEND.gram(x, seg)
    for reduction, dout in (("sum", y[0]), ("none", y)):
        got = ops.backward(x, dout, gram, order, seg, reduction, "native")
        want = ops.backward(x, dout, gram, order, seg, reduction, "torch")
        assert got.dtype == dtype
        rtol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol,
                                   atol=rtol * float(want.double().abs().max()))


# --------------------------------------------------------------------------------------
# Availability and registration
# --------------------------------------------------------------------------------------

def test_availability_when_the_extension_is_missing(monkeypatch):
    def fail(name):
        raise ModuleNotFoundError("No module named 'ortholora_kernels._C'")
    monkeypatch.setattr(native_impl, "_state", {})
    monkeypatch.setattr(native_impl.importlib, "import_module", fail)
    reason = native_impl.availability(torch.device("cpu"))
    assert reason is not None and "not built" in reason
    assert not native_impl.built_with_cuda()
    with pytest.raises(RuntimeError, match="not built"):
        native_impl.BACKEND.fused_forward(torch.randn(2, 3), segments_for(None, 3), random_order(2, 1), "sum")


def test_availability_reports_a_load_error(monkeypatch):
    def fail(name):
        raise OSError("undefined symbol: _ZN3c10whatever")
    monkeypatch.setattr(native_impl, "_state", {})
    monkeypatch.setattr(native_impl.importlib, "import_module", fail)
    reason = native_impl.availability(torch.device("cpu"))
    assert "failed to load" in reason and "undefined symbol" in reason


def test_package_imports_and_falls_back_without_the_extension():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ortholora_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, ortholora_kernels as ok
        usable, reason = ok.backends_available("cpu")["native"]
        assert not usable and "blocked for the test" in reason, reason
        from ortholora_kernels import backends
        assert backends.select(None, torch.device("cpu")) == "torch"
        print(ok.project(torch.randn(3, 10)).shape)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ORTHOLORA_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([10])" in res.stdout


@needs_native
def test_cuda_glue_is_registered_only_when_built_with_cuda():
    from ortholora_kernels import _C
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("ortholora_C::project", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ortholora_C::project", "CUDA")
    assert has_cpu
    assert has_cuda == bool(_C.WITH_CUDA) == native_impl.built_with_cuda()
    if not has_cuda:
        assert "without CUDA" in native_impl.availability(torch.device("cuda"))
    assert "no kernels" in native_impl.availability(torch.device("meta"))


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_shared_with_torch():
    """The kernels' OpenMP calls land in torch's libgomp (so torch.set_num_threads rules)."""
    code = ("import torch, ortholora_kernels._C\n"
            "print(len({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) <= 1


@needs_native
def test_automatic_choice_prefers_native_on_cpu(monkeypatch):
    from ortholora_kernels import backends
    monkeypatch.delenv("ORTHOLORA_BACKEND", raising=False)
    assert backends.select(None, torch.device("cpu")) == "native"


# --------------------------------------------------------------------------------------
# setup.py's build decisions
# --------------------------------------------------------------------------------------

def _setup_module():
    spec = importlib.util.spec_from_file_location("ortholora_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)                     # not __main__: setup() is not called
    return mod


FULL = dict(torch_version="2.13.0", torch_cuda="12.8", nvcc="/usr/local/cuda/bin/nvcc", cxx="/usr/bin/c++",
            machine="x86_64")


@pytest.mark.parametrize("env,facts,build,cuda,words", [
    ({"ORTHOLORA_SKIP_BUILD": "1"}, FULL, False, False, "ORTHOLORA_SKIP_BUILD"),
    ({}, dict(FULL, torch_version=None), False, False, "torch is not importable"),
    ({}, dict(FULL, cxx=None), False, False, "no C++ compiler"),
    ({}, dict(FULL, torch_cuda=None), True, False, "CPU-only"),
    ({}, dict(FULL, nvcc=None), True, False, "nvcc not found"),
    ({"ORTHOLORA_SKIP_CUDA_BUILD": "1"}, FULL, True, False, "ORTHOLORA_SKIP_CUDA_BUILD"),
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, FULL, True, True, "9.0"),
    ({"ORTHOLORA_SKIP_BUILD": "0"}, FULL, True, True, "CUDA kernels"),
])
def test_setup_build_plan(env, facts, build, cuda, words):
    plan = _setup_module().build_plan(env, **facts)
    assert plan["build"] is build and plan["cuda"] is cuda
    assert words in plan["message"]
    if build:
        assert "-O3" in plan["cxx_flags"] and "-march=native" not in plan["cxx_flags"]
        assert any(s.endswith(".cu") for s in plan["sources"]) is cuda
        assert (("ORTHOLORA_WITH_CUDA", "1") in plan["define_macros"]) is cuda
        assert not any("gencode" in f or f.startswith("-arch") for f in plan["nvcc_flags"])  # TORCH_CUDA_ARCH_LIST decides


def test_setup_build_plan_opt_in_native_arch_openmp_and_msvc():
    mod = _setup_module()
    assert "-march=native" in mod.build_plan({"ORTHOLORA_NATIVE_ARCH": "1"}, **FULL)["cxx_flags"]
    plan = mod.build_plan({}, **FULL)
    assert "-fopenmp" in plan["cxx_flags"] and plan["link_flags"] == ["-fopenmp"]
    for env, facts in (({"ORTHOLORA_NO_OPENMP": "1"}, FULL), ({}, dict(FULL, platform_name="darwin"))):
        plan = mod.build_plan(env, **facts)
        assert plan["build"] and "-fopenmp" not in plan["cxx_flags"] and not plan["link_flags"]
    plan = mod.build_plan({}, **dict(FULL, cxx=None, compiler_kind="msvc", platform_name="win32"))
    assert plan["build"] and plan["cxx_flags"] == ["/O2", "/openmp"]


def test_setup_sources_cover_csrc():
    cpu, cuda = _setup_module()._sources(ROOT)
    assert "csrc/ortholora_cpu.cpp" in cpu and not any("cuda" in s for s in cpu)
    assert all(s.startswith("csrc/cuda/") for s in cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [1, 2, 3, 7, 8, 9, 16, 17, 24, 31, 32])
def test_cuda_kernels_every_register_tile_and_accumulator_bound(t, dtype):
    """For the day a GPU is lent: the Gram pass's register tiles (2 x 2
    up to T = 16, 4 x 4 above, 1 x 4 for the backward's one-row cross product) and the
    combines' register accumulators (bounds 8 / 16 / 32) against the torch backend on the
    same GPU, forward and backward, sum and none, ragged segments with 1-column pieces,
    and bitwise repeatable."""
    if not native_impl.built_with_cuda():
        pytest.skip("the extension was built without CUDA")
    _native_matches_torch_and_repeats_bitwise(t, dtype, "cuda", 70_001)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [1, 2, 3, 7, 8, 9, 16, 17, 24, 31, 32])
def test_cpu_kernels_match_torch_and_repeat_bitwise_over_t(t, dtype):
    """CPU twin of the CUDA test above: the same comparison on the native CPU kernels."""
    if native_impl.availability(torch.device("cpu")) is not None:
        pytest.skip(native_impl.availability(torch.device("cpu")))
    _native_matches_torch_and_repeats_bitwise(t, dtype, "cpu", 9_001)


def _native_matches_torch_and_repeats_bitwise(t, dtype, device, n):
    """native against the reference and the torch backend on the same device, forward and
    backward, sum and none, ragged segments with 1-column pieces; a second native call is
    bitwise equal to the first."""
    x = make_grads(t, n, dtype=dtype, seed=300 + t, shared=-0.5, device=device)
    segs = [0, 1, 4097, 4098, n]
    order = random_order(t, 4, seed=301 + t, device=device)
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    for reduction in ("sum", "none"):
        outs, grads = [], []
        for backend in ("native", "torch", "native"):
            xx = x.clone().requires_grad_()
            out = ok.project(xx, segs, order=order, reduction=reduction, backend=backend)
            dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(302)).to(out)
            (g,) = torch.autograd.grad(out, xx, dy)
            outs.append(out.detach())
            grads.append(g)
        assert_matches_reference(outs[0], x, segs, order=order, reduction=reduction)
        for got, want in ((outs[0], outs[1]), (grads[0], grads[1])):
            torch.testing.assert_close(got.double(), want.double(), rtol=rtol,
                                       atol=rtol * float(want.double().abs().max()))
        assert torch.equal(outs[0], outs[2]) and torch.equal(grads[0], grads[2])


# --------------------------------------------------------------------------------------
# The passes of the weighting methods: Gram alone, one-operand combine, solve kernels
# --------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_gram_pass_is_the_fused_gram_and_combine_pass_matches_torch(dtype):
    for t, n in ((1, 7), (3, 5003), (9, 20000)):
        x = make_grads(t, n, seed=90 + t).to(dtype)
        offs = [0, 1, n // 3, n] if n > 3 else [0, n]
        seg = segments_for(offs, n)
        gram = _ops().gram(x, offs)
        order = torch.arange(t).expand(len(offs) - 1, t, t)
        assert torch.equal(gram, _ops().project(x, offs, order, "sum")[1])    # bitwise the fused pass's
        ref = torch_impl.BACKEND.gram(x, seg)
        # fp32 products (summed in float64 per tile): ~1e-6 of ||g_i|| ||g_j||.
        d = ref.diagonal(dim1=-2, dim2=-1).sqrt()
        scale = d.unsqueeze(-1) * d.unsqueeze(-2)
        err = ((gram - ref).abs() / scale.clamp_min(1e-300)).max()
        assert err <= (1e-6 if dtype != torch.float64 else 1e-13), err
        for r in (1, t):
            w = torch.randn(len(offs) - 1, r, t, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
            out = native_impl.BACKEND.combine(seg, x, w)
            assert out.dtype == dtype and out.shape == (r, n)
            expect = torch_impl.BACKEND.combine(seg, x, w)
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
            torch.testing.assert_close(out, expect, rtol=tol, atol=tol * float(x.abs().max()) * t)


@needs_native
def test_weighting_passes_opcheck_and_errors():
    x = make_grads(4, 40, seed=91)
    torch.library.opcheck(_ops().gram.default, (x, [0, 10, 40]))
    torch.library.opcheck(_ops().combine.default, (x, torch.randn(2, 3, 4, dtype=torch.float64), [0, 10, 40]))
    g = torch.stack([x[:, :10] @ x[:, :10].T, x @ x.T]).double() + torch.eye(4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [True] * 4])
    torch.library.opcheck(_ops().box_qp.default, (g, torch.zeros(2, 4, 4, dtype=torch.float64),
                                                  torch.eye(4, dtype=torch.float64).expand(2, 4, 4).contiguous(), 5))
    torch.library.opcheck(_ops().simplex_qp.default, (g, mask, 12))
    torch.library.opcheck(_ops().cagrad_kkt.default, (g, g.sum(-1) / 4, torch.full((2, 1), 0.1, dtype=torch.float64),
                                                      mask, 6, 1e-4))
    torch.library.opcheck(_ops().power_root.default, (g, mask, 1.0, 8))
    u = torch.rand(2, 4, dtype=torch.float64)
    for mode, scale in ((0, 0), (1, 0), (1, 1), (1, 2), (2, 0)):
        torch.library.opcheck(_ops().spectral.default, (g / 10, mask, u, mode, scale))
    with pytest.raises(ValueError, match="w: expected"):
        _ops().combine(x, torch.zeros(2, 1, 3, dtype=torch.float64), [0, 10, 40])
    with pytest.raises(ValueError, match="mask: expected"):
        _ops().simplex_qp(g, mask[:1], 12)
    with pytest.raises(ValueError, match="alpha"):
        _ops().power_root(g, mask, 0.0, 8)


@needs_native
def test_gradvac_op_opcheck_and_errors():
    if not hasattr(_ops(), "gradvac"):
        pytest.fail("the extension lacks ortholora_C::gradvac: rebuild it (setup.py build_ext --inplace)")
    x = make_grads(4, 40, seed=92).double()
    g = torch.stack([x[:, :10] @ x[:, :10].T, x @ x.T])
    gen = torch.Generator().manual_seed(7)
    order = torch.stack([torch.stack([torch.randperm(4, generator=gen) for _ in range(4)]) for _ in range(2)])
    hat = torch.rand(2, 4, 4, generator=gen, dtype=torch.float64) - 0.5
    mask = torch.tensor([[True, False, True, True], [True] * 4])
    torch.library.opcheck(_ops().gradvac.default, (g, order, hat, mask, 0.5, 1e-8))
    before = hat.clone()
    w, new_hat = _ops().gradvac(g, order, hat, mask, 0.5, 1e-8)
    assert w.shape == (2, 4) and new_hat.shape == (2, 4, 4) and w[0, 1] == 0
    assert torch.equal(hat, before) and not torch.equal(new_hat, hat)   # a new tensor, the input intact
    with pytest.raises(ValueError, match="order: expected task indices"):
        _ops().gradvac(g, order + 4, hat, mask, 0.5, 1e-8)
    with pytest.raises(ValueError, match="phi_hat: expected"):
        _ops().gradvac(g, order, hat[:, :3], mask, 0.5, 1e-8)
    with pytest.raises(ValueError, match="order: expected"):
        _ops().gradvac(g, order[:1], hat, mask, 0.5, 1e-8)
    with pytest.raises(ValueError, match="mask: expected"):
        _ops().gradvac(g, order, hat, mask[:1], 0.5, 1e-8)
