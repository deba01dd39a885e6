// CUDA kernels of the native backend (see kernels.cuh). No torch headers.
#include "kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ortholora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class In> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

// Staged type in shared memory: every input converts exactly to it.
template <class In> struct StageOf { typedef float type; };
template <> struct StageOf<double> { typedef double type; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_stage(double v) { return v; }
template <class In> __device__ __forceinline__ float to_stage(In v) { return to_float(v); }

template <class In> __device__ __forceinline__ In from_acc(typename AccOf<In>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ double warp_sum(double v) {
  // Fixed butterfly: the same additions in the same order on every run.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Stage 1: partial Gram of one piece. Shared memory: tile [T][tile] of Stage, plus
// pair sums [npairs] (double) and the pair index tables.
template <class In>
__global__ void __launch_bounds__(kThreads) gram_partial_kernel(const In* __restrict__ x, int T, int64_t n,
                                                                PieceTable table, int tile,
                                                                double* __restrict__ partial) {
  typedef typename StageOf<In>::type Stage;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int npairs = T * (T + 1) / 2;
  double* sums = reinterpret_cast<double*>(smem_raw);
  unsigned char* pi = reinterpret_cast<unsigned char*>(sums + npairs);
  unsigned char* pj = pi + npairs;
  Stage* xs = reinterpret_cast<Stage*>(smem_raw + ((npairs * 8 + 2 * npairs + 15) / 16) * 16);

  const int piece = blockIdx.x;
  const int64_t lo = table.lo[piece], hi = table.hi[piece];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int p = threadIdx.x; p < npairs; p += blockDim.x) {
    int i = 0;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    pi[p] = static_cast<unsigned char>(i);
    pj[p] = static_cast<unsigned char>(p - i * (i + 1) / 2);
    sums[p] = 0.0;
  }
  for (int64_t c0 = lo; c0 < hi; c0 += tile) {
    const int w = static_cast<int>(hi - c0 < tile ? hi - c0 : tile);
    __syncthreads();
    for (int e = threadIdx.x; e < T * tile; e += blockDim.x) {
      const int r = e / tile, c = e % tile;
      xs[e] = c < w ? to_stage(x[r * n + c0 + c]) : Stage(0);
    }
    __syncthreads();
    // Warp `warp` owns pairs warp, warp + kWarps, ...: one writer per pair sum.
    for (int p = warp; p < npairs; p += kWarps) {
      const Stage* a = xs + pi[p] * tile;
      const Stage* b = xs + pj[p] * tile;
      double acc = 0.0;
      for (int c = lane; c < tile; c += 32) acc = fma(static_cast<double>(a[c]), static_cast<double>(b[c]), acc);
      acc = warp_sum(acc);
      if (lane == 0) sums[p] += acc;
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < npairs; p += blockDim.x) partial[static_cast<int64_t>(piece) * npairs + p] = sums[p];
}

// Stage 2: one block per segment (blockDim >= T). Same arithmetic as solve.h / solve.py.
template <class Acc>
__global__ void solve_kernel(int T, PieceTable table, const double* __restrict__ partial,
                             const int64_t* __restrict__ order, int reduction, double* __restrict__ gram,
                             double* __restrict__ coeffs, int32_t* __restrict__ nproj, Acc* __restrict__ weights) {
  __shared__ double G[kMaxTasks * kMaxTasks];
  __shared__ double C[kMaxTasks * kMaxTasks];
  __shared__ int count;
  const int s = blockIdx.x;
  const int npairs = T * (T + 1) / 2;
  const int64_t q0 = table.seg_first[s], q1 = table.seg_first[s + 1];
  if (threadIdx.x == 0) count = 0;
  for (int p = threadIdx.x; p < npairs; p += blockDim.x) {
    int i = 0;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    const int j = p - i * (i + 1) / 2;
    double acc = partial[q0 * npairs + p];
    for (int64_t q = q0 + 1; q < q1; ++q) acc += partial[q * npairs + p];
    G[i * T + j] = acc;
    G[j * T + i] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < T * T; e += blockDim.x) gram[static_cast<int64_t>(s) * T * T + e] = G[e];
  const int i = threadIdx.x;
  if (i < T) {
    double* row = C + i * T;
    for (int m = 0; m < T; ++m) row[m] = m == i ? 1.0 : 0.0;
    const int64_t* ord = order + (static_cast<int64_t>(s) * T + i) * T;
    int np = 0;
    for (int k = 0; k < T; ++k) {
      const int64_t j = ord[k];
      if (j < 0 || j >= T || j == i) continue;       // out-of-range orders are skipped (no host check)
      const double norm2 = G[j * T + j];
      if (!(norm2 > 0.0)) continue;                  // a zero (or NaN) task is never divided by
      double inner = 0.0;
      for (int m = 0; m < T; ++m) inner = fma(row[m], G[j * T + m], inner);
      if (inner < 0.0 || inner != inner) row[j] -= inner / norm2;
      np += inner < 0.0 ? 1 : 0;
    }
    atomicAdd(&count, np);                           // integer: order-independent
  }
  __syncthreads();
  for (int e = threadIdx.x; e < T * T; e += blockDim.x) coeffs[static_cast<int64_t>(s) * T * T + e] = C[e];
  if (threadIdx.x == 0) nproj[s] = count;
  if (reduction == 2) {
    for (int e = threadIdx.x; e < T * T; e += blockDim.x) weights[static_cast<int64_t>(s) * T * T + e] = static_cast<Acc>(C[e]);
  } else if (threadIdx.x < T) {
    const int k = threadIdx.x;
    double w = C[k];
    for (int r = 1; r < T; ++r) w += C[r * T + k];
    if (reduction == 1) w /= T;
    weights[static_cast<int64_t>(s) * T + k] = static_cast<Acc>(w);
  }
}

// Stage 3: out[r, c] = sum_k W_s[r, k] x[k, c] over one piece; R = 1 or T.
template <class In>
__global__ void __launch_bounds__(kThreads) combine_kernel(const In* __restrict__ x, int T, int64_t n, PieceTable table,
                                                           int rows_out, const typename AccOf<In>::type* __restrict__ weights,
                                                           In* __restrict__ out) {
  typedef typename AccOf<In>::type Acc;
  __shared__ Acc w[kMaxTasks * kMaxTasks];
  const int piece = blockIdx.x;
  const int64_t s = table.seg[piece], lo = table.lo[piece], hi = table.hi[piece];
  for (int e = threadIdx.x; e < rows_out * T; e += blockDim.x) w[e] = weights[s * rows_out * T + e];
  __syncthreads();
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    for (int r = 0; r < rows_out; ++r) {
      const Acc* wr = w + r * T;
      Acc acc = wr[0] * static_cast<Acc>(to_stage(x[c]));
      for (int k = 1; k < T; ++k) acc = fma(wr[k], static_cast<Acc>(to_stage(x[k * n + c])), acc);
      out[r * n + c] = from_acc<In>(acc);
    }
  }
}

template <class In>
size_t gram_smem_bytes(int T, int tile) {
  const int npairs = T * (T + 1) / 2;
  return ((npairs * 8 + 2 * npairs + 15) / 16) * 16 + static_cast<size_t>(T) * tile * sizeof(typename StageOf<In>::type);
}

}  // namespace

int gram_tile_columns(int tasks, bool fp64_input) {
  // About 32 KiB of staged input per tile (within the default 48 KiB of shared memory).
  int tile = (fp64_input ? 4096 : 8192) / (tasks > 0 ? tasks : 1);
  tile = tile / 32 * 32;
  if (tile < 32) tile = 32;
  if (tile > 1024) tile = 1024;
  return tile;
}

template <class In>
cudaError_t launch_project(const In* x, int tasks, int64_t n, const PieceTable& table, const int64_t* order,
                           int reduction, double* partial, double* gram, double* coeffs, int32_t* nproj,
                           void* weights, In* out, cudaStream_t stream) {
  typedef typename AccOf<In>::type Acc;
  if (tasks < 1 || tasks > kMaxTasks) return cudaErrorInvalidValue;
  const int tile = gram_tile_columns(tasks, sizeof(In) == 8);
  const size_t smem = gram_smem_bytes<In>(tasks, tile);
  gram_partial_kernel<In><<<table.npieces, kThreads, smem, stream>>>(x, tasks, n, table, tile, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  solve_kernel<Acc><<<table.nsegments, 64, 0, stream>>>(tasks, table, partial, order, reduction, gram, coeffs, nproj,
                                                        static_cast<Acc*>(weights));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int rows_out = reduction == 2 ? tasks : 1;
  combine_kernel<In><<<table.npieces, kThreads, 0, stream>>>(x, tasks, n, table, rows_out,
                                                             static_cast<const Acc*>(weights), out);
  return cudaGetLastError();
}

template cudaError_t launch_project<float>(const float*, int, int64_t, const PieceTable&, const int64_t*, int, double*,
                                           double*, double*, int32_t*, void*, float*, cudaStream_t);
template cudaError_t launch_project<double>(const double*, int, int64_t, const PieceTable&, const int64_t*, int, double*,
                                            double*, double*, int32_t*, void*, double*, cudaStream_t);
template cudaError_t launch_project<__half>(const __half*, int, int64_t, const PieceTable&, const int64_t*, int, double*,
                                            double*, double*, int32_t*, void*, __half*, cudaStream_t);
template cudaError_t launch_project<__nv_bfloat16>(const __nv_bfloat16*, int, int64_t, const PieceTable&, const int64_t*,
                                                   int, double*, double*, double*, int32_t*, void*, __nv_bfloat16*,
                                                   cudaStream_t);

}  // namespace cuda
}  // namespace ortholora
