#!/usr/bin/env bash
# The test command: sets up .venv, then runs the suite (CPU tests, then the Triton
# kernels through the interpreter). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest -q -m "not interpreter" "$@"
# Exit code 5 = nothing collected (e.g. a -k filter that matches no interpreter test).
TRITON_INTERPRET=1 python -m pytest -q -m interpreter "$@" || [ $? -eq 5 ]
