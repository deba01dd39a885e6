"""The README's recipes, run as written by the tests that check them."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block under the README heading ``heading`` (exact title)."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^#+ {re.escape(heading)}\s*$", text, flags=re.M)
    if m is None:
        raise KeyError(f"README has no heading {heading!r}")
    rest = text[m.end():]
    nxt = re.search(r"^#+ ", rest, flags=re.M)
    section = rest[:nxt.start()] if nxt else rest
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    if code is None:
        raise KeyError(f"README section {heading!r} has no python block")
    return code.group(1)


def run_readme_block(heading: str) -> dict:
    """Execute the block in a fresh namespace; returns the namespace."""
    ns: dict = {"__name__": f"readme_{re.sub(r'[^a-z0-9]+', '_', heading.lower())}"}
    exec(compile(readme_block(heading), f"README.md:{heading}", "exec"), ns)
    return ns
