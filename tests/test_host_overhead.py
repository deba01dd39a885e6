"""Host overhead on the CUDA path, checked on CPU: how many kernel
launches and aten ops one forward and one backward issue, and the backward's fused reverse
solve (``triton_impl._solve_vjp_kernel``) against the torch reference.

Launch and op counts run the triton backend's host code with the kernels *recorded*, not
run (the way scripts/compile_gpu.py does), under a ``TorchDispatchMode`` that counts
every aten op: on a GPU each launch and each op that does work is a kernel on the stream.
The kernel itself runs through the interpreter (``-m interpreter``). The native backend's
compiled CPU reverse solve (``ortholora_C::solve_vjp``) is checked the same way: against
the torch ops, and its backward's op list independent of T.
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ortholora_kernels import _args, ops
from ortholora_kernels.solve import get_solve

from cases import make_grads, random_order

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from harness import KERNELS, LaunchRecorder  # noqa: E402  (benchmarks/harness.py)

interpreter = pytest.mark.interpreter


def _impl():
    from ortholora_kernels.backends import triton_impl
    if triton_impl._IMPORT_ERROR is not None:
        pytest.skip(triton_impl._IMPORT_ERROR)
    return triton_impl


class _Ops(TorchDispatchMode):
    """Counts aten ops (views and allocations included: each costs host time)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _counts(monkeypatch, t, reduction, fused_vjp=True):
    """``(forward launches, forward ops, backward launches, backward ops)`` at T = t."""
    impl = _impl()
    log = []
    for k in KERNELS:
        monkeypatch.setattr(impl, k, LaunchRecorder(k, log))
    monkeypatch.setattr(impl, "_FUSED_VJP", fused_vjp)
    n, offsets = 600, [0, 200, 600]
    seg = _args.segments_for(offsets, n)
    x = make_grads(t, n, seed=t)
    order = random_order(t, 2, seed=t + 1)
    gram = torch.randn(2, t, t, dtype=torch.float64)
    dout = torch.randn((t, n) if reduction == "none" else (n,))
    for _ in range(2):      # the second call of each: per-layout tables and workspaces cached
        log.clear()
        with _Ops() as fwd_ops:
            ops.forward(x, seg, order, reduction, "triton")
        fwd = [name for name, *_ in log]
        log.clear()
        with _Ops() as bwd_ops:
            ops.backward(x, dout, gram, order, seg, reduction, "triton")
        bwd = [name for name, *_ in log]
    seg._device_cache.clear()
    return fwd, fwd_ops.ops, bwd, bwd_ops.ops


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_launches_and_ops_per_call_do_not_grow_with_t(monkeypatch, reduction):
    """Forward: 2 launches; backward: 3 (cross, solve + reverse solve, combine); a handful of
    allocations and views each, the same at T = 2, 9 and 33. The torch composition of the
    reverse solve issued ~35 T ops per backward (about 1,100 at T = 32)."""
    counts = {t: _counts(monkeypatch, t, reduction) for t in (2, 9, 33)}
    for t, (fwd, fwd_ops, bwd, bwd_ops) in counts.items():
        assert fwd == ["_gram_kernel", "_combine_kernel"], (t, fwd)
        assert bwd == ["_gram_kernel", "_solve_vjp_kernel", "_combine_kernel"], (t, bwd)
        assert len(fwd_ops) <= 6 and len(bwd_ops) <= 8, (t, fwd_ops, bwd_ops)
    assert len({tuple(c[1]) for c in counts.values()}) == 1        # identical op lists for every T
    assert len({tuple(c[3]) for c in counts.values()}) == 1
    # What the fusion replaced: the same backward with the torch reverse solve.
    _, _, bwd, slow_ops = _counts(monkeypatch, 33, reduction, fused_vjp=False)
    assert bwd == ["_gram_kernel", "_combine_kernel"] and len(slow_ops) > 30 * 33


def _torch_reference(gram, order, reduction, v):
    sol = get_solve("pcgrad")
    w = sol.forward(gram, order, reduction).weights
    gbar = sol.vjp(gram, order, reduction, v)
    return gbar + gbar.transpose(-1, -2), w


def _inputs(t, s, reduction, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "psd":       # Gram matrices of conflicting tasks, one zero task
        x = make_grads(t, 40 * s, dtype=torch.float64, seed=seed, shared=-0.7).view(t, s, 40).transpose(0, 1)
        if t > 2:
            x[:, 1] = 0.0
        gram = x @ x.transpose(-1, -2)
    else:                   # any matrix (the op's backward accepts one: opcheck feeds random ones)
        gram = torch.randn(s, t, t, dtype=torch.float64, generator=g)
    order = random_order(t, s, seed=seed + 1)
    if kind == "odd" and t > 1:   # out-of-range entries (skipped) and in-range repeats
        order[0, 0, 0] = t + 3
        order[-1, -1, -1] = -2
        order[0, -1, :] = order[0, -1, 0]
    v = torch.randn(s, t if reduction == "none" else 1, t, dtype=torch.float64, generator=g)
    return gram, order, v


@interpreter
@pytest.mark.parametrize("reduction,t,kind", [
    (r, t, k) for r in ("sum", "mean", "none")
    for t, k in ((1, "psd"), (2, "psd"), (5, "odd"), (8, "psd"), (13, "any"), (17, "odd"))
] + [("none", 33, "psd")])   # T_PAD = 64 (the interpreter takes ~30 s there): one reduction
def test_solve_vjp_kernel_matches_torch(reduction, t, kind):
    """The fused kernel's ``(Gbar + Gbar^T, W)`` equals solve.py's torch ops on fresh inputs."""
    impl = _impl()
    gram, order, v = _inputs(t, 3, reduction, seed=100 + t, kind=kind)
    seg = _args.segments_for([0, 1, 2, 3], 3)
    m, w = impl._solve_vjp(gram, order, reduction, v, seg)
    m_ref, w_ref = _torch_reference(gram, order, reduction, v)
    scale = float(m_ref.abs().max()) + 1.0
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12 * (float(w_ref.abs().max()) + 1))
    torch.testing.assert_close(m, m_ref, rtol=1e-9, atol=1e-11 * scale)
    again = impl._solve_vjp(gram, order, reduction, v, seg)       # cached scratch, same bits
    assert torch.equal(again[0], m) and torch.equal(again[1], w)
    seg._device_cache.clear()


@interpreter
def test_solve_vjp_kernel_propagates_nan_like_torch():
    """A NaN in one task's Gram row reaches exactly the entries torch's ops give NaN."""
    impl = _impl()
    gram, order, v = _inputs(6, 2, "sum", seed=7, kind="psd")
    gram[0, 3, 4] = gram[0, 4, 3] = float("nan")
    seg = _args.segments_for([0, 1, 2], 2)
    m, w = impl._solve_vjp(gram, order, "sum", v, seg)
    m_ref, w_ref = _torch_reference(gram, order, "sum", v)
    assert torch.equal(m.isnan(), m_ref.isnan()) and torch.equal(w.isnan(), w_ref.isnan())
    assert m.isnan().any()
    torch.testing.assert_close(m.nan_to_num(), m_ref.nan_to_num(), rtol=1e-9, atol=1e-9)


@interpreter
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_solve_vjp_kernel_is_the_gradient_of_its_weights(reduction):
    """gradcheck-style, the kernel alone: for symmetric directions dG, the central difference
    of ``<v, W(G)>`` (the kernel's own W) equals ``<Gbar, dG> = <M, dG> / 2``."""
    impl = _impl()
    t = 6
    gram, order, v = _inputs(t, 2, reduction, seed=31, kind="psd")
    seg = _args.segments_for([0, 1, 2], 2)
    m, _ = impl._solve_vjp(gram, order, reduction, v, seg)
    g = torch.Generator().manual_seed(32)
    eps = 1e-6
    for _ in range(3):
        d = torch.randn(gram.shape, dtype=torch.float64, generator=g)
        d = d + d.transpose(-1, -2)
        d[:, 1, :] = d[:, :, 1] = 0.0     # task 1 is zero: any step off it switches its projections on
        f = [float((v * impl._solve_vjp(gram + sign * eps * d, order, reduction, v, seg)[1]).sum())
             for sign in (1, -1)]
        fd = (f[0] - f[1]) / (2 * eps)
        assert fd == pytest.approx(float((m * d).sum()) / 2, rel=1e-5, abs=1e-7)
    seg._device_cache.clear()


def _assert_backward_with_and_without_fused_vjp_agree(monkeypatch, impl, backend, reduction):
    """dX through the op with ``impl._FUSED_VJP`` on and off (the torch ops), same inputs."""
    import ortholora_kernels as ok
    x = make_grads(7, 500, seed=12, shared=-0.6)
    segs = [0, 3, 200, 500]
    order = random_order(7, 3, seed=13)
    dy = torch.randn((7, 500) if reduction == "none" else (500,), generator=torch.Generator().manual_seed(14))
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(impl, "_FUSED_VJP", fused)
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(ok.project(xx, segs, order=order, reduction=reduction, backend=backend), xx, dy)
        grads.append(gx)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * float(grads[1].abs().max()))


@interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_with_and_without_the_fused_reverse_solve_agree(monkeypatch, reduction):
    """dX through the op: fused kernel vs the torch ops it replaces, same inputs."""
    _assert_backward_with_and_without_fused_vjp_agree(monkeypatch, _impl(), "triton", reduction)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_eager_fast_path_equals_the_custom_op(monkeypatch, backend, reduction):
    """project()'s eager fast path (an autograd.Function) gives the custom op's results
    bitwise: output, Gram, coefficients, counts and the gradient."""
    import ortholora_kernels as ok
    from ortholora_kernels import backends
    reason = backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(reason)
    x = make_grads(5, 300, seed=3, shared=-0.6)
    order = random_order(5, 2, seed=4)
    dy = torch.randn((5, 300) if reduction == "none" else (300,), generator=torch.Generator().manual_seed(5))
    results, used = [], []
    real_apply = ops._EagerProject.apply
    monkeypatch.setattr(ops._EagerProject, "apply", lambda *a: used.append(1) or real_apply(*a))
    for fast in (True, False):
        monkeypatch.setattr(ops, "_EAGER_FAST_PATH", fast)
        xx = x.clone().requires_grad_()
        r = ok.project(xx, [0, 100, 300], order=order, backend=backend, reduction=reduction, return_stats=True)
        (g,) = torch.autograd.grad(r.output, xx, dy)
        results.append((r.output, r.gram, r.coeffs, r.num_projections, g))
    assert len(used) == 1                              # the first call only
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("fast", [True, False])
def test_second_derivative_raises_on_both_paths(monkeypatch, backend, fast):
    """The op is once differentiable: a second derivative raises on the fast path as through
    the custom op (the native kernels have no autograd; a silent zero would lose it)."""
    import ortholora_kernels as ok
    from ortholora_kernels import backends
    reason = backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(ops, "_EAGER_FAST_PATH", fast)
    x = make_grads(3, 50, seed=6).double().requires_grad_()
    y = ok.project(x, order=random_order(3, 1, seed=7), backend=backend)
    (g,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        g.sum().backward()


def test_eager_fast_path_only_where_it_cannot_differ():
    """Tensor subclasses (parameters, fake or distributed tensors), meta tensors, dispatch
    modes, functorch transforms and torch.compile keep the custom op."""
    x = make_grads(3, 10, seed=1)
    assert ops._eager_fast_path(x)
    assert not ops._eager_fast_path(torch.nn.Parameter(x))
    assert not ops._eager_fast_path(x.to("meta"))
    with _Ops():
        assert not ops._eager_fast_path(x)
    seen = []

    def f(v):
        seen.append(ops._eager_fast_path(v))
        return v.sum()
    torch.func.grad(f)(x)
    assert seen == [False]


def test_reverse_solve_scratch_is_cached_eagerly_and_per_call_under_capture(monkeypatch):
    """The kernel's scratch (written before read: no memset) is one cached buffer per
    (device, stream) for eager calls; under CUDA-graph capture each call gets its own
    (graph memory), so two captured graphs never share it."""
    impl = _impl()
    scratches = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: scratches.append(a[5])
    monkeypatch.setattr(impl, "_solve_vjp_kernel", Spy())
    seg = _args.segments_for([0, 5, 10], 10)
    seg._device_cache.clear()
    gram = torch.randn(2, 3, 3, dtype=torch.float64)
    order = random_order(3, 2, seed=1)
    v = torch.randn(2, 1, 3, dtype=torch.float64)
    for _ in range(2):
        impl._solve_vjp(gram, order, "sum", v, seg)
    assert scratches[0] is scratches[1]
    assert [k for k in seg._device_cache if k[0] == "triton_vjp_ws"]
    monkeypatch.setattr(impl, "_capturing", lambda device: True)
    for _ in range(2):
        impl._solve_vjp(gram, order, "sum", v, seg)
    assert len({s.data_ptr() for s in scratches[1:]}) == 3
    seg._device_cache.clear()


# --- the native backend's compiled reverse solve (CPU): ortholora_C::solve_vjp ---------

def _native():
    from ortholora_kernels import backends
    from ortholora_kernels.backends import native_impl
    reason = backends.availability("native", "cpu")
    if reason is not None:
        pytest.skip(reason)
    return native_impl


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("t", [1, 2, 5, 8, 13, 17, 33])
@pytest.mark.parametrize("kind", ["psd", "odd", "any"])
def test_native_solve_vjp_matches_torch(reduction, t, kind):
    """The compiled ``(Gbar + Gbar^T, W)`` equals solve.py's torch ops on fresh inputs: a
    zero task (psd), out-of-range and repeated order entries (odd), non-PSD Gram (any)."""
    impl = _native()
    gram, order, v = _inputs(t, 3, reduction, seed=200 + t, kind=kind)
    seg = _args.segments_for([0, 1, 2, 3], 3)
    m, w = impl.BACKEND.solve_vjp(gram, order, reduction, v, seg)
    m_ref, w_ref = _torch_reference(gram, order, reduction, v)
    assert m.dtype == w.dtype == torch.float64 and w.shape == w_ref.shape and m.shape == m_ref.shape
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12 * (float(w_ref.abs().max()) + 1))
    torch.testing.assert_close(m, m_ref, rtol=1e-12, atol=1e-12 * (float(m_ref.abs().max()) + 1))


@pytest.mark.parametrize("where", ["gram", "v"])
def test_native_solve_vjp_propagates_nan_like_torch(where):
    """A NaN in one Gram entry pair (or in dL/dW) reaches exactly the entries torch's ops give NaN."""
    impl = _native()
    gram, order, v = _inputs(6, 2, "sum", seed=7, kind="psd")
    if where == "gram":
        gram[0, 3, 4] = gram[0, 4, 3] = float("nan")
    else:
        v[1, 0, 2] = float("nan")
    seg = _args.segments_for([0, 1, 2], 2)
    m, w = impl.BACKEND.solve_vjp(gram, order, "sum", v, seg)
    m_ref, w_ref = _torch_reference(gram, order, "sum", v)
    assert torch.equal(m.isnan(), m_ref.isnan()) and torch.equal(w.isnan(), w_ref.isnan())
    assert m.isnan().any()
    torch.testing.assert_close(m.nan_to_num(), m_ref.nan_to_num(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.nan_to_num(), w_ref.nan_to_num(), rtol=1e-12, atol=1e-12)


def test_native_solve_vjp_rejects_bad_shapes():
    """Wrong shapes name the argument."""
    _native()
    gram = torch.randn(2, 4, 4, dtype=torch.float64)
    order = random_order(4, 2, seed=1)
    with pytest.raises(ValueError, match="weights_grad"):
        torch.ops.ortholora_C.solve_vjp(gram, order, "sum", torch.zeros(2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="gram"):
        torch.ops.ortholora_C.solve_vjp(gram[:, :3], order, "sum", torch.zeros(2, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="order"):
        torch.ops.ortholora_C.solve_vjp(gram, order[:, :3], "sum", torch.zeros(2, 1, 4, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_native_backward_with_and_without_the_compiled_reverse_solve_agree(monkeypatch, reduction):
    """dX through the op on native CPU: the compiled reverse solve vs the torch ops it replaces."""
    _assert_backward_with_and_without_fused_vjp_agree(monkeypatch, _native(), "native", reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_native_backward_ops_do_not_grow_with_t(monkeypatch, reduction):
    """The native CPU backward issues the same short list of aten/compiled ops at T = 2, 9
    and 33 (cross, the compiled reverse solve, the two-operand combine); with the torch
    reverse solve it was ~35 T ops."""
    impl = _native()
    n, offsets = 600, [0, 200, 600]
    seg = _args.segments_for(offsets, n)

    def count(t, fused):
        monkeypatch.setattr(impl, "_FUSED_VJP", fused)
        x = make_grads(t, n, seed=t)
        order = random_order(t, 2, seed=t + 1)
        gram = torch.randn(2, t, t, dtype=torch.float64)
        dout = torch.randn((t, n) if reduction == "none" else (n,))
        with _Ops() as bwd_ops:
            ops.backward(x, dout, gram, order, seg, reduction, "native")
        return bwd_ops.ops
    counts = {t: count(t, True) for t in (2, 9, 33)}
    assert len({tuple(c) for c in counts.values()}) == 1, counts
    compiled = [op for op in counts[2] if op.startswith("ortholora_C.")]
    assert compiled == ["ortholora_C.cross.default", "ortholora_C.solve_vjp.default",
                        "ortholora_C.backward_combine.default"], counts[2]
    assert len(counts[2]) <= 8, counts[2]       # plus a few views
    assert len(count(33, False)) > 30 * 33
