#!/usr/bin/env bash
# The main job on an embedded default: offline, a few minutes on 2 CPU cores.
#  1. the projection benchmark at T=8, N=295k (every usable backend vs the per-pair loop);
#  2. the GLUE harness demo: single vs joint vs Ortho-LoRA on a synthetic GLUE-format suite
#     with a tiny random RoBERTa; prints the comparison table, writes plots to runs/demo_glue/.
# Extra arguments go to `ortholora-glue demo` (e.g. --max-steps 300 --tasks sst2,cola,rte).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python benchmarks/bench_project.py --quick
python -m ortholora_kernels.glue demo --out runs/demo_glue "$@"
