// Stage 2 of the weighting methods on the host: the iterative kernels of
// ortholora_kernels/solvers/_lcp.py, one small problem at a time, float64, pure C++.
//
// Each function is the same arithmetic as its torch twin in _lcp.py (which runs on any
// device, batched, with a fixed number of iterations). Here an active-set loop stops as
// soon as the active set repeats: the next iterate would solve the same linear system
// again, so stopping there gives exactly what the fixed number of iterations gives.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ortholora {
namespace weights {

// Solves A x = b in place (A: n x n row-major, overwritten; b: n, overwritten by x) by
// Gaussian elimination with partial pivoting. A zero pivot divides by zero (Inf/NaN),
// like an unchecked LU; the callers keep their matrices nonsingular.
inline void lu_solve(double* A, double* b, int n) {
  for (int k = 0; k < n; ++k) {
    int p = k;
    double best = std::fabs(A[k * n + k]);
    for (int i = k + 1; i < n; ++i) {
      const double v = std::fabs(A[i * n + k]);
      if (v > best) best = v, p = i;
    }
    if (p != k) {
      for (int j = 0; j < n; ++j) std::swap(A[k * n + j], A[p * n + j]);
      std::swap(b[k], b[p]);
    }
    const double piv = A[k * n + k];
    for (int i = k + 1; i < n; ++i) {
      const double l = A[i * n + k] / piv;
      if (l == 0.0) continue;
      for (int j = k + 1; j < n; ++j) A[i * n + j] -= l * A[k * n + j];
      b[i] -= l * b[k];
    }
  }
  for (int k = n - 1; k >= 0; --k) {
    double s = b[k];
    for (int j = k + 1; j < n; ++j) s -= A[k * n + j] * b[j];
    b[k] = s / A[k * n + k];
  }
}

inline void matvec(const double* H, const double* x, int n, double* y) {
  for (int i = 0; i < n; ++i) {
    double s = 0.0;
    for (int j = 0; j < n; ++j) s += H[i * n + j] * x[j];
    y[i] = s;
  }
}

// Doubles of work the functions below need for n = T.
inline int64_t work_size(int n) { return 2 * static_cast<int64_t>(n + 1) * (n + 1) + 8 * (n + 1); }

// box_qp: argmin 1/2 s^T H s + q^T s, s >= lower (H positive definite); see _lcp.box_qp.
inline void box_qp(const double* H, const double* q0, const double* lower, int n, int iters, double* out,
                   double* work) {
  double* K = work;
  double* q = K + n * n;
  double* s = q + n;
  double* z = s + n;
  unsigned char* act = reinterpret_cast<unsigned char*>(z + n);      // 2n bytes (room: n doubles)
  unsigned char* prev = act + n;
  double* rf = z + 2 * n;
  int* idx = reinterpret_cast<int*>(rf + n);                          // n ints (room: n doubles)
  matvec(H, lower, n, q);
  for (int i = 0; i < n; ++i) q[i] += q0[i], s[i] = 0.0, z[i] = q[i];
  for (int it = 0; it < iters; ++it) {
    bool same = it > 0;
    for (int i = 0; i < n; ++i) {
      act[i] = z[i] > s[i];
      same = same && act[i] == prev[i];
      prev[i] = act[i];
    }
    if (same) break;
    // The free block H_FF s_F = -q_F (symmetric positive definite) by Cholesky; the LU of
    // the bordered-by-identity system (the torch twin's) where Cholesky meets a pivot <= 0.
    int nf = 0;
    for (int i = 0; i < n; ++i) {
      if (!act[i]) idx[nf++] = i;
    }
    bool chol = true;
    for (int a = 0; a < nf && chol; ++a) {
      for (int b = 0; b <= a; ++b) {
        double v = H[idx[a] * n + idx[b]];
        for (int k = 0; k < b; ++k) v -= K[a * nf + k] * K[b * nf + k];
        if (a == b) {
          if (!(v > 0.0)) {
            chol = false;
            break;
          }
          K[a * nf + a] = std::sqrt(v);
        } else {
          K[a * nf + b] = v / K[b * nf + b];
        }
      }
    }
    if (chol) {
      for (int a = 0; a < nf; ++a) {                                     // L y = -q_F
        double v = -q[idx[a]];
        for (int k = 0; k < a; ++k) v -= K[a * nf + k] * rf[k];
        rf[a] = v / K[a * nf + a];
      }
      for (int a = nf - 1; a >= 0; --a) {                                // L^T x = y
        double v = rf[a];
        for (int k = a + 1; k < nf; ++k) v -= K[k * nf + a] * rf[k];
        rf[a] = v / K[a * nf + a];
      }
      for (int i = 0; i < n; ++i) s[i] = 0.0;
      for (int a = 0; a < nf; ++a) s[idx[a]] = rf[a];
    } else {
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j < n; ++j) K[i * n + j] = act[i] ? (i == j ? 1.0 : 0.0) : H[i * n + j];
        s[i] = act[i] ? 0.0 : -q[i];
      }
      lu_solve(K, s, n);
    }
    matvec(H, s, n, z);
    for (int i = 0; i < n; ++i) z[i] += q[i];
  }
  for (int i = 0; i < n; ++i) out[i] = std::max(s[i], 0.0) + lower[i];
}

// simplex_qp: argmin w^T G w over {w >= 0, sum w = 1, w_i = 0 where !mask_i}; see
// _lcp.simplex_qp (a primal active-set method: one add or one drop per step).
inline void simplex_qp(const double* G, const unsigned char* mask, int n, int iters, double* out, double* work) {
  const int m = n + 1;
  double* K = work;
  double* z = K + m * m;            // n + 1 (the last: -lambda)
  double* w = z + m;
  double* mu = w + m;
  unsigned char* F = reinterpret_cast<unsigned char*>(mu + m);
  double dmax = 0.0;
  int k0 = -1;
  for (int i = 0; i < n; ++i) {
    F[i] = 0, w[i] = 0.0;
    if (!mask[i]) continue;
    dmax = std::max(dmax, G[i * n + i]);
    if (k0 < 0 || G[i * n + i] < G[k0 * n + k0]) k0 = i;
  }
  if (k0 < 0) {
    for (int i = 0; i < n; ++i) out[i] = 0.0;
    return;
  }
  F[k0] = 1, w[k0] = 1.0;
  const double tol = 1e-15 * dmax;
  for (int it = 0; it < iters; ++it) {
    // The minimiser on the affine hull of the free set: [G_FF 1; 1^T 0] [z; -lam] = [0; 1].
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) K[i * m + j] = F[i] ? G[i * n + j] : (i == j ? 1.0 : 0.0);
      K[i * m + n] = F[i] ? 1.0 : 0.0;
      K[n * m + i] = F[i] ? 1.0 : 0.0;
      z[i] = 0.0;
    }
    K[n * m + n] = 0.0;
    z[n] = 1.0;
    lu_solve(K, z, m);
    bool feasible = true;
    for (int i = 0; i < n; ++i) feasible = feasible && (!F[i] || z[i] > 0.0);
    if (feasible) {
      for (int i = 0; i < n; ++i) w[i] = F[i] ? z[i] : 0.0;
      matvec(G, w, n, mu);
      int j = -1;
      for (int i = 0; i < n; ++i) {
        mu[i] += z[n];                                       // G w - lambda
        if (mask[i] && !F[i] && mu[i] < -tol && (j < 0 || mu[i] < mu[j])) j = i;
      }
      if (j < 0) break;                                      // KKT hold: optimal
      F[j] = 1;
    } else {
      // Step from w towards z until the first free weight reaches 0; drop it.
      double alpha = 1.0;
      int drop = -1;
      for (int i = 0; i < n; ++i) {
        if (F[i] && z[i] <= 0.0) {
          const double r = w[i] - z[i] > 0.0 ? w[i] / (w[i] - z[i]) : 0.0;
          if (drop < 0 || r < alpha) alpha = r, drop = i;
        }
      }
      for (int i = 0; i < n; ++i) {
        if (F[i]) w[i] += alpha * (z[i] - w[i]);
      }
      F[drop] = 0, w[drop] = 0.0;
    }
  }
  for (int i = 0; i < n; ++i) out[i] = F[i] ? std::max(w[i], 0.0) : 0.0;
}

// cagrad_kkt: the CAGrad correction s >= 0 (v = ubar + s) on a positive definite G; see
// _lcp.cagrad_kkt. b = G ubar, phi2 = phi^2.
inline void cagrad_kkt(const double* G, const double* b, double phi2, const unsigned char* mask, int n, int iters,
                       double norm_eps, double* out, double* work) {
  double* K = work;
  double* Kc = K + n * n;
  double* sb = Kc + n * n;
  double* p = sb + n;
  double* s = p + n;
  double* z = s + n;
  double* t1 = z + n;
  unsigned char* act = reinterpret_cast<unsigned char*>(t1 + n);     // 2n bytes (room: n + 1 doubles)
  unsigned char* prev = act + n;
  // Start: only the task(s) with the smallest b = (G ubar)_i free (the vertex the
  // correction leans to first); the active-set steps free the others as needed.
  double bmin = std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) {
    if (mask[i]) bmin = std::min(bmin, b[i]);
  }
  for (int i = 0; i < n; ++i) s[i] = 0.0, z[i] = b[i] - bmin;
  double lam = 0.0;
  auto quad = [&](const double* u, const double* v) {
    matvec(G, v, n, t1);
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc += u[i] * t1[i];
    return acc;
  };
  for (int it = 0; it < iters; ++it) {
    bool same = it > 0;
    for (int i = 0; i < n; ++i) {
      act[i] = !mask[i] || z[i] > s[i];
      same = same && act[i] == prev[i];
      prev[i] = act[i];
    }
    if (same) break;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) K[i * n + j] = act[i] ? (i == j ? 1.0 : 0.0) : G[i * n + j];
      sb[i] = act[i] ? 0.0 : -b[i];
      p[i] = act[i] ? 0.0 : 1.0;
    }
    std::memcpy(Kc, K, sizeof(double) * n * n);
    lu_solve(K, sb, n);
    lu_solve(Kc, p, n);
    const double a = quad(p, p), bb = quad(p, sb), c0 = quad(sb, sb);
    const double disc = std::max(bb * bb - a * (c0 - phi2), 0.0);
    if (a > 1e-300) lam = (std::sqrt(disc) - bb) / a;
    for (int i = 0; i < n; ++i) s[i] = sb[i] + lam * p[i];
    matvec(G, s, n, z);
    for (int i = 0; i < n; ++i) z[i] += b[i] - lam;
  }
  // A non-finite iterate (0 in the hull of the free tasks) drops the correction; so does
  // ||g_w|| < norm_eps for w = s / sum(s) (its direction is undefined).
  bool finite = true;
  for (int i = 0; i < n; ++i) finite = finite && std::isfinite(s[i]);
  double total = 0.0;
  for (int i = 0; i < n; ++i) {
    out[i] = mask[i] && finite ? std::max(s[i], 0.0) : 0.0;
    total += out[i];
  }
  const double gs = std::sqrt(std::max(quad(out, out), 0.0));
  const double rho = gs / (total > 0.0 ? total : 1.0);
  if (rho < norm_eps) {
    for (int i = 0; i < n; ++i) out[i] = 0.0;
  }
}

// power_root: the positive root x of G x = x^(-1/alpha) on the masked coordinates (0 on
// the others); see _lcp.power_root. Fixed iterations (Newton converges, it never cycles).
inline void power_root(const double* G, const unsigned char* mask, double alpha, int n, int iters, double* out,
                       double* work) {
  const double p = -1.0 / alpha;
  double* J = work;
  double* x = J + n * n;
  double* f = x + n;
  double* xp = f + n;
  const double tiny = std::numeric_limits<double>::min();
  for (int i = 0; i < n; ++i) x[i] = std::pow(std::max(G[i * n + i], tiny), -alpha / (1 + alpha));
  for (int it = 0; it < iters; ++it) {
    for (int i = 0; i < n; ++i) xp[i] = std::pow(x[i], p);
    for (int i = 0; i < n; ++i) {
      double acc = 0.0;
      for (int j = 0; j < n; ++j) acc += mask[j] ? G[i * n + j] * x[j] : 0.0;
      f[i] = acc;
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        const bool both = mask[i] && mask[j];
        J[i * n + j] = both ? G[i * n + j] : (i == j ? 1.0 : 0.0);
      }
      if (mask[i]) J[i * n + i] -= p * (xp[i] / x[i]);
      f[i] = mask[i] ? -(f[i] - xp[i]) : 0.0;
    }
    lu_solve(J, f, n);                                                 // f: the step
    double t = 1.0;
    for (int i = 0; i < n; ++i) {
      if (f[i] < 0) t = std::min(t, -0.9 * x[i] / f[i]);
    }
    for (int i = 0; i < n; ++i) x[i] += t * f[i];
  }
  for (int i = 0; i < n; ++i) out[i] = mask[i] ? x[i] : 0.0;
}

}  // namespace weights
}  // namespace ortholora

namespace ortholora {
namespace weights {

// Eigen-decomposition of a symmetric n x n matrix by cyclic Jacobi rotations: A (row
// major, destroyed) -> eigenvalues lam (ascending) and eigenvectors as the COLUMNS of V
// (row major). Converges quadratically; stops when the off-diagonal mass is below
// 1e-30 of the diagonal's (at most 60 sweeps).
inline void jacobi_eigh(double* A, int n, double* lam, double* V) {
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) V[i * n + j] = i == j ? 1.0 : 0.0;
  }
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < n; ++i) {
      diag += A[i * n + i] * A[i * n + i];
      for (int j = i + 1; j < n; ++j) off += A[i * n + j] * A[i * n + j];
    }
    if (!(off > 1e-30 * diag)) break;                                 // also stops on NaN
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = A[p * n + q];
        if (apq == 0.0) continue;
        const double theta = (A[q * n + q] - A[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < n; ++k) {                                  // A <- A J (columns p, q)
          const double akp = A[k * n + p], akq = A[k * n + q];
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {                                  // A <- J^T A (rows p, q)
          const double apk = A[p * n + k], aqk = A[q * n + k];
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {                                  // V <- V J
          const double vkp = V[k * n + p], vkq = V[k * n + q];
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) lam[i] = A[i * n + i];
  // Ascending order (selection sort of the eigenpairs; n is small).
  for (int i = 0; i < n; ++i) {
    int m = i;
    for (int j = i + 1; j < n; ++j) {
      if (lam[j] < lam[m]) m = j;
    }
    if (m != i) {
      std::swap(lam[i], lam[m]);
      for (int k = 0; k < n; ++k) std::swap(V[k * n + i], V[k * n + m]);
    }
  }
}

// Doubles of work spectral() needs.
inline int64_t spectral_work(int n) { return 3 * static_cast<int64_t>(n) * n + 6 * n; }

// out = sum_k f(lam_k) (V_k . b) V_k over the eigenpairs of S (n x n), f(lam) = coef[k].
inline void spectral_apply(const double* V, const double* coef, const double* b, int n, double* out) {
  for (int i = 0; i < n; ++i) out[i] = 0.0;
  for (int k = 0; k < n; ++k) {
    if (coef[k] == 0.0) continue;
    double dot = 0.0;
    for (int i = 0; i < n; ++i) dot += V[i * n + k] * b[i];
    const double f = coef[k] * dot;
    for (int i = 0; i < n; ++i) out[i] += f * V[i * n + k];
  }
}

// The eigendecomposition-based weights on the unit-trace Gram G with absent rows zeroed:
// mode 0 IMTL-G, 1 Aligned-MTL (scale 0 min, 1 median, 2 rmse), 2 ConFIG; u: the
// preference vector (zeros on absent tasks). See solvers/imtlg.py, alignedmtl.py,
// config.py (the torch twins, the same formulas). A non-finite G gives NaN weights.
inline void spectral(const double* G, const unsigned char* mask, const double* u, int n, int mode, int scale,
                     double* out, double* work) {
  const double eps = std::numeric_limits<double>::epsilon();
  double* A = work;
  double* V = A + n * n;
  double* lam = V + n * n;
  double* coef = lam + n;
  double* b = coef + n;
  double* inv = b + n;
  double* ga = inv + n;
  int np = 0;
  bool finite = true;
  for (int i = 0; i < n; ++i) np += mask[i] ? 1 : 0;
  for (int q = 0; q < n * n; ++q) finite = finite && std::isfinite(G[q]);
  if (!finite) {
    for (int i = 0; i < n; ++i) out[i] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  if (mode == 2) {                                                    // cosine matrix K
    for (int i = 0; i < n; ++i) {
      const double nrm = std::sqrt(std::max(G[i * n + i], 0.0));
      inv[i] = nrm > 0 ? 1.0 / nrm : 0.0;
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) A[i * n + j] = G[i * n + j] * (inv[i] * inv[j]);
    }
  } else {
    std::memcpy(A, G, sizeof(double) * n * n);
  }
  jacobi_eigh(A, n, lam, V);
  if (mode == 0 || mode == 2) {                                       // pinv(.) b, cut np * eps relative
    double mx = 0.0;
    for (int k = 0; k < n; ++k) mx = std::max(mx, std::fabs(lam[k]));
    for (int k = 0; k < n; ++k) coef[k] = std::fabs(lam[k]) > np * eps * mx ? 1.0 / lam[k] : 0.0;
    if (mode == 0) {
      for (int i = 0; i < n; ++i) b[i] = std::sqrt(std::max(G[i * n + i], 0.0));
      spectral_apply(V, coef, b, n, out);
      double total = 0.0;
      for (int i = 0; i < n; ++i) total += out[i];
      for (int i = 0; i < n; ++i) out[i] = std::fabs(total) < 1e-12 ? 0.0 : out[i] / total;
    } else {
      spectral_apply(V, coef, u, n, b);
      for (int i = 0; i < n; ++i) b[i] *= inv[i];                       // a
      matvec(G, b, n, ga);
      double aga = 0.0, sga = 0.0;
      for (int i = 0; i < n; ++i) aga += b[i] * ga[i], sga += ga[i];
      aga = std::max(aga, 1e-24);
      for (int i = 0; i < n; ++i) out[i] = b[i] * sga / aga;
    }
  } else {                                                            // Aligned-MTL
    const double tol = lam[n - 1] * np * eps;
    int rank = 0;
    for (int k = 0; k < n; ++k) rank += lam[k] > tol ? 1 : 0;
    if (rank == 0) {
      for (int i = 0; i < n; ++i) out[i] = u[i];
    } else {
      double sc;
      if (scale == 0) {
        sc = std::numeric_limits<double>::infinity();
        for (int k = 0; k < n; ++k) {
          if (lam[k] > tol) sc = std::min(sc, lam[k]);
        }
      } else if (scale == 2) {
        sc = 0.0;
        for (int k = 0; k < n; ++k) sc += lam[k] > tol ? lam[k] : 0.0;
        sc /= rank;
      } else {
        sc = lam[(n - rank) + (rank - 1) / 2];
      }
      const double root = std::sqrt(std::max(sc, 0.0));
      for (int k = 0; k < n; ++k) {
        coef[k] = lam[k] > tol ? root / std::sqrt(std::max(lam[k], std::numeric_limits<double>::min())) : 0.0;
      }
      spectral_apply(V, coef, u, n, out);
    }
  }
  for (int i = 0; i < n; ++i) out[i] = mask[i] ? out[i] : 0.0;
}

}  // namespace weights
}  // namespace ortholora

namespace ortholora {
namespace weights {

// One GradVac step on one segment (see solvers/gradvac.py, the torch twin: the same
// arithmetic, the same order of updates). Each task i is independent of the others (its
// row of C, of C G and of the targets), so the rows run one after the other; task i visits
// order[i*n + k] at step k. G: n x n; order: n x n; hat: n x n targets, updated in place;
// mask: presence. Adds each row of C into w (n, zeroed by the caller). work: 2n doubles.
// As the torch twin: an absent task gets the row 0 and is never visited; a pair with an
// absent task keeps its target; NaN/Inf reach C G through w * G[j] even where w = 0.
inline void gradvac_step(const double* G, const int64_t* order, const unsigned char* mask, int n, double beta,
                         double eps, double* hat, double* w, double* work) {
  auto clamp0 = [](double v) { return v < 0.0 ? 0.0 : v; };           // NaN stays NaN (as clamp_min)
  double* c = work;
  double* cg = work + n;
  for (int i = 0; i < n; ++i) {
    for (int l = 0; l < n; ++l) c[l] = 0.0, cg[l] = G[i * n + l];
    c[i] = mask[i] ? 1.0 : 0.0;
    for (int k = 0; k < n; ++k) {
      const int j = static_cast<int>(order[i * n + k]);
      const bool other = j != i && mask[i] && mask[j];
      double ni = 0.0;
      for (int l = 0; l < n; ++l) ni += cg[l] * c[l];
      ni = std::sqrt(clamp0(ni));
      const double nj = std::sqrt(clamp0(G[j * n + j]));
      const double phi = cg[j] / (ni * nj + eps);
      const double h = hat[i * n + j];
      const bool act = other && phi < h;
      const double sq_phi = std::sqrt(clamp0(1.0 - phi * phi));
      const double sq_hat = std::sqrt(clamp0(1.0 - h * h));
      const double wk = act ? ni * (h * sq_phi - phi * sq_hat) / (nj * sq_hat + eps) : 0.0;
      c[j] += wk;
      for (int l = 0; l < n; ++l) cg[l] += wk * G[j * n + l];
      if (other) hat[i * n + j] = (1.0 - beta) * h + beta * phi;
    }
    for (int l = 0; l < n; ++l) w[l] += c[l];
  }
}

}  // namespace weights
}  // namespace ortholora
