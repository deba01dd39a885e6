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

// Step k of task i visits order[i, k]; an entry outside [0, T) reads as task 0 and is
// skipped (in_range false), as in solve.py's _visit.
inline int64_t visit(const int64_t* order, int T, int i, int k, bool& in_range) {
  const int64_t j = order[static_cast<int64_t>(i) * T + k];
  in_range = j >= 0 && j < T;
  return in_range ? j : int64_t{0};
}

// Doubles of solve_vjp_one's work buffer.
inline int64_t solve_vjp_work(int T) { return static_cast<int64_t>(T) * T * (T + 4) + T; }

// The backward's stage 2 on one segment: the solve replayed (its history kept) and its
// reverse mode, the same arithmetic as ortholora_kernels/solve.py's solve_vjp (float64):
//   M = Gbar + Gbar^T [T, T] with Gbar = dL/dG given V = dL/dW [R, T], and W [R, T].
// Every multiplication of the torch ops is done even where its factor is zero (an
// inactive step: inner_bar = 0), so a NaN/Inf in G or C reaches the entries torch's ops
// give NaN. Row i of C and of dL/dC only ever meet row i, so each step updates them row
// by row. work: solve_vjp_work(T) doubles.
inline void solve_vjp_one(const double* G, const int64_t* order, const double* V, int T, int reduction,
                          double* M, double* W, double* work) {
  const int64_t TT = static_cast<int64_t>(T) * T;
  double* hist = work;                  // hist[k]: C before step k (T x T)
  double* inner = hist + TT * T;        // inner[k * T + i]: g_i' . g_j at step k
  double* C = inner + TT;
  double* cbar = C + TT;                // dL/dC
  double* gbar = cbar + TT;             // dL/dG
  double* norm2_bar = gbar + TT;        // per task, the step's dL/dG[j, j]
  for (int64_t q = 0; q < TT; ++q) C[q] = gbar[q] = 0.0;
  for (int i = 0; i < T; ++i) C[static_cast<int64_t>(i) * T + i] = 1.0;
  // Forward, steps outer (as torch): record C and the inner products of every step.
  for (int k = 0; k < T; ++k) {
    double* h = hist + k * TT;
    for (int64_t q = 0; q < TT; ++q) h[q] = C[q];
    for (int i = 0; i < T; ++i) {
      bool in_range;
      const int64_t j = visit(order, T, i, k, in_range);
      const double* row = h + static_cast<int64_t>(i) * T;
      const double* gj = G + j * T;
      double acc = 0.0;
      for (int m = 0; m < T; ++m) acc += row[m] * gj[m];
      inner[k * T + i] = acc;
      const double norm2 = G[j * T + j];
      const bool valid = in_range && j != i && norm2 > 0.0;
      if (valid && (acc < 0.0 || acc != acc)) C[static_cast<int64_t>(i) * T + j] -= acc / norm2;
    }
  }
  weights_one(C, T, reduction, W);
  // dL/dC from dL/dW (the adjoint of weights_one).
  for (int i = 0; i < T; ++i) {
    for (int m = 0; m < T; ++m) {
      const double v = reduction == 2 ? V[static_cast<int64_t>(i) * T + m] : V[m];
      cbar[static_cast<int64_t>(i) * T + m] = reduction == 1 ? v / T : v;
    }
  }
  for (int k = T - 1; k >= 0; --k) {
    const double* h = hist + k * TT;
    for (int i = 0; i < T; ++i) {
      bool in_range;
      const int64_t j = visit(order, T, i, k, in_range);
      const double in = inner[k * T + i];
      const double norm2 = G[j * T + j];
      const bool valid = in_range && j != i && norm2 > 0.0;
      const double safe = valid ? norm2 : 1.0;
      const bool active = valid && in < 0.0;          // where coef = inner / norm2
      double* cb = cbar + static_cast<int64_t>(i) * T;
      const double coef_bar = -cb[j];
      const double inner_bar = active ? coef_bar / safe : 0.0;
      norm2_bar[i] = active ? -coef_bar * in / (safe * safe) : 0.0;
      const double* gj = G + j * T;
      const double* row = h + static_cast<int64_t>(i) * T;
      double* gb = gbar + j * T;
      for (int m = 0; m < T; ++m) cb[m] += inner_bar * gj[m];
      for (int m = 0; m < T; ++m) gb[m] += inner_bar * row[m];
    }
    for (int i = 0; i < T; ++i) {    // the diagonal after the rows, as torch's two scatter_adds
      bool in_range;
      gbar[visit(order, T, i, k, in_range) * (T + 1)] += norm2_bar[i];
    }
  }
  for (int a = 0; a < T; ++a) {
    for (int b = 0; b < T; ++b) M[static_cast<int64_t>(a) * T + b] = gbar[static_cast<int64_t>(a) * T + b] + gbar[static_cast<int64_t>(b) * T + a];
  }
}

}  // namespace ortholora
