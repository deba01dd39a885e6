#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch and the package installed editable.
# Sourced by the two README commands; idempotent and offline after the first run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=.venv/.ortholora-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ -n "$(find csrc -newer "$STAMP" -type f 2>/dev/null | head -1)" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -c requirements/constraints.txt torch==2.13.0
    python -m pip install -q -c requirements/constraints.txt triton
    # --no-build-isolation: build the extension against the torch just installed.
    python -m pip install -q -c requirements/constraints.txt --no-build-isolation -e ".[dev,glue,bench]"
    touch "$STAMP"
fi
