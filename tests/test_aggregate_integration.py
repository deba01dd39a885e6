"""OrthoLoRA(method=...), OrthoLoRATrainer(ortho_method=...) and the harness's --aggregator."""
import json
from pathlib import Path

import pytest
import torch

from models import make_batch, task_losses, tiny_multitask
from ortholora_kernels import Aggregator, OrthoLoRA, aggregate
from ortholora_kernels.glue.cli import main
from ortholora_kernels.glue.data import write_synthetic_suite

T = 3


def _model():
    m = tiny_multitask("roberta", T, lora_dropout=0.0)
    m.train()
    return m


@pytest.mark.parametrize("method,options", [("upgrad", {}), ("cagrad", {"c": 0.4}), ("mgda", {})])
def test_ortholora_method_sets_grad_to_the_aggregate(method, options):
    m = _model()
    ortho = OrthoLoRA(m, T, method=method, method_options=options)
    b = make_batch([3, 2, 4])
    with ortho.record(b["task_ids"]):
        task_losses(m, b).sum().backward()
    buf = ortho.buffer.clone()
    res = ortho.project_()
    want = aggregate(buf, ortho.layout.segments("ab"), method=method, **options)
    got = torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert res.method == method and res.conflict_fraction.shape == (2,)
    ortho.remove()


def test_ortholora_ema_state_round_trips():
    m = _model()
    ortho = OrthoLoRA(m, T, ema=0.9, method="gradvac")
    for seed in range(2):
        b = make_batch([2, 2, 2], seed=seed)
        with ortho.record(b["task_ids"]):
            task_losses(m, b).sum().backward()
        ortho.project_()
    state = ortho.state_dict()
    assert state["aggregator"]["step"] == 2 and state["aggregator"]["ema_gram"].shape == (2, T, T)
    other = OrthoLoRA(_model(), T, ema=0.9, method="gradvac")
    other.load_state_dict(state)
    assert other.aggregator.step == 2 and torch.equal(other.aggregator.state_dict()["phi_hat"], ortho.aggregator.state_dict()["phi_hat"])
    ortho.remove()
    other.remove()
    with pytest.raises(ValueError, match="method"):
        OrthoLoRA(_model(), T, method="nope")


def test_trainer_accepts_every_method(tmp_path):
    transformers = pytest.importorskip("transformers")
    from models import VOCAB, tiny_peft_classifier
    from ortholora_kernels.integrations import MultiTaskCollator, OrthoLoRATrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (8,), generator=g).tolist(), "attention_mask": [1] * 8,
             "labels": i % 2, "task_id": i % T} for i in range(12)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                          per_device_train_batch_size=6, max_steps=2, learning_rate=0.1, optim="sgd",
                                          save_strategy="no", seed=0, dataloader_num_workers=0)
    model = tiny_peft_classifier("roberta", num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = OrthoLoRATrainer(model=model, args=args, train_dataset=rows, data_collator=MultiTaskCollator(num_tasks=T),
                               num_tasks=T, ortho_method="dualproj")
    trainer.train()
    assert trainer.ortho.last_stats.method == "dualproj"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    trainer.ortho.remove()
    # the aggregator object passes through as it is (its state is the one the Trainer's OrthoLoRA runs)
    agg = Aggregator("upgrad", ema=0.9)
    trainer = OrthoLoRATrainer(model=model, args=args, train_dataset=rows, data_collator=MultiTaskCollator(num_tasks=T),
                               num_tasks=T, ortho_aggregator=agg)
    trainer.train()
    assert trainer.ortho.aggregator is agg and agg.step == 2 and trainer.ortho.last_stats.method == "upgrad"
    trainer.ortho.remove()
    # beside the object, the old knobs would be silently ignored: refused, naming the knob
    for knob in (dict(ortho_ema=0.5), dict(ortho_method="mgda"), dict(ortho_every=2)):
        with pytest.raises(TypeError, match=next(iter(knob))):
            OrthoLoRATrainer(model=model, args=args, train_dataset=rows, data_collator=MultiTaskCollator(num_tasks=T),
                             num_tasks=T, ortho_aggregator=Aggregator("upgrad"), **knob)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_synthetic_suite(str(d), n_train=32, n_dev=8, seed=0)
    return str(d)


FAST = ["--tiny", "--batch-size", "4", "--eval-batch-size", "32", "--max-eval-samples", "8", "--max-length", "32",
        "--max-steps", "2", "--eval-every", "2", "--no-progress", "--no-plots", "--tasks", "sst2,cola"]


@pytest.mark.parametrize("method,extra", [
    ("ortho", ["--aggregator", "cagrad", "--aggregator-options", "c=0.4"]),
    ("ortho", ["--aggregator", "pcgrad", "--aggregator-ema", "0.9"]),
    ("mtl-lora", ["--projection", "ab", "--aggregator", "upgrad"]),
    ("lori", ["--lori-mode", "joint", "--projection", "ab", "--aggregator", "imtlg"]),
])
def test_harness_runs_aggregators(tmp_path, synth, capsys, method, extra):
    out = str(tmp_path / "run")
    assert main(["train", *FAST, "--data-dir", synth, "--method", method, "--out", out, *extra]) == 0
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["aggregator"] == extra[extra.index("--aggregator") + 1]
    capsys.readouterr()


@pytest.mark.parametrize("extra,match", [
    (["--method", "ortho", "--aggregator", "nope"], "--aggregator must be one of"),
    (["--method", "ortho", "--aggregator", "upgrad", "--aggregator-options", "c=1"], "no option 'c'"),
    (["--method", "ortho", "--aggregator-options", "c=1"], "needs --aggregator"),
    (["--method", "mtl-lora", "--aggregator", "upgrad"], "needs --projection"),
    (["--method", "joint", "--aggregator", "upgrad"], "applies only to methods"),
])
def test_harness_aggregator_mistakes(tmp_path, synth, capsys, extra, match):
    assert main(["train", *FAST, "--data-dir", synth, "--out", str(tmp_path / "r"), *extra]) == 2
    assert match in capsys.readouterr().err


def test_aggregator_direct_use_matches_aggregate():
    x = torch.randn(4, 50, dtype=torch.float64)
    agg = Aggregator("alignedmtl", scale_mode="median")
    assert torch.equal(agg(x), aggregate(x, method="alignedmtl", scale_mode="median"))


def test_harness_checkpoint_carries_the_aggregator_state(tmp_path, synth, capsys):
    # The aggregator's state (EMA Gram, GradVac targets, step) goes into the weights_only
    # checkpoint, and a run resumes from it (OrthoLoRA.load_state_dict restores it: see
    # test_ortholora_ema_state_round_trips).
    from ortholora_kernels.glue import checkpoint as ckpt

    args = ["train", *[a for a in FAST if a != "2"], "--data-dir", synth, "--method", "ortho",
            "--aggregator", "gradvac", "--aggregator-ema", "0.8", "--save-every", "2"]
    args.insert(args.index("--max-steps") + 1, "4")
    args.insert(args.index("--eval-every") + 1, "4")
    part = tmp_path / "part"
    assert main(args + ["--out", str(part), "--stop-after-steps", "2"]) == 0
    state = torch.load(part / ckpt.LATEST, weights_only=True)
    found = [v for v in _walk(state) if isinstance(v, dict) and "ema_gram" in v and "phi_hat" in v]
    assert len(found) == 1 and found[0]["step"] == 2
    assert found[0]["ema_gram"].shape[-1] == 2 and found[0]["phi_hat"].shape == found[0]["ema_gram"].shape
    assert main(args + ["--out", str(part), "--resume"]) == 0
    capsys.readouterr()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _step_grad(ortho, model, seed):
    for p in ortho.layout.params:
        p.grad = None
    b = make_batch([2, 2, 2], seed=seed)
    with ortho.record(b["task_ids"]):
        task_losses(model, b).sum().backward()
    ortho.project_()
    return torch.cat([p.grad.reshape(-1) for p in ortho.layout.params])


@pytest.mark.parametrize("fmt", ["state_dict", "ortholora", "generators"])
def test_harness_projector_state_round_trips(fmt):
    # The harness saves a projector through its public state_dict() (aggregator included);
    # the two earlier formats still load. The restored projector's next step is the same.
    from ortholora_kernels.glue.methods import load_projector_state, projector_state

    m = _model()
    ortho = OrthoLoRA(m, T, ema=0.9, method="gradvac", seed=3)
    for seed in range(2):
        _step_grad(ortho, m, seed)
    full = ortho.state_dict()
    assert list(projector_state(ortho)) == ["state_dict"]
    state = {"state_dict": projector_state(ortho),
             "ortholora": {"ortholora": full},
             "generators": {"generators": {"_generator": full["generator"]}, "num_steps": full["num_steps"],
                            "aggregator": full["aggregator"]}}[fmt]
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    other = OrthoLoRA(m2, T, ema=0.9, method="gradvac", seed=3)
    assert not _same(other.state_dict(), full)
    load_projector_state(other, state)
    assert _same(other.state_dict(), full)
    assert torch.equal(_step_grad(other, m2, 5), _step_grad(ortho, m, 5))
    ortho.remove()
    other.remove()


def test_harness_projector_state_without_state_dict():
    # A projector with only a public generator and step count (no state_dict()).
    from ortholora_kernels.glue.methods import load_projector_state, projector_state

    class Plain:
        def __init__(self):
            self.generator, self.num_steps = torch.Generator().manual_seed(5), 0

    p = Plain()
    torch.randn(3, generator=p.generator)
    p.num_steps = 4
    q = Plain()
    load_projector_state(q, projector_state(p))
    assert q.num_steps == 4
    assert torch.equal(torch.randn(3, generator=q.generator), torch.randn(3, generator=p.generator))


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
