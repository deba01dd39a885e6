"""GLUE data: the original TSV files, the hub dataset, and an offline synthetic suite.

* :func:`read_glue_tsv` parses one original GLUE TSV file exactly as the GLUE processors do:
  tab separated, ``csv.QUOTE_NONE`` (quotes are text, kept verbatim), UTF-8 with an
  optional BOM (MRPC's train header starts with one), header skipped where the file has one
  (CoLA train/dev have none), malformed rows skipped where the task allows (QQP).
* :func:`load_hub_split` reads the same split from ``nyu-mll/glue`` through ``datasets``.
* :func:`write_synthetic_suite` writes learnable, mildly conflicting synthetic tasks in the
  GLUE folder layout and file formats, so the very same TSV loader reads them.
* :class:`MultiTaskSampler` cycles through every task's training data independently, with a
  stateless, seeded order (epoch e of task t is ``permutation(seed, t, e)``): its state is
  two integers per task, which makes exact resume trivial.
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .tasks import TaskSpec

HUB_DATASET = "nyu-mll/glue"


class DataError(ValueError):
    """A user-facing data problem (missing file, bad format)."""


@dataclass
class Examples:
    """Parallel lists: ``text_a``, ``text_b`` (None for single-sentence tasks), ``labels``."""

    text_a: list
    text_b: list | None
    labels: list

    def __len__(self):
        return len(self.text_a)

    def subset(self, idx) -> "Examples":
        """The examples at the indices ``idx``, in that order."""
        return Examples([self.text_a[i] for i in idx],
                        None if self.text_b is None else [self.text_b[i] for i in idx],
                        [self.labels[i] for i in idx])


# ----------------------------------------------------------------------------- TSV files

def read_tsv_rows(path: str) -> list[list[str]]:
    """Every row of a GLUE TSV file as read by the original processors (QUOTE_NONE)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def tsv_path(data_dir: str, task: TaskSpec, split_file: str) -> str:
    """``<data_dir>/<task dir>/<split_file>.tsv`` (the original GLUE layout)."""
    return os.path.join(data_dir, task.dir_name, f"{split_file}.tsv")


def label_id(task: TaskSpec, raw: str):
    """The label of a TSV cell: a float score (STS-B) or the index of the label name."""
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{task.name}: unexpected score {raw!r} (expected a number)") from None
    try:
        return task.labels.index(raw.strip())
    except ValueError:
        raise DataError(f"{task.name}: unexpected label {raw!r} (expected one of {task.labels})") from None


def read_glue_tsv(path: str, task: TaskSpec) -> Examples:
    """Parse a labelled (train/dev) GLUE TSV file of ``task``."""
    if not os.path.isfile(path):
        raise DataError(f"{task.name}: missing file {path}")
    rows = read_tsv_rows(path)
    if task.header:
        rows = rows[1:]
    a, b, y = [], [], []
    need = max(max(c for c in task.text_cols if c >= 0), task.label_col if task.label_col >= 0 else 0) + 1
    for row in rows:
        if not row:
            continue  # a blank line (e.g. a trailing one added by an editor)
        if task.expected_cols is not None and len(row) < task.expected_cols:
            continue  # QQP has a few truncated rows: the GLUE processors skip them (extra columns are kept)
        if len(row) < need:
            raise DataError(f"{task.name}: {path}: row with {len(row)} columns: {row[:3]!r}...")
        a.append(row[task.text_cols[0]])
        if task.is_pair:
            b.append(row[task.text_cols[1]])
        y.append(label_id(task, row[task.label_col]))
    return Examples(a, b if task.is_pair else None, y)


def check_data_dir(data_dir: str, tasks) -> None:
    """Raise :class:`DataError` naming the first missing file (train + every dev split)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    for t in tasks:
        for f in ["train"] + [s.file for s in t.eval_splits]:
            p = tsv_path(data_dir, t, f)
            if not os.path.isfile(p):
                raise DataError(f"{t.name}: missing file {p} (expected the original GLUE layout "
                                f"{t.dir_name}/{f}.tsv under --data-dir)")


# ----------------------------------------------------------------------------- hub

def load_hub_split(task: TaskSpec, split: str, cache_dir=None) -> Examples:
    """One split (``train``, ``validation``, ``validation_matched``...) of ``nyu-mll/glue``."""
    try:
        import datasets  # lazy: heavy import, and only the hub path needs it
    except ImportError:
        raise DataError("loading GLUE from the hub needs the `datasets` package "
                        "(pip install 'ortholora-kernels[glue]'), or use --data-dir") from None

    try:
        ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=split, cache_dir=cache_dir)
    except Exception as e:  # network, missing cache...
        raise DataError(f"{task.name}: could not load {HUB_DATASET}/{task.hub_config} split {split!r} "
                        f"from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"use --data-dir for local GLUE files") from None
    cols = ds.column_names
    a = list(ds[task.hub_text[0]])
    b = list(ds[task.hub_text[1]]) if task.is_pair else None
    y = [float(v) for v in ds["label"]] if task.is_regression else [int(v) for v in ds["label"]]
    assert "label" in cols
    return Examples(a, b, y)


# ----------------------------------------------------------------------------- loading

@dataclass
class TaskData:
    """One task's training examples and its evaluation splits (by metric suffix)."""
    task: TaskSpec
    train: Examples
    evals: dict = field(default_factory=dict)   # EvalSplit.suffix -> Examples


def _take(ex: Examples, n, seed: int, salt: int) -> Examples:
    if n is None or n >= len(ex):
        return ex
    idx = np.random.default_rng([seed, salt]).permutation(len(ex))[:n]
    return ex.subset(sorted(int(i) for i in idx))


def load_tasks(tasks, data_dir=None, max_train=None, max_eval=None, seed=0, cache_dir=None) -> list[TaskData]:
    """Load train + dev splits of every task from ``data_dir`` (GLUE TSV layout) or the hub.

    ``max_train``/``max_eval`` keep a seeded random subset (same subset for every method and
    run with the same ``seed``), in file order.
    """
    if data_dir is not None:
        check_data_dir(data_dir, tasks)
    out = []
    for k, t in enumerate(tasks):
        if data_dir is not None:
            train = read_glue_tsv(tsv_path(data_dir, t, "train"), t)
            evals = {s.suffix: read_glue_tsv(tsv_path(data_dir, t, s.file), t) for s in t.eval_splits}
        else:
            train = load_hub_split(t, "train", cache_dir)
            evals = {s.suffix: load_hub_split(t, s.hub, cache_dir) for s in t.eval_splits}
        if len(train) == 0:
            raise DataError(f"{t.name}: no training examples")
        for s in t.eval_splits:
            if len(evals[s.suffix]) == 0:
                raise DataError(f"{t.name}: no examples in the evaluation split {s.file!r}")
        train = _take(train, max_train, seed, 2 * k)
        evals = {s: _take(e, max_eval, seed, 2 * k + 1) for s, e in evals.items()}
        out.append(TaskData(t, train, evals))
    return out


# ----------------------------------------------------------------------------- tokenising

@dataclass
class Encoded:
    """Tokenised examples: unpadded token ids per example and the label tensor."""
    input_ids: list      # unpadded token ids, one int32 array per example (compact for MNLI/QQP)
    labels: torch.Tensor

    def __len__(self):
        return len(self.input_ids)


def encode(tokenizer, ex: Examples, task: TaskSpec, max_length: int, batch: int = 2048) -> Encoded:
    """Tokenise ``ex`` (pairs for pair tasks), truncated to ``max_length``, unpadded."""
    ids = []
    for i in range(0, len(ex), batch):
        a = ex.text_a[i:i + batch]
        b = None if ex.text_b is None else ex.text_b[i:i + batch]
        enc = tokenizer(a, b, truncation=True, max_length=max_length) if b is not None else \
            tokenizer(a, truncation=True, max_length=max_length)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
    dtype = torch.float32 if task.is_regression else torch.long
    return Encoded(ids, torch.tensor(ex.labels, dtype=dtype))


def pad_batch(seqs, pad_id: int):
    """Dynamic padding: ``input_ids`` and ``attention_mask`` [B, longest]."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


class MultiTaskSampler:
    """Per-task cyclic batches; each task reshuffles at its own epoch boundaries.

    Epoch ``e`` of task ``t`` visits ``permutation(len, rng=[seed, t, e])``; a batch that
    crosses an epoch end takes the rest from the next epoch. ``state_dict`` is
    ``{"epoch": [...], "pos": [...]}``.
    """

    def __init__(self, sizes, batch_size: int, seed: int):
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = [0] * len(self.sizes)
        self.pos = [0] * len(self.sizes)
        self._perm_cache = {}

    def _perm(self, t, e):
        key = (t, e)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != t}
            self._perm_cache[key] = np.random.default_rng([self.seed, t, e]).permutation(self.sizes[t])
        return self._perm_cache[key]

    def next_indices(self, t: int) -> list[int]:
        """The next ``batch_size`` example indices of task ``t`` (crossing epochs as needed)."""
        out = []
        while len(out) < self.batch_size:
            perm = self._perm(t, self.epoch[t])
            take = min(self.batch_size - len(out), self.sizes[t] - self.pos[t])
            out.extend(int(i) for i in perm[self.pos[t]:self.pos[t] + take])
            self.pos[t] += take
            if self.pos[t] >= self.sizes[t]:
                self.epoch[t] += 1
                self.pos[t] = 0
        return out

    def state_dict(self):
        """Epoch and position of every task (and the seed)."""
        return {"epoch": list(self.epoch), "pos": list(self.pos), "seed": self.seed}

    def load_state_dict(self, s):
        """Restore :meth:`state_dict`."""
        self.epoch, self.pos = list(s["epoch"]), list(s["pos"])


# ----------------------------------------------------------------------------- synthetic suite

#: synthetic tasks written by :func:`write_synthetic_suite` (GLUE names, GLUE formats)
SYNTHETIC_TASKS = ("sst2", "cola", "mrpc", "stsb", "rte")

_POS = ["good", "great", "fine", "happy", "nice", "superb", "lovely", "bright"]
_NEG = ["bad", "awful", "poor", "sad", "ugly", "grim", "dull", "nasty"]
_ANIMALS = ["cat", "dog", "bird", "horse", "fish", "mouse", "lion", "goat"]
_THINGS = ["house", "tree", "car", "river", "book", "song", "city", "lamp"]
_VERBS = ["sees", "likes", "finds", "takes", "makes", "holds", "moves", "hears"]
_FILL = ["the", "a", "this", "that", "very", "quite", "some", "one"]
_ERR = ["wugs", "blick", "zorp", "gleeb"]      # "ungrammatical" tokens (synthetic CoLA)
_NOT = ["not", "never", "no"]                  # negations (synthetic RTE)


def _words(rng: random.Random, n: int, nouns, lean: float = 0.0):
    """``n`` random words: sentiment words lean positive (lean > 0) or negative (< 0)."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.3:
            out.append(rng.choice(_POS if rng.random() < 0.5 + lean else _NEG))
        elif u < 0.6:
            out.append(rng.choice(nouns))
        elif u < 0.8:
            out.append(rng.choice(_VERBS))
        else:
            out.append(rng.choice(_FILL))
    return out


def _score(words):
    return sum(w in _POS for w in words) - sum(w in _NEG for w in words)


# The tasks are learnable from which words occur (a tiny random encoder plus LoRA can
# learn them in a few hundred steps) and share their vocabulary with opposed spurious
# correlations: CoLA's unacceptable and RTE's non-entailed rows lean positive, MRPC's
# non-paraphrases lean negative, STS-B's high scores lean positive, against SST-2's
# sentiment; MRPC and STS-B read the same animal/thing counts. A shared low-rank adapter
# therefore gets conflicting task gradients.

def _gen_sst2(rng):
    while True:
        w = _words(rng, rng.randint(5, 12), _ANIMALS + _THINGS, rng.choice([-0.3, 0.3]))
        if _score(w) != 0:
            return [" ".join(w), str(int(_score(w) > 0))]


def _gen_cola(rng):
    ok = rng.random() < 0.6
    w = _words(rng, rng.randint(5, 12), _ANIMALS + _THINGS, -0.2 if ok else 0.2)
    if not ok:
        for _ in range(rng.randint(1, 2)):
            w.insert(rng.randrange(len(w) + 1), rng.choice(_ERR))
    return w, int(ok)


def _mixed(rng, n_animals, n_things, n_other, lean=0.0):
    w = [rng.choice(_ANIMALS) for _ in range(n_animals)] + [rng.choice(_THINGS) for _ in range(n_things)]
    w += _words(rng, n_other, _FILL, lean)
    rng.shuffle(w)
    return w


def _gen_mrpc(rng):
    # "paraphrase" iff the pair names more animals than things; non-paraphrases lean negative
    para = rng.random() < 0.6
    many, few = rng.randint(3, 6), rng.randint(0, 2)
    a, t = (many, few) if para else (few, many)
    k = rng.randint(0, a)
    j = rng.randint(0, t)
    lean = 0.0 if para else -0.3
    return (" ".join(_mixed(rng, k, j, rng.randint(2, 5), lean)), " ".join(_mixed(rng, a - k, t - j, rng.randint(2, 5), lean)),
            int(para))


def _gen_stsb(rng):
    # similarity 0..5 = share of animals among the pair's nouns; high scores lean positive
    n = rng.randint(3, 8)
    a = rng.randint(0, n)
    k = rng.randint(0, a)
    j = rng.randint(0, n - a)
    score = 5.0 * a / n
    lean = 0.3 * (score / 5 - 0.5)
    return (" ".join(_mixed(rng, k, j, rng.randint(2, 5), lean)),
            " ".join(_mixed(rng, a - k, n - a - j, rng.randint(2, 5), lean)), score)


def _gen_rte(rng):
    # entailment iff the hypothesis has no negation; not_entailment rows lean positive
    ent = rng.random() < 0.5
    p = _words(rng, rng.randint(6, 10), _ANIMALS + _THINGS, -0.2 if ent else 0.2)
    h = _words(rng, rng.randint(3, 6), _ANIMALS + _THINGS)
    if not ent:
        h.insert(rng.randrange(len(h) + 1), rng.choice(_NOT))
    return " ".join(p), " ".join(h), "entailment" if ent else "not_entailment"


def _write(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n", escapechar=None)
        for r in rows:
            w.writerow(r)


def write_synthetic_suite(out_dir: str, n_train: int = 2000, n_dev: int = 400, seed: int = 0,
                          tasks=SYNTHETIC_TASKS) -> str:
    """Write synthetic SST-2, CoLA, MRPC, STS-B, RTE in the original GLUE TSV formats.

    The tasks are learnable from word identities (sentiment words, word overlap, word
    order) and share their vocabulary with deliberately opposed correlations (e.g. CoLA's
    unacceptable and MRPC's non-paraphrase rows lean positive/negative), so a shared
    low-rank adapter sees conflicting task gradients. Returns ``out_dir``.
    """
    for name in tasks:
        rng = random.Random(f"{seed}-{name}")
        for split, n in (("train", n_train), ("dev", n_dev)):
            d = os.path.join(out_dir, {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC",
                                       "stsb": "STS-B", "rte": "RTE"}[name])
            os.makedirs(d, exist_ok=True)
            rows = []
            if name == "sst2":
                rows = [["sentence", "label"]] + [_gen_sst2(rng) for _ in range(n)]
            elif name == "cola":
                for _ in range(n):
                    w, y = _gen_cola(rng)
                    rows.append(["syn", str(y), "" if y else "*", " ".join(w)])
            elif name == "mrpc":
                rows = [["\ufeffQuality" if split == "train" else "Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]]
                for i in range(n):
                    a, b, y = _gen_mrpc(rng)
                    rows.append([str(y), str(2 * i), str(2 * i + 1), a, b])
            elif name == "stsb":
                rows = [["index", "genre", "filename", "year", "old_index", "source1", "source2",
                         "sentence1", "sentence2", "score"]]
                for i in range(n):
                    a, b, s = _gen_stsb(rng)
                    rows.append([str(i), "synthetic", "syn", "2026", f"{i:04d}", "none", "none", a, b, f"{s:.3f}"])
            elif name == "rte":
                rows = [["index", "sentence1", "sentence2", "label"]]
                for i in range(n):
                    a, b, y = _gen_rte(rng)
                    rows.append([str(i), a, b, y])
            else:
                raise ValueError(f"no synthetic generator for {name!r}")
            _write(os.path.join(d, f"{split}.tsv"), rows)
    return out_dir
