"""Grouped (one backward) and loop (one backward per task) collection give the same buffer."""
import pytest
import torch

from models import make_batch, slice_batch, task_losses, tiny_multitask
from ortholora_kernels import LoRALayout, OrthoLoRA, per_task_mean_loss


def _fork_rng_run(fn, seed=123):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _backward(ortho, mode, losses, task_ids):
    """One backward of the per-task ``losses`` (one shared forward) in collection ``mode``."""
    if mode == "grouped":
        with ortho.record(task_ids):
            losses.sum().backward()
    else:
        ortho.backward(list(losses))


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
@pytest.mark.parametrize("sizes", [[3, 1, 2], [2, 0, 3, 1], [2, 2, 2]])
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


@pytest.mark.parametrize("sizes", [[3, 1, 2], [2, 2, 2], [2, 0, 3]])
def test_grouped_equals_loop_per_task_on_an_unsorted_batch(sizes):
    """The gather path (task ids not sorted): every task's row, not only their sum."""
    t = len(sizes)
    model = tiny_multitask("roberta", t, lora_dropout=0.3, dropout=0.1)
    model.train()
    batch = make_batch(sizes, seq_len=7, shuffle=True, seed=5)
    ids = batch["task_ids"]
    assert not torch.equal(ids, ids.sort().values)
    g, gh = _collect(model, batch, "grouped", t)
    l, lh = _collect(model, batch, "loop_retain", t)
    for k, n in enumerate(sizes):
        if n == 0:
            assert torch.count_nonzero(g[k]) == 0
        else:
            assert g[k].norm() > 0
            torch.testing.assert_close(g[k], l[k], rtol=1e-5, atol=1e-5 * l[k].abs().max().item())
    assert not torch.allclose(g[0], g[-1])
    for a, b in zip(gh, lh):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mtl_lora_shared_params_grouped_equals_loop():
    """MTL-LoRA: several shared B_k per module (layout from AdapterParams); task-specific
    Lambda_t / w_t keep ordinary gradients; grouped == loop with dropout on."""
    mtl = pytest.importorskip("ortholora_kernels.adapters.mtl_lora")
    from transformers import RobertaModel

    from models import tiny_config
    t = 3
    torch.manual_seed(0)
    enc = RobertaModel(tiny_config("roberta"), add_pooling_layer=False)
    mtl.apply_mtl_lora(enc, r=4, num_tasks=t, num_b=2, dropout=0.2, keep_trainable=())
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n and p.dim() == 2:
                p.normal_(0, 0.05)
    enc.train()
    ap = mtl.mtl_lora_parameters(enc)
    layout = LoRALayout.from_params(ap.entries(), model=enc)
    assert len(layout.segments("layer")) - 1 == 2 * 2  # A and B side of 2 layers
    assert sum(e.side == "B" for e in layout.entries) == 2 * 2 * 2  # query/value x 2 layers x n_B=2
    batch = make_batch([2, 0, 3], seq_len=6)
    head = torch.nn.Linear(32, 1)

    def losses():
        with mtl.mtl_task_ids(enc, batch["task_ids"]):
            h = enc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        return per_task_mean_loss(head(h).squeeze(1) ** 2, batch["task_ids"], t)

    bufs, task_grads = [], []
    for mode in ("grouped", "loop"):
        enc.zero_grad(set_to_none=True)
        ortho = OrthoLoRA(layout, t, collect=mode)
        ls = _fork_rng_run(losses)
        _backward(ortho, mode, ls, batch["task_ids"])
        bufs.append(ortho.buffer.clone())
        task_grads.append([p.grad.clone() for p in ap.task_parameters()])
        ortho.remove()
    assert bufs[0][0].norm() > 0 and torch.count_nonzero(bufs[0][1]) == 0
    torch.testing.assert_close(bufs[0], bufs[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(*task_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reentrant", [True, False])
def test_grouped_with_gradient_checkpointing(reentrant):
    """The layers re-run their forward inside the backward: routing is read there too."""
    sizes = [2, 3, 1]
    model = tiny_multitask("bert", 3, lora_dropout=0.0)
    model.train()
    batch = make_batch(sizes, seq_len=6)
    plain, _ = _collect(model, batch, "grouped", 3)
    model.encoder.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.encoder.base_model.model.enable_input_require_grads()
    ckpt, _ = _collect(model, batch, "grouped", 3)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-8)


def test_dora_grouped_equals_loop():
    """peft's DoRA detaches the weight norm, so LoRA A/B gradients only flow through the two
    nn.Linear: grouped applies (the magnitude vector keeps an ordinary gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    from models import tiny_config
    torch.manual_seed(0)
    enc = get_peft_model(BertModel(tiny_config("bert"), add_pooling_layer=False),
                         LoraConfig(r=2, target_modules=["query", "value"], use_dora=True, lora_dropout=0.2))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    enc.train()
    batch = make_batch([2, 3], seq_len=5)

    def losses():
        h = enc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        return per_task_mean_loss(h.pow(2).mean(1), batch["task_ids"], 2)

    out = []
    for mode in ("grouped", "loop"):
        enc.zero_grad(set_to_none=True)
        ortho = OrthoLoRA(enc, 2, collect=mode)
        ls = _fork_rng_run(losses)
        _backward(ortho, mode, ls, batch["task_ids"])
        mags = [p.grad.clone() for n, p in enc.named_parameters() if "magnitude" in n]
        out.append((ortho.buffer.clone(), mags))
        ortho.remove()
    assert out[0][0][0].norm() > 0 and len(out[0][1]) == 4
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_per_task_mean_loss_values_and_no_data_dependent_ops():
    """Means per task (0 for an absent task), and no op whose output depends on the ids' values
    (torch.bincount reads the max id back to the host on CUDA): it runs on the meta device."""
    per_ex = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    ids = torch.tensor([2, 0, 2, 0, 2])
    torch.testing.assert_close(per_task_mean_loss(per_ex, ids, 4), torch.tensor([5.0, 0.0, 7.0, 0.0]))
    out = per_task_mean_loss(per_ex.to("meta"), ids.to("meta"), 4)
    assert out.shape == (4,) and out.device.type == "meta"


@pytest.mark.gpu
def test_per_task_mean_loss_on_cuda_without_host_sync():
    """The meta-device run above, on a GPU: no blocking copy, with GPU or CPU task ids and counts."""
    per_ex = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    ids_cpu = torch.tensor([2, 0, 2, 0, 2])
    per_ex, ids = per_ex.cuda(), ids_cpu.cuda()   # the copies themselves synchronise
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [per_task_mean_loss(per_ex, ids, 4),
                per_task_mean_loss(per_ex, ids_cpu, 4),   # CPU task ids (as given to record) with a GPU loss
                per_task_mean_loss(per_ex, ids_cpu, 4, counts=torch.ones(4, dtype=torch.float64))]  # CPU counts
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    for out in outs[:2]:
        torch.testing.assert_close(out.cpu(), torch.tensor([5.0, 0.0, 7.0, 0.0]))


def test_unsorted_groups_select_rows_on_cpu():
    """CPU twin of the CUDA test below: the rows of each task of an unsorted batch."""
    from ortholora_kernels.collect import TaskGroups

    groups = TaskGroups(torch.tensor([1, 0, 2, 0, 1]), 3)
    assert not groups.sorted
    x = torch.arange(10.0).reshape(5, 2)
    rows = {t: groups.select(sel, x) for t, sel in groups.groups}
    assert rows[0].tolist() == [[2.0, 3.0], [6.0, 7.0]] and rows[2].tolist() == [[4.0, 5.0]]
    assert rows[1].tolist() == [[0.0, 1.0], [8.0, 9.0]]


@pytest.mark.gpu
def test_unsorted_groups_select_on_cuda_without_host_sync():
    """The per-task row indices of an unsorted batch (CPU task ids) reach the GPU without a
    blocking copy (``record`` promises no host sync for CPU task ids)."""
    from ortholora_kernels.collect import TaskGroups

    groups = TaskGroups(torch.tensor([1, 0, 2, 0, 1]), 3)
    assert not groups.sorted
    x = torch.arange(10.0, device="cuda").reshape(5, 2)
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = {t: groups.select(sel, x) for t, sel in groups.groups}
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert rows[0].cpu().tolist() == [[2.0, 3.0], [6.0, 7.0]] and rows[2].cpu().tolist() == [[4.0, 5.0]]
