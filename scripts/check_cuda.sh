#!/usr/bin/env bash
# Compile-check the CUDA kernels: every csrc/**/*.cu with `nvcc -c` (default arch and
# sm_90) into a temporary directory. The kernels include no torch header, so this needs
# only nvcc, not a CUDA build of torch. Skips (exit 0) when nvcc is not on PATH.
# Extra arguments go to nvcc (e.g. -arch=sm_80).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
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
    for src in "${SOURCES[@]}"; do
        obj="$TMP/$(echo "$src" | tr '/' '_').${arch#-arch=}.o"
        if "$NVCC" -std=c++17 -O3 $arch -I"$ROOT/csrc" "$@" -c "$ROOT/$src" -o "$obj"; then
            echo "check_cuda: ok   ${arch:-default arch} $src"
        else
            echo "check_cuda: FAIL ${arch:-default arch} $src"
            status=1
        fi
    done
done
exit $status
