"""Run reports: results.json, conflict log, markdown tables and PNG plots.

Files in a run directory::

    config.json         the resolved configuration
    results.json        every evaluation ({"evals": [...]}) and the final metrics/score
    conflicts.jsonl     per step and segment: fraction of task pairs in conflict (dot < 0),
                        mean pairwise cosine, fraction of ordered pairs actually projected
                        (ortho runs)
    cosine.json         mean task x task gradient cosine per segment (ortho runs)
    plots/learning_curves.png, plots/conflicts.png, plots/cosine_heatmap.png
    summary.md          the table of this run (``compare`` writes a table of several runs)

Tables show the per-task metrics x100, the GLUE average and, for runs that record them,
the trainable parameter counts: ``adapter params`` (LoRA/MTL-LoRA/LoRI adapter scalars
that train, summed over separately trained adapters: single and lori-merge count T
adapters; LoRI counts only the kept B entries of its final LoRI-S stage, A is frozen) and
``head params`` (all task heads).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from .checkpoint import atomic_write_json, atomic_write_text
from .data import DataError
from .intervals import group_runs, mean_curves, paired_differences, t_interval, tasks_of
from .metrics import glue_score, task_score
from .tasks import get_task

RESULTS = "results.json"
CONFLICTS = "conflicts.jsonl"


class ConflictLog:
    """Per-step projection statistics, kept on the device and flushed every ``flush_every``.

    ``append`` only stacks device tensors (no host sync); ``flush`` moves the pending
    steps to the host in one transfer and appends JSON lines. The mean task x task cosine
    matrix is accumulated on the device as well.
    """

    def __init__(self, path: str, flush_every: int = 50):
        self.path = path
        self.flush_every = max(1, flush_every)
        self.pending = []   # (step, tensor [2, S])
        self.cos_sum = None
        self.cos_count = 0

    def append(self, step: int, stats) -> None:
        """Add one step's projection statistics (device tensors, no host sync); None is ignored."""
        if stats is None:
            return
        cf = _get(stats, "conflict_fraction")
        mc = _get(stats, "mean_cosine")
        if cf is None or mc is None:
            return
        pf = _get(stats, "projection_fraction")
        pf = torch.full_like(cf, float("nan"), dtype=torch.float32) if pf is None else pf
        self.pending.append((step, torch.stack([cf.detach().float(), mc.detach().float(), pf.detach().float()])))
        cos = _get(stats, "cosine")
        if cos is not None:
            cos = cos.detach().double()
            # after a resume the restored sum is on the CPU while the statistics are on the device
            self.cos_sum = cos if self.cos_sum is None else self.cos_sum.to(cos.device) + cos
            self.cos_count += 1
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the pending steps as JSON lines (one device-to-host transfer)."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        vals = torch.stack([v for _, v in self.pending]).cpu().tolist()   # one transfer
        self.pending = []
        with open(self.path, "a", encoding="utf-8") as f:
            for step, (cf, mc, pf) in zip(steps, vals):
                for seg, (a, b, c) in enumerate(zip(cf, mc, pf)):
                    f.write(json.dumps({"step": step, "segment": seg, "conflict_fraction": round(a, 6),
                                        "mean_cosine": round(b, 6), "projection_fraction": round(c, 6)}) + "\n")

    def mean_cosine_matrix(self):
        """Mean task x task cosine per segment over the logged steps (nested lists), or None."""
        if self.cos_sum is None:
            return None
        return (self.cos_sum / self.cos_count).cpu().tolist()

    def state_dict(self):
        """The cosine accumulators (CPU) for a checkpoint."""
        return {"cos_sum": None if self.cos_sum is None else self.cos_sum.cpu(), "cos_count": self.cos_count}

    def load_state_dict(self, s, step: int):
        """Restore the accumulators and drop logged rows after ``step`` (written after the checkpoint)."""
        self.cos_sum, self.cos_count = s.get("cos_sum"), s.get("cos_count", 0)
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(self.path, "".join(keep))


def _get(stats, name):
    if isinstance(stats, dict):
        return stats.get(name)
    try:
        return getattr(stats, name)
    except AttributeError:
        return None


def conflict_summary(run_dir: str) -> str | None:
    """One line: mean conflict fraction and mean cosine per segment over all logged steps."""
    rows = read_conflicts(os.path.join(run_dir, CONFLICTS))
    if not rows:
        return None
    names = []
    cos_path = os.path.join(run_dir, "cosine.json")
    if os.path.isfile(cos_path):
        with open(cos_path, encoding="utf-8") as f:
            names = json.load(f).get("segments") or []
    parts = []
    for s in sorted({r["segment"] for r in rows}):
        seg = [r for r in rows if r["segment"] == s]
        label = _short_segment(names[s]) if s < len(names) else f"segment {s}"
        parts.append(f"{label}: {np.mean([r['conflict_fraction'] for r in seg]):.2f} conflicting pairs, "
                     f"mean cosine {np.mean([r['mean_cosine'] for r in seg]):+.3f}")
    return "; ".join(parts)


def read_conflicts(path):
    """The rows of a ``conflicts.jsonl`` file ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# ----------------------------------------------------------------------------- results

def final_metrics(evals: list) -> dict:
    """``{task: metrics}`` of the last evaluation of every task."""
    last = {}
    for e in evals:
        if last.get(e["task"], {"step": -1})["step"] <= e["step"]:
            last[e["task"]] = e
    return {t: e["metrics"] for t, e in last.items()}


def write_results(run_dir: str, cfg: dict, evals: list, extra: dict | None = None) -> dict:
    """Write ``results.json`` (evaluations, final metrics, task scores, GLUE average); return it."""
    final = final_metrics(evals)
    res = {"method": cfg.get("method"), "tasks": cfg.get("tasks"), "evals": evals,
           "final": final, "task_scores": {t: task_score(t, m) for t, m in final.items()},
           "glue_score": glue_score(final) if final else None}
    if extra:
        res.update(extra)
    atomic_write_json(os.path.join(run_dir, RESULTS), res)
    return res


def load_results(run_dir: str) -> dict:
    """``results.json`` of a run directory (FileNotFoundError / DataError when missing or corrupt)."""
    p = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{run_dir}: no {RESULTS} (not a finished run directory?)")
    with open(p, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not a results file ({e})") from None


def _metric_cell(task, metrics):
    t = get_task(task)
    vals = [100 * metrics[k] for k in t.metric_names()]
    return "/".join(f"{v:.1f}" for v in vals)


def markdown_table(runs: list) -> str:
    """Tasks x runs: per-task metrics (``acc/F1`` etc.) and the GLUE average.

    ``runs``: list of (label, results dict).
    """
    tasks = []
    for _, r in runs:
        for t in r["final"]:
            if t not in tasks:
                tasks.append(t)
    counts = any(r.get("params") for _, r in runs)
    head = ["method"] + [_task_header(t) for t in tasks] + ["avg"]
    if counts:   # trainable scalars: adapter(s) and task heads apart (see results.json "params")
        head += ["adapter params", "head params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, r in runs:
        cells = [label]
        for t in tasks:
            cells.append(_metric_cell(t, r["final"][t]) if t in r["final"] else "-")
        cells.append(f"{r['glue_score']:.1f}" if r.get("glue_score") is not None else "-")
        if counts:
            p = r.get("params") or {}
            cells += [f"{p['adapter']:,}" if "adapter" in p else "-", f"{p['heads']:,}" if "heads" in p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _task_header(task):
    t = get_task(task)
    short = {"matthews_correlation": "mcc", "accuracy": "acc", "f1": "F1", "pearson": "P", "spearmanr": "S",
             "accuracy_m": "m", "accuracy_mm": "mm"}
    return f"{t.name} ({'/'.join(short.get(k, k) for k in t.metric_names())})"


def run_label(run_dir: str, res: dict, cfg: dict | None) -> str:
    """The name of a run in tables and plots (method, granularity, options)."""
    label = res.get("method") or os.path.basename(os.path.normpath(run_dir))
    cfg = cfg or {}
    if cfg.get("method") == "ortho":
        label += f" ({cfg.get('granularity') or 'ab'})"
    if cfg.get("method") == "lori" and cfg.get("lori_mode") == "joint":
        label = "lori-joint"
    if cfg.get("method") == "lori" and cfg.get("lori_mode") == "continual":
        label = "lori-continual"
    if cfg.get("method") == "lori" and cfg.get("lori_shared_a"):
        label += " (shared A)"
    if cfg.get("method") in ("mtl-lora", "lori") and cfg.get("projection") not in (None, "none"):
        label += f"+ortho ({cfg['projection']}, {cfg.get('collect') or 'grouped'})"
    return label


def load_config(run_dir):
    """``config.json`` of a run directory, or None when there is none."""
    p = os.path.join(run_dir, "config.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: not a config file ({e})") from None
    return None


def load_groups(run_dirs) -> list:
    """The finished runs in ``run_dirs`` grouped by configuration (runs differing only in seed
    form one :class:`~.intervals.Group`)."""
    runs, seen = [], set()
    for d in run_dirs:
        if os.path.realpath(d) in seen:   # the same directory twice is one run
            continue
        seen.add(os.path.realpath(d))
        res = load_results(d)
        cfg = load_config(d)
        runs.append((run_label(d, res, cfg), res, cfg, d))
    return group_runs(runs)


def comparison_table(groups) -> str:
    """One row per run when every configuration has one run (seeds not repeated); otherwise
    mean ± 95% t interval over seeds per configuration and the paired differences."""
    if all(len(g.runs) == 1 for g in groups):
        return markdown_table([(g.label, g.runs[0][1]) for g in groups]) + conflict_table(groups)
    return seed_table(groups)


def compare(run_dirs, out=None) -> str:
    """Markdown table of the runs in ``run_dirs`` (also written to ``out`` if given); runs
    that differ only in seed are summarised by their mean and 95% interval."""
    table = comparison_table(load_groups(run_dirs))
    if out:
        atomic_write_text(out, table)
    return table


def write_comparison_plots(groups, base: str) -> list:
    """``<base>_curves.png`` (learning curves; the mean over seeds per configuration) and,
    when some configuration has several seeds, ``<base>_seeds.png`` (means and paired
    differences with 95% error bars). Returns the paths."""
    seeded = any(len(g.runs) > 1 for g in groups)
    runs = [(g.label + (f" (mean of {len(g.runs)})" if len(g.runs) > 1 else ""),
             mean_curves(g) if len(g.runs) > 1 else g.runs[0][1]) for g in groups]
    paths = [base + "_curves.png"]
    plot_learning_curves(runs, paths[0])
    if seeded:
        paths.append(base + "_seeds.png")
        plot_seed_intervals(groups, paths[1])
    return paths


# ----------------------------------------------------------------------------- over seeds

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
    tasks = tasks_of(groups)
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
    return "\n".join(lines) + "\n" + conflict_table(groups)


def conflict_rows(groups) -> list:
    """``[(group, conflicting, projected)]``: per configuration, the mean fraction of task pairs
    whose gradients conflict per step, and the mean fraction of ordered pairs the method
    projected per step (over the steps and segments of each run's conflicts.jsonl), each as
    ``(mean, half, n)`` over the seeds. ``projected`` is None when no run logged it (joint
    ``--log-conflicts`` projects nothing). The two differ when conflicts are detected on a
    smoothed Gram (``--aggregator-ema``) or by a method other than PCGrad."""
    out = []
    for g in groups:
        conflicting, projected = [], []
        for _, _, d in g.runs:
            rows = read_conflicts(os.path.join(d, CONFLICTS)) if d else []
            if rows:
                conflicting.append(float(np.mean([r["conflict_fraction"] for r in rows])))
                pf = [r["projection_fraction"] for r in rows if r.get("projection_fraction") is not None
                      and r["projection_fraction"] == r["projection_fraction"]]
                if pf:
                    projected.append(float(np.mean(pf)))
        if conflicting:
            out.append((g, t_interval(conflicting), t_interval(projected) if projected else None))
    return out




def _share(cell) -> str:
    if cell is None:
        return "-"
    m, h, n = cell
    return f"{m:.3f}" + (f" ± {h:.3f}" if n > 1 and h == h else "")


def conflict_table(groups) -> str:
    """Markdown (with a blank line before it), or "" when no run logged its conflicts: per
    configuration the share of task pairs that conflict and the share the method projected."""
    conf = conflict_rows(groups)
    if not conf:
        return ""
    lines = ["", "Task-gradient conflicts (runs that log them: ortho, joint --log-conflicts, the seed methods with "
             "--projection), per step, mean over steps and segments (then mean ± 95% t half-width over seeds): "
             "conflicting = fraction of task pairs with a negative inner product; projected = fraction of "
             "ordered pairs the method projected (fewer than the conflicting ones when conflicts are detected "
             "on a smoothed Gram, --aggregator-ema; '-' for runs that project nothing).", "",
             "| method | n | conflicting pairs | projected pairs |", "|---|---|---|---|"]
    for g, conflicting, projected in conf:
        lines.append(f"| {g.label} | {conflicting[2]} | {_share(conflicting)} | {_share(projected)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(runs, path: str) -> None:
    """One panel per task: task score (mean of its metrics, x100) over steps, one line per run."""
    plt = _plt()
    tasks = []
    for _, r in runs:
        for e in r["evals"]:
            if e["task"] not in tasks:
                tasks.append(e["task"])
    if not tasks:
        return
    n = len(tasks)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for label, r in runs:
            pts = sorted((e["step"], e["score"]) for e in r["evals"] if e["task"] == task)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_title(_task_header(task))
        ax.set_xlabel("step")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_conflicts(rows, path: str, labels=None, smooth: int = 10) -> None:
    """Conflict fraction per segment over steps (moving average over ``smooth`` steps)."""
    plt = _plt()
    if not rows:
        return
    segs = sorted({r["segment"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in segs:
        pts = sorted((r["step"], r["conflict_fraction"]) for r in rows if r["segment"] == s)
        x, y = np.array(pts).T
        if len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        name = labels[s] if labels and s < len(labels) else f"segment {s}"
        ax.plot(x, y, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("conflicting task pairs (fraction)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cosine_heatmap(cos, tasks, path: str, labels=None) -> None:
    """Mean task x task gradient cosine, one panel per segment."""
    plt = _plt()
    if cos is None:
        return
    cos = np.asarray(cos)
    s = cos.shape[0]
    fig, axes = plt.subplots(1, s, figsize=(3.6 * s + 0.8, 3.4), squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        im = ax.imshow(cos[k], vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{cos[k, i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(labels[k] if labels and k < len(labels) else f"segment {k}", fontsize=9)
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def segment_labels(granularity, num_segments):
    """Readable labels of the projection segments of ``granularity``."""
    if granularity == "ab" and num_segments == 2:
        return ["A", "B"]
    if granularity == "global":
        return ["all LoRA"]
    return [f"segment {i}" for i in range(num_segments)]


def _short_segment(name: str) -> str:
    """Short plot labels: ``A:...layer.0`` -> ``A:L0``, ``...layer.1...value.lora_B...`` -> ``L1.value.B``."""
    import re

    name = str(name)
    side = ""
    if ":" in name:
        side, name = name.split(":", 1)
        side += ":"
    m = re.search(r"\.(\d+)\..*?(\w+)\.lora_(?:embedding_)?(A|B)\b", name)
    if m:
        return f"{side}L{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.search(r"\.(\d+)$", name)
    if m:
        return f"{side}L{m.group(1)}"
    return side + name


def write_run_plots(run_dir: str, res: dict, cfg: dict) -> list:
    """Learning curves and, where logged, conflict and cosine plots in ``<run_dir>/plots``; returns the paths."""
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    out = []
    p = os.path.join(run_dir, "plots", "learning_curves.png")
    plot_learning_curves([(cfg.get("method", "run"), res)], p)
    out.append(p)
    rows = read_conflicts(os.path.join(run_dir, CONFLICTS))
    if rows:
        nseg = max(r["segment"] for r in rows) + 1
        labels = segment_labels(cfg.get("granularity") or cfg.get("projection"), nseg)
        cos_path = os.path.join(run_dir, "cosine.json")
        if os.path.isfile(cos_path):
            with open(cos_path, encoding="utf-8") as f:
                names = json.load(f).get("segments") or []
            if len(names) == nseg:
                labels = [_short_segment(n) for n in names]
        p = os.path.join(run_dir, "plots", "conflicts.png")
        plot_conflicts(rows, p, labels)
        out.append(p)
        cos_path = os.path.join(run_dir, "cosine.json")
        if os.path.isfile(cos_path):
            with open(cos_path, encoding="utf-8") as f:
                cos = json.load(f)["mean_cosine"]
            p = os.path.join(run_dir, "plots", "cosine_heatmap.png")
            plot_cosine_heatmap(cos, cfg["tasks"], p, labels)
            out.append(p)
    return out


def plot_seed_intervals(groups, path: str) -> None:
    """Error-bar plot: per task and for the average, every configuration's mean with its 95%
    t interval; below, the paired differences with theirs (and the zero line)."""
    plt = _plt()
    tasks = tasks_of(groups) + [None]
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
