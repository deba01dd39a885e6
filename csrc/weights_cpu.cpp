// Torch glue of the weighting methods' iterative kernels on the CPU (csrc/weights.h):
// torch.ops.ortholora_C.{box_qp, simplex_qp, cagrad_kkt, power_root, spectral, gradvac}.
// Each runs every problem of the batch in one call (at::parallel_for over problems), float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "weights.h"

namespace ortholora {
namespace {

at::Tensor f64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  return t.to(at::kDouble).contiguous();
}

// [B, T, T] square batch; returns T.
int64_t check_square(const at::Tensor& g, const char* name) {
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(1) == g.size(2) && g.size(1) >= 1, name, ": expected [B, T, T], got ",
                    g.sizes());
  return g.size(1);
}

at::Tensor check_mask(const at::Tensor& mask, int64_t b, int64_t t) {
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == b && mask.size(1) == t, "mask: expected [B, T] = [", b, ", ",
                    t, "], got ", mask.sizes());
  return mask.to(at::kByte).contiguous();
}

// Problems per thread: each is ~T^3 flops per iteration.
int64_t grain_for(int64_t t) { return std::max<int64_t>(1, 16384 / (t * t * t)); }

// fn(k, work) for every problem k in [0, n), in parallel over problems of T tasks, with a
// float64 scratch of `work` entries per thread.
template <typename F>
void for_each_problem(int64_t n, int64_t t, int64_t work, const F& fn) {
  at::parallel_for(0, n, grain_for(t), [&](int64_t b0, int64_t e0) {
    std::vector<double> buf(static_cast<size_t>(work));
    for (int64_t k = b0; k < e0; ++k) fn(k, buf.data());
  });
}

at::Tensor box_qp_cpu(const at::Tensor& h, const at::Tensor& q, const at::Tensor& lower, int64_t iters) {
  const int64_t T = check_square(h, "h");
  const int64_t B = h.size(0);
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(0) == B && q.size(2) == T && lower.sizes() == q.sizes(),
                    "q, lower: expected [B, P, T] with B = ", B, ", T = ", T, ", got ", q.sizes(), " and ",
                    lower.sizes());
  const at::Tensor H = f64(h, "h"), Q = f64(q, "q"), L = f64(lower, "lower");
  const int64_t P = Q.size(1);
  at::Tensor out = at::empty_like(Q);
  const double* hp = H.data_ptr<double>();
  const double* qp = Q.data_ptr<double>();
  const double* lp = L.data_ptr<double>();
  double* op = out.data_ptr<double>();
  for_each_problem(B * P, T, weights::work_size(static_cast<int>(T)), [&](int64_t k, double* work) {
    weights::box_qp(hp + (k / P) * T * T, qp + k * T, lp + k * T, static_cast<int>(T), static_cast<int>(iters),
                    op + k * T, work);
  });
  return out;
}

at::Tensor simplex_qp_cpu(const at::Tensor& g, const at::Tensor& mask, int64_t iters) {
  const int64_t T = check_square(g, "g");
  const int64_t B = g.size(0);
  const at::Tensor G = f64(g, "g"), M = check_mask(mask, B, T);
  at::Tensor out = at::empty({B, T}, G.options());
  const double* gp = G.data_ptr<double>();
  const uint8_t* mp = M.data_ptr<uint8_t>();
  double* op = out.data_ptr<double>();
  for_each_problem(B, T, weights::work_size(static_cast<int>(T)), [&](int64_t k, double* work) {
    weights::simplex_qp(gp + k * T * T, mp + k * T, static_cast<int>(T), static_cast<int>(iters), op + k * T,
                        work);
  });
  return out;
}

at::Tensor cagrad_kkt_cpu(const at::Tensor& g, const at::Tensor& b, const at::Tensor& phi2, const at::Tensor& mask,
                          int64_t iters, double norm_eps) {
  const int64_t T = check_square(g, "g");
  const int64_t B = g.size(0);
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == B && b.size(1) == T, "b: expected [B, T], got ", b.sizes());
  TORCH_CHECK_VALUE(phi2.numel() == B, "phi2: expected B = ", B, " values, got ", phi2.sizes());
  const at::Tensor G = f64(g, "g"), Bv = f64(b, "b"), P2 = f64(phi2, "phi2").reshape({B}),
                   M = check_mask(mask, B, T);
  at::Tensor out = at::empty({B, T}, G.options());
  const double* gp = G.data_ptr<double>();
  const double* bp = Bv.data_ptr<double>();
  const double* pp = P2.data_ptr<double>();
  const uint8_t* mp = M.data_ptr<uint8_t>();
  double* op = out.data_ptr<double>();
  for_each_problem(B, T, weights::work_size(static_cast<int>(T)), [&](int64_t k, double* work) {
    weights::cagrad_kkt(gp + k * T * T, bp + k * T, pp[k], mp + k * T, static_cast<int>(T),
                        static_cast<int>(iters), norm_eps, op + k * T, work);
  });
  return out;
}

at::Tensor power_root_cpu(const at::Tensor& g, const at::Tensor& mask, double alpha, int64_t iters) {
  const int64_t T = check_square(g, "g");
  const int64_t B = g.size(0);
  TORCH_CHECK_VALUE(alpha > 0, "alpha: expected > 0, got ", alpha);
  const at::Tensor G = f64(g, "g"), M = check_mask(mask, B, T);
  at::Tensor out = at::empty({B, T}, G.options());
  const double* gp = G.data_ptr<double>();
  const uint8_t* mp = M.data_ptr<uint8_t>();
  double* op = out.data_ptr<double>();
  for_each_problem(B, T, weights::work_size(static_cast<int>(T)), [&](int64_t k, double* work) {
    weights::power_root(gp + k * T * T, mp + k * T, alpha, static_cast<int>(T), static_cast<int>(iters),
                        op + k * T, work);
  });
  return out;
}

at::Tensor spectral_cpu(const at::Tensor& g, const at::Tensor& mask, const at::Tensor& u, int64_t mode,
                        int64_t scale) {
  const int64_t T = check_square(g, "g");
  const int64_t B = g.size(0);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2 && scale >= 0 && scale <= 2, "mode, scale: expected 0..2, got ", mode,
                    ", ", scale);
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == B && u.size(1) == T, "u: expected [B, T], got ", u.sizes());
  const at::Tensor G = f64(g, "g"), U = f64(u, "u"), M = check_mask(mask, B, T);
  at::Tensor out = at::empty({B, T}, G.options());
  const double* gp = G.data_ptr<double>();
  const double* up = U.data_ptr<double>();
  const uint8_t* mp = M.data_ptr<uint8_t>();
  double* op = out.data_ptr<double>();
  for_each_problem(B, T, weights::spectral_work(static_cast<int>(T)), [&](int64_t k, double* work) {
    weights::spectral(gp + k * T * T, mp + k * T, up + k * T, static_cast<int>(T), static_cast<int>(mode),
                      static_cast<int>(scale), op + k * T, work);
  });
  return out;
}

// GradVac's step for every segment in one call: (weights [S, T], new targets [S, T, T]).
std::tuple<at::Tensor, at::Tensor> gradvac_cpu(const at::Tensor& gram, const at::Tensor& order,
                                               const at::Tensor& phi_hat, const at::Tensor& mask, double beta,
                                               double eps) {
  const int64_t T = check_square(gram, "gram");
  const int64_t S = gram.size(0);
  TORCH_CHECK_VALUE(order.sizes() == gram.sizes(), "order: expected [S, T, T] = ", gram.sizes(), ", got ",
                    order.sizes());
  TORCH_CHECK_VALUE(phi_hat.sizes() == gram.sizes(), "phi_hat: expected [S, T, T] = ", gram.sizes(), ", got ",
                    phi_hat.sizes());
  TORCH_CHECK_VALUE(!at::isFloatingType(order.scalar_type()) && !at::isComplexType(order.scalar_type()),
                    "order: expected an integer tensor, got ", order.scalar_type());
  TORCH_CHECK_VALUE(order.device().is_cpu(), "order: expected a CPU tensor, got ", order.device());
  const at::Tensor G = f64(gram, "gram"), M = check_mask(mask, S, T);
  const at::Tensor O = order.to(at::kLong).contiguous();
  at::Tensor hat = f64(phi_hat, "phi_hat").clone();
  at::Tensor w = at::zeros({S, T}, G.options());
  const int64_t* op = O.data_ptr<int64_t>();
  for (int64_t q = 0; q < S * T * T; ++q) {
    TORCH_CHECK_VALUE(op[q] >= 0 && op[q] < T, "order: expected task indices in [0, ", T, "), got ", op[q]);
  }
  const double* gp = G.data_ptr<double>();
  const uint8_t* mp = M.data_ptr<uint8_t>();
  double* hp = hat.data_ptr<double>();
  double* wp = w.data_ptr<double>();
  for_each_problem(S, T, 2 * T, [&](int64_t k, double* work) {
    weights::gradvac_step(gp + k * T * T, op + k * T * T, mp + k * T, static_cast<int>(T), beta, eps,
                          hp + k * T * T, wp + k * T, work);
  });
  return {w, hat};
}

}  // namespace
}  // namespace ortholora

TORCH_LIBRARY_FRAGMENT(ortholora_C, m) {
  m.def("box_qp(Tensor h, Tensor q, Tensor lower, int iters) -> Tensor");
  m.def("simplex_qp(Tensor g, Tensor mask, int iters) -> Tensor");
  m.def("cagrad_kkt(Tensor g, Tensor b, Tensor phi2, Tensor mask, int iters, float norm_eps) -> Tensor");
  m.def("power_root(Tensor g, Tensor mask, float alpha, int iters) -> Tensor");
  m.def("spectral(Tensor g, Tensor mask, Tensor u, int mode, int scale) -> Tensor");
  m.def("gradvac(Tensor gram, Tensor order, Tensor phi_hat, Tensor mask, float beta, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ortholora_C, CPU, m) {
  m.impl("box_qp", &ortholora::box_qp_cpu);
  m.impl("simplex_qp", &ortholora::simplex_qp_cpu);
  m.impl("cagrad_kkt", &ortholora::cagrad_kkt_cpu);
  m.impl("power_root", &ortholora::power_root_cpu);
  m.impl("spectral", &ortholora::spectral_cpu);
  m.impl("gradvac", &ortholora::gradvac_cpu);
}
