#!/usr/bin/env bash
# One call on a bare, offline GPU machine (torch with CUDA, triton, transformers, peft
# preinstalled; nvcc on PATH): everything a first GPU session needs, in about 8 minutes.
#
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run   # the same steps on CPU where possible (CI runs it)
#
# Steps, each with its own timeout; a failing step is recorded and the next one runs:
#   env      versions, nvidia-smi, nvcc
#   build    the extension in place with ORTHOLORA_REQUIRE_BUILD=1 (setup.py build_ext:
#            no pip, no download, no dependency resolution; TORCH_CUDA_ARCH_LIST from the GPU)
#   avail    backends_available("cuda") must report native and triton usable
#   tests    the GPU tests (pytest -m gpu) and the GPU-readiness tests on this torch
#   stress   scripts/gpu_stress.py (graphs, streams, determinism, fp64, T*N > 2^31, ...)
#   bench    benchmarks/bench_project_gpu.py --quick (triton and native rows, CUDA graphs)
#   train    benchmarks/bench_train_step.py, a short run on cuda
# Dry run: the build step only imports the already-built extension, "avail" prints the CUDA
# reasons and checks the CPU backends, tests are collected (not run), stress runs on CPU
# through the Triton interpreter, bench and train run their CPU counterparts briefly.
#
# Results under $OUT (default ./gpu_check_out), at most 8 files (the device tool brings back
# no more): summary.json, summary.csv, stress.json, bench.csv, train_step.json and
# logs.tar.gz (every step's full log). Exit status: 1 when any step failed.
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
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
if [ -z "${PYTHON:-}" ]; then
    if [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET
START=$(date +%s)
echo "step,status,seconds,timeout_s,log" > "$WORK/summary.csv"
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run with a timeout, log to $LOGS/NAME.log, record the status.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "gpu_check: [$name] $* (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124|137) status="FAILED (timeout)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    tail -n 15 "$LOGS/$name.log" | sed "s/^/gpu_check:   $name| /"
    echo "$name,$status,$(( $(date +%s) - t0 )),$limit,logs/$name.log" >> "$WORK/summary.csv"
    echo "gpu_check: [$name] $status in $(( $(date +%s) - t0 ))s"
}

step env 120 bash -c "
    date -u; uname -a
    nvidia-smi || echo 'no nvidia-smi'
    nvcc --version || echo 'no nvcc on PATH'
    $PYTHON -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'
    $PYTHON -c 'import triton; print(\"triton\", triton.__version__)' || true
    $PYTHON -c 'import transformers, peft; print(\"transformers\", transformers.__version__, \"peft\", peft.__version__)' || true"

if [ "$DRY" = 1 ]; then
    step build 120 "$PYTHON" -c "import ortholora_kernels._C as c; print('extension present:', c.__file__, 'WITH_CUDA =', c.WITH_CUDA)"
    step avail 120 "$PYTHON" -c "
import ortholora_kernels as ok
cuda = ok.backends_available('cuda'); cpu = ok.backends_available('cpu')
print('cuda:', cuda); print('cpu:', cpu)
assert cpu['native'][0] and cpu['torch'][0], 'native and torch must be usable on CPU'
if not __import__('torch').cuda.is_available():   # no GPU: each GPU backend says why
    assert all(not cuda[k][0] and cuda[k][1] for k in ('native', 'triton')), cuda"
    step tests 300 "$PYTHON" -m pytest -q --co -m gpu -p no:cacheprovider tests/
    step stress 600 "$PYTHON" scripts/gpu_stress.py --dry-run --out "$WORK"
    step bench 300 "$PYTHON" benchmarks/bench_project.py --quick
    step train 600 "$PYTHON" benchmarks/bench_train_step.py --device cpu --tasks 2 --batch 4 --layers 1 \
        --hidden 64 --heads 2 --seq-len 8 --warmup 1 --repeat 1 --no-mem --out "$WORK/train_step.json"
else
    ARCH="$($PYTHON -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)"
    step build 300 env ORTHOLORA_REQUIRE_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext --inplace
    step avail 120 "$PYTHON" -c "
import ortholora_kernels as ok
cuda = ok.backends_available('cuda'); print(cuda)
bad = {k: v[1] for k, v in cuda.items() if k in ('native', 'triton') and not v[0]}
assert not bad, f'not usable on cuda: {bad}'"
    step tests 240 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/
    step stress 180 "$PYTHON" scripts/gpu_stress.py --out "$WORK"
    step bench 180 "$PYTHON" benchmarks/bench_project_gpu.py --quick --rep-ms 50 --skip-loop-above 50000000 \
        --out "$WORK/bench"
    step train 120 "$PYTHON" benchmarks/bench_train_step.py --device cuda --tasks 4 --batch 8 --warmup 2 \
        --repeat 5 --no-mem --out "$WORK/train_step.json"
fi

# At most 8 files back: the summaries, the main results, every log in one archive.
"$PYTHON" - "$WORK/summary.csv" "$WORK/summary.json" "$DRY" "$START" <<'EOF'
import csv, json, sys, time
rows = list(csv.DictReader(open(sys.argv[1])))
json.dump({"dry_run": sys.argv[3] == "1", "seconds": int(time.time()) - int(sys.argv[4]), "steps": rows},
          open(sys.argv[2], "w"), indent=1)
EOF
cp "$WORK/summary.csv" "$WORK/summary.json" "$OUT/"
[ -f "$WORK/stress.json" ] && cp "$WORK/stress.json" "$OUT/"
[ -f "$WORK/bench/results.csv" ] && cp "$WORK/bench/results.csv" "$OUT/bench.csv"
[ -f "$WORK/train_step.json" ] && cp "$WORK/train_step.json" "$OUT/"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
rm -rf "$WORK"
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    echo "gpu_check: more than 8 files under $OUT (the device tool returns 8): $(ls "$OUT")"
    FAILED=1
fi
echo "gpu_check: $(( $(date +%s) - START ))s in all; results under $OUT"
column -s, -t < "$OUT/summary.csv" 2>/dev/null || cat "$OUT/summary.csv"
exit $FAILED
