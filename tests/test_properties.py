"""Property tests (hypothesis): geometry of the projection and scale invariance, on every pair.

Each test builds its ``@given`` function inside, so the (backend, device) pair comes from
the matrix fixture and the interpreter gets fewer examples.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def _examples(target, n: int) -> int:
    return max(3, n // 4) if target.interpreted else n


def test_two_tasks_end_non_conflicting(target):
    @settings(max_examples=_examples(target, 20), deadline=None)
    @given(seed=st.integers(0, 10_000), n=st.integers(2, 300))
    def check(seed, n):
        x = target.grads(2, n, dtype=torch.float64, seed=seed, shared=-1.0)
        out = target.project(x, reduction="none")
        scale = float(x.norm(dim=1).prod())
        # each projected gradient has a non-negative inner product with the other original
        assert float(out[0] @ x[1]) >= -1e-12 * scale
        assert float(out[1] @ x[0]) >= -1e-12 * scale
    check()


def test_positive_scaling_commutes(target):
    @settings(max_examples=_examples(target, 15), deadline=None)
    @given(seed=st.integers(0, 10_000), t=st.integers(1, 7), log_scale=st.floats(-20, 20),
           reduction=st.sampled_from(["sum", "mean", "none"]))
    def check(seed, t, log_scale, reduction):
        x = target.grads(t, 97, dtype=torch.float64, seed=seed, shared=-0.6)
        order = target.order(t, 2, seed=seed)
        c = 10.0 ** log_scale
        a = target.project(x, [0, 40, 97], order=order, reduction=reduction)
        b = target.project(x * c, [0, 40, 97], order=order, reduction=reduction)
        torch.testing.assert_close(b / c, a, rtol=1e-9, atol=1e-9 * float(a.abs().max() + 1e-300))
    check()


def test_projection_never_increases_norm_of_a_task(target):
    """Each projection removes a component: ||g_i'|| <= ||g_i||."""
    @settings(max_examples=_examples(target, 15), deadline=None)
    @given(seed=st.integers(0, 10_000), t=st.integers(2, 6))
    def check(seed, t):
        x = target.grads(t, 64, dtype=torch.float64, seed=seed, shared=-0.8)
        out = target.project(x, reduction="none", order=target.order(t, seed=seed))
        assert (out.norm(dim=1) <= x.norm(dim=1) * (1 + 1e-12)).all()
    check()
