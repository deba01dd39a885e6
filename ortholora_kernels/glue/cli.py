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

from .options import PROG, CliError, Parser, add_train_options, config_from_args

__all__ = ["PROG", "CliError", "build_parser", "main"]


def build_parser():
    """The argparse parser of every subcommand (errors raise :class:`CliError`)."""
    p = Parser(prog=PROG, description="Multi-task LoRA on GLUE: single-task, joint and Ortho-LoRA training, "
                "official metrics, reports, checkpoints. Also: python -m ortholora_kernels.glue.",
                formatter_class=argparse.HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    t = sub.add_parser("train", help="train one method and evaluate it",
                       description="Train one method on GLUE tasks; writes config.json, results.json, "
                                   "conflicts.jsonl (ortho), checkpoint.pt, summary.md and plots/ in --out.")
    add_train_options(t)
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
    add_train_options(d, demo=True)
    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    s = sub.add_parser("synth", help="write the synthetic suite in GLUE TSV layout",
                       description="Write the synthetic tasks (learnable, mildly conflicting) as GLUE TSV files.")
    s.add_argument("out", help="output directory (e.g. data/synthetic_glue)")
    s.add_argument("--tasks", default="sst2,cola,mrpc,stsb,rte", help="(default: %(default)s)")
    s.add_argument("--n-train", type=int, default=2000, help="(default: %(default)s)")
    s.add_argument("--n-dev", type=int, default=400, help="(default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p




def _print_summary(res, out):
    from .report import load_config, markdown_table, run_label

    table = markdown_table([(run_label(out, res, load_config(out)), res)])
    if res.get("continual"):   # lori --lori-mode continual: scores after each task, forgetting
        from .methods.lori import forgetting_table

        table += "\n" + forgetting_table(res["continual"])
    print(table, end="")
    from .checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out, "summary.md"), table)


def cmd_train(a):
    """``train``: train one method, print its table and conflict summary."""
    from .train import train

    cfg = config_from_args(a)
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
    from .data import SYNTHETIC_TASKS
    from .tasks import parse_tasks
    from .train import train

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
        cfg = config_from_args(a, **over)
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
    from .data import SYNTHETIC_TASKS, write_synthetic_suite
    from .tasks import parse_tasks

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
                from .sweep import cmd_sweep

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
