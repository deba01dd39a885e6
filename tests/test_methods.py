"""Every method x training condition x CPU backend, with TorchJD-style property checks.

Conditions are the geometry a training step produces: one task, a zero task (no example
or a frozen head), all zero, duplicate / exactly colinear / antiparallel rows, a
rank-deficient Gram, task norms 1e6 apart, gradients at 1e-30 and 1e30 (fp64), 64 tasks.
Backends: "torch" runs the torch Gram/combine and the torch solve kernels
(``_lcp.NATIVE = False``); "native" the compiled Gram/combine and the compiled solve
kernels. Checks (beside tests/test_aggregate.py's comparisons with TorchJD itself):

- finite output from finite input, and never 0 where the method's answer is not 0
  (the zeros that ARE the method's answer are listed in :data:`ZERO`, each with why);
- scale equivariance ``A(c X) = c^k A(X)`` (k = 1, except the root methods);
- permutation invariance (pcgrad with the permuted order);
- non-conflicting output where the method promises it (upgrad, dualproj, mgda);
- absent tasks: weight 0 and exactly the method on the present rows alone;
- NaN/Inf propagate (or raise with ``check_finite=True``).
"""
from __future__ import annotations

import pytest
import torch

import ortholora_kernels as ok
from ortholora_kernels import solvers
from ortholora_kernels.solvers import _lcp, gradvac

N = 48
METHODS = ("pcgrad",) + solvers.WEIGHTINGS + ("gradvac",)
BACKENDS = ("torch", "native")
OPTIONS = {"cagrad": {"c": 0.5}, "fairgrad": {"alpha": 1.0}}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _conflicting(t, n=N, seed=0):
    g = _gen(seed)
    base = torch.randn(1, n, generator=g, dtype=torch.float64)
    x = torch.randn(t, n, generator=g, dtype=torch.float64) + 0.3 * base
    x[: t // 2] -= 0.8 * base
    return x * (torch.rand(t, 1, generator=g, dtype=torch.float64) * 3 + 0.1)


def _cond(name):
    g = _gen(1)
    v, w, u = torch.randn(3, N, generator=g, dtype=torch.float64)
    if name == "random":
        return _conflicting(5)
    if name == "t1":
        return v[None].clone()
    if name == "one_zero":
        x = _conflicting(4)
        x[2] = 0
        return x
    if name == "all_zero":
        return torch.zeros(4, N, dtype=torch.float64)
    if name == "duplicate":
        x = _conflicting(4)
        x[3] = x[0]
        return x
    if name == "colinear":
        return torch.stack([v, v, -0.5 * v])
    if name == "colinear_pos":
        return torch.stack([v, 2 * v, 0.5 * v])
    if name == "antiparallel":
        return torch.stack([v, -v, w])
    if name == "rank_deficient":
        basis = torch.stack([v, w, u])
        return torch.randn(6, 3, generator=g, dtype=torch.float64) @ basis
    if name == "norms_1e6":
        x = _conflicting(4)
        return x * torch.tensor([[1e3], [1e-3], [1.0], [1e3]], dtype=torch.float64)
    if name == "mixed_hull0":          # [1e3 v, w / 1e3, -v]: 0 lies in the hull
        w2 = w - (w @ v) / (v @ v) * v
        return torch.stack([1e3 * v, w2 / 1e3, -v])
    if name == "tiny":
        return _conflicting(4) * 1e-30
    if name == "huge":
        return _conflicting(4) * 1e30
    if name == "t64":
        return _conflicting(64, n=96)
    raise KeyError(name)


CONDITIONS = ("random", "t1", "one_zero", "all_zero", "duplicate", "colinear", "colinear_pos", "antiparallel",
              "rank_deficient", "norms_1e6", "mixed_hull0", "tiny", "huge", "t64")

# Where 0 IS the method's answer (beside all_zero, where every method gives 0):
ZERO = {
    # The min-norm point of a hull that holds 0 (a zero row, v and -v, [v, v, -v/2], [1e3 v, w/1e3, -v]).
    ("mgda", "one_zero"), ("mgda", "antiparallel"), ("mgda", "colinear"), ("mgda", "mixed_hull0"),
    # [v, v, -v/2]: no direction improves every task (no Nash/FairGrad root), the update tends to 0.
    ("nashmtl", "colinear"), ("fairgrad", "colinear"),
    # The dual cone of {v, v, -v/2} is the plane v . d = 0: no component along v remains
    # (up to the reg_eps = 1e-4 ridge of TorchJD's definition: ~1e-3 of the scale).
    ("upgrad", "colinear"), ("dualproj", "colinear"),
    # PCGrad / GradVac (targets start at 0: PCGrad) on [v, v, -v/2]: the v's are projected
    # to 0 on -v/2, and -v/2 to 0 on v (GradVac up to its eps = 1e-8).
    ("pcgrad", "colinear"), ("gradvac", "colinear"),
}
ZERO_TOL = {"upgrad": 2e-3, "dualproj": 2e-3}
# Outputs that do not scale with the gradients (Nash-MTL clipped to max_norm, FairGrad at alpha = 1).
UNSCALED = ("nashmtl", "fairgrad")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(_lcp, "NATIVE", request.param == "native")
    if request.param == "native":
        from ortholora_kernels.backends import native_impl
        if native_impl.availability(torch.device("cpu")) is not None:
            pytest.skip(native_impl.availability(torch.device("cpu")))
    return request.param


def run(method, x, backend, order=None, **extra):
    """The method's ``[N]`` output (sum reduction) through the public API."""
    opts = {**OPTIONS.get(method, {}), **extra}
    if method == "gradvac":
        agg = ok.GradVac(backend=backend, **opts)
        return agg(x) if order is None else agg(x, order=order)
    if method == "pcgrad" and order is not None:
        return ok.aggregate(x, method="pcgrad", backend=backend, order=order)
    return ok.aggregate(x, method=method, backend=backend, **opts)


def _order(t, seed=3):
    g = _gen(seed)
    return torch.stack([torch.randperm(t, generator=g) for _ in range(t)])


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("method", METHODS)
def test_finite_and_no_silent_zero(method, cond, backend):
    x = _cond(cond)
    out = run(method, x, backend, order=_order(x.shape[0]) if method in ("pcgrad", "gradvac") else None)
    assert out.shape == (x.shape[1],)
    assert torch.isfinite(out).all(), f"{method} on {cond}: non-finite output"
    scale = x.norm(dim=1).max()
    if cond == "all_zero":
        assert (out == 0).all()
    elif (method, cond) in ZERO:
        tol = ZERO_TOL.get(method, 1e-6) * scale
        assert out.norm() <= tol, f"{method} on {cond}: expected ~0 (its answer), got {out.norm()}"
    else:
        # Not 0: at least 1e-4 of the typical output (of the gradients' scale, or O(1)).
        floor = 1e-4 if method in UNSCALED else 1e-4 * x.norm(dim=1).median()
        assert out.norm() > floor, f"{method} on {cond}: silent zero ({out.norm()})"


SCALE_POWER = {"nashmtl": 0.0, "fairgrad": 0.0}     # roots: A(c X) = c^k A(X) with k = (1 - a) / (1 + a)


@pytest.mark.parametrize("cond", ("random", "norms_1e6", "rank_deficient", "duplicate"))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "gradvac"])   # gradvac: TorchJD's eps is absolute
def test_scale_equivariance(method, cond, backend):
    x = _cond(cond)
    extra = {"max_norm": 0.0} if method == "nashmtl" else {}
    order = _order(x.shape[0]) if method in ("pcgrad", "gradvac") else None
    k = SCALE_POWER.get(method, 1.0)
    ref = run(method, x, backend, order=order, **extra)
    for c in (1e-20, 1e-3, 1e25):
        got = run(method, c * x, backend, order=order, **extra)
        torch.testing.assert_close(got, c ** k * ref, rtol=1e-7, atol=1e-12 * ref.norm() * c ** k)


@pytest.mark.parametrize("cond", ("random", "one_zero", "duplicate", "rank_deficient", "norms_1e6"))
@pytest.mark.parametrize("method", METHODS)
def test_permutation_invariance(method, cond, backend):
    x = _cond(cond)
    t = x.shape[0]
    perm = torch.randperm(t, generator=_gen(7))
    inv = torch.argsort(perm)
    order = _order(t) if method in ("pcgrad", "gradvac") else None
    ref = run(method, x, backend, order=order)
    # Task k of the permuted problem is task perm[k]; its visits are the same tasks, renumbered.
    order_p = inv[order[perm]] if order is not None else None
    got = run(method, x[perm], backend, order=order_p)
    # Rounding amplified by the conditioning: the eigh-based methods on norms 1e6 apart
    # (a unit-trace Gram with eigenvalues ~1e-12) keep ~1e-4.
    rtol = 1e-3 if cond == "norms_1e6" and method in ("imtlg", "alignedmtl", "config") else 1e-7
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * 1e-3 * x.norm(dim=1).max())


@pytest.mark.parametrize("cond", ("random", "one_zero", "duplicate", "antiparallel", "rank_deficient",
                                  "norms_1e6", "t64"))
@pytest.mark.parametrize("method", ("upgrad", "dualproj", "mgda"))
def test_non_conflicting(method, cond, backend):
    x = _cond(cond)
    singular = cond in ("one_zero", "duplicate", "antiparallel", "rank_deficient")
    # The dual-cone methods without TorchJD's reg_eps ridge (which trades exactness for a
    # positive definite Gram: a tiny one where the Gram is singular).
    extra = {} if method == "mgda" else {"reg_eps": 1e-12 if singular else 0.0}
    out = run(method, x, backend, **extra)
    dots = x @ out
    tol = 1e-9 * x.norm(dim=1) * out.norm() + 1e-13 * x.norm(dim=1).max() ** 2
    assert (dots >= -tol).all(), f"{method} on {cond}: conflicts with a task ({dots.min()})"


def _sub(gram, keep):
    return gram[:, keep][:, :, keep]


@pytest.mark.parametrize("cond", ("random", "one_zero", "duplicate", "colinear", "antiparallel", "norms_1e6",
                                  "t64"))
@pytest.mark.parametrize("method", solvers.WEIGHTINGS)
def test_absent_rows_equal_the_method_on_the_present_rows(method, cond, backend):
    x = _cond(cond)
    t = x.shape[0]
    gram = (x @ x.T)[None].expand(3, t, t).contiguous()
    present = torch.ones(3, t, dtype=torch.bool)
    present[0, t // 2] = False                      # one absent
    present[1, ::2] = False                         # every other one absent
    present[2, :] = False                           # none present
    present[2, 0] = t > 1
    opts = OPTIONS.get(method, {})
    w = solvers.weights(method, gram, present, **opts)
    assert torch.isfinite(w).all()
    assert (w[~present] == 0).all()
    for s in range(3):
        keep = present[s].nonzero().flatten()
        if keep.numel() == 0:
            continue
        ref = solvers.weights(method, _sub(gram[s:s + 1], keep), **opts)[0]
        torch.testing.assert_close(w[s, keep], ref, rtol=1e-10, atol=1e-12 * ref.abs().max().clamp_min(1e-300))
    # No task present: zero weights.
    none = solvers.weights(method, gram, torch.zeros(3, t, dtype=torch.bool), **opts)
    assert (none == 0).all()
    # All present: the same as no mask at all.
    full = solvers.weights(method, gram, torch.ones(3, t, dtype=torch.bool), **opts)
    torch.testing.assert_close(full, solvers.weights(method, gram, **opts), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cond", ("random", "one_zero", "t64"))
def test_gradvac_absent_rows(cond, backend):
    x = _cond(cond)
    t = x.shape[0]
    gram = (x @ x.T)[None]
    order = _order(t)[None]
    hat = torch.rand(1, t, t, generator=_gen(5), dtype=torch.float64) * 0.4 - 0.2
    present = torch.ones(1, t, dtype=torch.bool)
    present[0, t // 2] = False
    w, new_hat = gradvac.step(gram, order, hat, present, beta=0.5, eps=1e-8)
    keep = present[0].nonzero().flatten()
    # The restricted problem: the orders without the absent task, renumbered.
    pos = torch.full((t,), -1, dtype=torch.long)
    pos[keep] = torch.arange(keep.numel())
    sub_order = torch.stack([pos[row][pos[row] >= 0] for row in order[0][keep]])[None]
    w_ref, hat_ref = gradvac.step(_sub(gram, keep), sub_order, hat[:, keep][:, :, keep], beta=0.5, eps=1e-8)
    assert w[0, t // 2] == 0
    torch.testing.assert_close(w[0, keep], w_ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_hat[:, keep][:, :, keep], hat_ref, rtol=1e-12, atol=1e-14)
    absent = ~present[0]
    assert torch.equal(new_hat[0][absent], hat[0][absent]) and torch.equal(new_hat[0][:, absent], hat[0][:, absent])


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
@pytest.mark.parametrize("method", METHODS)
def test_nan_inf_propagate_or_raise(method, bad, backend):
    x = _conflicting(4)
    x[1, 5] = bad
    out = run(method, x, backend, order=_order(4) if method in ("pcgrad", "gradvac") else None)
    assert not torch.isfinite(out).all(), f"{method}: {bad} in the input vanished from the output"
    if method != "gradvac":
        with pytest.raises(FloatingPointError):
            ok.aggregate(x, method=method, backend=backend, check_finite=True, **OPTIONS.get(method, {}))


def test_reported_cases_cagrad_colinear_and_mgda_mixed_scales(backend):
    g = _gen(11)
    v, w = torch.randn(2, N, generator=g, dtype=torch.float64)
    out = ok.aggregate(torch.stack([v, v, -0.5 * v]), method="cagrad", c=0.5, backend=backend)
    torch.testing.assert_close(out, 0.25 * v, rtol=1e-10, atol=1e-12)      # TorchJD's answer
    # Within 1e-8 of colinear: still the colinear answer (to first order).
    e = torch.randn(3, N, generator=g, dtype=torch.float64) * 1e-8
    out = ok.aggregate(torch.stack([v, v, -0.5 * v]) + e, method="cagrad", c=0.5, backend=backend)
    torch.testing.assert_close(out, 0.25 * v, rtol=1e-5, atol=1e-6 * v.norm().item())
    w = w - (w @ v) / (v @ v) * v
    x = torch.stack([1e3 * v, w / 1e3, -v])
    out = ok.aggregate(x, method="mgda", backend=backend)
    assert out.norm() < 1e-9 * v.norm()                                    # the hull holds 0


def test_method_aliases():
    for name in ("IMTL-G", "imtl_g", "IMTLG", "imtlg"):
        assert solvers.check_method(name) == "imtlg"
    for name in ("Nash-MTL", "nash-mtl", "NashMTL", "nash_mtl"):
        assert solvers.check_method(name) == "nashmtl"
    pairs = {"UPGrad": "upgrad", "Aligned-MTL": "alignedmtl", "CAGrad": "cagrad", "FairGrad": "fairgrad",
             "DualProj": "dualproj", "GradVac": "gradvac", "PCGrad": "pcgrad", "ConFIG": "config", "MGDA": "mgda"}
    for name, canonical in pairs.items():
        assert solvers.check_method(name) == canonical
    x = _conflicting(3)
    torch.testing.assert_close(ok.aggregate(x, method="IMTL-G"), ok.aggregate(x, method="imtlg"))
    with pytest.raises(ValueError, match="upgrad"):
        solvers.check_method("up-grad-x")
    with pytest.raises(ValueError, match="expected one of"):
        ok.aggregate(x, method="nash")


@pytest.mark.parametrize("method", ("upgrad", "dualproj", "mgda", "cagrad", "nashmtl", "fairgrad", "imtlg",
                                    "alignedmtl", "config"))
@pytest.mark.parametrize("cond", ("random", "one_zero", "duplicate", "colinear", "norms_1e6", "t64"))
def test_compiled_kernels_equal_the_torch_kernels(method, cond, monkeypatch):
    from ortholora_kernels.backends import native_impl
    if native_impl.availability(torch.device("cpu")) is not None:
        pytest.skip(native_impl.availability(torch.device("cpu")))
    x = _cond(cond)
    t = x.shape[0]
    gram = (x @ x.T)[None].expand(2, t, t).contiguous()
    present = torch.ones(2, t, dtype=torch.bool)
    present[1, 0] = False
    opts = OPTIONS.get(method, {})
    monkeypatch.setattr(_lcp, "NATIVE", True)
    a = solvers.weights(method, gram, present, **opts)
    monkeypatch.setattr(_lcp, "NATIVE", False)
    b = solvers.weights(method, gram, present, **opts)
    if cond in ("duplicate", "colinear"):
        # Weights of equal rows are a tie (the ridge breaks it at ~1e-13, the rounding of
        # each LU shows through); the updates X^T w must agree.
        diff = torch.einsum("si,sij,sj->s", a - b, gram, a - b).clamp_min(0).sqrt()
        size = torch.einsum("si,sij,sj->s", b, gram, b).clamp_min(0).sqrt()
        assert (diff <= 1e-7 * size + 1e-12 * gram.diagonal(dim1=-2, dim2=-1).amax().sqrt()).all()
    else:
        # LAPACK's eigh and the compiled Jacobi differ by the rounding the conditioning
        # amplifies: norms 1e6 apart give unit-trace eigenvalues ~1e-12 (~1e-4 relative).
        rtol = 1e-3 if cond == "norms_1e6" and method in ("imtlg", "alignedmtl", "config") else 1e-9
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-3 * b.abs().max().item())


@pytest.mark.interpreter
@pytest.mark.parametrize("method", ("mgda", "cagrad", "nashmtl"))
@pytest.mark.parametrize("cond", ("one_zero", "duplicate", "colinear"))
def test_triton_backend_on_degenerate_rows(method, cond):
    # The Triton Gram and combine (TRITON_INTERPRET=1) around the same solve, fp32.
    x = _cond(cond).float()
    a = ok.aggregate(x, method=method, backend="triton", **OPTIONS.get(method, {}))
    b = ok.aggregate(x, method=method, backend="torch", **OPTIONS.get(method, {}))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(x.norm(dim=1).max()))


@pytest.mark.parametrize("method", ("mgda", "cagrad", "nashmtl"))   # the three kernel kinds (compiles are slow)
def test_weights_with_absent_tasks_compile_fullgraph(method):
    # One graph (no graph break, no data-dependent Python control flow); the torch kernels.
    x = _conflicting(3)
    t = x.shape[0]
    gram = (x @ x.T)[None].expand(2, t, t).contiguous()
    present = torch.ones(2, t, dtype=torch.bool)
    present[1, 1] = False
    opts = OPTIONS.get(method, {})
    torch._dynamo.reset()
    fn = torch.compile(lambda g, p: solvers.weights(method, g, p, **opts), fullgraph=True, dynamic=False)
    torch.testing.assert_close(fn(gram, present), solvers.weights(method, gram, present, **opts),
                               rtol=1e-9, atol=1e-12)


def _gradvac_inputs(t, cond, seed):
    """``(gram [3, T, T], order, hat, present)``: three segments (column slices of the
    same rows), orders that visit every task (self included, skipped), random targets."""
    g = _gen(seed)
    x = _conflicting(t, n=60, seed=seed)
    if cond == "degenerate" and t >= 2:   # a duplicate, an antiparallel and a colinear row, a zero row
        x[1] = x[0]
        if t >= 3:
            x[2] = -0.5 * x[0]
        if t >= 4:
            x[3] = 0
        if t >= 5:
            x[4] = 3 * x[-1]
    gram = torch.stack([x[:, :20] @ x[:, :20].T, x @ x.T, x[:, 20:] @ x[:, 20:].T])
    order = torch.stack([torch.stack([torch.randperm(t, generator=g) for _ in range(t)]) for _ in range(3)])
    hat = torch.rand(3, t, t, generator=g, dtype=torch.float64) * 1.8 - 0.9
    present = None
    if cond == "absent":
        present = torch.rand(3, t, generator=g) > 0.4
        present[1] = False                      # no task present
        present[2] = False
        present[2, t - 1] = True                # one task present
    if cond == "nan":
        gram[0, t // 2, :] = float("nan")       # a NaN gradient: its row and column
        gram[0, :, t // 2] = float("nan")
        gram[2, 0, 0] = float("inf")
        hat[1, 0, t - 1] = float("nan")         # a NaN target
    return gram, order, hat, present


@pytest.mark.parametrize("cond", ("random", "absent", "degenerate", "nan"))
@pytest.mark.parametrize("t", (1, 2, 5, 8, 33))
def test_compiled_gradvac_equals_the_torch_loop(t, cond, monkeypatch):
    from ortholora_kernels.backends import native_impl
    if native_impl.availability(torch.device("cpu")) is not None:
        pytest.skip(native_impl.availability(torch.device("cpu")))
    gram, order, hat, present = _gradvac_inputs(t, cond, seed=10 + t)
    monkeypatch.setattr(_lcp, "NATIVE", True)
    assert gradvac._native(gram, hat) is not None, "the compiled step is not used"
    w, new_hat = gradvac.step(gram, order, hat, present, beta=0.3, eps=1e-8)
    monkeypatch.setattr(_lcp, "NATIVE", False)
    assert gradvac._native(gram, hat) is None
    w_ref, hat_ref = gradvac.step(gram, order, hat, present, beta=0.3, eps=1e-8)
    assert w.dtype == w_ref.dtype and w.shape == w_ref.shape and new_hat.shape == hat_ref.shape
    # NaN where (and only where) the torch loop has NaN.
    assert torch.equal(w.isnan(), w_ref.isnan()) and torch.equal(new_hat.isnan(), hat_ref.isnan())
    if cond == "nan" and t >= 2:   # (T = 1: no pair, nothing visited)
        # The NaN row's pairs get NaN targets (the weights stay finite: a NaN cosine is
        # never below its target; the combine then carries the NaN gradient itself).
        assert new_hat[0].isnan().any() and new_hat[1, 0, t - 1].isnan()
    # The sums of T terms in another order: rounding, amplified where a cosine is ~ +-1
    # (sqrt(1 - phi^2) of a duplicate or antiparallel row).
    tol = 1e-9 if cond == "degenerate" else 1e-12
    torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(new_hat, hat_ref, rtol=tol, atol=tol, equal_nan=True)
    if present is not None:
        assert (w[~present] == 0).all()
        pair = present.unsqueeze(-1) & present.unsqueeze(-2)
        assert torch.equal(new_hat[~pair], hat[~pair])           # pairs with an absent task keep their targets
    # Every visited pair moved its target (beta > 0) unless its cosine equals it.
    if cond == "random":
        off = ~torch.eye(t, dtype=torch.bool).expand(3, t, t)
        assert (new_hat[off] != hat[off]).all()
        assert torch.equal(new_hat[~off], hat[~off])


def test_gradvac_without_the_compiled_op_runs_the_torch_loop(monkeypatch):
    # An extension built before ortholora_C::gradvac: the torch loop, the same answer.
    gram, order, hat, present = _gradvac_inputs(5, "absent", seed=3)
    monkeypatch.setattr(_lcp, "NATIVE", False)
    ref = gradvac.step(gram, order, hat, present, beta=0.5, eps=1e-8)
    monkeypatch.setattr(_lcp, "NATIVE", True)
    monkeypatch.setitem(_lcp._HAS_OP, "gradvac", False)
    assert gradvac._native(gram, hat) is None
    got = gradvac.step(gram, order, hat, present, beta=0.5, eps=1e-8)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
