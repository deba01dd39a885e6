"""The code blocks of README.md and of every page under docs/, found and run as written.

Rules (docs/contributing.md, "Code blocks in the docs"):

* every fenced block names its language; ```` ```python ```` and ```` ```bash ```` blocks are
  run, every other language (``text`` for output and trees, ``toml``, ``yaml``) is shown only;
* the blocks of one page run in order, in one fresh Python process and one namespace, from
  a scratch directory that links ``examples/``, ``benchmarks/``, ``docs/`` and
  ``requirements/`` of the checkout (not the package, ``setup.py`` or ``scripts/``: nothing run
  there can rebuild or reinstall the checkout), so relative paths work and outputs stay out
  of the checkout; a
  ``bash`` block runs with ``bash -euo pipefail`` there, with the tests' Python first on
  ``PATH`` and the checkout on ``PYTHONPATH``;
* a block that cannot run on a CPU-only test machine (``torchrun``, a GPU, an install, a
  run of minutes) is preceded by ``<!-- skip-test: REASON -->`` (an HTML comment, invisible
  on the site; it applies to the next block only) and is not run; the reason is mandatory;
* indented code blocks are refused (they name no language): fence them.

``run_doc_block(heading)`` runs the first Python block under a heading (on any page) in this
process and returns its namespace, for tests that check what a recipe defines.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: the languages whose blocks run; every other fenced block must name one of SHOWN
RUN = ("python", "bash")
SHOWN = ("text", "toml", "yaml", "console")
SKIP = re.compile(r"<!--\s*skip-test:\s*(?P<reason>.*?)\s*-->", re.S)


@dataclasses.dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int            # 1-based line of the block's first code line
    lang: str
    code: str
    heading: str | None  # the closest heading above it
    skip: str | None     # the skip reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (sorted)."""
    return [ROOT / "README.md"] + sorted(DOCS.rglob("*.md"))


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of ``page`` (``text``: its content, read from ``page`` by default)."""
    text = page.read_text(encoding="utf-8") if text is None else text
    tokens = MarkdownIt("commonmark").parse(text)
    out, heading, skip = [], None, None
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            heading = tokens[i + 1].content.strip()
        elif tok.type == "html_block" and SKIP.search(tok.content):
            skip = SKIP.search(tok.content).group("reason")
            if not skip:
                raise ValueError(f"{page}:{tok.map[0] + 1}: skip-test needs a reason")
        elif tok.type in ("fence", "code_block"):   # the marker applies to the next block only
            lang = tok.info.split()[0] if tok.type == "fence" and tok.info.strip() else ""
            out.append(Block(page, tok.map[0] + (2 if tok.type == "fence" else 1), lang, tok.content, heading, skip))
            skip = None
    return out


def page_script(page: Path, text: str | None = None) -> str:
    """A Python script that runs the page's runnable blocks in order (line numbers kept:
    a traceback names ``docs/page.md`` and the line in it)."""
    lines = ["import subprocess as _sp, sys as _sys", "_ns = {'__name__': '__main__'}"]
    for b in blocks(page, text):
        if b.lang not in RUN or b.skip:
            continue
        if b.lang == "python":
            src = "\n" * (b.line - 1) + b.code
            lines.append(f"exec(compile({src!r}, {b.where.rsplit(':', 1)[0]!r}, 'exec'), _ns)")
        else:
            lines.append(f"print('$ bash block at {b.where}', flush=True)")
            lines.append(f"_sp.run(['bash', '-euo', 'pipefail', '-c', {b.code!r}], check=True)")
    return "\n".join(lines) + "\n"


def find_block(heading: str, lang: str = "python") -> Block:
    """The first ``lang`` block under the heading ``heading`` (exact title) on any page; the
    heading must be on one page only."""
    found = [b for p in pages() for b in blocks(p) if b.heading == heading and b.lang == lang]
    where = sorted({str(b.page.relative_to(ROOT)) for b in found})
    if not found:
        raise KeyError(f"no {lang} block under the heading {heading!r} in README.md or docs/")
    if len(where) > 1:
        raise KeyError(f"the heading {heading!r} has {lang} blocks on several pages: {where}")
    return found[0]


def run_doc_block(heading: str) -> dict:
    """Execute the first Python block under ``heading`` in a fresh namespace; returns it."""
    b = find_block(heading)
    ns: dict = {"__name__": f"doc_{re.sub(r'[^a-z0-9]+', '_', heading.lower())}"}
    exec(compile("\n" * (b.line - 1) + b.code, str(b.page.relative_to(ROOT)), "exec"), ns)
    return ns
