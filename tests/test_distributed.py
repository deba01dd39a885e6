"""Two gloo processes on CPU == one process on the union of their batches.

Loss normalisation (see ortholora_kernels/integrations/distributed.py): each rank's loss is
``sum_t mean_{rank's task-t examples}``; the per-task buffer and DDP's gradients are averaged
over the ranks. That equals the per-task means over the union batch exactly when every rank
holds the same number of examples of each task ("equal" case below). With unequal per-rank
counts, the means must use the global counts (``counts=global_task_counts(...)``): the
"global" case checks that, and that the naive local means then do NOT match.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models import make_batch, tiny_multitask

T, STEPS = 3, 3
SIZES = {"equal": ([2, 1, 2], [2, 1, 2]), "global": ([2, 1, 0], [1, 2, 2])}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(case, rank, step):
    sizes = SIZES[case][rank]
    return make_batch(sizes, seed=1000 * step + 10 * rank)


def _loss(model, batch, counts=None):
    from ortholora_kernels import per_task_mean_loss
    logits = model(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    per_ex = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return per_task_mean_loss(per_ex, batch["task_ids"], T, counts=counts).sum()


def _train(case, rank=None, ddp=True, global_counts=False):
    """STEPS SGD steps. ``rank=None``: one process on the union of both ranks' batches."""
    from ortholora_kernels import OrthoLoRA
    from ortholora_kernels.integrations import all_reduce_grads, global_task_counts
    torch.manual_seed(0)
    model = tiny_multitask("roberta", T, lora_dropout=0.0, seed=rank or 0)  # ranks start differently:
    if rank is not None:                                                   # broadcast fixes the LoRA part
        torch.manual_seed(0)
        ref = tiny_multitask("roberta", T, lora_dropout=0.0, seed=0)
        with torch.no_grad():  # non-LoRA params: same init on every rank (DDP would also broadcast)
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                if "lora_" not in n:
                    p.copy_(q)
    ortho = OrthoLoRA(model, T, seed=1)
    net = model
    if rank is not None and ddp:
        net = nn.parallel.DistributedDataParallel(model)
    # SGD: the update is linear in the gradient, so fp32 rounding of the different summation
    # orders (union vs two ranks) stays at rounding level (Adam's first steps are sign-like
    # and amplify rounding of near-cancelling entries).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for step in range(STEPS):
        if rank is None:
            b0, b1 = _batch(case, 0, step), _batch(case, 1, step)
            batch = {k: torch.cat([b0[k], b1[k]]) for k in b0}
        else:
            batch = _batch(case, rank, step)
        counts = global_task_counts(batch["task_ids"], T) if global_counts else None
        with ortho.record(batch["task_ids"]):
            _loss(net, batch, counts).backward()
        ortho.project_()
        if rank is not None and not ddp:
            all_reduce_grads([p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n])
        opt.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = {
            "ddp_equal": _train("equal", rank, ddp=True),
            "plain_equal": _train("equal", rank, ddp=False),
            "ddp_global": _train("global", rank, ddp=True, global_counts=True),
            "ddp_global_naive": _train("global", rank, ddp=True, global_counts=False),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _assert_same(a, b, tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("variant", ["ddp_equal", "plain_equal", "ddp_global"])
def test_ranks_identical_and_equal_to_union(two_ranks, variant):
    r0, r1 = two_ranks[0][variant], two_ranks[1][variant]
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n  # every rank applies the same update
    case = variant.split("_")[1]
    single = _train(case, None)
    _assert_same(r0, single, 1e-6)
    torch.manual_seed(0)
    init = dict(tiny_multitask("roberta", T, lora_dropout=0.0, seed=0).named_parameters())
    for n in single:  # LoRA matrices and heads actually trained
        if "lora_" in n or "heads" in n:
            assert not torch.allclose(single[n], init[n].detach()), n


def test_naive_local_means_with_unequal_counts_differ(two_ranks):
    single = _train("global", None)
    naive = two_ranks[0]["ddp_global_naive"]
    diff = max((naive[n] - single[n]).abs().max().item() for n in single)
    assert diff > 1e-4
