// Torch glue of the CPU implementation and the op schemas (namespace ortholora_C).
//
// torch.ops.ortholora_C.project is ONE call for the three stages over all segments:
//   1. Gram: columns are cut into fixed chunks (independent of the thread count), each
//      chunk-segment piece gets its own float64 partial Gram; OpenMP over chunks.
//   2. Per segment: sum the partials in column order (fixed order: deterministic), solve
//      the projection on the T x T Gram matrix, build the combine weights.
//   3. Combine: out = W_s X_s per piece, OpenMP over the same chunks (same thread, same
//      chunks as in 1, walked backwards, so the last ones read are still in L2).
// The three run in one OpenMP parallel region with barriers between them (run_phases).
// Kernels (csrc/cpu/) are plain C++ on raw pointers, one variant per instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernels_api.h"
#include "ortholora_ops.h"
#include "solve.h"

namespace ortholora {
namespace {

// One step of a parallel computation: f(begin, end) over contiguous, equal shares of
// [0, n), one share per thread, and only as many threads as give each at least
// `min_per_thread` items.
struct Phase {
  int64_t n;
  int64_t min_per_thread;
  std::function<void(int64_t, int64_t)> f;
};

// Runs the phases in ONE OpenMP parallel region, a barrier between phases (one thread
// wake-up per call instead of one per phase). A thread gets the same share of two phases
// of the same size (the combine finds its Gram chunks in L2). Thread count: torch's
// (at::get_num_threads(), i.e. torch.set_num_threads), even if this extension's OpenMP
// runtime were a different copy from torch's; no nested parallelism. Results never
// depend on it: every chunk's partial is computed and summed the same way.
void run_phases(const std::vector<Phase>& phases) {
#ifdef _OPENMP
  auto users = [](const Phase& p, int64_t nth) {
    return std::max<int64_t>(1, std::min<int64_t>(nth, p.n / std::max<int64_t>(1, p.min_per_thread)));
  };
  int64_t want = 1;
  for (const Phase& p : phases) want = std::max(want, users(p, at::get_num_threads()));
  if (want > 1 && !at::in_parallel_region() && !omp_in_parallel()) {
    std::exception_ptr error;
    const int64_t nphases = static_cast<int64_t>(phases.size());
#pragma omp parallel num_threads(static_cast<int>(want))
    {
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
      for (int64_t k = 0; k < nphases; ++k) {
        const Phase& p = phases[k];
        const int64_t use = users(p, nth);
        const int64_t share = (p.n + use - 1) / use;
        const int64_t b = std::min(p.n, tid * share), e = std::min(p.n, b + share);
        if (tid < use && b < e) {
          try {
            p.f(b, e);
          } catch (...) {
#pragma omp critical(ortholora_error)
            if (!error) error = std::current_exception();
          }
        }
        if (k + 1 < nphases) {
#pragma omp barrier
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (const Phase& p : phases) {
    if (p.n > 0) p.f(0, p.n);
  }
}

// Columns per chunk: about 256 KiB of input, at least 64 columns per row (so the T x T
// float64 partial per chunk stays small next to its input for large T), a multiple of
// 512. Depends only on the shape and dtype, never on the thread count, so results are
// bitwise reproducible.
int64_t chunk_columns(int64_t rows, int64_t elem) {
  int64_t c = (int64_t{1} << 18) / std::max<int64_t>(1, rows * elem);
  c = std::max<int64_t>(c, 64 * rows);
  c = std::max<int64_t>(512, (c + 511) / 512 * 512);
  return c;
}

bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// fp16/bf16 are widened to fp32 once (exact); fp32 accumulation, one rounding at the end.
at::Tensor working(const at::Tensor& x) { return is_low_precision(x.scalar_type()) ? x.to(at::kFloat) : x; }

// The two phases of the pair products Y_s X_s^T of every segment (sym: Y is X, Gram):
// chunk partials, then per segment the fixed-order sum into out [S, R, T] (float64).
struct PairPhases {
  std::vector<double> partial;
  Phase chunks, segments;
};

void pair_phases(const at::Tensor& y, const at::Tensor& x, bool sym, const Pieces& P, int64_t S, double* out,
                 PairPhases& ph) {
  const int64_t R = y.size(0), T = x.size(0), N = x.size(1);
  const int64_t RT = R * T;
  const int64_t np = static_cast<int64_t>(P.lo.size());
  ph.partial.assign(static_cast<size_t>(np * RT), 0.0);
  double* partial = ph.partial.data();
  const cpu::KernelTable* K = &cpu::active_table();
  const bool f64 = x.scalar_type() == at::kDouble;
  const void* yp = y.data_ptr();
  const void* xp = x.data_ptr();
  const Pieces* PP = &P;
  ph.chunks = Phase{P.nchunks, 1, [=](int64_t b, int64_t e) {
    for (int64_t q = PP->chunk_first[b]; q < PP->chunk_first[e]; ++q) {
      double* dst = partial + q * RT;
      if (f64) {
        K->pairs_f64(static_cast<const double*>(yp), static_cast<int>(R), static_cast<const double*>(xp),
                     static_cast<int>(T), sym, N, PP->lo[q], PP->hi[q], dst);
      } else {
        K->pairs_f32(static_cast<const float*>(yp), static_cast<int>(R), static_cast<const float*>(xp),
                     static_cast<int>(T), sym, N, PP->lo[q], PP->hi[q], dst);
      }
    }
  }};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, RT * (1 + np / S)));
  ph.segments = Phase{S, grain, [=](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      double* g = out + s * RT;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t jend = sym ? i + 1 : T;
        for (int64_t j = 0; j < jend; ++j) {
          double acc = partial[PP->seg_first[s] * RT + i * T + j];
          for (int64_t q = PP->seg_first[s] + 1; q < PP->seg_first[s + 1]; ++q) acc += partial[q * RT + i * T + j];
          g[i * T + j] = acc;
          if (sym) g[j * T + i] = acc;
        }
      }
    }
  }};
}

// out[r, c] = sum_k m1_s[r, k] s1[k, c] (+ sum_k m2_s[r, k] s2[k, c]) per piece, as a
// phase over the chunks. Each thread walks its chunks backwards: the ones the Gram phase
// read last are still in its L2. (Which thread writes which column never changes values.)
template <class S_>
Phase combine_phase(const S_* s1, int64_t k1, const S_* m1, const S_* s2, int64_t k2, const S_* m2, int64_t rout,
                    int64_t N, const Pieces& P, S_* out) {
  const cpu::KernelTable* K = &cpu::active_table();
  const Pieces* PP = &P;
  return Phase{P.nchunks, 1, [=](int64_t b, int64_t e) {
    for (int64_t q = PP->chunk_first[e] - 1; q >= PP->chunk_first[b]; --q) {
      const int64_t s = PP->seg[q];
      const S_* w1 = m1 + s * rout * k1;
      const S_* w2 = k2 ? m2 + s * rout * k2 : nullptr;
      if constexpr (std::is_same<S_, double>::value) {
        K->combine_f64(s1, static_cast<int>(k1), w1, s2, static_cast<int>(k2), w2, static_cast<int>(rout), N,
                       PP->lo[q], PP->hi[q], out, N);
      } else {
        K->combine_f32(s1, static_cast<int>(k1), w1, s2, static_cast<int>(k2), w2, static_cast<int>(rout), N,
                       PP->lo[q], PP->hi[q], out, N);
      }
    }
  }};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> project_cpu(const at::Tensor& grads,
                                                                       at::IntArrayRef offsets,
                                                                       const at::Tensor& order,
                                                                       c10::string_view reduction) {
  const at::Tensor x0 = check_grads(grads, "grads");
  const int red = reduction_code(reduction);
  const int64_t T = x0.size(0), N = x0.size(1);
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const at::Tensor ord = check_order(order, S, T, x0.device());
  // Out-of-range order values are skipped by the solve (solve.h), as on every backend.
  const int64_t* op = ord.data_ptr<int64_t>();
  const at::Tensor x = working(x0);
  const bool f64 = x.scalar_type() == at::kDouble;
  const Pieces P = make_pieces(offs, chunk_columns(T, f64 ? 8 : 4));

  auto f64opt = x.options().dtype(at::kDouble);
  at::Tensor gram = at::empty({S, T, T}, f64opt);
  at::Tensor coeffs = at::empty({S, T, T}, f64opt);
  at::Tensor nproj = at::empty({S}, x.options().dtype(at::kInt));
  const int64_t R = red == 2 ? T : 1;
  at::Tensor out = red == 2 ? at::empty({T, N}, x.options()) : at::empty({N}, x.options());
  std::vector<double> w64(static_cast<size_t>(S * R * T));
  std::vector<float> w32(f64 ? 0 : static_cast<size_t>(S * R * T));
  double* gp = gram.data_ptr<double>();
  double* cp = coeffs.data_ptr<double>();
  int32_t* npp = nproj.data_ptr<int32_t>();
  double* wp64 = w64.data();
  float* wp32 = w32.data();

  // 1. Gram partials per chunk | 2. per segment: sum them, solve, weights | 3. combine.
  PairPhases gram_phases;
  pair_phases(x, x, true, P, S, gp, gram_phases);
  const Phase reduce = gram_phases.segments;
  Phase solve{S, reduce.min_per_thread, [=](int64_t b, int64_t e) {
    reduce.f(b, e);
    for (int64_t s = b; s < e; ++s) {
      npp[s] = solve_one(gp + s * T * T, op + s * T * T, static_cast<int>(T), cp + s * T * T);
      weights_one(cp + s * T * T, static_cast<int>(T), red, wp64 + s * R * T);
      if (!f64) {
        for (int64_t q = s * R * T; q < (s + 1) * R * T; ++q) wp32[q] = static_cast<float>(wp64[q]);
      }
    }
  }};
  const Phase combine = f64 ? combine_phase<double>(x.data_ptr<double>(), T, wp64, nullptr, 0, nullptr, R, N, P,
                                                    out.data_ptr<double>())
                            : combine_phase<float>(x.data_ptr<float>(), T, wp32, nullptr, 0, nullptr, R, N, P,
                                                   out.data_ptr<float>());
  run_phases({gram_phases.chunks, solve, combine});
  if (out.scalar_type() != x0.scalar_type()) out = out.to(x0.scalar_type());
  return {out, gram, coeffs, nproj};
}

// G[s] = X_s X_s^T, float64 [S, T, T]: stage 1 alone (the Gram of every other solve),
// the same chunks, kernels and fixed-order sums as the fused project (bitwise equal).
at::Tensor gram_cpu(const at::Tensor& grads, at::IntArrayRef offsets) {
  const at::Tensor x0 = check_grads(grads, "grads");
  const int64_t T = x0.size(0), N = x0.size(1);
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const at::Tensor x = working(x0);
  const Pieces P = make_pieces(offs, chunk_columns(T, x.scalar_type() == at::kDouble ? 8 : 4));
  at::Tensor gram = at::empty({S, T, T}, x.options().dtype(at::kDouble));
  PairPhases ph;
  pair_phases(x, x, true, P, S, gram.data_ptr<double>(), ph);
  run_phases({ph.chunks, ph.segments});
  return gram;
}

// out = per segment W_s X_s for w [S, R, T] (any float dtype): stage 3 alone, one pass,
// in the dtype of grads (fp32-or-better accumulation), the kernels of the fused project.
at::Tensor combine_cpu(const at::Tensor& grads, const at::Tensor& w, at::IntArrayRef offsets) {
  const at::Tensor x0 = check_grads(grads, "grads");
  const at::Tensor x = working(x0);
  const at::ScalarType acc = x.scalar_type();
  const int64_t T = x.size(0), N = x.size(1);
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == S && w.size(2) == T && w.size(1) >= 1,
                    "w: expected [S, R, T] with S = ", S, ", T = ", T, ", got ", w.sizes());
  const int64_t R = w.size(1);
  const at::Tensor m = w.to(acc).contiguous();
  const Pieces P = make_pieces(offs, chunk_columns(T, acc == at::kDouble ? 8 : 4));
  at::Tensor out = at::empty({R, N}, x.options());
  if (acc == at::kDouble) {
    run_phases({combine_phase<double>(x.data_ptr<double>(), T, m.data_ptr<double>(), nullptr, 0, nullptr, R, N, P,
                                      out.data_ptr<double>())});
  } else {
    run_phases({combine_phase<float>(x.data_ptr<float>(), T, m.data_ptr<float>(), nullptr, 0, nullptr, R, N, P,
                                     out.data_ptr<float>())});
  }
  if (out.scalar_type() != x0.scalar_type()) out = out.to(x0.scalar_type());
  return out;
}

// v[s] = Y_s X_s^T, float64 [S, R, T] (the Gram-like pass of the backward).
at::Tensor cross_cpu(const at::Tensor& y, const at::Tensor& x, at::IntArrayRef offsets) {
  const at::Tensor x0 = check_grads(x, "x");
  at::Tensor y0 = check_grads(y, "y");
  TORCH_CHECK_VALUE(y0.size(1) == x0.size(1), "y and x must have the same number of columns");
  const at::Tensor xw = working(x0);
  const at::Tensor yw = y0.to(xw.scalar_type()).contiguous();
  const int64_t R = yw.size(0), T = xw.size(0), N = xw.size(1);
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const Pieces P = make_pieces(offs, chunk_columns(R + T, xw.scalar_type() == at::kDouble ? 8 : 4));
  at::Tensor v = at::empty({S, R, T}, xw.options().dtype(at::kDouble));
  PairPhases ph;
  pair_phases(yw, xw, false, P, S, v.data_ptr<double>(), ph);
  run_phases({ph.chunks, ph.segments});
  return v;
}

// dX = per segment W_s^T dY_s + M_s X_s, in the dtype of x (fp32-or-better accumulation).
at::Tensor backward_combine_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& m, at::IntArrayRef offsets) {
  const at::Tensor x0 = check_grads(x, "x");
  const at::Tensor dy0 = check_grads(dy, "dy");
  TORCH_CHECK_VALUE(dy0.size(1) == x0.size(1), "dy and x must have the same number of columns");
  const at::Tensor xw = working(x0);
  const at::ScalarType acc = xw.scalar_type();
  const at::Tensor yw = dy0.to(acc).contiguous();
  const int64_t R = yw.size(0), T = xw.size(0), N = xw.size(1);
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == S && w.size(1) == R && w.size(2) == T, "w: expected [S, R, T] = [",
                    S, ", ", R, ", ", T, "], got ", w.sizes());
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == S && m.size(1) == T && m.size(2) == T, "m: expected [S, T, T], got ",
                    m.sizes());
  // m1 = W_s^T [T, R], m2 = M_s [T, T], in the accumulation dtype.
  const at::Tensor m1 = w.transpose(1, 2).to(acc).contiguous();
  const at::Tensor m2 = m.to(acc).contiguous();
  const Pieces P = make_pieces(offs, chunk_columns(R + T, acc == at::kDouble ? 8 : 4));
  at::Tensor out = at::empty({T, N}, xw.options());
  if (acc == at::kDouble) {
    run_phases({combine_phase<double>(yw.data_ptr<double>(), R, m1.data_ptr<double>(), xw.data_ptr<double>(), T,
                                      m2.data_ptr<double>(), T, N, P, out.data_ptr<double>())});
  } else {
    run_phases({combine_phase<float>(yw.data_ptr<float>(), R, m1.data_ptr<float>(), xw.data_ptr<float>(), T,
                                     m2.data_ptr<float>(), T, N, P, out.data_ptr<float>())});
  }
  if (out.scalar_type() != x0.scalar_type()) out = out.to(x0.scalar_type());
  return out;
}

// The backward's stage 2 for the built-in PCGrad solve: (M, W) = (Gbar + Gbar^T, W) per
// segment from gram [S, T, T], order and v = dL/dW [S, R, T] (solve.h: solve_vjp_one).
// Replaces ~35 T small torch ops per backward.
std::tuple<at::Tensor, at::Tensor> solve_vjp_cpu(const at::Tensor& gram, const at::Tensor& order,
                                                 c10::string_view reduction, const at::Tensor& weights_grad) {
  const int red = reduction_code(reduction);
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1,
                    "gram: expected [S, T, T], got ", gram.sizes());
  const int64_t S = gram.size(0), T = gram.size(1), R = red == 2 ? T : 1;
  TORCH_CHECK_VALUE(weights_grad.dim() == 3 && weights_grad.size(0) == S && weights_grad.size(1) == R &&
                        weights_grad.size(2) == T,
                    "weights_grad: expected [S, R, T] = [", S, ", ", R, ", ", T, "], got ", weights_grad.sizes());
  const at::Tensor g = gram.to(at::kDouble).contiguous();
  const at::Tensor v = weights_grad.to(at::kDouble).contiguous();
  const at::Tensor ord = check_order(order, S, T, g.device());
  at::Tensor m = at::empty({S, T, T}, g.options());
  at::Tensor w = at::empty({S, R, T}, g.options());
  const double* gp = g.data_ptr<double>();
  const double* vp = v.data_ptr<double>();
  const int64_t* op = ord.data_ptr<int64_t>();
  double* mp = m.data_ptr<double>();
  double* wp = w.data_ptr<double>();
  const int64_t TT = T * T;
  // A segment is ~6 T^3 flops: threads only when there are many (T = 16: 8 segments).
  const int64_t grain = std::max<int64_t>(1, 32768 / (TT * T));
  at::parallel_for(0, S, grain, [&](int64_t b, int64_t e) {
    std::vector<double> work(static_cast<size_t>(solve_vjp_work(static_cast<int>(T))));
    for (int64_t s = b; s < e; ++s) {
      solve_vjp_one(gp + s * TT, op + s * TT, vp + s * R * T, static_cast<int>(T), red, mp + s * TT, wp + s * R * T,
                    work.data());
    }
  });
  return {m, w};
}

std::string cpu_isa() { return cpu::active_table().name; }

std::string set_cpu_isa(c10::string_view isa) {
  std::string previous = cpu::active_table().name;
  const std::string name(isa.data(), isa.size());
  TORCH_CHECK_VALUE(cpu::set_table_by_name(name.c_str()), "set_cpu_isa: '", name,
                    "' is not available on this CPU or in this build (expected baseline, avx2, avx512 or auto)");
  return previous;
}

}  // namespace
}  // namespace ortholora

TORCH_LIBRARY(ortholora_C, m) {
  m.def("project(Tensor grads, int[] offsets, Tensor order, str reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gram(Tensor grads, int[] offsets) -> Tensor");
  m.def("combine(Tensor grads, Tensor w, int[] offsets) -> Tensor");
  m.def("cross(Tensor y, Tensor x, int[] offsets) -> Tensor");
  m.def("backward_combine(Tensor dy, Tensor x, Tensor w, Tensor m, int[] offsets) -> Tensor");
  m.def("solve_vjp(Tensor gram, Tensor order, str reduction, Tensor weights_grad) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &ortholora::cpu_isa);
  m.def("set_cpu_isa(str isa) -> str", &ortholora::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(ortholora_C, CPU, m) {
  m.impl("project", &ortholora::project_cpu);
  m.impl("gram", &ortholora::gram_cpu);
  m.impl("combine", &ortholora::combine_cpu);
  m.impl("cross", &ortholora::cross_cpu);
  m.impl("backward_combine", &ortholora::backward_combine_cpu);
  m.impl("solve_vjp", &ortholora::solve_vjp_cpu);
}
