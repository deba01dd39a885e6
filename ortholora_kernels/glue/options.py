"""The ``train`` options, shared by every subcommand that trains (``train``, ``demo``, ``sweep``).

:func:`add_train_options` adds them to a parser and returns the actions it added,
:func:`config_from_args` turns parsed options into a :class:`~.train.TrainConfig`, and
:func:`train_parser` is a stand-alone parser of ``train``'s options (the sweep checks every
grid point's options with it). :class:`Parser` is argparse with one-line errors raised as
:class:`CliError`, which ``main`` prints as ``ortholora-glue: error: ...`` (exit status 2).
"""
from __future__ import annotations

import argparse
import functools

PROG = "ortholora-glue"


class CliError(Exception):
    """A user mistake: printed as one ``ortholora-glue: error: ...`` line, exit status 2."""
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so ``main`` can print and return 2)."""

    def error(self, message):
        raise CliError(message)


def _int_or_none(s):
    return None if s in ("none", "None", "") else int(s)


class _Recorder:
    """Forwards ``add_argument`` to a parser or group and keeps the actions it adds."""

    def __init__(self, target, actions):
        self._target, self._actions = target, actions

    def add_argument(self, *args, **kwargs):
        action = self._target.add_argument(*args, **kwargs)
        self._actions.append(action)
        return action

    def add_mutually_exclusive_group(self, **kwargs):
        return _Recorder(self._target.add_mutually_exclusive_group(**kwargs), self._actions)


def add_train_options(p, demo=False) -> list:
    """Add ``train``'s options to parser ``p`` (``demo``: the demo's subset and defaults);
    returns the added :class:`argparse.Action` objects."""
    actions = []

    def group(title):
        return _Recorder(p.add_argument_group(title), actions)

    from .methods import available_methods
    from .tasks import PAPER_TASKS

    g = group("data")
    if not demo:
        g.add_argument("--tasks", default=",".join(PAPER_TASKS),
                       help="comma-separated GLUE tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli "
                            "(default: %(default)s)")
        src = g.add_mutually_exclusive_group()
        src.add_argument("--data-dir", default=None,
                         help="local directory in the original GLUE layout (CoLA/train.tsv, "
                              "MNLI/dev_matched.tsv, ...); default: download nyu-mll/glue from the Hugging Face hub "
                              "through `datasets`")
        src.add_argument("--synthetic", action="store_true",
                         help="generate the offline synthetic suite (GLUE TSV format) in OUT/data and train on it")
    g.add_argument("--max-train-samples", type=_int_or_none, default=None,
                   help="keep a seeded random subset of N training examples per task (default: all)")
    g.add_argument("--max-eval-samples", type=_int_or_none, default=None,
                   help="keep a seeded random subset of N examples per evaluation split (default: all)")
    g.add_argument("--max-length", type=int, default=64 if demo else 128,
                   help="max tokens per (pair) example; longer ones are truncated, batches are padded dynamically "
                        "to their longest (default: %(default)s)")
    g.add_argument("--cache-dir", default=None, help="datasets cache directory for hub downloads")

    g = group("model")
    if not demo:
        g.add_argument("--model", default="roberta-base",
                       help="Hugging Face encoder: hub name or local path, or 'tiny-roberta' (a random 2-layer "
                            "RoBERTa from a config with an offline word-level tokenizer) (default: %(default)s)")
        g.add_argument("--tiny", action="store_true", help="shorthand for --model tiny-roberta")
    g.add_argument("--tiny-hidden", type=int, default=32, help="tiny-roberta hidden size (default: %(default)s)")
    g.add_argument("--tiny-layers", type=int, default=2, help="tiny-roberta layers (default: %(default)s)")
    g.add_argument("--pooling", default="mean" if demo else "cls", choices=["cls", "mean"],
                   help="head input: the first token (<s>, RoBERTa's classification head) or the mean over the "
                        "tokens (default: %(default)s)")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (paper: 8) (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--lora-target-modules", default="query,value",
                   help="comma-separated module names to adapt (paper: query,value) (default: %(default)s)")

    g = group("method")
    if not demo:
        g.add_argument("--method", default="ortho", choices=available_methods(),
                       help="single: one adapter per task, trained separately; joint: one shared adapter, summed "
                            "task losses; ortho: shared adapter + Ortho-LoRA projection; mtl-lora: MTL-LoRA "
                            "(arXiv 2410.09437); lori: LoRI (arXiv 2504.07448) (default: %(default)s)")
        g.add_argument("--granularity", default=None, choices=["global", "ab", "layer", "matrix"],
                       help="ortho (and joint --log-conflicts): projection segments; ab = A and B matrices apart, "
                            "the paper's bipartite decoupling (default: ab)")
        g.add_argument("--collect", default=None, choices=["grouped", "loop"],
                       help="ortho only: per-task gradients from one grouped backward, or one backward per task "
                            "(default: grouped)")
        g.add_argument("--log-conflicts", action="store_true",
                       help="joint only: also collect the per-task LoRA gradients (one grouped backward) to log "
                            "their conflicts and cosines like ortho does; the update stays their plain sum "
                            "(--granularity then sets the logged segments)")
        g.add_argument("--backend", default=None,
                       help="ortho only: projection backend: torch, triton or native (default: automatic, or "
                            "$ORTHOLORA_BACKEND: native if built, triton on GPUs, else torch)")
        g.add_argument("--projection", default=None, choices=["none", "global", "ab", "layer", "matrix"],
                       help="mtl-lora and lori (--lori-mode joint): add Ortho-LoRA over the adapter's shared "
                            "parameters with this granularity (same meaning as ortho's --granularity; mtl-lora: "
                            "A and the B_k, not the task transforms/mixtures; lori: the B's, A is frozen); "
                            "--collect and --backend then apply as for ortho (default: none)")
        # the Gramian family of aggregators in place of PCGrad
        g.add_argument("--aggregator", default=None,
                       help="ortho, and mtl-lora/lori with --projection: the per-segment aggregator: pcgrad (default), "
                            "upgrad, dualproj, mgda, cagrad, imtlg, alignedmtl, config, nashmtl, fairgrad, sum, mean, "
                            "gradvac")
        g.add_argument("--aggregator-options", default=None,
                       help="its options as key=value,... (TorchJD's names, e.g. c=0.5 for cagrad, alpha=1 for "
                            "fairgrad)")
        g.add_argument("--aggregator-ema", type=float, default=None,
                       help="detect conflicts on EMA-smoothed Gram entries with this beta (e.g. 0.9; default: off)")
        g.add_argument("--mtl-num-b", type=int, default=None,
                       help="mtl-lora: number of shared up-projections B_k (default: 3)")
        g.add_argument("--mtl-temperature", type=float, default=None,
                       help="mtl-lora: softmax temperature of the per-task B mixture weights (default: 0.1)")
        g.add_argument("--mtl-diagonal", action="store_true",
                       help="mtl-lora: diagonal task-specific transforms Lambda_t (r entries instead of r x r)")
        add_lori_arguments(g)

    g = group("optimisation")
    g.add_argument("--batch-size", type=int, default=16, help="examples per task per step (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3 if demo else 5e-4,
                   help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=0.06,
                   help="linear warm-up over this fraction of the steps, then linear decay (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=600 if demo else 2000,
                   help="training steps; every step takes one batch from every task (default: %(default)s)")
    if not demo:
        g.add_argument("--epochs", type=float, default=None,
                       help="instead of --max-steps: epochs over the largest task's training set")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for tiny-roberta, which is launch-bound, else torch's default)")
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy, torch, data order, LoRA init and "
                   "projection order (default: %(default)s)")

    g = group("evaluation, logging, checkpoints")
    if not demo:
        g.add_argument("--out", default="runs/glue", help="output directory (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=100 if demo else 500,
                   help="evaluate every N steps and at the end (default: %(default)s)")
    if not demo:
        g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: %(default)s)")
        g.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt (optimizer, scheduler, RNG and data order restored)")
        g.add_argument("--stop-after-steps", type=int, default=None,
                       help="testing aid: checkpoint and stop after N steps, as if interrupted (resume with --resume)")
    g.add_argument("--log-every", type=int, default=50,
                   help="flush the conflict log (kept on the device) every N steps (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    return actions


# ----------------------------------------------------------------------------- LoRI options

def _float_list(text):
    """argparse type: one number or a comma-separated list of numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()] or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None


def add_lori_arguments(g):
    """The ``--lori-*`` options of ``train`` (defaults: the authors' recipe; see methods.lori)."""
    g.add_argument("--lori-mode", default=None, choices=["merge", "joint", "continual"],
                   help="lori: merge = one adapter per task trained alone (each with its own random A), merged "
                        "by concatenation as the authors do (peft 'cat') and evaluated on every task; continual = "
                        "the tasks in --tasks order trained into one adapter, each on its own mask, earlier "
                        "tasks' entries kept, every seen task evaluated after each (forgetting table); joint = one "
                        "shared adapter on all tasks, summed losses, takes --projection (default: merge)")
    g.add_argument("--lori-shared-a", action="store_true", default=None,
                   help="lori merge mode, a variant: one frozen A (from --seed) for every task instead of an "
                        "independent one per task; the merge is then a weighted sum of the B's at rank r")
    g.add_argument("--lori-sparsity", type=float, default=None,
                   help="lori: fraction of the B entries masked out for LoRI-S (global magnitude mask, "
                        "k = int((1 - s) N) kept) (default: 0.9)")
    g.add_argument("--lori-s-steps", type=int, default=None,
                   help="lori: LoRI-S steps after the LoRI-D budget (--max-steps/--epochs); 0 = LoRI-D only "
                        "(default: as many as LoRI-D)")
    g.add_argument("--lori-s-lr", type=float, default=None,
                   help="lori: LoRI-S learning rate (default: 10 x --lr, the authors' ratio)")
    g.add_argument("--lori-s-weight-decay", type=float, default=None,
                   help="lori: LoRI-S AdamW weight decay (default: 0)")
    g.add_argument("--lori-s-schedule", default=None, choices=["constant", "linear"],
                   help="lori: LoRI-S schedule, constant or the harness's warm-up + linear decay (default: constant)")
    g.add_argument("--lori-merge-weights-d", type=_float_list, default=None, metavar="W[,W...]",
                   help="lori merge mode: merge weights of the LoRI-D adapters, one for all or one per task "
                        "(default: the authors' 0.5 for 3 tasks, 0.4 for 4; min(1, 1.5/T) below, min(1, 1.6/T) above)")
    g.add_argument("--lori-merge-weights-s", type=_float_list, default=None, metavar="W[,W...]",
                   help="lori merge mode: merge weights of the LoRI-S adapters (default: the authors' 0.4 for 3 "
                        "tasks, 0.3 for 4; min(1, 1.2/T) otherwise)")


def _lori_config(a) -> dict:
    """TrainConfig fields of the ``--lori-*`` options (absent on subcommands without them)."""
    names = ("lori_sparsity", "lori_mode", "lori_s_steps", "lori_s_lr", "lori_s_weight_decay", "lori_s_schedule",
             "lori_merge_weights_d", "lori_merge_weights_s")
    out = {n: getattr(a, n, None) for n in names}
    out["lori_shared_a"] = bool(getattr(a, "lori_shared_a", False))
    return out


def config_from_args(a, **over):
    """The :class:`~.train.TrainConfig` of parsed ``train`` options ``a``; ``over``: fields to set after."""
    from .train import TrainConfig

    model = "tiny-roberta" if getattr(a, "tiny", False) else getattr(a, "model", "tiny-roberta")
    cfg = TrainConfig(
        tasks=[x.strip() for x in a.tasks.split(",") if x.strip()], method=getattr(a, "method", "ortho"),
        out=a.out, data_dir=getattr(a, "data_dir", None), synthetic=getattr(a, "synthetic", False), model=model,
        tiny_hidden=a.tiny_hidden, tiny_layers=a.tiny_layers, pooling=a.pooling, max_length=a.max_length,
        lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
        lora_target_modules=[x.strip() for x in a.lora_target_modules.split(",") if x.strip()],
        batch_size=a.batch_size, eval_batch_size=a.eval_batch_size, lr=a.lr, weight_decay=a.weight_decay,
        warmup_ratio=a.warmup_ratio, max_steps=a.max_steps, epochs=getattr(a, "epochs", None),
        eval_every=a.eval_every, save_every=getattr(a, "save_every", 10**9), log_every=a.log_every, seed=a.seed,
        granularity=getattr(a, "granularity", None), collect=getattr(a, "collect", None),
        backend=getattr(a, "backend", None), log_conflicts=getattr(a, "log_conflicts", False),
        projection=getattr(a, "projection", None), aggregator=getattr(a, "aggregator", None),
        aggregator_options=getattr(a, "aggregator_options", None), aggregator_ema=getattr(a, "aggregator_ema", None),
        mtl_num_b=getattr(a, "mtl_num_b", None),
        mtl_temperature=getattr(a, "mtl_temperature", None), mtl_diagonal=getattr(a, "mtl_diagonal", False),
        **_lori_config(a),
        max_train_samples=a.max_train_samples,
        max_eval_samples=a.max_eval_samples, resume=getattr(a, "resume", False),
        stop_after_steps=getattr(a, "stop_after_steps", None), progress=not a.no_progress,
        plots=not a.no_plots, cache_dir=a.cache_dir, threads=a.threads)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@functools.lru_cache(maxsize=1)
def _train_parser_and_flags():
    p = Parser(prog=f"{PROG} train", allow_abbrev=False)
    actions = add_train_options(p)
    return p, frozenset(s for a in actions for s in a.option_strings)


def train_parser() -> Parser:
    """A stand-alone parser of ``train``'s options (errors raise :class:`CliError`)."""
    return _train_parser_and_flags()[0]


def train_option_strings() -> frozenset:
    """Every option string ``train`` takes (``--tasks``, ``--aggregator``, ...)."""
    return _train_parser_and_flags()[1]


__all__ = ["PROG", "CliError", "Parser", "add_train_options", "add_lori_arguments", "config_from_args",
           "train_parser", "train_option_strings"]
