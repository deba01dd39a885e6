#!/usr/bin/env bash
# The main job on an embedded default: offline, a few minutes on 2 CPU cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python benchmarks/bench_project.py --quick
