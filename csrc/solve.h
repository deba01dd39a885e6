// Stage 2 on the host: the sequential projection on one T x T Gram matrix (float64).
// Pure C++ (no torch); the same arithmetic as ortholora_kernels/solve.py:
//   C = I; for every task i, for k = 0..T-1 with j = order[i, k]:
//     valid = j in [0, T), j != i, G[j, j] > 0   (skip self and out-of-range j, never divide by zero)
//     inner = sum_m C[i, m] G[j, m]              (g_i' . g_j through the Gram matrix)
//     C[i, j] -= min(inner, 0) / G[j, j]         (NaN propagates, like torch.clamp)
//     nproj += valid and inner < 0
#pragma once

#include <cstdint>

namespace ortholora {

// G, C: T x T row-major; order: T x T. An entry outside [0, T) is skipped, never read
// through (the contract of every backend, see ARCHITECTURE.md). Returns nproj.
inline int32_t solve_one(const double* G, const int64_t* order, int T, double* C) {
  int32_t nproj = 0;
  for (int64_t q = 0; q < static_cast<int64_t>(T) * T; ++q) C[q] = 0.0;
  for (int i = 0; i < T; ++i) {
    double* row = C + static_cast<int64_t>(i) * T;
    row[i] = 1.0;
    const int64_t* ord = order + static_cast<int64_t>(i) * T;
    for (int k = 0; k < T; ++k) {
      const int64_t j = ord[k];
      if (j < 0 || j >= T || j == i) continue;
      const double norm2 = G[j * T + j];
      if (!(norm2 > 0.0)) continue;
      const double* gj = G + j * T;
      double inner = 0.0;
      for (int m = 0; m < T; ++m) inner += row[m] * gj[m];
      if (inner < 0.0 || inner != inner) row[j] -= inner / norm2;
      nproj += inner < 0.0 ? 1 : 0;
    }
  }
  return nproj;
}

// Combine weights W [R, T] from C [T, T]: R = 1 (sum of rows; mean divides by T) or
// R = T (none: W = C). reduction: 0 sum, 1 mean, 2 none.
inline void weights_one(const double* C, int T, int reduction, double* W) {
  if (reduction == 2) {
    for (int64_t q = 0; q < static_cast<int64_t>(T) * T; ++q) W[q] = C[q];
    return;
  }
  for (int k = 0; k < T; ++k) {
    double s = C[k];
    for (int i = 1; i < T; ++i) s += C[static_cast<int64_t>(i) * T + k];
    W[k] = reduction == 1 ? s / T : s;
  }
}

}  // namespace ortholora
