// CUDA kernels of the native backend: raw pointers and a cudaStream_t, no torch headers,
// so `nvcc -c kernels.cu` compiles alone (scripts/check_cuda.sh). The torch glue lives in
// ortholora_cuda.cpp and only builds when torch has CUDA.
//
// Stages (all on `stream`, no host synchronisation):
//   1. gram_partial: one block per piece (a column range inside one segment); the
//      piece is staged through shared memory, each warp owns a register tile of pairs
//      (2 x 2 or 4 x 4; 1 x 4 for a one-row cross product), each pair's sum reduced with a
//      fixed shuffle tree -> partial[piece][pair] (float64).
//   2. solve: one block per segment; sums its pieces' partials in piece order
//      (deterministic), writes G, runs the sequential projection (one thread per task
//      row), writes C, nproj and the combine weights.
//   3. combine: one block per piece, out[:, cols] = W_s x[:, cols], fp32-or-better; each
//      thread reads its column of x once and keeps every output row's accumulator in
//      registers.
// The backward's two passes (v = dY X^T and dX = W^T dY + M X) reuse 1 and 3.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ortholora {
namespace cuda {

constexpr int kMaxTasks = 32;   // T limit of the CUDA kernels (shared-memory solve)

// The piece table, device pointers (int64): piece_seg/lo/hi [npieces], seg_first [S + 1].
struct PieceTable {
  const int64_t* seg;
  const int64_t* lo;
  const int64_t* hi;
  const int64_t* seg_first;
  int npieces;
  int nsegments;
};

// Columns staged per shared-memory tile for T tasks (a multiple of 32).
int gram_tile_columns(int tasks, bool fp64_input);

// In: float, double, __half or __nv_bfloat16 (as the raw CUDA types); Acc is float for
// every input but double (double). weights: S * R * T values of Acc (R = T for
// reduction "none", else 1); partial: npieces * T * (T + 1) / 2 doubles.
// reduction: 0 sum, 1 mean, 2 none. Returns the launch error (cudaSuccess when fine).
template <class In>
cudaError_t launch_project(const In* x, int tasks, int64_t n, const PieceTable& table, const int64_t* order,
                           int reduction, double* partial, double* gram, double* coeffs, int32_t* nproj,
                           void* weights, In* out, cudaStream_t stream);

// Backward passes (T, R <= kMaxTasks). launch_cross: out [S][R][T] float64 = Y_s X_s^T
// (partial: npieces * R * T doubles). launch_backward_combine: out [T, n] =
// M1_s dY_s + M2_s X_s per piece, m1 [S][T][R] and m2 [S][T][T] of Acc.
template <class In>
cudaError_t launch_cross(const In* y, int rows, const In* x, int tasks, int64_t n, const PieceTable& table,
                         double* partial, double* out, cudaStream_t stream);

template <class In>
cudaError_t launch_backward_combine(const In* dy, int rows, const In* x, int tasks, int64_t n,
                                    const PieceTable& table, const void* m1, const void* m2, In* out,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace ortholora
