"""torch.compile and CUDA graphs: grouped collection without graph breaks, a fullgraph
training step (forward, backward, project_), project(...) with generator/order/stats under
fullgraph, loop collection on a compiled model, no host syncs, capture and replay."""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from models import make_batch, task_losses, tiny_multitask
from ortholora_kernels import OrderGenerator, OrthoLoRA, project

T = 3
# Per-task counts of 10 steps: the batch size changes, tasks go missing, counts shuffle.
SIZES = [[2, 2, 2], [3, 1, 2], [1, 4, 2], [2, 0, 3], [4, 2, 1], [2, 2, 3], [1, 1, 1], [3, 3, 0], [2, 5, 1], [1, 2, 3]]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _pair(**kw):
    m = tiny_multitask("roberta", T, lora_dropout=0.0, **kw)
    m.train()
    return m, copy.deepcopy(m)


def _breaks():
    return sum(counters["graph_break"].values())


def test_grouped_collection_compiles_without_graph_breaks_one_recompile():
    """torch.compile(model) + record(): zero graph breaks over 10 steps with varying per-task
    counts, one recompile (the batch size becomes a symbol), buffer == eager grouped."""
    m, ref = _pair()
    cm = torch.compile(m)
    o, oref = OrthoLoRA(m, T), OrthoLoRA(ref, T)
    for i, sizes in enumerate(SIZES):
        b = make_batch(sizes, seq_len=6, seed=i)
        with o.record(b["task_ids"]):
            loss = task_losses(cm, b).sum()
            loss.backward()
        with oref.record(b["task_ids"]):
            task_losses(ref, b).sum().backward()
        assert all(p.grad is None for p in o.layout.params)  # the summed LoRA gradient is never formed
        for t, n in enumerate(sizes):
            assert (o.buffer[t].norm() > 0) == (n > 0)
        torch.testing.assert_close(o.buffer, oref.buffer, rtol=1e-5, atol=1e-7)
        o.project_(), oref.project_()
        m.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
    assert _breaks() == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # the first graph + one dynamic-batch recompile
    # Ordinary (joint) gradients outside record() still compile and flow into .grad.
    b = make_batch([2, 2, 2], seq_len=6)
    task_losses(cm, b).sum().backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for p in o.layout.params)
    o.remove(), oref.remove()


def test_compiled_forward_outside_record_keeps_ordinary_gradients():
    """Under compile the routing is read by the forward: a compiled forward outside record()
    gives ordinary gradients, which stay in .grad (kept, not projected), never lost."""
    m, _ = _pair()
    cm = torch.compile(m)
    o = OrthoLoRA(m, T)
    b = make_batch([2, 2, 2], seq_len=6)
    loss = task_losses(cm, b).sum()
    with o.record(b["task_ids"]):
        loss.backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for p in o.layout.params)
    assert torch.count_nonzero(o.buffer) == 0
    o.remove()


def _counting(calls):
    """An inductor backend that records each graph it compiles (the recompiles of ONE
    compiled function, unlike the global counters, which also see the optimizer's)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        calls.append(gm)
        return compile_fx(gm, example_inputs)
    return backend


def test_whole_grouped_step_fullgraph_equals_eager():
    """forward + backward of the summed per-task losses + project_() as ONE fullgraph graph
    (Tensor.backward traced with trace_autograd_ops; fullgraph: zero graph breaks, or it
    raises) over steps with varying per-task counts and batch sizes, at most one recompile
    (the batch size becomes a symbol); optimizer.step() compiled on its own (torch's
    Optimizer breaks the graph there on purpose). Loss, statistics, parameters, the order
    generator's state and the step count equal eager step by step."""
    m, ref = _pair()
    o, oref = OrthoLoRA(m, T, rng="counter"), OrthoLoRA(ref, T, rng="counter")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)

    def step(b):
        loss = task_losses(m, b).sum()
        loss.backward()
        res = o.project_()
        return loss.detach(), res.conflict_fraction, res.order

    calls = []
    steps = SIZES[:6]  # batch sizes 6, 6, 7, 5, 7, 7; task 1 absent at step 4
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        cstep = torch.compile(step, fullgraph=True, backend=_counting(calls))
        copt = torch.compile(opt.step)
        for i, sizes in enumerate(steps):
            b = make_batch(sizes, seq_len=6, seed=i)
            with o.record(b["task_ids"]):
                loss, cf, order = cstep(b)
            grads = [p.grad.clone() for p in o.layout.params]
            copt()
            opt.zero_grad()
            with oref.record(b["task_ids"]):
                lr = task_losses(ref, b).sum()
                lr.backward()
            res = oref.project_()
            # (after the first steps the two runs' parameters differ by ~1e-6: Adam, above)
            torch.testing.assert_close([q.grad for q in oref.layout.params], grads, rtol=1e-4, atol=1e-6)
            opt_ref.step()
            opt_ref.zero_grad()
            torch.testing.assert_close(loss, lr.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cf, res.conflict_fraction)
            assert torch.equal(order, res.order)
            for p, q in zip(m.parameters(), ref.parameters()):  # Adam's steps are ~lr = 1e-2 per element:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # 1e-7 in a tiny gradient shows ~1e-6
    assert 1 <= len(calls) <= 2, len(calls)
    assert o.num_steps == len(steps) and torch.count_nonzero(o.buffer) == 0 and not o.pending
    torch.testing.assert_close(o._generator.state, oref._generator.state, rtol=0, atol=0)
    o.remove(), oref.remove()


def test_project_generator_order_stats_fullgraph():
    """project(...) with generator=OrderGenerator, an explicit order, return_stats=True and
    every statistic compiles with fullgraph=True and equals eager, step after step."""
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    x[1] = -x[0] + 0.1 * x[1]  # a conflict
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(k)) for k in range(4)])
    stats = ("output", "gram", "coeffs", "num_projections", "order", "cosine", "conflicts", "conflict_fraction",
             "projection_fraction", "mean_cosine")

    def f(x, g, order):
        r = project(x, [0, 10, 30], generator=g, return_stats=True)
        r2 = project(x, [0, 10, 30], order=order, reduction="none", return_stats=True)
        return [getattr(r, s) for s in stats] + [getattr(r2, s) for s in stats]

    cf = torch.compile(f, fullgraph=True)
    ge, gc = OrderGenerator(3), OrderGenerator(3)
    orders = []
    for _ in range(3):
        e, c = f(x, ge, order), cf(x, gc, order)
        for a, b in zip(e, c):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        orders.append(e[4])
    assert not torch.equal(orders[0], orders[1])  # a fresh order every call
    assert torch.equal(ge.state, gc.state) and int(ge.state[1]) == 3
    assert _breaks() == 0
    with pytest.raises(Exception, match="OrderGenerator"):
        torch.compile(f, fullgraph=True)(x, torch.Generator().manual_seed(0), order)


def test_order_generator_permutations_uniform_and_resumable():
    g = OrderGenerator(11)
    draws = torch.stack([g.draw(1, 3)[0] for _ in range(600)])  # [600, 3, 3]
    assert torch.equal(draws.sort(-1).values, torch.arange(3).expand_as(draws))
    codes = (draws[..., 0] * 9 + draws[..., 1] * 3 + draws[..., 2]).reshape(-1)
    counts = torch.bincount(codes, minlength=27)[[5, 7, 11, 15, 19, 21]]  # the 6 permutations of 0..2
    assert counts.sum() == 1800 and counts.min() > 240 and counts.max() < 360  # 300 each; 6 sigma ~ 90
    state = g.get_state()
    a = g.draw(2, 5)
    g.set_state(state)
    assert torch.equal(g.draw(2, 5), a)
    assert not torch.equal(OrderGenerator(12).draw(2, 5), OrderGenerator(11).draw(2, 5))
    with pytest.raises(ValueError, match="OrderGenerator on"):
        project(torch.randn(3, 4, device="meta"), generator=g)
    with pytest.raises(ValueError, match="state"):
        g.set_state(torch.zeros(3))


def test_loop_collection_on_a_compiled_model():
    """collect='loop' on a compiled model: one forward and backward per task inside task(t)
    equals eager (measured max abs difference ~1e-8 on values up to 4.5e-2)."""
    m, ref = _pair()
    o, oref = OrthoLoRA(m, T, collect="loop"), OrthoLoRA(ref, T, collect="loop")
    b = make_batch([2, 3, 1], seq_len=6)
    cm = torch.compile(m)
    for t in range(T):
        sl = b["task_ids"] == t
        sub = {k: v[sl] for k, v in b.items()}
        with o.task(t):
            task_losses(cm, sub)[t].backward()
        with oref.task(t):
            task_losses(ref, sub)[t].backward()
    assert all(oref.buffer[t].norm() > 0 for t in range(T))
    torch.testing.assert_close(o.buffer, oref.buffer, rtol=1e-5, atol=1e-7)
    assert _breaks() == 0


@pytest.fixture
def _two_threads():
    """The inductor fault below was seen with 2 threads (the code inductor generates depends on
    the thread count), never with 1: the tests that look for it run with 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _retained_grads(losses, params):
    return [torch.autograd.grad(l, params, retain_graph=True) for l in losses]


def _close(a, b):
    try:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        return True
    except AssertionError:
        return False


def test_backward_over_one_compiled_forward_refused_or_equal_to_eager(_two_threads):
    """``ortho.backward(task_losses)`` over ONE compiled forward keeps the library's promise on
    every machine. Whether the running torch gets T retained passes over one compiled backward
    right depends on the machine (seen wrong with torch 2.13 on some CPUs, 2 threads: relative
    errors ~2e-3 after the first pass; right on others, e.g. an AMD EPYC with AVX-512). Where
    the guard's probe refuses, no gradient is written, the error names the three ways out, and
    plain retained autograd is indeed wrong there; where it allows, the projected buffer
    equals eager."""
    m, ref = _pair()
    ps = [p for n, p in m.named_parameters() if "lora_" in n]
    b = make_batch([2, 3, 1], seq_len=6)
    cm = torch.compile(m)
    plain_ok = _close(_retained_grads(task_losses(cm, b), ps), _retained_grads(task_losses(m, b), ps))
    o, oref = OrthoLoRA(m, T, collect="loop"), OrthoLoRA(ref, T, collect="loop")
    oref.backward(task_losses(ref, b))
    try:
        o.backward(task_losses(cm, b))
        refused = None
    except RuntimeError as e:
        refused = str(e)
    if refused is not None:
        assert "a probe found" in refused
        for way in ("record(task_ids)", "ortho.task(t)", "inplace_buffers = False"):
            assert way in refused
        assert torch.count_nonzero(o.buffer) == 0 and all(p.grad is None for p in o.layout.params)
        assert not plain_ok, "the guard refused retained passes that equal eager on this machine"
    else:
        assert all(oref.buffer[t].norm() > 0 for t in range(T))
        torch.testing.assert_close(o.buffer, oref.buffer, rtol=1e-4, atol=1e-7)
    o.remove(), oref.remove()


def _region(faulty):
    """A fresh stand-in for one AOTAutograd region (a new class per compiled graph, as AOTAutograd
    makes; its backward node is a ``CompiledFunctionBackward``, the name the guard looks for)
    computing ``y = x * w``. With ``faulty``, its backward overwrites, in place, a buffer it
    keeps (as the inductor fault does), so every pass after the first reads a wrong value."""

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.buf, ctx.w = x.detach().clone(), w.detach()  # a buffer of the region, not autograd-tracked
            return x * w

        @staticmethod
        def backward(ctx, dy):
            dw = (dy * ctx.buf).sum(0)
            if faulty:
                ctx.buf.mul_(1.001)  # the reused buffer: the next pass reads this
            return dy * ctx.w, dw

    def losses(w, x):
        y = CompiledFunction.apply(x, w)
        return [(y[:, k] ** 2).sum() + (y ** 2).sum() for k in range(T)]

    return losses


@pytest.mark.parametrize("faulty", [False, True])
def test_guard_probe_catches_a_region_whose_retained_passes_differ(faulty, monkeypatch):
    """The guard's verdict on a region whose backward corrupts its saved buffer (the fault's
    twin, on every machine) and on one that does not: refused before any gradient is written,
    or allowed with the gradients eager gives; probed once per region, then cached."""
    from ortholora_kernels import LoRALayout, projector
    _region_losses = _region(faulty)
    torch.manual_seed(0)
    w, b_ = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    x = torch.randn(5, 4)
    o = OrthoLoRA(LoRALayout.from_params([("m", w, b_)]), T, collect="loop")
    probes = []
    real = projector._retained_passes_agree
    monkeypatch.setattr(projector, "_retained_passes_agree", lambda loss: probes.append(1) or real(loss))
    if faulty:
        with pytest.raises(RuntimeError, match=r"tasks 0 and 1 .*a probe found.*record\(task_ids\)"
                                               r".*ortho.task.*inplace_buffers = False"):
            o.backward(_region_losses(w, x))
        assert torch.count_nonzero(o.buffer) == 0 and w.grad is None
        with pytest.raises(RuntimeError, match="a probe found"):
            o.backward(_region_losses(w, x))
    else:
        o.backward(_region_losses(w, x))
        want = torch.stack([torch.cat([torch.autograd.grad(l, w, retain_graph=True)[0], torch.zeros(4)])
                            for l in _region_losses(w, x)])
        assert want.norm() > 0
        torch.testing.assert_close(o.buffer, want, rtol=1e-6, atol=0)
        o.backward(_region_losses(w, x))
        torch.testing.assert_close(o.buffer, 2 * want, rtol=1e-6, atol=0)
    # Each call builds a new region node of the same class: one probe, then the cached verdict.
    assert len(probes) == 1
    o.remove()


def test_backward_over_one_compiled_forward_with_inplace_buffers_off(_two_threads):
    """The same T retained passes with inductor's in-place buffer reuse off: plain autograd and
    ortho.backward (which then allows losses of one compiled forward) equal eager."""
    m, ref = _pair()
    ps = [p for n, p in m.named_parameters() if "lora_" in n]
    b = make_batch([2, 3, 1], seq_len=6)
    o, oref = OrthoLoRA(m, T, collect="loop"), OrthoLoRA(ref, T, collect="loop")
    with torch._inductor.config.patch(inplace_buffers=False):
        cm = torch.compile(m)
        got = _retained_grads(task_losses(cm, b), ps)
        o.backward(task_losses(cm, b))
    torch.testing.assert_close(got, _retained_grads(task_losses(m, b), ps), rtol=1e-4, atol=1e-6)
    oref.backward(task_losses(ref, b))
    assert all(oref.buffer[t].norm() > 0 for t in range(T))
    torch.testing.assert_close(o.buffer, oref.buffer, rtol=1e-4, atol=1e-7)
    o.remove(), oref.remove()


def test_captured_step_logic_replays_on_static_tensors():
    """CPU twin of the CUDA-graph capture: ONE compiled fullgraph step (forward, backward,
    project_) replayed 100 times on STATIC tensors (each batch copied into the same input
    tensors; buffer, .grad and generator state updated in place, as a captured graph
    requires) equals an eager step each time, drawing fresh orders every replay."""
    m, ref = _pair(layers=1)
    o, oref = OrthoLoRA(m, T, rng="counter"), OrthoLoRA(ref, T, rng="counter")
    static = {k: v.clone() for k, v in make_batch([2, 2, 2], seq_len=6).items()}
    for model, ortho in ((m, o), (ref, oref)):  # warm-up (eager): buffer, sinks and every .grad exist
        with ortho.record(static["task_ids"]):
            task_losses(model, static).sum().backward()
        ortho.project_()
        model.zero_grad(set_to_none=False)
    ptrs = [o.buffer.data_ptr(), o._generator.state.data_ptr()] + [p.grad.data_ptr() for p in m.parameters()
                                                                    if p.requires_grad]

    def step():
        task_losses(m, static).sum().backward()
        return o.project_().order

    calls, orders = [], []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        cstep = torch.compile(step, fullgraph=True, backend=_counting(calls))
        for i in range(100):
            b = make_batch([2, 2, 2], seq_len=6, seed=i + 1)
            for k in static:
                static[k].copy_(b[k])
            with o.record(static["task_ids"]):
                orders.append(cstep())
            with oref.record(b["task_ids"]):
                task_losses(ref, b).sum().backward()
            want = oref.project_()
            assert torch.equal(orders[-1], want.order)
            for p, q in zip(m.parameters(), ref.parameters()):
                if q.requires_grad:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
            m.zero_grad(set_to_none=False), ref.zero_grad(set_to_none=False)
    assert len(calls) == 1
    assert ptrs == [o.buffer.data_ptr(), o._generator.state.data_ptr()] + [p.grad.data_ptr() for p in m.parameters()
                                                                           if p.requires_grad]
    assert len({tuple(x.reshape(-1).tolist()) for x in orders}) > 50  # fresh orders (6**6 possible)
    o.remove(), oref.remove()


def test_task_id_minus_one_under_compile():
    """Rows of task id -1 on a compiled model: their LoRA gradient reaches .grad (unprojected)
    as in eager, the task rows reach the buffer; both equal eager grouped, and buffer + .grad
    equal the joint gradient. A later batch without -1 rows leaves .grad None again."""
    m, ref = _pair()
    cm = torch.compile(m)
    o, oref = OrthoLoRA(m, T), OrthoLoRA(ref, T)
    b = make_batch([2, 2, 2], seq_len=6)
    ids = b["task_ids"].clone()
    ids[[1, 4]] = -1

    def loss_of(model):
        logits = model(b["input_ids"], b["attention_mask"], b["task_ids"])
        return torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none").sum()

    with o.record(ids):
        loss_of(cm).backward()
    with oref.record(ids):
        loss_of(ref).backward()
    rest = o.layout.flatten([p.grad for p in o.layout.params])
    assert rest.norm() > 0 and all(oref.buffer[t].norm() > 0 for t in range(T))
    torch.testing.assert_close(o.buffer, oref.buffer, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rest, oref.layout.flatten([p.grad for p in oref.layout.params]), rtol=1e-5, atol=1e-7)
    ref.zero_grad(set_to_none=True)
    loss_of(ref).backward()  # joint, outside any record
    joint = oref.layout.flatten([p.grad for p in oref.layout.params])
    torch.testing.assert_close(o.buffer.sum(0) + rest, joint, rtol=1e-5, atol=1e-7)
    o.project_()
    m.zero_grad(set_to_none=True)
    with o.record(b["task_ids"]):
        loss_of(cm).backward()
    assert all(p.grad is None for p in o.layout.params) and o.buffer.norm() > 0
    o.remove(), oref.remove()


def test_grouped_step_traces_without_host_reads():
    """CPU twin of the sync-free check: the per-task weight gradients and the projection
    run on the meta device (no value can be read back) and the step above traced with
    fullgraph=True (a host read would be a graph break)."""
    from ortholora_kernels.collect import task_weight_grads
    x, dy = torch.randn(5, 7, 16, device="meta"), torch.randn(5, 7, 4, device="meta")
    ids = torch.zeros(5, dtype=torch.long, device="meta")
    assert task_weight_grads(x, dy, ids, 3).shape == (3, 4, 16)
    assert task_weight_grads(dy, x, ids, 3).shape == (3, 16, 4)
    g = OrderGenerator(0, "meta")
    r = project(torch.randn(3, 20, device="meta"), [0, 8, 20], generator=g, backend="torch", return_stats=True)
    assert r.output.shape == (20,) and r.mean_cosine.shape == (2,) and r.conflict_fraction.device.type == "meta"


def test_task_weight_grads_matches_per_task_products():
    """The static-shape grouped product against the literal per-task sums (both sides, per
    example and per token task ids, unsorted, absent tasks)."""
    from ortholora_kernels.collect import task_weight_grads
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(6, 5, 16, generator=g, dtype=torch.float64), torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([2, 0, 2, 0, 2, 2])
    tok = torch.randint(0, 3, (6, 5), generator=g)
    for a, b in ((x, dy), (dy, x)):
        got = task_weight_grads(a, b, ids, 4)
        want = torch.stack([b[ids == t].reshape(-1, b.shape[-1]).t() @ a[ids == t].reshape(-1, a.shape[-1])
                            for t in range(4)])
        torch.testing.assert_close(got, want)
        assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[3]) == 0
        got = task_weight_grads(a, b, tok, 3)
        want = torch.stack([b[tok == t].t() @ a[tok == t] for t in range(3)])
        torch.testing.assert_close(got, want)


def _cuda_step_setup():
    m = tiny_multitask("roberta", T, lora_dropout=0.0, layers=1).cuda()
    m.train()
    return m


@pytest.mark.gpu
def test_grouped_step_has_no_host_sync_on_gpu():
    m = _cuda_step_setup()
    o = OrthoLoRA(m, T, rng="counter")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    b = {k: v.cuda() for k, v in make_batch([2, 3, 1], seq_len=6).items()}
    ids_cpu = b["task_ids"].cpu()
    for warm in (True, False):
        if not warm:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with o.record(ids_cpu):
                task_losses(m, b).sum().backward()
            res = o.project_()
            res.conflict_fraction, res.mean_cosine, res.projection_fraction
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_grouped_step_cuda_graph_replays_equal_eager():
    """torch.cuda.graph capture of the grouped step (static batch, counter generator):
    100 replays equal 100 eager steps (fresh orders each replay)."""
    m = _cuda_step_setup()
    ref = copy.deepcopy(m)
    o, oref = OrthoLoRA(m, T, rng="counter"), OrthoLoRA(ref, T, rng="counter")
    b = {k: v.cuda() for k, v in make_batch([2, 2, 2], seq_len=6).items()}
    ids_cpu = b["task_ids"].cpu()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: buffers, sinks, tables built before capture
        for _ in range(2):
            with o.record(ids_cpu):
                task_losses(m, b).sum().backward()
            o.project_()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):
        with oref.record(ids_cpu):
            task_losses(ref, b).sum().backward()
        oref.project_()
    graph = torch.cuda.CUDAGraph()
    with o.record(ids_cpu):
        with torch.cuda.graph(graph):
            task_losses(m, b).sum().backward()
            o.project_()
    grads = [p.grad for p in o.layout.params]
    for _ in range(100):
        graph.replay()
        with oref.record(ids_cpu):
            task_losses(ref, b).sum().backward()
        oref.project_()
        for g, q in zip(grads, oref.layout.params):
            torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-6)
