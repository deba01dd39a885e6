"""``ortholora-glue sweep``: a grid of training runs, resumable, compared at the end.

The grid is methods x seeds x ranks x granularities (x aggregators, when the installed
``train`` has an ``--aggregator`` option). Granularities apply to the methods that take
``--granularity`` (ortho; joint only logs conflicts with it), aggregators to those that
take ``--aggregator``; the others run once per (seed, rank). Options the sweep does not
know are handed to every ``train`` run verbatim (``--lr 1e-3``, or everything after
``--``), after the budget's options, so they override them.

Every run has its own directory ``OUT/runs/<method>[-<granularity>][-<aggregator>]-r<r>-s<seed>``:
a finished run (``results.json`` with ``finished: true``) whose configuration matches is
skipped, an interrupted one (``checkpoint.pt``) continues with ``--resume``, and a directory
holding a finished run with other options stops the sweep (use another ``--out``). Runs go
one after another in this process, or ``--workers N`` at a time as child processes
(``python -m ortholora_kernels.glue train ...``, log in ``<run>/train.log``). At the end
``OUT/comparison.md`` (mean and 95% interval over seeds, paired differences) and
``OUT/comparison_curves.png`` / ``OUT/comparison_seeds.png`` are written.

``--preset paper-checks``: the paper's first checks (arXiv 2601.09684): single, joint (with
its conflicts logged: the conflict frequency) and ortho over seeds 0, 1, 2; ranks 4, 8, 16;
ortho with ``ab`` (A and B apart) and ``global`` projection. Joint runs always log their
task-gradient conflicts (``--log-conflicts`` at the first granularity: the update stays the
plain sum) instead of running once per granularity. ``--budget tiny`` (default): the
tiny random RoBERTa on the synthetic suite (written once to ``OUT/data``), 150 steps per run:
minutes on a CPU. ``--budget roberta``: roberta-base, the paper's recipe (r on query/value,
lr 5e-4, batch 16, length 128), 3000 steps per run on MNLI, QQP and SST-2 by default: hours
on one GPU.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time

from .options import CliError, config_from_args, train_option_strings, train_parser

PRESETS = {
    "paper-checks": dict(methods="single,joint,ortho", seeds="0,1,2", ranks="4,8,16", granularities="ab,global"),
}

#: train options of each budget (before the user's own pass-through options)
BUDGETS = {
    "tiny": ["--model", "tiny-roberta", "--pooling", "mean", "--max-length", "32", "--batch-size", "16",
             "--lr", "2e-3", "--max-steps", "150", "--eval-every", "150", "--save-every", "50",
             "--max-eval-samples", "200", "--no-progress", "--no-plots"],
    "roberta": ["--model", "roberta-base", "--max-length", "128", "--batch-size", "16", "--lr", "5e-4",
                "--lora-alpha", "16", "--lora-dropout", "0.1", "--max-steps", "3000", "--eval-every", "1000",
                "--save-every", "500", "--max-eval-samples", "2000", "--no-progress"],
    "none": [],
}
BUDGET_TASKS = {"tiny": "sst2,cola,mrpc,stsb", "roberta": "mnli,qqp,sst2", "none": None}
BUDGET_HELP = ("tiny: tiny random RoBERTa on the synthetic suite (OUT/data), 150 steps per run, minutes on a CPU; "
               "roberta: roberta-base, 3000 steps per run, eval on 2000 examples per split, hours on one GPU; "
               "none: only train's defaults and your options")


def add_sweep_parser(sub):
    """The ``sweep`` subcommand's parser (unknown options are passed to every train run)."""
    s = sub.add_parser("sweep", allow_abbrev=False, help="a grid of train runs (resumable), compared at the end",
                       description="Run a grid of methods x seeds x ranks x granularities (x aggregators) one "
                                   "after another or in worker processes; finished runs are skipped, interrupted "
                                   "ones resumed; writes OUT/comparison.md and its plots. Options not listed "
                                   "here (or after --) are passed to every train run.")
    s.add_argument("--out", default="runs/sweep", help="sweep directory (default: %(default)s)")
    s.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="paper-checks: single/joint/ortho, seeds 0,1,2, ranks 4,8,16, granularities ab,global "
                        "(grid options given explicitly override it)")
    s.add_argument("--budget", default="tiny", choices=sorted(BUDGETS), help=BUDGET_HELP + " (default: %(default)s)")
    s.add_argument("--tasks", default=None, help="comma-separated tasks (default: the budget's: tiny "
                   f"{BUDGET_TASKS['tiny']}, roberta {BUDGET_TASKS['roberta']}, none train's default)")
    s.add_argument("--methods", default=None, help="comma-separated methods (default: joint,ortho)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0)")
    s.add_argument("--ranks", default=None, help="comma-separated LoRA ranks (default: 8)")
    s.add_argument("--granularities", default=None,
                   help="comma-separated projection granularities for the methods that take --granularity "
                        "(default: ab)")
    s.add_argument("--aggregators", default=None,
                   help="comma-separated --aggregator values for the methods that take it (only when the "
                        "installed train has an --aggregator option)")
    s.add_argument("--workers", type=int, default=1,
                   help="runs at a time: 1 = one after another in this process; N > 1 = N child processes "
                        "(default: %(default)s)")
    s.add_argument("--n-train", type=int, default=2000, help="budget tiny: synthetic training rows per task "
                   "(default: %(default)s)")
    s.add_argument("--n-dev", type=int, default=400, help="budget tiny: synthetic dev rows per task "
                   "(default: %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="print the runs (and what would be skipped), run nothing")
    return s


def _csv(s, what, cast=str):
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    try:
        return [cast(x) for x in items]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated {cast.__name__} values, got {s!r}") from None


def train_has_option(flag: str) -> bool:
    """Does the installed ``train`` subcommand take ``flag`` (e.g. ``--aggregator``)?"""
    return flag in train_option_strings()


class Run:
    """One grid point: its name, directory and train arguments."""

    def __init__(self, name, out, argv):
        self.name, self.out, self.argv = name, out, argv

    def config(self):
        """The resolved :class:`TrainConfig` of this run (options checked; ValueError if bad)."""
        from .train import validate

        try:
            a = train_parser().parse_args(self.argv)
        except CliError as e:
            raise ValueError(f"{self.name}: train {e}") from None
        except SystemExit:
            raise ValueError(f"{self.name}: bad train options") from None
        cfg = config_from_args(a)
        validate(cfg)
        return cfg


def plan(a, extra):
    """The list of :class:`Run` of the grid (ValueError for bad grid values)."""
    from .methods import get_method

    preset = PRESETS.get(a.preset, {})
    methods = _csv(a.methods or preset.get("methods", "joint,ortho"), "methods")
    seeds = _csv(a.seeds or preset.get("seeds", "0"), "seeds", int)
    ranks = _csv(a.ranks or preset.get("ranks", "8"), "ranks", int)
    grans = _csv(a.granularities or preset.get("granularities", "ab"), "granularities")
    bad = [g for g in grans if g not in ("global", "ab", "layer", "matrix")]
    if bad:
        raise ValueError(f"--granularities: {bad[0]!r} is not one of global, ab, layer, matrix")
    aggs = [None]
    if a.aggregators:
        if not train_has_option("--aggregator"):
            raise ValueError("--aggregators: this version's train has no --aggregator option")
        aggs = _csv(a.aggregators, "aggregators")
    if a.workers < 1:
        raise ValueError("--workers must be >= 1")
    for m in methods:
        get_method(m)          # ValueError naming the known methods
    base = list(BUDGETS[a.budget])
    tasks = a.tasks or BUDGET_TASKS[a.budget]
    if tasks:
        base += ["--tasks", tasks]
    if a.budget == "tiny":
        from .data import SYNTHETIC_TASKS
        from .tasks import parse_tasks

        bad = [t.name for t in parse_tasks(tasks) if t.name not in SYNTHETIC_TASKS]
        if bad:
            raise ValueError(f"--budget tiny: no synthetic version of {', '.join(bad)} "
                             f"(synthetic tasks: {', '.join(SYNTHETIC_TASKS)})")
        base += ["--data-dir", os.path.join(a.out, "data")]
    runs = []
    for m in methods:
        opts = get_method(m).options
        # joint logs its conflicts (at the first granularity; its update stays the plain sum)
        # instead of running once per granularity
        logs = "log_conflicts" in opts
        for r in ranks:
            for g in (grans[:1] if logs else grans) if "granularity" in opts else [None]:
                for agg in (aggs if "aggregator" in opts else [None]):
                    for s in seeds:
                        argv = base + ["--method", m, "--lora-r", str(r), "--seed", str(s)]
                        name = m
                        if g is not None:
                            argv += (["--log-conflicts"] if logs else []) + ["--granularity", g]
                            name += "" if logs else f"-{g}"
                        if agg is not None:
                            argv += ["--aggregator", agg]
                            name += f"-{agg}"
                        name += f"-r{r}-s{s}"
                        out = os.path.join(a.out, "runs", name)
                        runs.append(Run(name, out, argv + list(extra) + ["--out", out]))
    return runs


def _state(run, cfg) -> str:
    """``finished`` | ``resume`` | ``new``; ValueError when the directory holds a finished run
    of other options."""
    from . import checkpoint as ckpt
    from .intervals import IGNORED
    from .report import load_config

    res_path = os.path.join(run.out, "results.json")
    if os.path.isfile(res_path):
        with open(res_path, encoding="utf-8") as f:
            try:
                finished = bool(json.load(f).get("finished"))
            except json.JSONDecodeError:
                finished = False
        if finished:
            saved = load_config(run.out) or {}
            mine = cfg.to_dict()
            diff = [k for k in mine if k not in IGNORED and k in saved and saved[k] != mine[k]]
            if diff:
                raise ValueError(f"{run.out} holds a finished run with other options ({', '.join(diff)}); "
                                 "use another --out or remove it")
            return "finished"
    return "resume" if os.path.isfile(os.path.join(run.out, ckpt.LATEST)) else "new"


def _run_inline(run, resume):
    from .train import Stopped, train

    a = train_parser().parse_args([*run.argv, *(["--resume"] if resume else [])])
    try:
        train(config_from_args(a))
    except Stopped as e:
        return f"stopped after step {e.args[0]}"
    return "done"


def _run_child(run, resume):
    os.makedirs(run.out, exist_ok=True)
    cmd = [sys.executable, "-m", "ortholora_kernels.glue", "train", *run.argv, *(["--resume"] if resume else [])]
    with open(os.path.join(run.out, "train.log"), "a", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        return f"FAILED (exit {r.returncode}, see {os.path.join(run.out, 'train.log')})"
    res = os.path.join(run.out, "results.json")
    with open(res, encoding="utf-8") as f:
        return "done" if json.load(f).get("finished") else "stopped (resume by re-running the sweep)"


def cmd_sweep(a, extra):
    """``sweep``: plan the grid, check every run's options, run what is not finished, compare."""
    from .report import comparison_table, load_groups, write_comparison_plots

    extra = list(extra)
    if "--" in extra:
        extra.remove("--")
    for bad in ("--out", "--resume", "--method", "--seed", "--lora-r", "--granularity", "--aggregator"):
        if bad in extra:
            raise CliError(f"sweep: {bad} is set by the sweep (use its grid options / --out)")
    try:
        runs = plan(a, extra)
        configs = [r.config() for r in runs]
        states = [_state(r, c) for r, c in zip(runs, configs)]
    except ValueError as e:
        raise CliError(f"sweep: {e}") from None
    todo = [(r, s == "resume") for r, s in zip(runs, states) if s != "finished"]
    print(f"sweep: {len(runs)} runs in {a.out}/runs: {states.count('finished')} finished (skipped), "
          f"{states.count('resume')} to resume, {states.count('new')} new; budget {a.budget}, "
          f"workers {a.workers}", flush=True)
    if a.dry_run:
        for r, s in zip(runs, states):
            print(f"  [{s}] train {shlex.join(r.argv)}")
        return 0
    if a.budget == "tiny" and todo:
        from .data import write_synthetic_suite

        data = os.path.join(a.out, "data")
        tasks = configs[0].tasks
        if not all(os.path.isdir(os.path.join(data, d)) for d in _task_dirs(tasks)):
            write_synthetic_suite(data, n_train=a.n_train, n_dev=a.n_dev, seed=0, tasks=tasks)
    t0 = time.perf_counter()
    failed = []

    def report(i, run, status):
        print(f"[{i}/{len(todo)}] {run.name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if status.startswith("FAILED"):
            failed.append(run.name)

    if a.workers == 1:
        for i, (run, resume) in enumerate(todo, 1):
            report(i, run, _run_inline(run, resume))
    else:
        with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
            futs = {pool.submit(_run_child, run, resume): run for run, resume in todo}
            for i, f in enumerate(concurrent.futures.as_completed(futs), 1):
                report(i, futs[f], f.result())
    done = [r.out for r in runs if _finished(r.out)]
    if not done:
        print("sweep: no finished run to compare yet", flush=True)
        return 1 if failed else 0
    groups = load_groups(done)
    table = comparison_table(groups)
    from .checkpoint import atomic_write_text

    path = os.path.join(a.out, "comparison.md")
    atomic_write_text(path, table)
    plots = write_comparison_plots(groups, os.path.splitext(path)[0])
    print(table, end="")
    print(f"sweep: {len(done)}/{len(runs)} runs finished; table {path}; plots {', '.join(plots)}")
    if failed:
        print(f"sweep: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _finished(run_dir):
    p = os.path.join(run_dir, "results.json")
    if not os.path.isfile(p):
        return False
    with open(p, encoding="utf-8") as f:
        try:
            return bool(json.load(f).get("finished"))
        except json.JSONDecodeError:
            return False


def _task_dirs(tasks):
    from .tasks import get_task

    return [get_task(t).dir_name for t in tasks]


__all__ = ["add_sweep_parser", "cmd_sweep", "plan", "train_has_option", "PRESETS", "BUDGETS"]
