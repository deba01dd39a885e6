"""gloo processes on CPU == one process on the union of their batches (DDP, sharded mode, FSDP2).

One ``torch.multiprocessing`` spawn per world size runs every scenario (process start-up and
imports dominate on 2 cores); the one-process references run in the pytest process.

Loss normalisation (see ortholora_kernels/distributed/reduce.py): each rank's loss is
``sum_t (sum of its task-t losses) / (global task-t count / W)`` (``global_task_counts``), so
the rank-averaged gradient equals the per-task means over the union batch whatever the
per-rank counts (case "global": unequal counts, task 2 absent on rank 0). With the naive
local means the result must differ.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models import make_batch, tiny_multitask

T, STEPS = 3, 3
# LoRA rank 3: FSDP2's and the sharded mode's Shard(0) chunks of A ([3, 32]) are uneven on 2
# ranks and empty on the 4th of 4 ranks (padding and empty shards are exercised)
LORA = dict(lora_dropout=0.0, r=3)
# per-rank task sizes; "global": unequal, task 2 absent on rank 0 (and on rank 2 with 4 ranks)
SIZES = {"equal": [[2, 1, 2]] * 4, "global": [[2, 1, 0], [1, 2, 2], [0, 1, 1], [3, 0, 1]]}
TOL = 1e-6

# name -> options of _train: structure ("outer"/"inner" = OrthoLoRA on the wrapper / on the peft
# encoder), when ("before"/"after" DDP wrapping), wrap ("ddp"/"none"/"fsdp"), comm, collect,
# accum (micro-batches per step), case, counts ("global"/"local"), forward_outside (forward
# before entering record).
SCENARIOS = {
    "ddp_outer_before": dict(structure="outer", when="before"),
    "ddp_inner_before": dict(structure="inner", when="before"),
    "ddp_outer_after": dict(structure="outer", when="after"),
    "ddp_inner_after": dict(structure="inner", when="after", forward_outside=True),
    "ddp_loop_after": dict(structure="inner", when="after", collect="loop", case="equal"),
    "ddp_sharded": dict(structure="outer", when="after", comm="sharded", accum=2),
    "plain_equal": dict(wrap="none", case="equal"),
    "ddp_accum": dict(structure="inner", when="before", accum=2),
    "ddp_naive": dict(counts="local"),
    "ddp_leftover": dict(structure="inner", when="after", leftover=True),
    "fsdp_before": dict(wrap="fsdp", when="before", accum=2),
    "fsdp_after": dict(wrap="fsdp", when="after", structure="inner"),
    "fsdp_resume": dict(wrap="fsdp", when="before", resume=True),
    "fsdp_bf16": dict(wrap="fsdp", when="before", mp=True),
    # every method, EMA and schedule in the sharded mode and under FSDP2 (the pipeline's Gram
    # all-reduce hook); case "absent": task 2 has no example on any rank at step 1
    "sharded_pcgrad_ema": dict(comm="sharded", agg=("pcgrad", dict(ema=0.9))),
    "sharded_upgrad": dict(comm="sharded", agg=("upgrad", {}), case="absent"),
    "sharded_cagrad_every": dict(comm="sharded", agg=("cagrad", dict(c=0.5, every=2))),
    "sharded_nashmtl": dict(comm="sharded", agg=("nashmtl", {}), case="absent"),
    "sharded_gradvac": dict(comm="sharded", agg=("gradvac", dict(beta=0.3)), accum=2),
    "ddp_nashmtl": dict(agg=("nashmtl", {}), case="absent"),
    "fsdp_pcgrad_ema": dict(wrap="fsdp", agg=("pcgrad", dict(ema=0.5, start=1))),
    "fsdp_upgrad": dict(wrap="fsdp", agg=("upgrad", {}), case="absent"),
    "fsdp_cagrad": dict(wrap="fsdp", agg=("cagrad", dict(c=0.4))),
    "fsdp_nashmtl": dict(wrap="fsdp", agg=("nashmtl", {}), case="absent"),
    "fsdp_gradvac": dict(wrap="fsdp", agg=("gradvac", dict(every=2))),
    "fsdp_bf16_upgrad": dict(wrap="fsdp", mp=True, agg=("upgrad", {})),
    "fsdp_resume_ema": dict(wrap="fsdp", when="before", resume=True, agg=("upgrad", dict(ema=0.9))),
}
# bf16 parameters in the forward/backward (fp32 master weights, buffer and reduction): bf16 rounding
LOOSE = {"fsdp_bf16": 3e-2, "fsdp_bf16_upgrad": 3e-2}
WORLD4 = ("ddp_inner_after", "ddp_sharded", "fsdp_before", "ddp_leftover", "sharded_upgrad", "sharded_gradvac",
          "fsdp_pcgrad_ema", "fsdp_nashmtl")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(case, rank, step, micro, world):
    sizes = list(SIZES["global" if case == "absent" else case][rank])
    if case == "absent" and step == 1:
        sizes[2] = 0   # task 2 absent from the whole step: left out of the method's solve
    return make_batch(sizes, seed=10000 * step + 100 * micro + rank + 7 * world)


def _loss(net, batch, counts):
    from ortholora_kernels import per_task_mean_loss
    logits = net(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    per_ex = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return per_task_mean_loss(per_ex, batch["task_ids"], T, counts=counts)


def _full(p):
    from ortholora_kernels.distributed import is_dtensor
    return (p.full_tensor() if is_dtensor(p) else p).detach().clone()


def _model(rank, same_init):
    torch.manual_seed(0)
    model = tiny_multitask("roberta", T, seed=0 if same_init else rank, **LORA)
    if not same_init:  # ranks' LoRA starts differ: OrthoLoRA broadcasts rank 0's (DDP the rest)
        ref = tiny_multitask("roberta", T, seed=0, **LORA)
        with torch.no_grad():
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                if "lora_" not in n:
                    p.copy_(q)
    return model


def _train(name, rank=None, world=1, out_dir=None, steps=STEPS):
    """``steps`` SGD steps of scenario ``name``; ``rank=None``: one process on the union batch."""
    from ortholora_kernels import OrthoLoRA
    from ortholora_kernels.distributed import global_task_counts
    o = dict(structure="outer", when="before", wrap="ddp", comm=None, collect="grouped", accum=1, case="global",
             counts="global", forward_outside=False, resume=False, mp=False,
             leftover=False, agg=None)
    o.update(SCENARIOS[name])
    dist_on = rank is not None
    wrap = o["wrap"] if dist_on else "none"
    model = _model(rank or 0, same_init=wrap == "fsdp" or not dist_on)
    target = model if o["structure"] == "outer" else model.encoder
    kw = dict(seed=1, collect=o["collect"], comm=o["comm"] if dist_on else None)
    if o["agg"] is not None:
        from ortholora_kernels import Aggregator
        kw["aggregator"] = Aggregator(o["agg"][0], **o["agg"][1])
    ortho = net = None
    if o["when"] == "before" or wrap == "none":
        ortho = OrthoLoRA(target, T, **kw)
    if wrap == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh("cpu", (world,))
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if o["mp"] \
            else MixedPrecisionPolicy()
        for layer in model.encoder.base_model.model.encoder.layer:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        net = fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    else:
        net = model
    if ortho is None:  # built after wrapping: on the DDP instance itself or on the inner module
        ortho = OrthoLoRA(net if (o["structure"] == "outer" and wrap == "ddp") else target, T, **kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    first = 0
    if o["resume"] and dist_on:
        first = _resume(model, opt, ortho, name, rank, world, out_dir)
    for step in range(first, steps):
        for micro in range(o["accum"]):
            if dist_on:
                batch = _batch(o["case"], rank, step, micro, world)
            else:  # the union of the ranks' batches
                parts = [_batch(o["case"], r, step, micro, world) for r in range(world)]
                batch = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
            ids = batch["task_ids"]
            counts = global_task_counts(ids, T) if (o["counts"] == "global" and dist_on) else None
            if o["collect"] == "loop":  # a forward and backward per task (every rank has every task)
                for t in range(T):
                    rows = (ids == t).nonzero().squeeze(1)
                    sub = {k: v[rows] for k, v in batch.items()}
                    with ortho.task(t):
                        _loss(net, sub, counts)[t].backward()
            elif o["forward_outside"]:
                loss = _loss(net, batch, counts).sum()
                with ortho.record(ids):
                    loss.backward()
            else:
                with ortho.record(ids):
                    _loss(net, batch, counts).sum().backward()
        if o["leftover"]:  # an ordinary LoRA gradient (kept, unprojected) that differs per rank
            c = 0.01 * ((rank + 1.0) if dist_on else (world + 1) / 2)  # its rank average, in one process
            (c * sum((p * p).sum() for n, p in model.named_parameters() if "lora_" in n)).backward()
        ortho.project_()
        if wrap == "none" and dist_on:
            from ortholora_kernels.distributed import all_reduce_grads
            all_reduce_grads([p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if o["resume"] and dist_on and step == 0:
            _save(model, opt, ortho, name, rank, out_dir)
            return _train(name, rank, world, out_dir, steps)  # a fresh process state resumes
    ortho.remove()
    return {n: _full(p) for n, p in model.named_parameters()}


def _save(model, opt, ortho, name, rank, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out_dir, name))
    torch.save({"ortho": ortho.state_dict(), "step": 1}, os.path.join(out_dir, f"{name}-ortho{rank}.pt"))
    ortho.remove()


def _resume(model, opt, ortho, name, rank, world, out_dir):
    """Load the step-1 checkpoint when there is one (the second call of the scenario)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = os.path.join(out_dir, f"{name}-ortho{rank}.pt")
    if not os.path.exists(path):
        return 0
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, name))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path, weights_only=True)
    ortho.load_state_dict(extra["ortho"])
    os.remove(path)
    return extra["step"]


def _errors(world):
    """Messages of what must refuse under FSDP2 instead of training wrong."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ortholora_kernels import OrthoLoRA
    out = {}
    for what in ("loop", "all_reduce"):
        model = _model(0, same_init=True)
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        kw = dict(collect="loop") if what == "loop" else dict(comm="all_reduce")
        ortho = OrthoLoRA(model, T, seed=1, **kw)
        batch = make_batch([1, 1, 1], seed=0)
        try:
            with ortho.task(0):
                _loss(model, batch, None)[0].backward()
            ortho.project_()
            out[what] = None
        except (RuntimeError, ValueError) as exc:
            out[what] = str(exc)
        ortho.remove()
    # a DDP that cannot be rebuilt without the LoRA parameters: the advice names the fix
    model = _model(0, same_init=True)
    ddp = nn.parallel.DistributedDataParallel(model, static_graph=True)
    ortho = OrthoLoRA(model.encoder, T, seed=1)
    batch = make_batch([1, 1, 1], seed=0)
    try:
        with ortho.record(batch["task_ids"]):
            _loss(ddp, batch, None).sum().backward()
        out["static_graph"] = None
    except RuntimeError as exc:
        out["static_graph"] = str(exc)
    ortho.remove()
    return out


def _worker(rank, world, port, out_dir, names):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {name: _train(name, rank, world, out_dir) for name in names}
        res["errors"] = _errors(world)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# Children fork from one server that imported these once (imports cost ~25 s per process on
# a loaded 2-core machine; the server never runs torch ops, so forking it is safe).
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "peft", "transformers",
           "transformers.models.roberta.modeling_roberta", "ortholora_kernels", "models", "test_distributed"]


def _spawn(tmp_path_factory, world, names):
    import multiprocessing.forkserver
    out = tmp_path_factory.mktemp(f"dist{world}")
    multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
    mp.start_processes(_worker, args=(world, _free_port(), str(out), names), nprocs=world, join=True,
                       start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, list(SCENARIOS))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory, 4, list(WORLD4))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(ranks, name, world):
    single = _train(name, None, world)
    for r in range(world):
        res = ranks[r][name]
        assert res.keys() == single.keys()
        for n in single:
            assert torch.equal(res[n], ranks[0][name][n]), (name, n, r)  # every rank: the same update
            assert _rel(res[n], single[n]) <= LOOSE.get(name, TOL), (name, n, _rel(res[n], single[n]))
    torch.manual_seed(0)
    init = dict(tiny_multitask("roberta", T, seed=0, **LORA).named_parameters())
    for n in single:  # LoRA matrices and heads actually trained
        if "lora_" in n or "heads" in n:
            assert not torch.allclose(single[n], init[n].detach()), n


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "ddp_naive"])
def test_two_ranks_equal_union(two_ranks, name):
    _check(two_ranks, name, 2)


@pytest.mark.parametrize("name", WORLD4)
def test_four_ranks_equal_union(four_ranks, name):
    _check(four_ranks, name, 4)


def test_naive_local_means_with_unequal_counts_differ(two_ranks):
    single = _train("ddp_naive", None, 2)
    naive = two_ranks[0]["ddp_naive"]
    assert max(_rel(naive[n], single[n]) for n in single) > 1e-3


def test_fsdp2_refuses_what_it_cannot_do_right(two_ranks):
    errors = two_ranks[0]["errors"]
    assert "collect='grouped'" in errors["loop"]
    assert "comm: under FSDP2" in errors["all_reduce"]
    assert "exclude_from_ddp" in errors["static_graph"] and "collect='loop'" not in errors["static_graph"]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shard_plan_partitions_the_buffer(world):
    """Every column is owned by exactly one rank, in FSDP2's Shard(0) chunks, segment by segment."""
    from ortholora_kernels import LoRALayout
    from ortholora_kernels.distributed import ShardPlan
    shapes = [(3, 7), (5, 2), (1, 4), (6, 6)]
    entries = []
    for i, (a, b) in enumerate(shapes):
        entries += [(f"l{i}", "A", f"l{i}.A", nn.Parameter(torch.zeros(a, b))),
                    (f"l{i}", "B", f"l{i}.B", nn.Parameter(torch.zeros(b, a)))]
    lay = LoRALayout.from_params(entries)
    for gran in ("global", "ab", "layer", "matrix"):
        offsets = lay.segments(gran)
        buf = torch.arange(lay.numel, dtype=torch.float64).expand(2, -1)
        seg_of_col = torch.bucketize(torch.arange(lay.numel), torch.tensor(offsets[1:]), right=True)
        plans = [ShardPlan(lay, offsets, world, r) for r in range(world)]
        shards = []
        for r, plan in enumerate(plans):
            own = torch.cat([buf[:, c:c + k] for c, k in plan.send_slices[r]], 1) if plan.send_slices[r] \
                else buf[:, :0]
            assert own.shape[1] == plan.local_len <= plan.shard_len
            lo = plan.local_offsets
            for k in range(len(offsets) - 1):  # local segment k holds columns of segment k only
                assert (seg_of_col[own[0, lo[k]:lo[k + 1]].long()] == k).all()
            for i, row0, rows, at, n in plan.local_pieces():  # torch.chunk rows of every matrix
                e = lay.entries[i]
                chunk = torch.arange(e.shape[0]).chunk(world)
                assert rows == (len(chunk[r]) if r < len(chunk) else 0)
                assert torch.equal(own[0, at:at + n], buf[0, e.offset:e.offset + e.numel].view(e.shape)[row0:row0 + rows].reshape(-1))
            shards.append(torch.cat([own[0], own.new_zeros(plan.shard_len - plan.local_len)]))
        full = torch.cat(shards)
        back = torch.cat([full[a:a + k] for a, k in plans[0].gather_slices])
        assert torch.equal(back, buf[0])


def test_comm_is_checked():
    from ortholora_kernels import OrthoLoRA
    with pytest.raises(ValueError, match="comm"):
        OrthoLoRA(_model(0, same_init=True), T, comm="ring")
