"""Multi-task SFT of a tiny Llama on real GLUE tasks, joint vs Ortho-LoRA, through TRL.

    python examples/sft_multitask.py                     # a few minutes on 2 CPU cores
    python examples/sft_multitask.py --smoke             # seconds (what the test runs)

SST-2 (sentiment), MRPC (paraphrase) and RTE (entailment) from the GLUE files in
``--glue-dir`` (default ``../shared/glue`` next to the checkout, or ``$ORTHOLORA_GLUE_DIR``;
read in place, nothing is copied) become prompt -> answer text:

    sst2 sentence: <s> sentiment:                  -> " positive" / " negative"
    mrpc one: <s1> two: <s2> paraphrase:           -> " yes" / " no"
    rte premise: <s1> hypothesis: <s2> entailment: -> " yes" / " no"

A word-level tokenizer is built from the training text and a Llama from a ``LlamaConfig``
(random weights, nothing downloaded), with peft LoRA on the attention and MLP projections.
Both runs train the same initial model on the same packed data (``packing=True``, "bfd":
padding-free, documents kept apart; completion-only loss): ``joint`` with TRL's
``SFTTrainer`` (the mean over all tasks' answer tokens), ``ortho`` with
:class:`~ortholora_kernels.integrations.OrthoLoRASFTTrainer` (one class changed, the task
column named; ``ortho_reduction="mean"``: the mean of the projected per-task gradients, the
scale of the joint loss's gradient). Evaluation (the same function for both): per-task loss of the answer tokens
and answer accuracy (the answer with the higher log-likelihood given the prompt). Output:
a table, ``<out>/sft_multitask.json`` and a plot ``<out>/sft_multitask.png``.

A tiny random model learns little in minutes: the figures show the pipeline, not a result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

TASKS = ("sst2", "mrpc", "rte")
ANSWERS = {"sst2": (" negative", " positive"), "mrpc": (" no", " yes"), "rte": (" yes", " no")}  # by label id


def default_glue_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("ORTHOLORA_GLUE_DIR", os.path.join(os.path.dirname(here), "shared", "glue"))


def prompt(task: str, a: str, b: str | None) -> str:
    a = " ".join(a.split()[:40])
    b = None if b is None else " ".join(b.split()[:30])
    if task == "sst2":
        return f"sst2 sentence: {a} sentiment:"
    if task == "mrpc":
        return f"mrpc one: {a} two: {b} paraphrase:"
    return f"rte premise: {a} hypothesis: {b} entailment:"


def load_rows(glue_dir: str, split: str, per_task: int, seed: int) -> list[dict]:
    """``per_task`` prompt/completion rows of each task (a seeded sample of the split)."""
    from ortholora_kernels.glue.data import read_glue_tsv, tsv_path
    from ortholora_kernels.glue.tasks import TASKS as SPECS
    g = torch.Generator().manual_seed(seed)
    out = []
    for task in TASKS:
        spec = SPECS[task]
        ex = read_glue_tsv(tsv_path(glue_dir, spec, split), spec)
        idx = torch.randperm(len(ex), generator=g)[:per_task].tolist()
        for i in idx:
            y = ex.labels[i]
            out.append({"prompt": prompt(task, ex.text_a[i], None if ex.text_b is None else ex.text_b[i]),
                        "completion": ANSWERS[task][y], "task": task, "label": y})
    return out


def build_tokenizer(texts, vocab_size: int):
    """A word-level tokenizer trained on ``texts`` (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                             special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(vocab: int, args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.max_length, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      initializer_range=0.1)  # logits with some range: the frozen LM head lets LoRA move them
    base = LlamaForCausalLM(cfg)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))


@torch.no_grad()
def evaluate(model, tok, rows, desc: str):
    """Per task: mean loss of the answer tokens and answer accuracy (higher log-likelihood)."""
    from tqdm.auto import tqdm
    model.eval()
    stats = {t: {"loss": 0.0, "tokens": 0, "correct": 0, "n": 0} for t in TASKS}
    for r in tqdm(rows, desc=desc, leave=False):
        p = tok(r["prompt"])["input_ids"]
        scores = []
        for k, ans in enumerate(ANSWERS[r["task"]]):
            a = tok(r["prompt"] + ans + tok.eos_token)["input_ids"][len(p):]
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            nll = -logp.gather(1, torch.tensor(a)[:, None]).squeeze(1)
            scores.append(-float(nll.sum()))
            if k == r["label"]:
                stats[r["task"]]["loss"] += float(nll.sum())
                stats[r["task"]]["tokens"] += len(a)
        s = stats[r["task"]]
        s["correct"] += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
        s["n"] += 1
    return {t: {"loss": s["loss"] / max(s["tokens"], 1), "accuracy": s["correct"] / max(s["n"], 1)}
            for t, s in stats.items()}


def train(method: str, tok, train_rows, args, out_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ortholora_kernels.integrations import OrthoLoRASFTTrainer
    model = build_model(len(tok), args)
    cfg = SFTConfig(output_dir=os.path.join(out_dir, method), report_to="none", use_cpu=True, bf16=False,
                    max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                    lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10), save_strategy="no",
                    packing=True, packing_strategy="bfd", max_length=args.max_length, seed=args.seed,
                    gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=False)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "task")} for r in train_rows])
    if method == "joint":
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds.remove_columns("task"), processing_class=tok)
    else:
        trainer = OrthoLoRASFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                      task_field="task", ortho_method=args.ortho_method,
                                      ortho_reduction="mean")  # the mean of the projected task gradients:
        # the scale of joint's mean token loss (the default "sum" adds T of them)
    trainer.train()
    if method != "joint":
        trainer.ortho.remove()
    return model, trainer.state.log_history


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    w = 0.38
    for ax, key in zip(axes, ("loss", "accuracy")):
        for k, method in enumerate(results):
            vals = [results[method][t][key] for t in TASKS]
            ax.bar([i + (k - 0.5) * w for i in range(len(TASKS))], vals, w, label=method)
        ax.set_xticks(range(len(TASKS)), TASKS)
        ax.set_title(f"eval answer {key}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--glue-dir", default=default_glue_dir())
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--train-per-task", type=int, default=400)
    ap.add_argument("--eval-per-task", type=int, default=80)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4, help="packed sequences per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--ortho-method", default="pcgrad")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_per_task, args.eval_per_task, args.steps, args.batch = 12, 4, 2, 2
        args.max_length, args.hidden, args.vocab = 128, 32, 400
    if not os.path.isdir(args.glue_dir):
        raise SystemExit(f"--glue-dir: {args.glue_dir} is not a folder (the GLUE TSV files: SST-2/, MRPC/, RTE/)")
    out = args.out or tempfile.mkdtemp(prefix="sft_multitask_")
    os.makedirs(out, exist_ok=True)
    train_rows = load_rows(args.glue_dir, "train", args.train_per_task, args.seed)
    eval_rows = load_rows(args.glue_dir, "dev", args.eval_per_task, args.seed + 1)
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in train_rows], args.vocab)
    results, logs = {}, {}
    for method in ("joint", "ortho"):
        model, logs[method] = train(method, tok, train_rows, args, out)
        results[method] = evaluate(model, tok, eval_rows, f"eval {method}")
    print(f"\n{'task':6} {'joint loss':>10} {'ortho loss':>10} {'joint acc':>9} {'ortho acc':>9}")
    for t in TASKS:
        j, o = results["joint"][t], results["ortho"][t]
        print(f"{t:6} {j['loss']:>10.4f} {o['loss']:>10.4f} {j['accuracy']:>9.3f} {o['accuracy']:>9.3f}")
    with open(os.path.join(out, "sft_multitask.json"), "w") as f:
        json.dump({"results": results, "logs": logs, "args": vars(args)}, f, indent=1)
    plot(results, os.path.join(out, "sft_multitask.png"))
    print(f"wrote {out}/sft_multitask.json and {out}/sft_multitask.png")
    return results


if __name__ == "__main__":
    main()
