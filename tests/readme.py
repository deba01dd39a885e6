"""The recipes of README.md and docs/, run as written by the tests that check what they define.

Kept for the tests that import ``run_readme_block``; the block finder and the rules are in
:mod:`docs_blocks` (a heading is looked up on README.md and on every docs page).
"""
from __future__ import annotations

from docs_blocks import find_block, run_doc_block

readme_block = lambda heading: find_block(heading).code   # noqa: E731  (the block's text)
run_readme_block = run_doc_block

__all__ = ["readme_block", "run_readme_block"]
