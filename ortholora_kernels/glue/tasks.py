"""GLUE task specifications: names, file layout, columns, labels and metrics.

One :class:`TaskSpec` per task says everything the loaders, the model and the metrics need:
where the original GLUE TSV files keep the text and the label (column indices, header or
not), the Hugging Face hub configuration (``nyu-mll/glue``), the label names in the hub's
order (TSV labels are mapped to the same ids), and which metrics are the official ones.

The GLUE average (see :func:`ortholora_kernels.glue.metrics.glue_score`) takes, for every
task, the mean of its official metrics (x100), then the mean over tasks:
CoLA: Matthews corr.; SST-2, QNLI, RTE, WNLI: accuracy; MRPC, QQP: mean of accuracy and
F1; STS-B: mean of Pearson and Spearman; MNLI: mean of matched and mismatched accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split: its TSV file stem, hub split name and metric-name suffix."""

    file: str       # e.g. "dev" or "dev_matched"
    hub: str        # e.g. "validation" or "validation_matched"
    suffix: str     # "" or "_m" / "_mm": appended to metric names (MNLI)


@dataclass(frozen=True)
class TaskSpec:
    """Everything about one GLUE task: TSV columns, header, labels, hub names, metrics, splits."""
    name: str                    # cli name: "cola"
    dir_name: str                # GLUE folder: "CoLA"
    hub_config: str              # nyu-mll/glue configuration: "cola"
    text_cols: tuple             # TSV column indices of sentence(s) (negative from the end)
    label_col: int               # TSV column index of the label
    header: bool                 # train/dev TSV files have a header row
    labels: tuple | None         # label names in hub id order; None = regression
    hub_text: tuple              # hub column names of sentence(s)
    metrics: tuple               # official metric names (before split suffix)
    eval_splits: tuple = (EvalSplit("dev", "validation", ""),)
    expected_cols: int | None = None  # rows with fewer columns are malformed and skipped (QQP)

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a score, no label names)."""
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of model outputs (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        """Does an example have two texts?"""
        return len(self.text_cols) == 2

    def metric_names(self) -> list[str]:
        """Every metric key this task reports (``accuracy_m`` etc. for MNLI)."""
        return [m + s.suffix for s in self.eval_splits for m in self.metrics]


_BIN = ("0", "1")
_ENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", "cola", (3,), 1, False, _BIN, ("sentence",), ("matthews_correlation",)),
    "sst2": TaskSpec("sst2", "SST-2", "sst2", (0,), 1, True, _BIN, ("sentence",), ("accuracy",)),
    "mrpc": TaskSpec("mrpc", "MRPC", "mrpc", (3, 4), 0, True, _BIN, ("sentence1", "sentence2"),
                     ("accuracy", "f1")),
    "stsb": TaskSpec("stsb", "STS-B", "stsb", (7, 8), -1, True, None, ("sentence1", "sentence2"),
                     ("pearson", "spearmanr")),
    "qqp": TaskSpec("qqp", "QQP", "qqp", (3, 4), 5, True, _BIN, ("question1", "question2"),
                    ("accuracy", "f1"), expected_cols=6),
    "mnli": TaskSpec("mnli", "MNLI", "mnli", (8, 9), -1, True, ("entailment", "neutral", "contradiction"),
                     ("premise", "hypothesis"), ("accuracy",),
                     eval_splits=(EvalSplit("dev_matched", "validation_matched", "_m"),
                                  EvalSplit("dev_mismatched", "validation_mismatched", "_mm"))),
    "qnli": TaskSpec("qnli", "QNLI", "qnli", (1, 2), -1, True, _ENT, ("question", "sentence"), ("accuracy",)),
    "rte": TaskSpec("rte", "RTE", "rte", (1, 2), -1, True, _ENT, ("sentence1", "sentence2"), ("accuracy",)),
    "wnli": TaskSpec("wnli", "WNLI", "wnli", (1, 2), -1, True, _BIN, ("sentence1", "sentence2"), ("accuracy",)),
}

ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}

#: default task list of the paper-style run (all 8 GLUE tasks except WNLI)
PAPER_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


class UnknownTaskError(ValueError):
    """A task name that is not a GLUE task (a user mistake)."""
    pass


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a task name (case-insensitive; aliases such as ``sst-2``)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    try:
        return TASKS[key]
    except KeyError:
        raise UnknownTaskError(f"unknown GLUE task {name!r} (known: {', '.join(TASKS)})") from None


def parse_tasks(spec) -> list[TaskSpec]:
    """``"cola,sst2"`` or a list of names -> task specs (order kept, duplicates refused)."""
    names = [n for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise UnknownTaskError("no task given")
    out = [get_task(n) for n in names]
    seen = set()
    for t in out:
        if t.name in seen:
            raise UnknownTaskError(f"task {t.name!r} given twice")
        seen.add(t.name)
    return out
