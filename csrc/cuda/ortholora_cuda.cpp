// Torch glue of the CUDA implementation: TORCH_LIBRARY_IMPL(ortholora_C, CUDA).
// Built only when torch has CUDA and nvcc is found (setup.py); the kernels themselves
// (kernels.cu) include no torch header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cuda/kernels.cuh"
#include "ortholora_ops.h"

namespace ortholora {
namespace {

// The piece table on the device: segments cut into blocks of `piece` columns (a multiple
// of the Gram tile), sized for a few hundred blocks. Depends only on the shape, so results
// are deterministic. Built once per (device, tile, offsets) and cached for the process:
// - outside CUDA-graph capture the upload is a blocking copy, so a kernel on ANY stream
//   that uses the table later reads the finished table (an asynchronous upload on the
//   first stream could be read by another stream before it landed);
// - a first use inside capture cannot copy eagerly: the copy from a pinned host buffer is
//   recorded into the graph (every replay re-uploads it), that host buffer is kept alive
//   for the process, and the graph-owned device copy is NOT cached (later eager calls
//   would read memory only the graph's replays fill);
// - entries are never evicted: a captured graph keeps the table's raw address, and
//   freeing it would let the allocator reuse that memory under the graph. A table is a
//   few KB; a process sees few layouts.
struct DeviceTable {
  at::Tensor host;
  at::Tensor storage;
  cuda::PieceTable table;
};

DeviceTable build_table(const std::vector<int64_t>& offs, int64_t tile, const at::Device& device, bool capturing);

DeviceTable make_table(const std::vector<int64_t>& offs, int64_t tile, const at::Device& device) {
  typedef std::tuple<int, int64_t, std::vector<int64_t>> Key;
  static std::mutex mutex;
  // Leaked on purpose: no CUDA frees from static destructors after the context is gone.
  static auto* cache = new std::map<Key, DeviceTable>();
  static auto* graph_sources = new std::vector<at::Tensor>();   // pinned sources of captured uploads
  Key key{device.index(), tile, offs};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  DeviceTable t = build_table(offs, tile, device, capturing);
  if (capturing) {
    graph_sources->push_back(t.host);
  } else {
    cache->emplace(std::move(key), t);
  }
  return t;
}

DeviceTable build_table(const std::vector<int64_t>& offs, int64_t tile, const at::Device& device, bool capturing) {
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const int64_t N = offs.back();
  const int64_t piece = tile * std::max<int64_t>(1, std::min<int64_t>(16, N / (tile * 512)));
  std::vector<int64_t> seg, lo, hi, seg_first(S + 1);
  for (int64_t s = 0; s < S; ++s) {
    seg_first[s] = static_cast<int64_t>(lo.size());
    for (int64_t c = offs[s]; c < offs[s + 1]; c += piece) {
      seg.push_back(s);
      lo.push_back(c);
      hi.push_back(std::min(c + piece, offs[s + 1]));
    }
  }
  const int64_t np = static_cast<int64_t>(lo.size());
  seg_first[S] = np;
  at::Tensor host = at::empty({3 * np + S + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(seg.begin(), seg.end(), h);
  std::copy(lo.begin(), lo.end(), h + np);
  std::copy(hi.begin(), hi.end(), h + 2 * np);
  std::copy(seg_first.begin(), seg_first.end(), h + 3 * np);
  DeviceTable t;
  t.host = host;
  // Captured: an asynchronous copy node of the graph. Eager: a blocking copy.
  t.storage = host.to(device, /*non_blocking=*/capturing);
  const int64_t* d = t.storage.data_ptr<int64_t>();
  t.table = cuda::PieceTable{d, d + np, d + 2 * np, d + 3 * np, static_cast<int>(np), static_cast<int>(S)};
  return t;
}

// The raw CUDA type the kernels take for a torch scalar type (same layout: at::Half is
// __half, at::BFloat16 is __nv_bfloat16); paired with AT_DISPATCH_*'s scalar_t below.
template <class T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Runs the lambda `__VA_ARGS__` with scalar_t (the torch type) and CT (the raw CUDA type)
// for the dtypes check_grads accepts (float64/float32/float16/bfloat16).
#define OL_DISPATCH(DT, NAME, ...)                                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DT, NAME, [&] {     \
    using CT = typename CudaType<scalar_t>::type;                              \
    __VA_ARGS__;                                                               \
  })

void check_tasks(int64_t t, const char* what) {
  TORCH_CHECK_VALUE(t <= cuda::kMaxTasks, "backend 'native' on CUDA supports ", what, " <= ", cuda::kMaxTasks,
                    ", got ", t, "; use backend='torch' or 'triton'");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> project_cuda(const at::Tensor& grads,
                                                                        at::IntArrayRef offsets,
                                                                        const at::Tensor& order,
                                                                        c10::string_view reduction) {
  const at::Tensor x = check_grads(grads, "grads");
  const int red = reduction_code(reduction);
  const int64_t T = x.size(0), N = x.size(1);
  check_tasks(T, "T (tasks)");
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const at::Tensor ord = check_order(order, S, T, x.device());   // values are not read: no host sync
  c10::cuda::CUDAGuard guard(x.device());

  const bool f64 = x.scalar_type() == at::kDouble;
  const DeviceTable dt = make_table(offs, cuda::gram_tile_columns(static_cast<int>(T), f64), x.device());
  const cuda::PieceTable& table = dt.table;
  const int64_t np = table.npieces;

  auto f64opt = x.options().dtype(at::kDouble);
  const int64_t npairs = T * (T + 1) / 2;
  at::Tensor partial = at::empty({np * npairs}, f64opt);
  at::Tensor gram = at::empty({S, T, T}, f64opt);
  at::Tensor coeffs = at::empty({S, T, T}, f64opt);
  at::Tensor nproj = at::empty({S}, x.options().dtype(at::kInt));
  const int64_t R = red == 2 ? T : 1;
  at::Tensor weights = at::empty({S * R * T}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor out = red == 2 ? at::empty({T, N}, x.options()) : at::empty({N}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* op = ord.data_ptr<int64_t>();
  cudaError_t err = cudaSuccess;
  OL_DISPATCH(x.scalar_type(), "ortholora_C::project",
              err = cuda::launch_project<CT>(reinterpret_cast<const CT*>(x.data_ptr<scalar_t>()), static_cast<int>(T),
                                             N, table, op, red, partial.data_ptr<double>(), gram.data_ptr<double>(),
                                             coeffs.data_ptr<double>(), nproj.data_ptr<int32_t>(), weights.data_ptr(),
                                             reinterpret_cast<CT*>(out.data_ptr<scalar_t>()), stream));
  TORCH_CHECK(err == cudaSuccess, "ortholora_C::project CUDA launch failed: ", cudaGetErrorString(err));
  return {out, gram, coeffs, nproj};
}

// v[s] = Y_s X_s^T, float64 [S, R, T].
at::Tensor cross_cuda(const at::Tensor& y, const at::Tensor& x, at::IntArrayRef offsets) {
  const at::Tensor xc = check_grads(x, "x");
  const at::Tensor yc = check_grads(y, "y").to(xc.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(yc.size(1) == xc.size(1), "y and x must have the same number of columns");
  const int64_t R = yc.size(0), T = xc.size(0), N = xc.size(1);
  check_tasks(T, "T (tasks)");
  check_tasks(R, "R (rows of y)");
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  c10::cuda::CUDAGuard guard(xc.device());
  const bool f64 = xc.scalar_type() == at::kDouble;
  const DeviceTable dt = make_table(offs, cuda::gram_tile_columns(static_cast<int>(R + T), f64), xc.device());
  at::Tensor partial = at::empty({dt.table.npieces * R * T}, xc.options().dtype(at::kDouble));
  at::Tensor v = at::empty({S, R, T}, xc.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  OL_DISPATCH(xc.scalar_type(), "ortholora_C::cross",
              err = cuda::launch_cross<CT>(reinterpret_cast<const CT*>(yc.data_ptr<scalar_t>()), static_cast<int>(R),
                                           reinterpret_cast<const CT*>(xc.data_ptr<scalar_t>()), static_cast<int>(T), N,
                                           dt.table, partial.data_ptr<double>(), v.data_ptr<double>(), stream));
  TORCH_CHECK(err == cudaSuccess, "ortholora_C::cross CUDA launch failed: ", cudaGetErrorString(err));
  return v;
}

// dX = per segment W_s^T dY_s + M_s X_s, in the dtype of x (fp32-or-better accumulation).
at::Tensor backward_combine_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& m,
                                 at::IntArrayRef offsets) {
  const at::Tensor xc = check_grads(x, "x");
  const at::Tensor yc = check_grads(dy, "dy").to(xc.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(yc.size(1) == xc.size(1), "dy and x must have the same number of columns");
  const int64_t R = yc.size(0), T = xc.size(0), N = xc.size(1);
  check_tasks(T, "T (tasks)");
  check_tasks(R, "R (rows of dy)");
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == S && w.size(1) == R && w.size(2) == T, "w: expected [S, R, T], got ",
                    w.sizes());
  TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == S && m.size(1) == T && m.size(2) == T, "m: expected [S, T, T], got ",
                    m.sizes());
  c10::cuda::CUDAGuard guard(xc.device());
  const bool f64 = xc.scalar_type() == at::kDouble;
  const at::ScalarType acc = f64 ? at::kDouble : at::kFloat;
  const at::Tensor m1 = w.to(xc.device()).transpose(1, 2).to(acc).contiguous();   // [S, T, R]
  const at::Tensor m2 = m.to(xc.device()).to(acc).contiguous();                    // [S, T, T]
  const DeviceTable dt = make_table(offs, cuda::gram_tile_columns(static_cast<int>(T), f64), xc.device());
  at::Tensor out = at::empty({T, N}, xc.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  OL_DISPATCH(xc.scalar_type(), "ortholora_C::backward_combine",
              err = cuda::launch_backward_combine<CT>(reinterpret_cast<const CT*>(yc.data_ptr<scalar_t>()),
                                                      static_cast<int>(R),
                                                      reinterpret_cast<const CT*>(xc.data_ptr<scalar_t>()),
                                                      static_cast<int>(T), N, dt.table, m1.data_ptr(), m2.data_ptr(),
                                                      reinterpret_cast<CT*>(out.data_ptr<scalar_t>()), stream));
  TORCH_CHECK(err == cudaSuccess, "ortholora_C::backward_combine CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}
#undef OL_DISPATCH

}  // namespace
}  // namespace ortholora

TORCH_LIBRARY_IMPL(ortholora_C, CUDA, m) {
  m.impl("project", &ortholora::project_cuda);
  m.impl("cross", &ortholora::cross_cuda);
  m.impl("backward_combine", &ortholora::backward_combine_cuda);
}
