// Torch glue of the CUDA implementation: TORCH_LIBRARY_IMPL(ortholora_C, CUDA).
// Built only when torch has CUDA and nvcc is found (setup.py); the kernels themselves
// (kernels.cu) include no torch header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

#include "cuda/kernels.cuh"
#include "ortholora_ops.h"

namespace ortholora {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> project_cuda(const at::Tensor& grads,
                                                                        at::IntArrayRef offsets,
                                                                        const at::Tensor& order,
                                                                        c10::string_view reduction) {
  const at::Tensor x = check_grads(grads, "grads");
  const int red = reduction_code(reduction);
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(T <= cuda::kMaxTasks, "backend 'native' on CUDA supports T <= ", cuda::kMaxTasks,
                    " tasks, got T = ", T, "; use backend='torch' or 'triton'");
  const std::vector<int64_t> offs = check_offsets(offsets, N);
  const int64_t S = static_cast<int64_t>(offs.size()) - 1;
  const at::Tensor ord = check_order(order, S, T, x.device());   // values are not read: no host sync
  c10::cuda::CUDAGuard guard(x.device());

  // Pieces: segments cut into blocks of `piece` columns (a multiple of the Gram tile),
  // sized for a few hundred blocks. Depends only on the shape: deterministic.
  const bool f64 = x.scalar_type() == at::kDouble;
  const int64_t tile = cuda::gram_tile_columns(static_cast<int>(T), f64);
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
  // One pinned host buffer, copied asynchronously (the caching host allocator keeps it
  // alive until the copy has run).
  at::Tensor host = at::empty({3 * np + S + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(seg.begin(), seg.end(), h);
  std::copy(lo.begin(), lo.end(), h + np);
  std::copy(hi.begin(), hi.end(), h + 2 * np);
  std::copy(seg_first.begin(), seg_first.end(), h + 3 * np);
  const at::Tensor dev = host.to(x.device(), /*non_blocking=*/true);
  const int64_t* d = dev.data_ptr<int64_t>();
  const cuda::PieceTable table{d, d + np, d + 2 * np, d + 3 * np, static_cast<int>(np), static_cast<int>(S)};

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
#define OL_LAUNCH(TORCH_T, CUDA_T)                                                                             \
  err = cuda::launch_project<CUDA_T>(reinterpret_cast<const CUDA_T*>(x.data_ptr<TORCH_T>()), static_cast<int>(T), \
                                     N, table, op, red, partial.data_ptr<double>(), gram.data_ptr<double>(),      \
                                     coeffs.data_ptr<double>(), nproj.data_ptr<int32_t>(), weights.data_ptr(),   \
                                     reinterpret_cast<CUDA_T*>(out.data_ptr<TORCH_T>()), stream)
  switch (x.scalar_type()) {
    case at::kFloat: OL_LAUNCH(float, float); break;
    case at::kDouble: OL_LAUNCH(double, double); break;
    case at::kHalf: OL_LAUNCH(at::Half, __half); break;
    case at::kBFloat16: OL_LAUNCH(at::BFloat16, __nv_bfloat16); break;
    default: TORCH_CHECK_TYPE(false, "grads: unsupported dtype ", x.scalar_type());
  }
#undef OL_LAUNCH
  TORCH_CHECK(err == cudaSuccess, "ortholora_C::project CUDA launch failed: ", cudaGetErrorString(err));
  return {out, gram, coeffs, nproj};
}

}  // namespace
}  // namespace ortholora

TORCH_LIBRARY_IMPL(ortholora_C, CUDA, m) { m.impl("project", &ortholora::project_cuda); }
