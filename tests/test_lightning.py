"""PyTorch Lightning: the README's callback recipe on Lightning's CPU trainer equals a
hand-written OrthoLoRA loop; accumulation and the checkpointed state."""
import copy
import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning")
from models import make_batch, task_losses, tiny_multitask  # noqa: E402
from ortholora_kernels import OrthoLoRA  # noqa: E402
from readme import run_readme_block  # noqa: E402

T, STEPS = 3, 3


def _batches(n):
    return [make_batch([2, 1, 2], seed=10 + i) for i in range(n)]


def _model():
    m = tiny_multitask("roberta", T, lora_dropout=0.0)
    m.train()
    return m


def _by_hand(model, batches, accum=1, clip=None, lr=0.1):
    ortho = OrthoLoRA(model, T, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for k in range(0, len(batches), accum):
        for b in batches[k:k + accum]:
            with ortho.record(b["task_ids"]):
                (task_losses(model, b).sum() / accum).backward()
        ortho.project_()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ortho.remove()
    return ortho


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def _quiet():
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning)


def test_readme_callback_recipe_equals_hand_written_loop():
    _quiet()
    ns = run_readme_block("PyTorch Lightning")
    model, ref = _model(), None
    ref = copy.deepcopy(model)
    init = copy.deepcopy(model)
    batches = _batches(STEPS)
    ns["fit"](model, T, _loader(batches), STEPS)
    _by_hand(ref, batches)
    for (n, p), q, p0 in zip(model.named_parameters(), ref.parameters(), init.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert any("lora_" in n and not torch.equal(p, p0) for (n, p), p0 in zip(model.named_parameters(),
                                                                               init.parameters()))


def test_accumulation_clipping_and_checkpointed_state():
    _quiet()
    from ortholora_kernels.integrations import OrthoLoRACallback
    ns = run_readme_block("PyTorch Lightning")
    model = _model()
    ref = copy.deepcopy(model)
    batches = _batches(2 * 2)
    ortho = OrthoLoRA(model, T, seed=0)
    cb = OrthoLoRACallback(ortho)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.05,
                                callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    trainer.fit(ns["MultiTaskModule"](model, T), _loader(batches))
    assert ortho.num_steps == 2  # one projection per optimizer step, not per micro-batch
    _by_hand(ref, batches, accum=2, clip=0.05)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    state = cb.state_dict()
    assert state["num_steps"] == 2 and state["signature"]["num_tasks"] == T
    ortho.remove()
    with pytest.raises(ValueError, match="grouped"):
        OrthoLoRACallback(OrthoLoRA(model, T, collect="loop"))
