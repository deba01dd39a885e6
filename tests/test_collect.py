"""Grouped (one backward) and loop (one backward per task) collection give the same buffer."""
import pytest
import torch

from models import make_batch, slice_batch, task_losses, tiny_multitask
from ortholora_kernels import LoRALayout, OrthoLoRA, per_task_mean_loss


def _fork_rng_run(fn, seed=123):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _collect(model, batch, mode, num_tasks):
    """Buffer (cloned) and head grads after one collection with ``mode``."""
    model.zero_grad(set_to_none=True)
    ortho = OrthoLoRA(model, num_tasks, collect="grouped" if mode == "grouped" else "loop")
    try:
        if mode == "grouped":
            with ortho.record(batch["task_ids"]):
                losses = _fork_rng_run(lambda: task_losses(model, batch, num_tasks))
                losses.sum().backward()
        elif mode == "loop_retain":
            losses = _fork_rng_run(lambda: task_losses(model, batch, num_tasks))
            ortho.backward(list(losses))
        else:
            raise ValueError(mode)
        buf = ortho.buffer.clone()
        heads = [p.grad.clone() if p.grad is not None else None for p in model.heads.parameters()]
    finally:
        ortho.remove()
    return buf, heads


@pytest.mark.parametrize("kind", ["roberta", "bert"])
@pytest.mark.parametrize("sizes", [[3, 1, 2], [2, 0, 3, 1]])
def test_grouped_equals_loop_with_dropout(kind, sizes):
    t = len(sizes)
    model = tiny_multitask(kind, t, lora_dropout=0.3, dropout=0.1)
    model.train()
    batch = make_batch(sizes, seq_len=7)
    g, gh = _collect(model, batch, "grouped", t)
    l, lh = _collect(model, batch, "loop_retain", t)
    assert g.abs().sum() > 0
    for k, n in enumerate(sizes):
        if n == 0:
            assert torch.count_nonzero(g[k]) == 0 and torch.count_nonzero(l[k]) == 0
        else:
            assert g[k].norm() > 0
            torch.testing.assert_close(g[k], l[k], rtol=1e-5, atol=1e-5 * l[k].abs().max().item())
    for a, b in zip(gh, lh):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
