"""Every code block of README.md and of the docs pages runs as written (rules: :mod:`docs_blocks`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from docs_blocks import ROOT, RUN, SHOWN, blocks, page_script, pages

#: seconds one page may take (its blocks run at their smallest settings)
PAGE_TIMEOUT = 300


#: what a page's scratch directory links from the checkout: the paths its commands read. Not the
#: package, setup.py or scripts/ (the package comes from PYTHONPATH): a command that would build or
#: install into the checkout (scripts/env.sh, pip install -e .) fails instead of touching it.
SANDBOX_LINKS = ("examples", "benchmarks", "docs", "requirements")


def _sandbox(tmp: Path) -> Path:
    """A scratch directory with links to :data:`SANDBOX_LINKS` (outputs stay here)."""
    for name in SANDBOX_LINKS:
        if (ROOT / name).exists() and not (tmp / name).exists():
            (tmp / name).symlink_to(ROOT / name)
    return tmp


def run_page(page: Path, tmp: Path, text: str | None = None) -> subprocess.CompletedProcess:
    """Run the page's runnable blocks in a fresh interpreter from a sandbox in ``tmp``."""
    script = tmp / "_page.py"
    script.write_text(page_script(page, text), encoding="utf-8")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": pythonpath,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script)], cwd=_sandbox(tmp), env=env, capture_output=True, text=True,
                          timeout=PAGE_TIMEOUT)


def _runnable(page: Path) -> bool:
    return any(b.lang in RUN and not b.skip for b in blocks(page))


@pytest.mark.parametrize("page", [p for p in pages() if _runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page, tmp_path):
    r = run_page(page, tmp_path)
    assert r.returncode == 0, f"{page.relative_to(ROOT)}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_names_a_known_language(page):
    """A block is run (python, bash) or shown (text, ...): no unnamed or unknown language."""
    bad = [f"{b.where} ({b.lang or 'no language'})" for b in blocks(page) if b.lang not in RUN + SHOWN]
    assert not bad, f"fence these blocks with a language from {RUN + SHOWN}: {bad}"


def test_skipped_blocks_say_why():
    """Every skipped block has its reason (the list is printed with -rA for a reader)."""
    skipped = [(b.where, b.skip) for p in pages() for b in blocks(p) if b.skip]
    assert all(reason.strip() for _, reason in skipped)
    for where, reason in skipped:
        print(f"not run: {where}: {reason}")


def test_the_runner_runs_blocks_in_order_and_honours_the_marker(tmp_path):
    page = ROOT / "docs" / "_probe.md"
    text = ("# probe\n\n```python\nx = 2\n```\n\nText.\n\n<!-- skip-test: would fail -->\n```python\n"
            "raise SystemExit(3)\n```\n\n```bash\necho \"bash ran in $PWD\"\n```\n\n"
            "```python\nassert x == 2\nprint('x is', x)\n```\n\n```text\nnot run\n```\n")
    bs = blocks(page, text)
    assert [(b.lang, b.line, b.skip) for b in bs] == [("python", 4, None), ("python", 11, "would fail"),
                                                     ("bash", 15, None), ("python", 19, None), ("text", 24, None)]
    r = run_page(page, tmp_path, text)
    assert r.returncode == 0, r.stderr
    assert "x is 2" in r.stdout and f"bash ran in {tmp_path}" in r.stdout


def test_the_runner_names_the_page_and_line_of_a_failure(tmp_path):
    page = ROOT / "docs" / "_probe.md"
    text = "# probe\n\nIntro.\n\n```python\nok = 1\nundefined_name\n```\n"
    r = run_page(page, tmp_path, text)
    assert r.returncode != 0
    assert 'File "docs/_probe.md", line 7' in r.stderr and "NameError" in r.stderr
    r = run_page(page, tmp_path, "# p\n\n```bash\nfalse\n```\n")
    assert r.returncode != 0 and "docs/_probe.md:4" in r.stdout


def test_a_marker_without_reason_is_refused():
    with pytest.raises(ValueError, match="needs a reason"):
        blocks(ROOT / "docs" / "_probe.md", "<!-- skip-test: -->\n```python\nx = 1\n```\n")
