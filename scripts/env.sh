#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch and the package installed editable
# (or, where python already has a CUDA torch, use it: see below).
# Sourced by the two README commands; idempotent and offline after the first run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
# A machine whose python already has a CUDA torch (a GPU image, often offline): use that
# python as it is. Installing the pinned CPU torch would fail offline and, online, hide the
# CUDA build. The extension is built in place (setup.py build_ext: no pip, no download).
# ORTHOLORA_USE_VENV=1 forces the .venv path below.
if [ ! -x .venv/bin/python ] && [ "${ORTHOLORA_USE_VENV:-0}" != 1 ] \
        && "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    echo "env.sh: using $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)') (CUDA torch found: no .venv, no pip)"
    python() { "$PY" "$@"; }
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    STAMP=build/.ortholora-inplace
    if ! ls ortholora_kernels/_C*.so >/dev/null 2>&1 || [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] \
            || [ -n "$(find csrc -newer "$STAMP" -type f 2>/dev/null | head -1)" ]; then
        ORTHOLORA_REQUIRE_BUILD="${ORTHOLORA_REQUIRE_BUILD:-1}" "$PY" setup.py -q build_ext --inplace
        mkdir -p build && touch "$STAMP"
    fi
    return 0 2>/dev/null || exit 0
fi
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
    # --no-build-isolation builds the extension in THIS environment, so its build requirements
    # come first: a setuptools that reads the SPDX license (pyproject's build-system), wheel,
    # and numpy (torch's headers import it; without it the build prints "Failed to initialize NumPy").
    python -m pip install -q -c requirements/constraints.txt "setuptools>=77" wheel numpy
    python -m pip install -q -c requirements/constraints.txt --no-build-isolation -e ".[dev,glue,bench,docs]"
    touch "$STAMP"
fi
