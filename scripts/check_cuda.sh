#!/usr/bin/env bash
# Compile-check the CUDA kernels: every csrc/**/*.cu with `nvcc -c` (default arch and
# sm_90) into a temporary directory. The kernels include no torch header, so this needs
# only nvcc, not a CUDA build of torch. Skips (exit 0) when nvcc is not on PATH.
# The sm_90 pass runs with `-Xptxas -v`: it prints registers / spills / shared memory per
# kernel and FAILS when a hot kernel (the per-column passes over X: $HOT) spills.
# Then the torch glue (csrc/cuda/*.cpp) gets a syntax check against the installed torch.
# Extra arguments go to nvcc (e.g. -arch=sm_80).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
HOT="${ORTHOLORA_HOT_KERNELS:-pairs_partial_kernel|combine_kernel}"   # combine_kernel also matches backward_combine_kernel
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found on PATH; skipping the CUDA compile check"
    exit 0
fi
mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
    echo "check_cuda: no .cu sources under csrc/"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
for arch in "" "-arch=sm_90"; do
    verbose=()
    [ -n "$arch" ] && verbose=(-Xptxas -v)
    for src in "${SOURCES[@]}"; do
        obj="$TMP/$(echo "$src" | tr '/' '_').${arch#-arch=}.o"
        log="$obj.log"
        if "$NVCC" -std=c++17 -O3 $arch "${verbose[@]}" -I"$ROOT/csrc" "$@" -c "$ROOT/$src" -o "$obj" 2>"$log"; then
            echo "check_cuda: ok   ${arch:-default arch} $src"
        else
            cat "$log"
            echo "check_cuda: FAIL ${arch:-default arch} $src"
            status=1
            continue
        fi
        [ -n "$arch" ] || continue
        # One line per kernel: demangled name, registers, spill bytes, shared memory.
        if ! awk -v hot="$HOT" '
            /Function properties for/ { name = $NF; next }
            /bytes spill stores/ { spill = $5 + $9; next }
            /Used [0-9]+ registers/ {
                regs = $5; smem = 0
                if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
                short = name; sub(/^_ZN.*_[0-9a-f]+[0-9]+/, "", short); short = substr(short, 1, 60)
                flag = (spill > 0 && name ~ hot) ? "  SPILLS IN A HOT KERNEL" : ""
                printf "check_cuda:   %-60s regs=%-3d spills=%-4d smem=%d%s\n", short, regs, spill, smem, flag
                if (flag != "") bad = 1
            }
            END { exit bad }' "$log"; then
            echo "check_cuda: FAIL sm_90 $src: a hot kernel spills registers (see above)"
            status=1
        fi
    done
done
# The torch glue (csrc/cuda/*.cpp) needs torch's headers and CUDA's: a syntax check
# against the installed torch, so a CPU-only machine still sees glue that cannot compile.
# (A CPU torch wheel ships c10/cuda but not its generated cuda_cmake_macros.h: stubbed.)
PY="${PYTHON:-python}"
[ -x "$ROOT/.venv/bin/python" ] && PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
CUDA_INC="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
CXX_BIN="${CXX:-c++}"
if [ -n "$TORCH_INC" ] && [ -f "$CUDA_INC/cuda_runtime_api.h" ] && command -v "$CXX_BIN" >/dev/null 2>&1; then
    mkdir -p "$TMP/stub/c10/cuda/impl"
    [ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
    while IFS= read -r src; do
        if "$CXX_BIN" -fsyntax-only -std=c++20 -w -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$TMP/stub" \
                -I"$CUDA_INC" -I"$ROOT/csrc" -DORTHOLORA_WITH_CUDA "$ROOT/$src"; then
            echo "check_cuda: ok   glue syntax $src"
        else
            echo "check_cuda: FAIL glue syntax $src"
            status=1
        fi
    done < <(cd "$ROOT" && find csrc/cuda -name '*.cpp' | sort)
else
    echo "check_cuda: torch headers or CUDA headers not found; skipping the glue syntax check"
fi
exit $status
