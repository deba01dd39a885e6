"""The one composition (ortholora_kernels/pipeline.py) as OrthoLoRA, aggregate and Aggregator use it:
absent tasks, NaN, the schedule's skipped steps, the aggregator object, the custom-solve name."""
import math
import warnings
from unittest import mock

import pytest
import torch

from models import make_batch, task_losses, tiny_multitask
from ortholora_kernels import Aggregator, GradVac, OrthoLoRA, aggregate, per_task_mean_loss, pipeline, project

T = 3


def _model(seed=0):
    m = tiny_multitask("roberta", T, seed=seed, lora_dropout=0.0)
    m.train()
    return m


def _grad(ortho):
    return torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])


def _on_present_rows(x, offsets, present, method, **options):
    """The independent reference: the method on each segment's present rows alone (weight 0 elsewhere)."""
    out = torch.zeros(x.shape[1], dtype=x.dtype)
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        rows = present[s].nonzero().squeeze(1) if present.dim() == 2 else present.nonzero().squeeze(1)
        if rows.numel():
            out[a:b] = aggregate(x[rows, a:b].contiguous(), method=method, **options)
    return out


# ---- absent tasks ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [("nashmtl", {}), ("cagrad", {"c": 0.5}), ("mgda", {}), ("upgrad", {}),
                                            ("fairgrad", {}), ("mean", {}), ("imtlg", {})])
def test_ortholora_leaves_an_absent_task_out_of_the_solve(method, options):
    """Task 2 has no example: every LoRA .grad equals the method on tasks 0 and 1 alone (finite,
    not zero), where nashmtl/fairgrad once wrote NaN and cagrad/mgda (almost) 0."""
    m = _model()
    ortho = OrthoLoRA(m, T, aggregator=Aggregator(method, **options))
    b = make_batch([3, 2, 0], seed=1)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    buf = ortho.buffer.clone()
    assert buf[2].abs().max() == 0
    res = ortho.project_()
    got = _grad(ortho)
    offsets = ortho.layout.segments("ab")
    want = _on_present_rows(buf, offsets, torch.tensor([True, True, False]), method, **options)
    assert torch.isfinite(got).all() and got.norm() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert (res.weights[:, 2] == 0).all() and res.task_present.tolist() == [[True, True, False]] * 2
    ortho.remove()


def test_aggregate_present_matches_the_present_rows_per_segment():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 60, dtype=torch.float64, generator=g)
    offsets = [0, 25, 60]
    present = torch.tensor([[True, False, True, True], [True, True, True, False]])
    for method in ("upgrad", "nashmtl", "dualproj", "alignedmtl", "sum", "mean"):
        got = aggregate(x, offsets, method=method, present=present)
        torch.testing.assert_close(got, _on_present_rows(x, offsets, present, method), rtol=1e-9, atol=1e-12)
        res = aggregate(x, offsets, method=method, present=present, return_stats=True)
        assert (res.weights[~present] == 0).all(), method
    # all present: exactly the plain call; pcgrad: an absent task's zero row needs no flag
    torch.testing.assert_close(aggregate(x, offsets, method="upgrad", present=torch.ones(4, dtype=torch.bool)),
                               aggregate(x, offsets, method="upgrad"), rtol=0, atol=0)
    z = x.clone()
    z[1] = 0
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])
    # (to rounding: with a flag it runs the staged composition, without one the fused op)
    torch.testing.assert_close(aggregate(z, offsets, order=order, present=torch.tensor([True, False, True, True])),
                               project(z, offsets, order=order), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="present"):
        aggregate(x, offsets, method="upgrad", present=torch.ones(3, dtype=torch.bool))


def test_gradvac_with_an_absent_task_gives_it_no_weight():
    x = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[1] = 0
    agg = GradVac(beta=0.5)
    res = agg(x, [0, 40], present=torch.tensor([True, False, True]), return_stats=True,
              order=torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]]))
    assert res.weights[0, 1] == 0 and torch.isfinite(res.output).all()
    phi = agg.state_dict()["phi_hat"]
    assert (phi[0, 1] == 0).all() and (phi[0, :, 1] == 0).all()   # no evidence from the absent task
    assert phi[0, 0, 2] != 0 and phi[0, 2, 0] != 0


# ---- NaN / Inf ----------------------------------------------------------------------------------

def _nan_step(ortho, m):
    b = make_batch([2, 2, 2], seed=3)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    ortho.buffer[1, 5] = float("nan")


@pytest.mark.parametrize("aggregator", ["pcgrad", "upgrad"])
def test_nan_propagates_and_the_statistics_show_it(aggregator):
    m = _model()
    ortho = OrthoLoRA(m, T, aggregator=aggregator)
    _nan_step(ortho, m)
    ortho.project_()
    assert torch.isnan(_grad(ortho)).any()
    stats = ortho.stats_dict()
    seg0 = ortho.segment_names[0]
    assert math.isnan(stats[f"ortho/conflict_fraction/{seg0}"]) and math.isnan(stats[f"ortho/mean_cosine/{seg0}"])
    assert math.isnan(stats[f"ortho/grad_norm/{seg0}/task1"]) and not math.isnan(stats[f"ortho/grad_norm/{seg0}/task0"])
    ortho.remove()


def test_check_finite_names_the_task_and_writes_no_grad():
    m = _model()
    ortho = OrthoLoRA(m, T, check_finite=True)
    _nan_step(ortho, m)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        ortho.project_()
    assert all(p.grad is None for p in ortho.layout.params) and not ortho.pending
    b = make_batch([2, 2, 2], seed=4)   # the next step runs normally
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    ortho.project_()
    assert torch.isfinite(_grad(ortho)).all()
    with pytest.raises(TypeError, match="check_finite"):
        OrthoLoRA(_model(), T, check_finite="yes")
    ortho.remove()


def test_per_task_mean_loss_names_a_bad_task_id():
    loss = torch.ones(4)
    for bad in (3, 7, -2):
        with pytest.raises(ValueError, match=f"task id {bad} out of range"):
            per_task_mean_loss(loss, torch.tensor([0, 1, bad, 2]), 3)
    assert per_task_mean_loss(loss, torch.tensor([0, -1, 2, 2]), 3).tolist() == [1.0, 0.0, 1.0]


# ---- the Aggregator: orders, skipped steps, the object ---------------------------------------------

def test_aggregator_checks_orders_like_project():
    x = torch.randn(3, 20)
    bad = torch.tensor([[0, 0, 2], [1, 0, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match="permutation"):
        project(x, order=bad)
    for agg in (Aggregator("pcgrad", ema=0.9), GradVac()):
        with pytest.raises(ValueError, match="permutation"):
            agg(x, order=bad)


def test_a_skipped_step_makes_no_gram_pass_unless_needed():
    x = torch.randn(3, 50)
    with mock.patch.object(pipeline, "gram", wraps=pipeline.gram) as spy:
        agg = Aggregator("upgrad", every=2)
        agg(x)                                       # step 0: aggregates
        assert spy.call_count == 1
        out = agg(x)                                 # step 1: skipped, the plain sum
        assert spy.call_count == 1
        torch.testing.assert_close(out, x.sum(0))
        agg(x)
        agg(x, return_stats=True)                    # skipped, but the statistics need the Gram
        assert spy.call_count == 3
        ema = Aggregator("upgrad", every=2, ema=0.9)
        ema(x)
        ema(x)                                       # skipped, but the EMA is updated
        assert spy.call_count == 5


def test_ortholora_takes_one_aggregator_object_and_the_old_kwargs_still_work():
    def run(**kw):
        m = _model()
        ortho = OrthoLoRA(m, T, seed=2, **kw)
        for seed in range(3):
            b = make_batch([2, 1, 2], seed=seed)
            with ortho.record(b["task_ids"]):
                task_losses(m, b).sum().backward()
            ortho.project_()
        ortho.remove()
        return ortho, [p.detach().clone() for p in ortho.layout.params], _grad(ortho)

    new, _, g_new = run(aggregator=Aggregator("cagrad", c=0.4, ema=0.9, every=2))
    with pytest.warns(DeprecationWarning, match="ema, every, method_options"):
        old, _, g_old = run(method="cagrad", method_options={"c": 0.4}, ema=0.9, every=2)
    torch.testing.assert_close(g_new, g_old, rtol=0, atol=0)
    assert new.aggregator.step == 3 and new.method == "cagrad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the string and the defaults warn nothing
        OrthoLoRA(_model(), T, method="upgrad").remove()
        OrthoLoRA(_model(), T, aggregator="upgrad", ema=None, every=1).remove()
    # state round trip; a checkpoint without the aggregator's state (old, plain pcgrad) loads
    state = new.state_dict()
    other = OrthoLoRA(_model(), T, seed=2, aggregator=Aggregator("cagrad", c=0.4, ema=0.9, every=2))
    other.load_state_dict(state)
    assert other.aggregator.step == 3
    assert torch.equal(other.aggregator.state_dict()["ema_gram"], new.aggregator.state_dict()["ema_gram"])
    old_state = {k: v for k, v in OrthoLoRA(_model(), T).state_dict().items() if k != "aggregator"}
    OrthoLoRA(_model(), T).load_state_dict(old_state)
    for bad, err in ((dict(aggregator=3), TypeError), (dict(aggregator="nope"), ValueError),
                     (dict(aggregator=Aggregator("upgrad"), ema=0.5), TypeError),
                     (dict(aggregator="upgrad", method="mgda"), TypeError), (dict(emma=0.5), TypeError)):
        with pytest.raises(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            OrthoLoRA(_model(), T, **bad)
    assert "cagrad" in repr(new) and "Aggregator('cagrad', c=0.4, ema=0.9, every=2)" == repr(new.aggregator)


# ---- reprs; the custom-solve name ------------------------------------------------------------------

def test_result_reprs_are_short_and_hold_no_values():
    x = torch.randn(3, 5000, dtype=torch.float64)
    for res in (project(x, [0, 1000, 5000], return_stats=True), aggregate(x, method="upgrad", return_stats=True)):
        text = repr(res)
        assert len(text) < 600 and "tensor([5000], float64)" in text and "num_tasks=3" in text
        assert "e-" not in text and "..." not in text.replace("(0, 1000, 5000)", "")   # no printed values


def test_project_takes_a_registered_solve_by_name():
    from ortholora_kernels.solve import Solve, register_solve, weighting_solution

    class Half(Solve):
        name = "test-pipeline-half"

        def forward(self, gram, order, reduction):
            return weighting_solution(torch.full(gram.shape[:2], 0.5, dtype=gram.dtype, device=gram.device),
                                      reduction)

        def vjp(self, gram, order, reduction, weights_grad):
            return torch.zeros_like(gram)

    register_solve(Half())
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    out = project(x, [0, 10, 40], solve="test-pipeline-half")
    torch.testing.assert_close(out, 0.5 * x.detach().sum(0))
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 0.5))
    with pytest.raises(ValueError, match="solve"):
        project(x.detach(), solve="nope")


# ---- the EMA's state: NaN steps, resets, old checkpoints ---------------------------------------

@pytest.mark.parametrize("method", ["upgrad", "pcgrad"])
def test_a_nan_step_shows_nan_but_leaves_the_ema_state_as_it_was(method):
    """A NaN step's output is NaN (GradScaler skips it), and the next finite step gives what an
    aggregator that never saw it gives: the NaN does not stay in the smoothed Gram for ever."""
    torch.manual_seed(0)
    g1, g2 = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    g2[0] = -g1[1]
    bad = g1.clone()
    bad[1, 3] = float("nan")
    a, b = Aggregator(method, ema=0.9), Aggregator(method, ema=0.9)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a.generator, b.generator = gen_a, gen_b
    a(g1), b(g1)
    assert torch.isnan(a(bad)).any()
    b.generator = torch.Generator().manual_seed(1)   # a's next order is the same draw as b's
    a.generator = torch.Generator().manual_seed(1)
    got, want = a(g2, return_stats=True), b(g2, return_stats=True)
    assert torch.isfinite(got.output).all() and torch.isfinite(got.smoothed_gram).all()
    torch.testing.assert_close(got.output, want.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.smoothed_gram, want.smoothed_gram, rtol=1e-12, atol=1e-12)


def test_check_finite_with_an_ema_recovers_on_the_next_step():
    m = _model()
    ortho = OrthoLoRA(m, T, check_finite=True, aggregator=Aggregator("upgrad", ema=0.9))
    _nan_step(ortho, m)
    with pytest.raises(FloatingPointError):
        ortho.project_()
    b = make_batch([2, 2, 2], seed=4)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    ortho.project_()
    assert torch.isfinite(_grad(ortho)).all()
    ortho.remove()


def test_ema_bias_correction_restarts_with_the_state():
    """A new segment layout resets the EMA: its first step decides on G itself, as a fresh one
    (Nash-MTL's weights scale with the Gram, so a stale correction changes them)."""
    torch.manual_seed(0)
    g = torch.randn(3, 40, dtype=torch.float64)
    a = Aggregator("nashmtl", ema=0.9)
    for _ in range(5):
        a(g, [0, 20, 40])
    got = a(g, [0, 10, 40], return_stats=True)
    want = Aggregator("nashmtl", ema=0.9)(g, [0, 10, 40], return_stats=True)
    torch.testing.assert_close(got.output, want.output, rtol=1e-9, atol=1e-12)


def test_an_old_ema_checkpoint_without_its_norm_loads_with_the_step_count():
    torch.manual_seed(0)
    gs = [torch.randn(3, 30, dtype=torch.float64) for _ in range(4)]
    a = Aggregator("upgrad", ema=0.8)
    for g in gs[:3]:
        a(g)
    state = a.state_dict()
    old = {k: v for k, v in state.items() if k != "ema_norm"}   # the format before it was kept
    b = Aggregator("upgrad", ema=0.8)
    b.load_state_dict(old)
    torch.testing.assert_close(b.state_dict()["ema_norm"], state["ema_norm"], rtol=1e-15, atol=0)
    torch.testing.assert_close(b(gs[3]), a(gs[3]), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: the test above)")
def test_an_ema_state_loaded_on_the_cpu_follows_the_gradients_to_cuda():
    torch.manual_seed(0)
    gs = [torch.randn(3, 30, dtype=torch.float64) for _ in range(3)]
    a = Aggregator("upgrad", ema=0.8)
    for g in gs[:2]:
        a(g)
    b = Aggregator("upgrad", ema=0.8)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(gs[2].cuda()).cpu(), a(gs[2]), rtol=1e-9, atol=1e-12)
    assert b.state_dict()["ema_gram"].is_cuda


# ---- the step's task counts: every rank joins their all-reduce; no host sync ---------------------

def test_every_rank_joins_the_count_all_reduce_even_with_nothing_recorded():
    """A rank with no example in the step still joins the counts' all-reduce (with zeros):
    were it to skip the collective, the other ranks would wait for ever."""
    ortho = OrthoLoRA(_model(), T, aggregator="upgrad")
    others = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)   # what the other ranks counted
    with mock.patch("ortholora_kernels.distributed.reduce.all_reduce_counts",
                    side_effect=lambda c, group=None: c.add_(others)) as reduce:
        present = ortho._present(torch.device("cpu"), group=None)
    reduce.assert_called_once()
    assert present.tolist() == [True, False, True]
    assert ortho._present(torch.device("cpu"), group=False) is None   # one process: nothing counted
    ortho.remove()


def test_the_step_counts_reach_the_buffer_device_through_pinned_memory():
    """CPU twin of the CUDA test below: the counts of CPU task ids go to the buffer's device
    through the collector's non-blocking copy (a plain .to() from pageable memory syncs)."""
    from ortholora_kernels import projector
    m = _model()
    ortho = OrthoLoRA(m, T, aggregator="upgrad")
    b = make_batch([2, 0, 1], seed=3)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    with mock.patch.object(projector, "_to_device", wraps=projector._to_device) as copy:
        res = ortho.project_()
    assert copy.call_count == 1 and copy.call_args.args[0].tolist() == [2.0, 0.0, 1.0]
    assert res.task_present.tolist() == [[True, False, True]] * res.gram.shape[0]
    ortho.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: the test above)")
def test_the_step_counts_reach_cuda_without_a_host_sync():
    ortho = OrthoLoRA(_model(), T, aggregator="upgrad")
    ortho._count_tasks(torch.tensor([0, 0, 2]))
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        present = ortho._present(torch.device("cuda"), group=False)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert present.tolist() == [True, False, True]
    ortho.remove()


@pytest.mark.parametrize("method", ["sum", "mean", "pcgrad", "upgrad"])
def test_a_bad_present_is_named_on_every_path(method):
    """The fixed-weight path (sum/mean), the plain projection and the solve check ``present`` alike."""
    x = torch.randn(3, 20, dtype=torch.float64)
    for bad, err in ((torch.ones(5, dtype=torch.bool), ValueError), (torch.ones(2, 2, dtype=torch.bool), ValueError),
                     (torch.tensor([1, 0, 1]), TypeError), ("all", TypeError)):
        with pytest.raises(err, match="present"):
            aggregate(x, [0, 10, 20], method=method, present=bad)
    # a list of bools is a [T] mask; task 1 is left out
    def run(present):   # pcgrad: the same drawn orders for both
        return aggregate(x, [0, 10, 20], method=method, present=present, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run([True, False, True]), run(torch.tensor([True, False, True])))


@pytest.mark.parametrize("make", [lambda: None, lambda: Aggregator("pcgrad", ema=0.5)])
def test_pcgrad_leaves_an_absent_task_out_even_when_its_row_is_not_zero(make):
    """aggregate(present=) takes any rows: a flagged-absent task's non-zero gradient reaches
    neither the output nor the projections of the others (it once did on both paths)."""
    torch.manual_seed(0)
    x = torch.randn(3, 20, dtype=torch.float64)
    present = torch.tensor([True, False, True])
    agg = make()
    res = (aggregate(x, [0, 10, 20], method="pcgrad", present=present, return_stats=True) if agg is None
           else agg(x, [0, 10, 20], present=present, return_stats=True))
    # two present tasks: each visits only the other, whatever the order
    want = torch.cat([project(x[[0, 2], a:b].contiguous()) for a, b in ((0, 10), (10, 20))])
    torch.testing.assert_close(res.output, want, rtol=1e-12, atol=1e-12)
    assert (res.weights[:, 1] == 0).all()


def test_an_absent_task_gives_the_ema_no_evidence():
    """A step without task 2 leaves the smoothed entries of its pairs (and their step count)
    as they were: the EMA of a rarely sampled task averages the steps it took part in, instead
    of decaying towards 0 on every step it missed. The other entries move as usual."""
    torch.manual_seed(0)
    g1, g2 = torch.randn(3, 30, dtype=torch.float64), torch.randn(3, 30, dtype=torch.float64)
    g2[2] = 0
    beta = 0.8
    a = Aggregator("upgrad", ema=beta)
    a(g1)
    res = a(g2, present=torch.tensor([True, True, False]), return_stats=True)
    e1 = (1 - beta) * (g1 @ g1.T)
    want = beta * e1 + (1 - beta) * (g2 @ g2.T)
    want[2, :], want[:, 2] = e1[2, :], e1[:, 2]
    torch.testing.assert_close(res.smoothed_gram[0], want, rtol=1e-12, atol=1e-12)
    norm = a.state_dict()["ema_norm"][0]
    assert torch.allclose(norm[2], torch.full((3,), 1 - beta, dtype=torch.float64))
    assert torch.allclose(norm[0, :2], torch.full((2,), 1 - beta ** 2, dtype=torch.float64))
    assert (res.weights[:, 2] == 0).all() and torch.isfinite(res.output).all()


def test_the_ema_hook_takes_its_norm_as_a_tensor():
    """The hook's third argument is the state's ``1 - beta^k`` (a tensor), not a step count."""
    with pytest.raises(TypeError, match="norm"):
        pipeline.ema(0.9, None, 3)
    g = torch.randn(3, 10, dtype=torch.float64)
    gram = (g @ g.T).unsqueeze(0)
    st = pipeline.ema(0.9, None)(pipeline.GramStage(gram, gram))
    torch.testing.assert_close(st.decide, gram)           # step 1: the Gram itself
    st2 = pipeline.ema(0.9, st.smoothed, st.smoothed_norm)(pipeline.GramStage(2 * gram, 2 * gram))
    torch.testing.assert_close(st2.decide, (0.9 * 0.1 + 0.1 * 2) / (1 - 0.81) * gram)


def test_a_non_differentiable_pcgrad_call_says_why():
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="only as the plain projection"):
        aggregate(x, method="pcgrad", present=torch.tensor([True, False, True]))
    with pytest.raises(RuntimeError, match="only as the plain projection"):
        Aggregator("pcgrad", ema=0.9)(x)
    with pytest.raises(RuntimeError, match="only pcgrad is"):
        aggregate(x, method="upgrad")


def test_a_step_refused_by_check_finite_leaves_the_schedule_where_it_was():
    """The refused step is not a step: the aggregator's count (hence its schedule) and EMA are
    as before it, so the next step is the one the schedule would have run."""
    m = _model()
    ortho = OrthoLoRA(m, T, check_finite=True, aggregator=Aggregator("upgrad", every=2, ema=0.9))
    _nan_step(ortho, m)
    with pytest.raises(FloatingPointError):
        ortho.project_()
    assert ortho.aggregator.step == 0 and ortho.aggregator.state_dict()["ema_gram"] is None
    b = make_batch([2, 2, 2], seed=4)
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    assert ortho.project_().method == "upgrad"        # step 0 of the schedule aggregates
    assert ortho.aggregator.step == 1
    ortho.remove()
