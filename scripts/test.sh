#!/usr/bin/env bash
# The test command: sets up .venv, then runs the suite (CPU tests, then the Triton
# kernels through the interpreter). Extra arguments go to pytest. The interpreter suite
# runs even when the CPU suite fails (its verdict is independent); the exit status is
# non-zero if either failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
failed=()
python -m pytest -q -m "not interpreter" "$@" || failed+=("CPU suite (rc $?)")
# Exit code 5 = nothing collected (e.g. a -k filter that matches no interpreter test).
rc=0
TRITON_INTERPRET=1 python -m pytest -q -m interpreter "$@" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed+=("interpreter suite (rc $rc)"); fi
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'scripts/test.sh: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
