"""Property tests (hypothesis): geometry of the projection and scale invariance."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ortholora_kernels as ok

from cases import make_grads, random_order

BACKENDS = [n for n, (usable, _) in ok.backends_available("cpu").items() if usable and n != "triton"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 300), backend=st.sampled_from(BACKENDS))
def test_two_tasks_end_non_conflicting(seed, n, backend):
    x = make_grads(2, n, dtype=torch.float64, seed=seed, shared=-1.0)
    out = ok.project(x, reduction="none", backend=backend)
    scale = float(x.norm(dim=1).prod())
    # each projected gradient has a non-negative inner product with the other original
    assert float(out[0] @ x[1]) >= -1e-12 * scale
    assert float(out[1] @ x[0]) >= -1e-12 * scale


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(1, 7), log_scale=st.floats(-20, 20),
       reduction=st.sampled_from(["sum", "mean", "none"]), backend=st.sampled_from(BACKENDS))
def test_positive_scaling_commutes(seed, t, log_scale, reduction, backend):
    x = make_grads(t, 97, dtype=torch.float64, seed=seed, shared=-0.6)
    order = random_order(t, 2, seed=seed)
    c = 10.0 ** log_scale
    a = ok.project(x, [0, 40, 97], order=order, reduction=reduction, backend=backend)
    b = ok.project(x * c, [0, 40, 97], order=order, reduction=reduction, backend=backend)
    torch.testing.assert_close(b / c, a, rtol=1e-9, atol=1e-9 * float(a.abs().max() + 1e-300))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(2, 6), backend=st.sampled_from(BACKENDS))
def test_projection_never_increases_norm_of_a_task(seed, t, backend):
    """Each projection removes a component: ||g_i'|| <= ||g_i||."""
    x = make_grads(t, 64, dtype=torch.float64, seed=seed, shared=-0.8)
    out = ok.project(x, reduction="none", order=random_order(t, seed=seed), backend=backend)
    assert (out.norm(dim=1) <= x.norm(dim=1) * (1 + 1e-12)).all()
