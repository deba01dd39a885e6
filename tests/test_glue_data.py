"""GLUE loaders on the real files (../shared/glue, when present) and on format fixtures."""
import csv
import os
from pathlib import Path

import pytest

from ortholora_kernels.glue.data import (DataError, MultiTaskSampler, check_data_dir, load_tasks, read_glue_tsv,
                                         tsv_path, write_synthetic_suite)
from ortholora_kernels.glue.tasks import TASKS, UnknownTaskError, get_task, parse_tasks

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="real GLUE files not present (../shared/glue)")

# (task, split) -> (rows, label counts) from PROVENANCE.md
EXPECTED = {
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "dev"): (1043, {1: 721, 0: 322}),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "dev"): (872, {1: 444, 0: 428}),
    ("mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("mrpc", "dev"): (408, {1: 279, 0: 129}),
    ("stsb", "train"): (5749, None),
    ("stsb", "dev"): (1500, None),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("wnli", "train"): (635, None),
    ("wnli", "dev"): (71, {1: 31, 0: 40}),
}


def _present():
    return [(t, s) for (t, s) in EXPECTED if GLUE.is_dir() and os.path.isfile(tsv_path(str(GLUE), get_task(t), s))]


@needs_glue
@pytest.mark.parametrize("task,split", _present())
def test_real_glue_counts_labels_and_verbatim_text(task, split):
    spec = get_task(task)
    path = tsv_path(str(GLUE), spec, split)
    ex = read_glue_tsv(path, spec)
    rows, counts = EXPECTED[(task, split)]
    assert len(ex) == rows
    if counts is not None:
        assert {k: ex.labels.count(k) for k in set(ex.labels)} == counts
    if spec.is_regression:
        assert all(0.0 <= y <= 5.0 for y in ex.labels)
    # QUOTE_NONE: every field is exactly the raw text between tabs (quotes kept verbatim)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines = [ln for ln in lines if ln != ""]
    if spec.header:
        lines = lines[1:]
    raw = [ln.split("\t") for ln in lines]
    assert [r[spec.text_cols[0]] for r in raw] == ex.text_a
    if spec.is_pair:
        assert [r[spec.text_cols[1]] for r in raw] == ex.text_b
    assert all(not t.startswith("\ufeff") for t in ex.text_a[:1])


@needs_glue
def test_real_glue_quotes_kept():
    spec = get_task("qnli")
    if not os.path.isfile(tsv_path(str(GLUE), spec, "dev")):
        pytest.skip("no QNLI dev")
    ex = read_glue_tsv(tsv_path(str(GLUE), spec, "dev"), spec)
    quoted = [t for t in ex.text_a + ex.text_b if t.startswith('"')]
    assert quoted, "QNLI dev has fields that start with a double quote"
    # csv's default quoting would have eaten them
    with open(tsv_path(str(GLUE), spec, "dev"), encoding="utf-8", newline="") as f:
        default = list(csv.reader(f, delimiter="\t"))
    assert len(default) - 1 != len(ex) or [r[1] for r in default[1:]] != ex.text_a


@needs_glue
def test_real_mrpc_bom_header():
    path = tsv_path(str(GLUE), get_task("mrpc"), "train")
    if not os.path.isfile(path):
        pytest.skip("no MRPC train")
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    ex = read_glue_tsv(path, get_task("mrpc"))
    assert set(ex.labels) == {0, 1}


def _write(path, lines, bom=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if bom:
            f.write("\ufeff")
        f.write("\n".join(lines) + "\n")


MNLI_HEADER = "\t".join(["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                         "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"])


def _mnli_row(i, a, b, y):
    return "\t".join([str(i), "1", "1a", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, y, y])


def test_mnli_and_qqp_formats(tmp_path):
    d = tmp_path / "glue"
    for f in ("train", "dev_matched", "dev_mismatched"):
        _write(str(d / "MNLI" / f"{f}.tsv"), [MNLI_HEADER, _mnli_row(0, 'He said "hi', "ok", "neutral"),
                                             _mnli_row(1, "a", "b", "contradiction"),
                                             _mnli_row(2, "c", "d", "entailment")])
    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", '1\t2\t3\t"Why?\tHow?\t1',
           "2\t4\t5\tbroken row", "3\t6\t7\tq\tr\t0",
           "4\t8\t9\ts\tt\t1\textra"]   # extra columns: kept, as by the GLUE processors (only short rows go)
    for f in ("train", "dev"):
        _write(str(d / "QQP" / f"{f}.tsv"), qqp)
    mnli, qqp_t = load_tasks(parse_tasks("mnli,qqp"), str(d))
    assert mnli.train.labels == [1, 2, 0]
    assert mnli.train.text_a[0] == 'He said "hi' and mnli.train.text_b[0] == "ok"
    assert set(mnli.evals) == {"_m", "_mm"}
    assert qqp_t.train.labels == [1, 0, 1]        # malformed row skipped
    assert qqp_t.train.text_a == ['"Why?', "q", "s"] and qqp_t.train.text_b == ["How?", "r", "t"]


def test_cola_has_no_header_and_stsb_score_is_last(tmp_path):
    d = tmp_path / "g"
    _write(str(d / "CoLA" / "train.tsv"), ["gj04\t1\t\tThe cat sat.", "gj04\t0\t*\tCat the sat."])
    ex = read_glue_tsv(str(d / "CoLA" / "train.tsv"), get_task("cola"))
    assert ex.text_a == ["The cat sat.", "Cat the sat."] and ex.labels == [1, 0]
    hdr = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    _write(str(d / "STS-B" / "train.tsv"), [hdr, "0\tmain\tx\t2012\t0001\tnone\tnone\tA b.\tA c.\t3.800"])
    ex = read_glue_tsv(str(d / "STS-B" / "train.tsv"), get_task("stsb"))
    assert ex.labels == [3.8] and ex.text_b == ["A c."]


def test_missing_files_and_unknown_tasks(tmp_path):
    with pytest.raises(DataError, match="missing file"):
        check_data_dir(str(tmp_path), [get_task("rte")])
    with pytest.raises(DataError, match="does not exist"):
        check_data_dir(str(tmp_path / "nope"), [get_task("rte")])
    with pytest.raises(UnknownTaskError, match="unknown GLUE task"):
        parse_tasks("sst2,foo")
    assert get_task("SST-2").name == "sst2" and set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli",
                                                               "qnli", "rte", "wnli"}


def test_synthetic_suite_is_read_by_the_glue_loader(tmp_path):
    write_synthetic_suite(str(tmp_path), n_train=50, n_dev=20, seed=1)
    datas = load_tasks(parse_tasks("sst2,cola,mrpc,stsb,rte"), str(tmp_path), max_eval=10, seed=0)
    for d in datas:
        assert len(d.train) == 50 and len(d.evals[""]) == 10
        assert len(set(d.train.labels)) > 1
    assert open(tmp_path / "MRPC" / "train.tsv", "rb").read(3) == b"\xef\xbb\xbf"
    # deterministic
    write_synthetic_suite(str(tmp_path / "again"), n_train=50, n_dev=20, seed=1)
    assert (tmp_path / "again" / "RTE" / "train.tsv").read_bytes() == (tmp_path / "RTE" / "train.tsv").read_bytes()


def test_sampler_cycles_independently_and_resumes():
    s = MultiTaskSampler([5, 3], batch_size=4, seed=0)
    seen = [s.next_indices(0) + s.next_indices(0), s.next_indices(1)]
    assert sorted(seen[0][:5]) == list(range(5))       # first epoch of task 0 is a permutation
    assert len(seen[1]) == 4 and set(seen[1]) <= {0, 1, 2}
    state = s.state_dict()
    a = [s.next_indices(t) for t in (0, 1, 0)]
    s2 = MultiTaskSampler([5, 3], batch_size=4, seed=0)
    s2.load_state_dict(state)
    assert [s2.next_indices(t) for t in (0, 1, 0)] == a


def test_hub_path_maps_columns_and_splits(monkeypatch):
    """The hub code path (nyu-mll/glue through datasets), with load_dataset faked offline."""
    import datasets

    calls = []

    def fake(name, config, split, cache_dir=None):
        calls.append((name, config, split))
        if config == "mnli":
            return datasets.Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"],
                                               "label": [0, 2], "idx": [0, 1]})
        return datasets.Dataset.from_dict({"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                                           "label": [1.5, 2.0, 4.25], "idx": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    mnli, stsb = load_tasks(parse_tasks("mnli,stsb"), data_dir=None, max_train=1)
    assert ("nyu-mll/glue", "mnli", "validation_mismatched") in calls
    assert ("nyu-mll/glue", "stsb", "validation") in calls
    assert len(mnli.train) == 1 and mnli.evals["_m"].labels == [0, 2] and mnli.evals["_mm"].text_b == ["h1", "h2"]
    assert stsb.evals[""].labels == [1.5, 2.0, 4.25]

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load nyu-mll/glue/rte"):
        load_tasks(parse_tasks("rte"))


def _provenance_rows():
    """(task dir, file, data_rows) of the labelled train/dev files in PROVENANCE.md's table."""
    p = GLUE / "PROVENANCE.md"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[1] in ("train.tsv", "dev.tsv") and cells[8].isdigit():
            out.append((cells[0], cells[1], int(cells[8])))
    return out


@needs_glue
@pytest.mark.parametrize("task_dir,file,rows", _provenance_rows())
def test_row_counts_match_provenance_table(task_dir, file, rows):
    spec = next(t for t in TASKS.values() if t.dir_name == task_dir)
    path = str(GLUE / task_dir / file)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present")
    assert len(read_glue_tsv(path, spec)) == rows
