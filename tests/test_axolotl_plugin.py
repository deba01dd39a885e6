"""The axolotl plugin, driven the way axolotl drives a plugin, WITHOUT axolotl installed.

STAND-IN: axolotl 0.19 pins older transformers/peft/trl than the dev stack (its resolution
here: transformers 5.16.1, peft 0.20.0, trl 1.9.0, accelerate 1.13.0, datasets 4.8.4; the dev
stack has 5.25 / 0.22 / 1.16), so it cannot share the dev environment, and an install into a
virtual environment of its own (238 packages) did not finish within a 15-minute budget on
the shared 2-core machine; CI does not install it.
``drive_like_axolotl`` below is a stand-in of axolotl's documented plugin
flow (``axolotl.integrations.base``: ``load_plugin`` imports "module.Class" and
instantiates it; ``get_input_args`` names the pydantic model of the config keys; the
causal trainer builder calls ``get_trainer_cls(cfg)`` and instantiates the class with the
usual Trainer keywords; then ``post_trainer_create(cfg, trainer)``). The trainer base is
``transformers.Trainer`` (axolotl's would be ``AxolotlTrainer``, a Trainer subclass) and
``pack_collator`` stands in for axolotl's sample-packing collator (features are packs:
lists of rows; samples concatenated in order, position ids restarting per sample).
"""
import importlib

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from ortholora_kernels.integrations import OrthoLoRATrainer, PackedCausalLMCollator  # noqa: E402
from ortholora_kernels.integrations.axolotl import OrthoLoRAArgs, TaskIdsCollator, make_trainer_cls  # noqa: E402

from test_trl import model, rows, tokenizer  # noqa: E402

YAML_CFG = {"plugins": ["ortholora_kernels.integrations.axolotl.OrthoLoRAPlugin"], "ortholora_num_tasks": 2,
            "ortholora_task_field": "task", "ortholora_task_names": ["sst", "mrpc"], "ortholora_method": "pcgrad",
            "ortholora_seed": 3}


def pack_collator(packs):
    """Stand-in of axolotl's sample-packing collator: one row per pack, samples concatenated,
    position ids restarting at 0 per sample, labels -100 on each sample's first token, right
    padding (pad positions count on from 0: a segment of their own), no attention mask."""
    ids, pos, lab = [], [], []
    for p in packs:
        ids.append(torch.cat([torch.tensor(r["input_ids"]) for r in p]))
        pos.append(torch.cat([torch.arange(len(r["input_ids"])) for r in p]))
        lab.append(torch.cat([torch.tensor([-100] + r["input_ids"][1:]) for r in p]))
    s = max(len(x) for x in ids)

    def pad(xs, v):
        return torch.stack([torch.cat([x, torch.full((s - len(x),), v, dtype=x.dtype)]) for x in xs])
    p = pad(pos, 0)
    for r, x in enumerate(pos):
        p[r, len(x):] = torch.arange(s - len(x))
    return {"input_ids": pad(ids, 0), "position_ids": p, "labels": pad(lab, -100)}


def drive_like_axolotl(cfg, **trainer_kwargs):
    module, cls = cfg["plugins"][0].rsplit(".", 1)
    plugin = getattr(importlib.import_module(module), cls)()          # load_plugin
    args_path = plugin.get_input_args()
    m, c = args_path.rsplit(".", 1)
    getattr(importlib.import_module(m), c).model_validate(cfg)        # axolotl merges it into its schema
    trainer_cls = plugin.get_trainer_cls(cfg)                         # the causal builder
    trainer = trainer_cls(**trainer_kwargs)
    plugin.post_trainer_create(cfg, trainer)
    return trainer


def _docs():
    tok = tokenizer()
    return [{"input_ids": tok(r["prompt"] + r["completion"])["input_ids"], "task": r["task"]} for r in rows(16)]


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                             learning_rate=0.5, optim="sgd", save_strategy="no", logging_steps=1,
                             train_sampling_strategy="sequential", max_grad_norm=0.1, per_device_train_batch_size=2,
                             remove_unused_columns=False)


def test_plugin_trains_like_ortholoratrainer(tmp_path):
    docs = _docs()
    packs = [docs[i:i + 2] for i in range(0, len(docs), 2)]       # 2 samples per pack
    m = model()
    tr = drive_like_axolotl(YAML_CFG, model=m, args=_args(tmp_path / "a"), train_dataset=packs,
                            data_collator=pack_collator)
    assert isinstance(tr, OrthoLoRATrainer) and isinstance(tr, Trainer) and tr.num_tasks == 2
    assert isinstance(tr.data_collator, TaskIdsCollator)
    b = tr.data_collator(packs[:2])
    assert b["task_ids"].shape == b["input_ids"].shape
    assert b["task_ids"][0, :len(docs[0]["input_ids"])].eq(["sst", "mrpc"].index(docs[0]["task"])).all()
    tr.train()
    tr.ortho.remove()
    # the same documents, 4 per step, through OrthoLoRATrainer's own packed collator
    ref = model()
    flat = [{"input_ids": d["input_ids"], "task_id": ["sst", "mrpc"].index(d["task"])} for d in docs]
    args = _args(tmp_path / "b")
    args.per_device_train_batch_size = 4
    t2 = OrthoLoRATrainer(model=ref, args=args, train_dataset=flat, data_collator=PackedCausalLMCollator(num_tasks=2),
                          num_tasks=2, ortho_seed=3, task_names=["sst", "mrpc"])
    t2.train()
    t2.ortho.remove()
    init = dict(model().named_parameters())
    assert any("lora_" in n and not torch.equal(p, init[n]) for n, p in m.named_parameters())
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
    assert any("loss/sst" in h and "ortho/conflict_fraction/A" in h for h in tr.state.log_history)


def test_config_keys_and_errors():
    a = OrthoLoRAArgs.model_validate({"ortholora_num_tasks": 3, "ortholora_method": "upgrad"})
    assert a.ortholora_task_field == "task" and a.ortholora_collect == "grouped"
    with pytest.raises(Exception, match="ortholora_num_tasks"):
        OrthoLoRAArgs.model_validate({"ortholora_num_tasks": 0})
    from ortholora_kernels.integrations.axolotl import OrthoLoRAPlugin
    with pytest.raises(ValueError, match="ortholora_num_tasks"):
        OrthoLoRAPlugin().get_trainer_cls({})
    cls = make_trainer_cls(Trainer, num_tasks=4, ortho_method="upgrad")
    assert issubclass(cls, OrthoLoRATrainer) and cls.ortho_defaults == {"num_tasks": 4, "ortho_method": "upgrad"}
    with pytest.raises(TypeError, match="base"):
        make_trainer_cls(dict, num_tasks=2)
    coll = TaskIdsCollator(pack_collator, task_names=["sst", "mrpc"], num_tasks=2)
    with pytest.raises(ValueError, match="unknown task"):
        coll([[{"input_ids": [3, 4], "task": "rte"}]])
    with pytest.raises(KeyError, match="ortholora_task_field"):
        coll([[{"input_ids": [3, 4]}]])


def test_docs_page_runs_as_written():
    import os
    import re
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "axolotl.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1
    ns = {}
    exec(compile(blocks[0], "docs/axolotl.md", "exec"), ns)
    assert issubclass(ns["MyTrainer"], OrthoLoRATrainer)
    yaml = re.findall(r"```yaml\n(.*?)```", page, flags=re.S)[0]
    keys = {line.split(":")[0] for line in yaml.splitlines() if line.startswith("ortholora_")}
    assert keys <= set(OrthoLoRAArgs.model_fields)     # every documented key exists
