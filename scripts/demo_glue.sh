#!/usr/bin/env bash
# GLUE harness demo: offline, ~1-3 minutes on 2 CPU cores. Writes a synthetic suite in the
# GLUE TSV layout, trains single / joint / ortho (Ortho-LoRA, A|B segments) with a tiny
# random RoBERTa, prints the comparison table and writes the plots under runs/demo_glue/.
# Extra arguments go to `ortholora-glue demo` (e.g. --max-steps 500 --tasks sst2,cola,rte).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m ortholora_kernels.glue demo --out runs/demo_glue "$@"
