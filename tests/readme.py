"""The README's recipes, run as written by the tests that check them."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block under the README heading ``heading`` (exact title)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    in_section, fence, block = False, None, []
    for line in lines:
        if fence is None and re.match(r"#+ ", line):       # a heading (outside code)
            if in_section:
                break
            in_section = re.fullmatch(rf"#+ {re.escape(heading)}\s*", line) is not None
            continue
        if line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
                continue
            if in_section and fence == "python":
                return "\n".join(block) + "\n"
            fence, block = None, []
            continue
        if fence == "python" and in_section:
            block.append(line)
    raise KeyError(f"README has no python block under the heading {heading!r}")


def run_readme_block(heading: str) -> dict:
    """Execute the block in a fresh namespace; returns the namespace."""
    ns: dict = {"__name__": f"readme_{re.sub(r'[^a-z0-9]+', '_', heading.lower())}"}
    exec(compile(readme_block(heading), f"README.md:{heading}", "exec"), ns)
    return ns
