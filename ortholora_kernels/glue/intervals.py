"""Runs grouped over seeds: mean and 95% Student-t interval, paired differences.

Statistics only: reading run directories, tables and plots live in :mod:`.report`.

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
            for task in tasks_of(groups) + [None]:
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


def tasks_of(groups) -> list:
    """The tasks of every run of ``groups``, in order of first appearance."""
    tasks = []
    for g in groups:
        for _, res, _ in g.runs:
            for t in res.get("final", {}):
                if t not in tasks:
                    tasks.append(t)
    return tasks


def mean_curves(group) -> dict:
    """A results-like dict whose evals are the per-(task, step) mean score over the seeds."""
    acc = {}
    for _, res, _ in group.runs:
        for e in res.get("evals", []):
            acc.setdefault((e["task"], e["step"]), []).append(e["score"])
    return {"evals": [{"task": t, "step": s, "score": float(np.mean(v))} for (t, s), v in acc.items()]}
