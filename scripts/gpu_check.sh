#!/usr/bin/env bash
# One call on a bare, offline GPU machine (torch with CUDA, triton, transformers, peft,
# pytest-xdist and pytest-timeout preinstalled; nvcc on PATH): what a first GPU session
# needs, inside the device's 600 s per command (540 s budget, the rest for the transfers).
#
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run   # the same steps on CPU where possible (CI runs it)
#
# Steps in order of value; each gets min(its own limit, what is left of the budget), a
# failing step is recorded and the next one runs, a step with under 10 s left is skipped:
#   env      versions, nvidia-smi, nvcc                                   (30 s)
#   build    the extension in place with ORTHOLORA_REQUIRE_BUILD=1 (setup.py build_ext:
#            no pip, no download; TORCH_CUDA_ARCH_LIST from the GPU)      (180 s)
#   avail    backends_available("cuda") must report native and triton usable (60 s)
#   correct  every backend's forward and backward against the reference
#            (benchmarks/bench_project_gpu.py --check-only)                (60 s)
#   bench    benchmarks/bench_project_gpu.py --quick (triton and native rows, CUDA graphs) (90 s)
#   stress   scripts/gpu_stress.py (graphs, streams, determinism, fp64, T*N > 2^31, ...) (90 s)
#   train    benchmarks/bench_train_step.py, a short run on cuda           (60 s)
#   tests    the gpu-marked tests, pytest -n 4 --timeout 60                 (the rest)
# Dry run: build only imports the built extension, avail prints the CUDA reasons and checks
# the CPU backends, correct and stress run on CPU through the Triton interpreter, bench and
# train run their CPU counterparts briefly, tests are collected (not run).
#
# Results under $OUT (default ./gpu_check_out), written as they come so that a kill at any
# point brings back what ran; at most 8 files (what the device tool brings back):
#   summary.csv, summary.json  one row per finished step (rewritten after each step)
#   gpu_check.log              every step's full output, appended live
#   stress.json                gpu_stress.py rewrites it after each check
#   bench/results.csv, bench/results.json   the bench rewrites them after each shape
#   train_step.json
# Environment: PYTHON (default python3; the dry run prefers ./.venv/bin/python),
# GPU_CHECK_BUDGET (seconds; default 540, the dry run 1500). Exit status: 1 when any step failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "gpu_check: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
if [ -z "${PYTHON:-}" ]; then
    if [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET
BUDGET="${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 1500 || echo 540)}"   # the dry run: a loaded 2-core CPU
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
FAILED=0
: > "$OUT/gpu_check.log"
echo "step,status,seconds,timeout_s" > "$OUT/summary.csv"
ROWS=""

# write_summary: summary.json from the rows so far (plain bash: no interpreter needed).
write_summary() {
    local now; now=$(date +%s)
    printf '{"dry_run": %s, "budget_s": %s, "seconds": %s, "finished": %s, "steps": [%s]}\n' \
        "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET" "$(( now - START ))" "$1" "$ROWS" \
        > "$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

# record NAME STATUS SECONDS LIMIT: one summary row, in both files, at once.
record() {
    echo "$1,$2,$3,$4" >> "$OUT/summary.csv"
    ROWS="${ROWS:+$ROWS, }{\"step\": \"$1\", \"status\": \"$2\", \"seconds\": $3, \"timeout_s\": $4}"
    write_summary false
}

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), its output appended live
# to $OUT/gpu_check.log; then its summary row.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc status left
    t0=$(date +%s)
    left=$(( DEADLINE - t0 ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "gpu_check: [$name] skipped: ${left}s of the ${BUDGET}s budget left"
        echo "===== [$name] skipped: ${left}s of the ${BUDGET}s budget left" >> "$OUT/gpu_check.log"
        record "$name" "skipped (budget)" 0 "$limit"
        return
    fi
    echo "gpu_check: [$name] $* (timeout ${limit}s)"
    echo "===== [$name] $* (timeout ${limit}s, $(date -u +%H:%M:%S))" >> "$OUT/gpu_check.log"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" >> "$OUT/gpu_check.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=passed ;;
        124|137) status="FAILED (timeout)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    tail -n 15 "$LOGS/$name.log" | sed "s/^/gpu_check:   $name| /"
    echo "===== [$name] $status in $(( $(date +%s) - t0 ))s" >> "$OUT/gpu_check.log"
    record "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit"
    echo "gpu_check: [$name] $status in $(( $(date +%s) - t0 ))s"
}

write_summary false
step env 30 bash -c "
    date -u; uname -a
    nvidia-smi || echo 'no nvidia-smi'
    nvcc --version || echo 'no nvcc on PATH'
    $PYTHON -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'
    $PYTHON -c 'import triton; print(\"triton\", triton.__version__)' || true"

if [ "$DRY" = 1 ]; then
    step build 60 "$PYTHON" -c "import ortholora_kernels._C as c; print('extension present:', c.__file__, 'WITH_CUDA =', c.WITH_CUDA)"
    step avail 60 "$PYTHON" -c "
import ortholora_kernels as ok
cuda = ok.backends_available('cuda'); cpu = ok.backends_available('cpu')
print('cuda:', cuda); print('cpu:', cpu)
assert cpu['native'][0] and cpu['torch'][0], 'native and torch must be usable on CPU'
if not __import__('torch').cuda.is_available():   # no GPU: each GPU backend says why
    assert all(not cuda[k][0] and cuda[k][1] for k in ('native', 'triton')), cuda"
    step correct 120 env TRITON_INTERPRET=1 "$PYTHON" benchmarks/bench_project_gpu.py --check-only --device cpu
    step bench 120 "$PYTHON" benchmarks/bench_project.py --quick
    step stress 300 "$PYTHON" scripts/gpu_stress.py --dry-run --out "$OUT"
    step train 120 "$PYTHON" benchmarks/bench_train_step.py --device cpu --tasks 2 --batch 4 --layers 1 \
        --hidden 64 --heads 2 --seq-len 8 --warmup 1 --repeat 1 --no-mem --out "$OUT/train_step.json"
    step tests 120 "$PYTHON" -m pytest -q --co -m gpu -p no:cacheprovider tests/
else
    ARCH="$($PYTHON -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)"
    step build 180 env ORTHOLORA_REQUIRE_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext --inplace
    step avail 60 "$PYTHON" -c "
import ortholora_kernels as ok
cuda = ok.backends_available('cuda'); print(cuda)
bad = {k: v[1] for k, v in cuda.items() if k in ('native', 'triton') and not v[0]}
assert not bad, f'not usable on cuda: {bad}'"
    step correct 60 "$PYTHON" benchmarks/bench_project_gpu.py --check-only
    step bench 90 "$PYTHON" benchmarks/bench_project_gpu.py --quick --rep-ms 30 --skip-loop-above 50000000 \
        --out "$OUT/bench"
    step stress 90 "$PYTHON" scripts/gpu_stress.py --calls 100 --out "$OUT"
    step train 60 "$PYTHON" benchmarks/bench_train_step.py --device cuda --tasks 4 --batch 8 --warmup 2 \
        --repeat 5 --no-mem --out "$OUT/train_step.json"
    step tests 600 "$PYTHON" -m pytest -q -m gpu -n 4 --timeout 60 -p no:cacheprovider tests/
fi
write_summary true

NFILES="$(find "$OUT" -type f | wc -l)"
if [ "$NFILES" -gt 8 ]; then
    echo "gpu_check: $NFILES files under $OUT (the device tool returns 8): $(find "$OUT" -type f)"
    FAILED=1
fi
echo "gpu_check: $(( $(date +%s) - START ))s in all (budget ${BUDGET}s); results under $OUT"
column -s, -t < "$OUT/summary.csv" 2>/dev/null || cat "$OUT/summary.csv"
exit $FAILED
