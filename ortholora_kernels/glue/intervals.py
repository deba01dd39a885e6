"""Runs grouped over seeds: mean and 95% Student-t interval, paired differences, plots.

Two runs belong to one *configuration* when their ``config.json`` differ only in the seed
(and in fields that do not change what is trained: output paths, progress bars, logging and
checkpoint periods, threads). Per configuration and task the table shows the mean task score
over the seeds and the half-width of its 95% Student-t interval,
``t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation, ``n`` the number of
seeds, shown); the GLUE average is treated the same way (its per-seed values).

Paired differences: two configurations that differ only in the method and its options
(``method``, ``granularity``, ``collect``, ``backend``, ...) are compared seed by seed over
the seeds both have (e.g. ``ortho (ab) - joint`` at the same rank): the mean difference and
its 95% t interval over those seeds. Pairing removes the variation shared by both methods at
one seed (data order, initialisation), so the paired interval is usually narrower than the
two separate ones. An interval that excludes 0 is marked ``*``.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .metrics import task_score

#: config fields that do not change what is trained (ignored when grouping runs)
IGNORED = ("seed", "out", "data_dir", "cache_dir", "resume", "stop_after_steps", "progress", "plots", "threads",
           "log_every", "save_every", "eval_every", "resolved")
#: config fields that belong to the method (configurations differing only in these are paired),
#: besides the registry's method-specific options (:data:`.methods.METHOD_OPTIONS`) and any
#: ``mtl_*`` / ``lori_*`` field
METHOD_FIELDS = ("method", "granularity", "collect", "backend", "log_conflicts", "projection", "aggregator")


def is_method_field(name: str) -> bool:
    """Does config field ``name`` belong to the method (not to the shared setting)?"""
    from .methods import METHOD_OPTIONS

    return name in METHOD_FIELDS or name in METHOD_OPTIONS or name.startswith(("mtl_", "lori_"))
#: short names of the fields that tell configurations apart in labels
SHORT = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "max_steps": "steps",
         "batch_size": "bs", "lr": "lr", "tasks": "tasks", "model": "model"}


def t_interval(values, confidence: float = 0.95):
    """``(mean, half_width, n)`` of the Student-t interval of the mean (half-width NaN for n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan"), 1
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _scores(res) -> dict:
    """``{task: score}`` of a results dict (the stored task scores, else from the final metrics)."""
    s = res.get("task_scores")
    if s:
        return dict(s)
    return {t: task_score(t, m) for t, m in res.get("final", {}).items()}


class Group:
    """The runs of one configuration (differing only in seed)."""

    def __init__(self, label, cfg):
        self.label = label
        self.cfg = cfg or {}
        self.runs = []          # (seed, results dict, run dir)
        self.duplicates = []    # run dirs of a seed already in runs (left out)

    @property
    def seeds(self):
        """Seeds of the runs, in order."""
        return [s for s, _, _ in self.runs]

    def values(self, task=None) -> dict:
        """``{seed: score}`` of ``task`` (or of the GLUE average when None)."""
        out = {}
        for seed, res, _ in self.runs:
            v = res.get("glue_score") if task is None else _scores(res).get(task)
            if v is not None:
                out[seed] = float(v)
        return out


def group_runs(runs) -> list:
    """Group ``[(label, results, config, run_dir)]`` by configuration (seed ignored).

    Runs without a config.json form a group of their own. The label of a group is the run
    label plus the fields (rank, granularity...) that tell it apart from the other groups."""
    groups, by_key = [], {}
    for i, (label, res, cfg, d) in enumerate(runs):
        key = ("_nocfg", i) if cfg is None else _freeze({k: v for k, v in cfg.items() if k not in IGNORED})
        g = by_key.get(key)
        if g is None:
            g = by_key[key] = Group(label, cfg)
            groups.append(g)
        seed = (cfg or {}).get("seed", len(g.runs))
        if seed in g.seeds:   # the same configuration and seed again: not a new sample
            g.duplicates.append(d)
            continue
        g.runs.append((seed, res, d))
    _distinguish(groups)
    return groups


def _distinguish(groups):
    """Append to labels the non-method fields that vary across groups (e.g. ``r=4``)."""
    cfgs = [g.cfg for g in groups if g.cfg]
    keys = sorted(k for k in {k for c in cfgs for k in c} - set(IGNORED) if not is_method_field(k))
    vary = [k for k in keys if len({_freeze(c.get(k)) for c in cfgs}) > 1]
    for g in groups:
        if not g.cfg:
            continue
        extra = []
        for k in vary:
            v = g.cfg.get(k)
            v = ",".join(map(str, v)) if isinstance(v, list) else v
            extra.append(f"{SHORT.get(k, k)}={v}")
        if extra:
            g.label = f"{g.label}, {', '.join(extra)}"
    # configurations the run label does not tell apart (e.g. two --aggregator values): add
    # the method options in which they differ
    by_label = {}
    for g in groups:
        if g.cfg:
            by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for g in same for k in g.cfg} - set(IGNORED))
        vary = [k for k in keys if len({_freeze(g.cfg.get(k)) for g in same}) > 1]
        for g in same:
            g.label += " [" + ", ".join(f"{k}={g.cfg.get(k)}" for k in vary) + "]"


def _context(cfg):
    return _freeze({k: v for k, v in (cfg or {}).items() if k not in IGNORED and not is_method_field(k)})


def _baseline_rank(g):
    m = g.cfg.get("method")
    return (0 if m == "joint" else 1 if m == "single" else 2,
            0 if g.cfg.get("granularity") == "global" else 1)


def paired_differences(groups) -> list:
    """``[(a, b, {task or None: (mean, half, n)})]``: ``a - b`` over their common seeds, for
    every two groups whose configurations differ only in method fields. ``b`` is the more
    basic one (joint, then single, then the others; global before finer granularities)."""
    out = []
    for i, gi in enumerate(groups):
        for gj in groups[i + 1:]:
            if not gi.cfg or not gj.cfg or _context(gi.cfg) != _context(gj.cfg):
                continue
            a, b = (gj, gi) if _baseline_rank(gi) <= _baseline_rank(gj) else (gi, gj)
            cells = {}
            for task in _tasks(groups) + [None]:
                va, vb = a.values(task), b.values(task)
                common = [s for s in va if s in vb]
                if common:
                    cells[task] = t_interval([va[s] - vb[s] for s in common])
            if cells:
                out.append((a, b, cells))
    # grouped by context (e.g. rank), the most basic B first: "- joint" rows, then "- single"...
    first = {}
    for k, g in enumerate(groups):
        first.setdefault(_context(g.cfg), k)
    pos = {id(g): k for k, g in enumerate(groups)}
    out.sort(key=lambda p: (first[_context(p[1].cfg)], _baseline_rank(p[1]), pos[id(p[1])], pos[id(p[0])]))
    return out


def _tasks(groups):
    tasks = []
    for g in groups:
        for _, res, _ in g.runs:
            for t in res.get("final", {}):
                if t not in tasks:
                    tasks.append(t)
    return tasks


def _cell(mean, half, n, signed=False, star=False):
    if n == 0:
        return "-"
    if mean != mean:   # a NaN score (e.g. a constant prediction's correlation) stays visible
        return "nan"
    m = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    if n < 2 or half != half:
        return m
    s = f"{m} ± {half:.1f}"
    if star and abs(mean) > half:
        s += " *"
    return s


def seed_table(groups) -> str:
    """Markdown: per configuration, mean ± 95% t half-width over seeds (n shown), then the
    paired differences."""
    from .report import _task_header

    tasks = _tasks(groups)
    counts = any(r.get("params") for g in groups for _, r, _ in g.runs)
    head = ["method", "n", "seeds"] + [_task_header(t) for t in tasks] + ["avg"]
    if counts:
        head += ["adapter params", "head params"]
    lines = ["Task scores (mean of the task's metrics x100): mean ± half-width of the 95% Student-t interval "
             "over n seeds.", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        cells = [g.label, str(len(g.runs)), ",".join(map(str, g.seeds))]
        for t in tasks + [None]:
            cells.append(_cell(*t_interval(list(g.values(t).values()))))
        if counts:
            p = g.runs[0][1].get("params") or {}
            cells += [f"{p['adapter']:,}" if "adapter" in p else "-", f"{p['heads']:,}" if "heads" in p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = paired_differences(groups)
    if pairs:
        head = ["A − B", "n"] + [_task_header(t) for t in tasks] + ["avg"]
        lines += ["", "Paired differences over the seeds both have (A − B per seed): mean ± half-width of the 95% "
                  "Student-t interval; * the interval excludes 0.", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for a, b, cells in pairs:
            n = max(c[2] for c in cells.values())
            row = [f"{a.label} − {b.label}", str(n)]
            for t in tasks + [None]:
                row.append(_cell(*cells[t], signed=True, star=True) if t in cells else "-")
            lines.append("| " + " | ".join(row) + " |")
    dup = [f"{d} (same configuration and seed as a run of {g.label})" for g in groups for d in g.duplicates]
    if dup:
        lines += ["", "Left out: " + "; ".join(dup)]
    conf = conflict_rows(groups)
    if conf:
        lines += ["", "Task-gradient conflicts (runs that log them: ortho, joint --log-conflicts): fraction of "
                  "task pairs with a negative inner product per step, mean over steps and segments, then mean ± "
                  "95% t half-width over seeds.", "", "| method | n | conflicting pairs |", "|---|---|---|"]
        for g, (m, h, n) in conf:
            lines.append(f"| {g.label} | {n} | {m:.3f}" + (f" ± {h:.3f}" if n > 1 else "") + " |")
    return "\n".join(lines) + "\n"


def conflict_rows(groups) -> list:
    """``[(group, (mean, half, n))]``: per configuration, the mean fraction of conflicting task
    pairs per step (over steps and segments of each run's conflicts.jsonl), over the seeds."""
    from .report import CONFLICTS, read_conflicts

    out = []
    for g in groups:
        vals = []
        for _, _, d in g.runs:
            rows = read_conflicts(os.path.join(d, CONFLICTS)) if d else []
            if rows:
                vals.append(float(np.mean([r["conflict_fraction"] for r in rows])))
        if vals:
            out.append((g, t_interval(vals)))
    return out


def mean_curves(group) -> dict:
    """A results-like dict whose evals are the per-(task, step) mean score over the seeds."""
    acc = {}
    for _, res, _ in group.runs:
        for e in res.get("evals", []):
            acc.setdefault((e["task"], e["step"]), []).append(e["score"])
    return {"evals": [{"task": t, "step": s, "score": float(np.mean(v))} for (t, s), v in acc.items()]}


def plot_seed_intervals(groups, path: str) -> None:
    """Error-bar plot: per task and for the average, every configuration's mean with its 95%
    t interval; below, the paired differences with theirs (and the zero line)."""
    from .report import _plt, _task_header

    plt = _plt()
    tasks = _tasks(groups) + [None]
    pairs = paired_differences(groups)
    nrow = 2 if pairs else 1
    ncol = len(tasks)
    sizes = [len(groups)] + ([len(pairs)] if pairs else [])
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(2.6 * ncol, 6), 1.2 * nrow + 0.28 * sum(sizes) + 0.6),
                             squeeze=False, gridspec_kw={"height_ratios": [max(n, 1.5) for n in sizes]})

    def panel(ax, rows, title, zero):
        y = np.arange(len(rows))
        for k, (label, (mean, half, n)) in enumerate(rows):
            ax.errorbar([mean], [k], xerr=None if half != half else [[half], [half]], fmt="o", capsize=3)
        ax.set_yticks(y, [label for label, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if zero:
            ax.axvline(0, color="k", lw=0.8)

    for c, t in enumerate(tasks):
        title = "avg" if t is None else _task_header(t)
        panel(axes[0][c], [(f"{g.label} (n={len(g.runs)})", t_interval(list(g.values(t).values())))
                           for g in groups], title, False)
        if c:
            axes[0][c].set_yticklabels([])
        if pairs:
            panel(axes[1][c], [(f"{a.label} − {b.label}", cells.get(t, (float("nan"), float("nan"), 0)))
                               for a, b, cells in pairs], title + ": A − B", True)
            if c:
                axes[1][c].set_yticklabels([])
    fig.suptitle("mean and 95% Student-t interval over seeds", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
