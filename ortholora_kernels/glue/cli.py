"""``ortholora-glue``: train and compare multi-task LoRA methods on GLUE.

Subcommands:
    train     train one method (single | joint | ortho | mtl-lora | lori) on GLUE tasks
    compare   markdown table (tasks x runs, GLUE average) + overlaid learning curves; runs that
              differ only in seed: mean and 95% Student-t interval, paired differences
    sweep     a grid of train runs (methods x seeds x ranks x granularities), resumable;
              --preset paper-checks
    demo      offline: synthetic GLUE-format suite, tiny RoBERTa, single vs joint vs ortho
    synth     write the synthetic suite (GLUE TSV layout) to a directory

User mistakes (unknown task, missing file, bad path, incompatible options) print one
line ``ortholora-glue: error: ...`` on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "ortholora-glue"


class CliError(Exception):
    """A user mistake: printed as one ``ortholora-glue: error: ...`` line, exit status 2."""
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so ``main`` can print and return 2)."""

    def error(self, message):
        raise CliError(message)


def _int_or_none(s):
    return None if s in ("none", "None", "") else int(s)


def _add_train_options(p, demo=False):
    from .methods import available_methods

    from .tasks import PAPER_TASKS

    g = p.add_argument_group("data")
    if not demo:
        g.add_argument("--tasks", default=",".join(PAPER_TASKS),
                       help="comma-separated GLUE tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli "
                            "(default: %(default)s)")
        src = g.add_mutually_exclusive_group()
        src.add_argument("--data-dir", default=None,
                         help="local directory in the original GLUE layout (CoLA/train.tsv, MNLI/dev_matched.tsv, ...); "
                              "default: download nyu-mll/glue from the Hugging Face hub through `datasets`")
        src.add_argument("--synthetic", action="store_true",
                         help="generate the offline synthetic suite (GLUE TSV format) in OUT/data and train on it")
    g.add_argument("--max-train-samples", type=_int_or_none, default=None,
                   help="keep a seeded random subset of N training examples per task (default: all)")
    g.add_argument("--max-eval-samples", type=_int_or_none, default=None,
                   help="keep a seeded random subset of N examples per evaluation split (default: all)")
    g.add_argument("--max-length", type=int, default=64 if demo else 128, help="max tokens per (pair) example; longer ones are "
                   "truncated, batches are padded dynamically to their longest (default: %(default)s)")
    g.add_argument("--cache-dir", default=None, help="datasets cache directory for hub downloads")

    g = p.add_argument_group("model")
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

    g = p.add_argument_group("method")
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
        # issue 16: the Gramian family of aggregators in place of PCGrad
        g.add_argument("--aggregator", default=None,
                       help="ortho, and mtl-lora/lori with --projection: the per-segment aggregator: pcgrad (default), "
                            "upgrad, dualproj, mgda, cagrad, imtlg, alignedmtl, config, nashmtl, fairgrad, sum, mean, "
                            "gradvac")
        g.add_argument("--aggregator-options", default=None,
                       help="its options as key=value,... (TorchJD's names, e.g. c=0.5 for cagrad, alpha=1 for fairgrad)")
        g.add_argument("--aggregator-ema", type=float, default=None,
                       help="detect conflicts on EMA-smoothed Gram entries with this beta (e.g. 0.9; default: off)")
        g.add_argument("--mtl-num-b", type=int, default=None,
                       help="mtl-lora: number of shared up-projections B_k (default: 3)")
        g.add_argument("--mtl-temperature", type=float, default=None,
                       help="mtl-lora: softmax temperature of the per-task B mixture weights (default: 0.1)")
        g.add_argument("--mtl-diagonal", action="store_true",
                       help="mtl-lora: diagonal task-specific transforms Lambda_t (r entries instead of r x r)")
        _add_lori_arguments(g)

    g = p.add_argument_group("optimisation")
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

    g = p.add_argument_group("evaluation, logging, checkpoints")
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


def build_parser():
    """The argparse parser of every subcommand (errors raise :class:`CliError`)."""
    p = _Parser(prog=PROG, description="Multi-task LoRA on GLUE: single-task, joint and Ortho-LoRA training, "
                "official metrics, reports, checkpoints. Also: python -m ortholora_kernels.glue.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else argparse.HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    t = sub.add_parser("train", help="train one method and evaluate it",
                       description="Train one method on GLUE tasks; writes config.json, results.json, "
                                   "conflicts.jsonl (ortho), checkpoint.pt, summary.md and plots/ in --out.")
    _add_train_options(t)
    c = sub.add_parser("compare", help="compare finished runs: markdown table and learning curves",
                       description="Print a markdown table (tasks x runs, with the GLUE average: per task the "
                                   "mean of its official metrics x100, then the mean over tasks) and the "
                                   "trainable parameter counts: adapter (summed over per-task adapters) and "
                                   "heads. Runs whose config.json differ only in the seed are grouped: mean "
                                   "and 95% Student-t interval over the seeds (n shown) per task and for "
                                   "the average, and paired differences (A - B over the seeds both have) "
                                   "between configurations that differ only in the method.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with results.json)")
    c.add_argument("--out", default=None, help="also write the table to this markdown file and the overlaid "
                   "learning curves next to it (<name>_curves.png; the mean over seeds per configuration), "
                   "and with repeated seeds the error-bar plot <name>_seeds.png")
    d = sub.add_parser("demo", help="offline demo: synthetic suite, tiny model, single vs joint vs ortho",
                       description="Offline, a few minutes on 2 CPU cores: writes the synthetic GLUE-format "
                                   "suite, trains single, joint and ortho with a tiny random RoBERTa, prints "
                                   "the comparison table and writes the plots.")
    d.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    d.add_argument("--tasks", default="sst2,cola,mrpc,stsb",
                   help="synthetic tasks (from sst2, cola, mrpc, stsb, rte) (default: %(default)s)")
    d.add_argument("--methods", default="single,joint,ortho", help="methods to compare, from single, joint, ortho, mtl-lora, lori "
                   "(each with its default options) (default: %(default)s)")
    d.add_argument("--granularity", default="ab", choices=["global", "ab", "layer", "matrix"],
                   help="ortho granularity (default: %(default)s)")
    d.add_argument("--collect", default=None, choices=["grouped", "loop"], help="ortho collection (default: grouped)")
    d.add_argument("--no-log-conflicts", action="store_true",
                   help="do not log the task-gradient conflicts of the joint run (logged by default, to compare "
                        "with ortho's)")
    d.add_argument("--n-train", type=int, default=2000, help="synthetic training rows per task (default: %(default)s)")
    d.add_argument("--n-dev", type=int, default=400, help="synthetic dev rows per task (default: %(default)s)")
    _add_train_options(d, demo=True)
    _add_experiment_parsers(sub)
    s = sub.add_parser("synth", help="write the synthetic suite in GLUE TSV layout",
                       description="Write the synthetic tasks (learnable, mildly conflicting) as GLUE TSV files.")
    s.add_argument("out", help="output directory (e.g. data/synthetic_glue)")
    s.add_argument("--tasks", default="sst2,cola,mrpc,stsb,rte", help="(default: %(default)s)")
    s.add_argument("--n-train", type=int, default=2000, help="(default: %(default)s)")
    s.add_argument("--n-dev", type=int, default=400, help="(default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p


# ----------------------------------------------------------------------------- LoRI options (issue 18)

def _float_list(text):
    """argparse type: one number or a comma-separated list of numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()] or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None


def _add_lori_arguments(g):
    """The ``--lori-*`` options of ``train`` (defaults: the authors' recipe; see method_lori)."""
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


# ---- experiments (issue 17): the sweep subcommand; its own block --------------------------------
def _add_experiment_parsers(sub):
    from .sweep import add_sweep_parser

    add_sweep_parser(sub)


def cmd_sweep(a, extra=()):
    """``sweep``: a grid of train runs, resumable, compared at the end (see :mod:`.sweep`)."""
    from .sweep import cmd_sweep as run

    return run(a, extra)
# ---- end of the experiments block ---------------------------------------------------------------


def _config_from_args(a, **over):
    from .train import TrainConfig

    model = "tiny-roberta" if getattr(a, "tiny", False) else getattr(a, "model", "tiny-roberta")
    cfg = TrainConfig(
        tasks=[x.strip() for x in a.tasks.split(",") if x.strip()], method=getattr(a, "method", "ortho"),
        out=a.out, data_dir=getattr(a, "data_dir", None), synthetic=getattr(a, "synthetic", False), model=model,
        tiny_hidden=a.tiny_hidden, tiny_layers=a.tiny_layers, pooling=a.pooling, max_length=a.max_length, lora_r=a.lora_r,
        lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
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


def _print_summary(res, out):
    from .report import markdown_table

    from .report import load_config, run_label

    table = markdown_table([(run_label(out, res, load_config(out)), res)])
    if res.get("continual"):   # lori --lori-mode continual: scores after each task, forgetting
        from .method_lori import forgetting_table

        table += "\n" + forgetting_table(res["continual"])
    print(table, end="")
    from .checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out, "summary.md"), table)


def cmd_train(a):
    """``train``: train one method, print its table and conflict summary."""
    from .train import train

    cfg = _config_from_args(a)
    res = train(cfg)
    _print_summary(res, cfg.out)
    from .report import conflict_summary

    line = conflict_summary(cfg.out)
    if line:
        print(f"task gradients per step: {line}")
    print(f"reports in {cfg.out}/ (results.json, config.json, summary.md, plots/)")
    return 0


def cmd_compare(a):
    """``compare``: print (and optionally write) the table of finished runs and their plots."""
    from .report import comparison_table, load_groups, write_comparison_plots

    groups = load_groups(a.runs)
    table = comparison_table(groups)
    print(table, end="")
    if a.out:
        from .checkpoint import atomic_write_text

        atomic_write_text(a.out, table)
        write_comparison_plots(groups, os.path.splitext(a.out)[0])
    return 0


def cmd_demo(a):
    """``demo``: synthetic suite, tiny model, the chosen methods, comparison table and plots."""
    from .data import write_synthetic_suite
    from .report import compare, load_config, load_results, plot_learning_curves, run_label
    from .tasks import parse_tasks
    from .train import train

    from .data import SYNTHETIC_TASKS

    tasks = [t.name for t in parse_tasks(a.tasks)]
    bad = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if bad:
        raise CliError(f"demo: no synthetic version of {', '.join(bad)} (synthetic tasks: {', '.join(SYNTHETIC_TASKS)})")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods:
        raise CliError("demo: --methods is empty")
    from .methods import get_method

    for m in methods:
        try:
            get_method(m)
        except ValueError as e:
            raise CliError(str(e)) from None
    data = os.path.join(a.out, "data")
    write_synthetic_suite(data, n_train=a.n_train, n_dev=a.n_dev, seed=a.seed, tasks=tasks)
    dirs = []
    for m in methods:
        opts = get_method(m).options
        log = "log_conflicts" in opts and not a.no_log_conflicts
        over = dict(method=m, out=os.path.join(a.out, m), data_dir=data, model="tiny-roberta",
                    granularity=a.granularity if "granularity" in opts and ("log_conflicts" not in opts or log)
                    else None,
                    collect=a.collect if "collect" in opts else None, backend=None, log_conflicts=log)
        cfg = _config_from_args(a, **over)
        print(f"== {m} ==", file=sys.stderr)
        train(cfg)
        dirs.append(cfg.out)
    table = compare(dirs, os.path.join(a.out, "comparison.md"))
    runs = [(run_label(d, load_results(d), load_config(d)), load_results(d)) for d in dirs]
    os.makedirs(os.path.join(a.out, "plots"), exist_ok=True)
    plot_learning_curves(runs, os.path.join(a.out, "plots", "learning_curves.png"))
    print(table, end="")
    from .report import conflict_summary

    for m, d in zip(methods, dirs):
        line = conflict_summary(d)
        if line:
            print(f"{m}: task gradients per step: {line}")
    print(f"table: {a.out}/comparison.md; plots: {a.out}/plots/learning_curves.png and "
          f"{a.out}/<method>/plots/ (learning_curves.png; conflicts.png, cosine_heatmap.png for joint and ortho)")
    return 0


def cmd_synth(a):
    """``synth``: write the synthetic suite in the GLUE TSV layout."""
    from .data import write_synthetic_suite
    from .tasks import parse_tasks

    from .data import SYNTHETIC_TASKS

    tasks = [t.name for t in parse_tasks(a.tasks)]
    bad = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if bad:
        raise CliError(f"synth: no synthetic version of {', '.join(bad)} (synthetic tasks: {', '.join(SYNTHETIC_TASKS)})")
    write_synthetic_suite(a.out, n_train=a.n_train, n_dev=a.n_dev, seed=a.seed, tasks=tasks)
    print(f"synthetic GLUE suite written to {a.out}")
    return 0


def main(argv=None) -> int:
    """Entry point: returns the exit status (0, 2 for user mistakes, 130 when interrupted)."""
    from .data import DataError
    from .model import ModelError
    from .tasks import UnknownTaskError

    parser = build_parser()
    try:
        try:
            a, extra = parser.parse_known_args(argv)
            if extra and a.command != "sweep":   # only sweep passes unknown options on (to train)
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # --help
            return int(e.code or 0)
        from .train import Stopped, TrainError

        try:
            if a.command == "sweep":
                return cmd_sweep(a, extra)
            return {"train": cmd_train, "compare": cmd_compare, "demo": cmd_demo, "synth": cmd_synth}[a.command](a)
        except Stopped as e:
            print(f"{PROG}: stopped after step {e.args[0]} (--stop-after-steps); continue with --resume",
                  file=sys.stderr)
            return 0
        except (TrainError, DataError, ModelError, UnknownTaskError) as e:
            raise CliError(str(e)) from None
        except OSError as e:   # unreadable/unwritable paths, missing run directories
            raise CliError(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)) from None
    except CliError as e:
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
