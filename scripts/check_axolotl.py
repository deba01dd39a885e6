"""The axolotl plugin against a real axolotl install (not part of the test suite).

axolotl pins older transformers / peft / trl than this package's dev stack, so it lives in
a virtual environment of its own and CI does not install it (238 packages). Run by hand:

    python3 -m venv /tmp/axo && /tmp/axo/bin/pip install "axolotl==0.19.*" pytest
    PYTHONPATH=. /tmp/axo/bin/python scripts/check_axolotl.py

(the package from this checkout, its extension built against the same torch, or
``ORTHOLORA_BACKEND``-free: the torch backend is used when the extension does not load).

What it checks, with axolotl's own pieces: the plugin loads through axolotl's
``PluginManager`` (``load_plugin``) and is a ``BasePlugin``; its config keys validate; the
trainer class axolotl gets from ``get_trainer_cls`` is ``AxolotlTrainer`` with
``OrthoLoRATrainer`` mixed in; two optimizer steps through it, with axolotl's
``AxolotlTrainingArguments`` and its sample-packing collator
(``V2BatchSamplerDataCollatorForSeq2Seq``, wrapped by ``post_trainer_create``), leave the
same parameters as ``OrthoLoRATrainer`` over ``transformers.Trainer`` on the same packed
batches, and the trainer logs the per-task losses and conflict statistics. Exits non-zero
on the first failure.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main() -> None:
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.collators.batching import V2BatchSamplerDataCollatorForSeq2Seq
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset
    from test_trl import model, rows, tokenizer  # tiny Llama from a config, in-memory tokenizer
    from transformers import TrainingArguments

    from ortholora_kernels.integrations import OrthoLoRATrainer
    from ortholora_kernels.integrations.axolotl import OrthoLoRAArgs, TaskIdsCollator

    name = "ortholora_kernels.integrations.axolotl.OrthoLoRAPlugin"
    cfg = DictDefault({"plugins": [name], "ortholora_num_tasks": 2, "ortholora_task_field": "task",
                       "ortholora_task_names": ["sst", "mrpc"], "ortholora_method": "upgrad", "ortholora_seed": 3})
    pm = PluginManager.get_instance()
    pm.register(name)
    plugin = pm.plugins[name]
    assert isinstance(plugin, BasePlugin), type(plugin).__mro__
    assert pm.get_input_args() == ["ortholora_kernels.integrations.axolotl.OrthoLoRAArgs"]
    OrthoLoRAArgs.model_validate(dict(cfg))
    cls = pm.get_trainer_cls(cfg)
    assert issubclass(cls, AxolotlTrainer) and issubclass(cls, OrthoLoRATrainer), cls.__mro__
    print(f"check_axolotl: plugin loaded by axolotl's PluginManager; trainer {cls.__name__} "
          f"({' -> '.join(c.__name__ for c in cls.__mro__[:3])})")

    tok = tokenizer()
    docs = []
    for r in rows(16):
        ids = tok(r["prompt"] + r["completion"])["input_ids"]
        docs.append({"input_ids": ids, "labels": [-100] + ids[1:], "position_ids": list(range(len(ids))),
                     "task": r["task"]})
    # Rows as axolotl's datasets hold them; its packing collator concatenates a batch's rows
    # into one packed row (position ids restarting per sample).
    data = Dataset.from_list(docs)
    collator = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer=tok, padding=True, return_tensors="pt")
    common = dict(report_to="none", use_cpu=True, max_steps=2, learning_rate=0.5, optim="sgd", save_strategy="no",
                  logging_steps=1, train_sampling_strategy="sequential", max_grad_norm=0.1,
                  per_device_train_batch_size=4, remove_unused_columns=False)
    with tempfile.TemporaryDirectory() as tmp:
        m = model()
        tr = cls(model=m, args=AxolotlTrainingArguments(output_dir=os.path.join(tmp, "a"), **common),
                 train_dataset=data, data_collator=collator)
        pm.post_trainer_create(cfg, tr)
        assert isinstance(tr.data_collator, TaskIdsCollator), type(tr.data_collator)
        b = tr.data_collator(docs[:2])
        assert b["task_ids"].shape == b["input_ids"].shape == (1, sum(len(d["input_ids"]) for d in docs[:2]))
        n0 = len(docs[0]["input_ids"])
        assert b["task_ids"][0, :n0].eq(0).all() and b["task_ids"][0, n0:].eq(1).all(), b["task_ids"]
        tr.train()
        tr.ortho.remove()
        ref = model()
        t2 = OrthoLoRATrainer(model=ref, args=TrainingArguments(output_dir=os.path.join(tmp, "b"), **common),
                              train_dataset=data, num_tasks=2, ortho_seed=3, ortho_method="upgrad",
                              task_names=["sst", "mrpc"],
                              data_collator=TaskIdsCollator(collator, task_names=["sst", "mrpc"], num_tasks=2))
        t2.train()
        t2.ortho.remove()
    init = dict(model().named_parameters())
    moved = [n for n, p in m.named_parameters() if "lora_" in n and not torch.equal(p, init[n])]
    assert moved, "no LoRA parameter changed"
    worst = 0.0
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
        worst = max(worst, float((p - q).detach().abs().max()))
    logged = [h for h in tr.state.log_history if "loss/sst" in h]
    assert logged and all("ortho/conflict_fraction/A" in h for h in logged), tr.state.log_history
    print(f"check_axolotl: 2 steps through AxolotlTrainer + axolotl's packing collator equal OrthoLoRATrainer "
          f"(max |diff| {worst:.1e} over {len(init)} parameters, {len(moved)} LoRA matrices moved); "
          f"logged loss/sst, loss/mrpc, ortho/* per step")


if __name__ == "__main__":
    main()
