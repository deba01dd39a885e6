// Argument checks and segment tables shared by the CPU and CUDA glue.
#include "ortholora_ops.h"

#include <torch/library.h>

namespace ortholora {

int reduction_code(c10::string_view reduction) {
  if (reduction == "sum") return 0;
  if (reduction == "mean") return 1;
  if (reduction == "none") return 2;
  TORCH_CHECK_VALUE(false, "reduction: expected one of ('sum', 'mean', 'none'), got '",
                    std::string(reduction.data(), reduction.size()), "'");
  return 0;
}

std::vector<int64_t> check_offsets(at::IntArrayRef offsets, int64_t n) {
  TORCH_CHECK_VALUE(offsets.size() >= 2, "segments: expected at least two offsets [0, ..., N], got ",
                    offsets.size());
  TORCH_CHECK_VALUE(offsets[0] == 0, "segments: the first offset must be 0, got ", offsets[0]);
  TORCH_CHECK_VALUE(offsets.back() == n, "segments: the last offset must equal N = grads.shape[1] = ", n,
                    ", got ", offsets.back());
  for (size_t k = 1; k < offsets.size(); ++k) {
    TORCH_CHECK_VALUE(offsets[k] > offsets[k - 1], "segments: offsets must be strictly increasing");
  }
  return std::vector<int64_t>(offsets.begin(), offsets.end());
}

at::Tensor check_grads(const at::Tensor& grads, const char* name) {
  TORCH_CHECK_VALUE(grads.dim() == 2, name, ": expected a 2-D tensor [T, N], got ", grads.dim(), "-D");
  const auto dt = grads.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                   ": expected a float64/float32/float16/bfloat16 tensor, got ", dt);
  TORCH_CHECK_VALUE(grads.size(0) >= 1 && grads.size(1) >= 1, name,
                    ": expected T >= 1 tasks and N >= 1 columns, got ", grads.sizes());
  return grads.contiguous();
}

at::Tensor check_order(const at::Tensor& order, int64_t s, int64_t t, const at::Device& device) {
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong || order.scalar_type() == at::kInt,
                   "order: expected an int64 (or int32) tensor, got ", order.scalar_type());
  TORCH_CHECK_VALUE(order.device() == device, "order: expected a tensor on the device of grads (", device,
                    "), got ", order.device());
  const bool ok2 = order.dim() == 2 && order.size(0) == t && order.size(1) == t;
  const bool ok3 = order.dim() == 3 && order.size(0) == s && order.size(1) == t && order.size(2) == t;
  TORCH_CHECK_VALUE(ok2 || ok3, "order: expected shape [T, T] or [S, T, T] with S = ", s, ", T = ", t, ", got ",
                    order.sizes());
  at::Tensor o = ok2 ? order.unsqueeze(0).expand({s, t, t}) : order;
  return o.to(at::kLong).contiguous();
}

Pieces make_pieces(const std::vector<int64_t>& offs, int64_t chunk) {
  Pieces p;
  const int64_t n = offs.back();
  const int64_t s_count = static_cast<int64_t>(offs.size()) - 1;
  p.chunk = chunk;
  p.nchunks = (n + chunk - 1) / chunk;
  p.chunk_first.assign(p.nchunks + 1, 0);
  p.seg_first.assign(s_count + 1, 0);
  for (int64_t s = 0; s < s_count; ++s) {
    p.seg_first[s] = static_cast<int64_t>(p.lo.size());
    int64_t lo = offs[s];
    while (lo < offs[s + 1]) {
      const int64_t hi = std::min(offs[s + 1], (lo / chunk + 1) * chunk);
      p.seg.push_back(s);
      p.lo.push_back(lo);
      p.hi.push_back(hi);
      lo = hi;
    }
  }
  const int64_t np = static_cast<int64_t>(p.lo.size());
  p.seg_first[s_count] = np;
  // chunk_first[k] = first piece whose lo >= k * chunk.
  int64_t q = 0;
  for (int64_t k = 0; k <= p.nchunks; ++k) {
    while (q < np && p.lo[q] < k * chunk) ++q;
    p.chunk_first[k] = q;
  }
  return p;
}

}  // namespace ortholora
