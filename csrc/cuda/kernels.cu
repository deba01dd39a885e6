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

// Stage 1: partial Gram of one piece. Shared memory: pair sums [npairs] (double), then the
// tile [rows][tile] of Stage.
// sym (y == x, R == T): the T(T+1)/2 pairs i >= j of the Gram matrix; otherwise the
// R * T pairs (i < R rows of y, j < T rows of x) of the backward's v = dY X^T.
// Register tiles: a warp owns a TI x TJ block of pairs and keeps its
// TI * TJ sums in registers, so per column TI + TJ shared-memory reads feed TI * TJ fp64
// FMAs (one pair per warp took 2 reads per FMA). sym needs TI == TJ (blocks bi >= bj of
// the lower triangle). Each pair's sum is the same chain as with one pair per warp
// (lane-strided columns, the fixed butterfly, tiles in order): bitwise the same results.
template <class In, int TI, int TJ>
__global__ void __launch_bounds__(kThreads) pairs_partial_kernel(const In* __restrict__ y, int R,
                                                                 const In* __restrict__ x, int T, bool sym,
                                                                 int64_t n, PieceTable table, int tile,
                                                                 double* __restrict__ partial) {
  typedef typename StageOf<In>::type Stage;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int npairs = sym ? T * (T + 1) / 2 : R * T;
  const int rows = sym ? T : R + T;               // staged rows: x (sym) or y then x
  const int arows = sym ? T : R;                  // rows of the left operand (staged first)
  const int boff = sym ? 0 : R;                   // staged row of x[0]
  double* sums = reinterpret_cast<double*>(smem_raw);
  Stage* xs = reinterpret_cast<Stage*>(smem_raw + ((npairs * 8 + 15) / 16) * 16);
  const int nbi = (arows + TI - 1) / TI, nbj = (T + TJ - 1) / TJ;
  const int nblocks = sym ? nbi * (nbi + 1) / 2 : nbi * nbj;

  const int piece = blockIdx.x;
  const int64_t lo = table.lo[piece], hi = table.hi[piece];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int p = threadIdx.x; p < npairs; p += blockDim.x) sums[p] = 0.0;
  for (int64_t c0 = lo; c0 < hi; c0 += tile) {
    const int w = static_cast<int>(hi - c0 < tile ? hi - c0 : tile);
    __syncthreads();
    for (int e = threadIdx.x; e < rows * tile; e += blockDim.x) {
      const int r = e / tile, c = e % tile;
      const In* src = sym ? x + r * n : (r < R ? y + r * n : x + (r - R) * n);
      xs[e] = c < w ? to_stage(src[c0 + c]) : Stage(0);
    }
    __syncthreads();
    // Warp `warp` owns blocks warp, warp + kWarps, ...: one writer per pair sum.
    for (int blk = warp; blk < nblocks; blk += kWarps) {
      int bi, bj;
      if (sym) {
        bi = 0;
        while ((bi + 1) * (bi + 2) / 2 <= blk) ++bi;
        bj = blk - bi * (bi + 1) / 2;
      } else {
        bi = blk / nbj;
        bj = blk % nbj;
      }
      const Stage* a[TI];
      const Stage* b[TJ];
      // Rows past the end read the last row (never out of bounds); their sums are dropped.
#pragma unroll
      for (int u = 0; u < TI; ++u) a[u] = xs + min(bi * TI + u, arows - 1) * tile;
#pragma unroll
      for (int v = 0; v < TJ; ++v) b[v] = xs + (boff + min(bj * TJ + v, T - 1)) * tile;
      double acc[TI][TJ];
#pragma unroll
      for (int u = 0; u < TI; ++u)
#pragma unroll
        for (int v = 0; v < TJ; ++v) acc[u][v] = 0.0;
      for (int c = lane; c < tile; c += 32) {
        double av[TI], bv[TJ];
#pragma unroll
        for (int u = 0; u < TI; ++u) av[u] = static_cast<double>(a[u][c]);
#pragma unroll
        for (int v = 0; v < TJ; ++v) bv[v] = static_cast<double>(b[v][c]);
#pragma unroll
        for (int u = 0; u < TI; ++u)
#pragma unroll
          for (int v = 0; v < TJ; ++v) acc[u][v] = fma(av[u], bv[v], acc[u][v]);
      }
#pragma unroll
      for (int u = 0; u < TI; ++u) {
#pragma unroll
        for (int v = 0; v < TJ; ++v) {
          const int i = bi * TI + u, j = bj * TJ + v;
          const double sum = warp_sum(acc[u][v]);   // every lane takes part (shuffles)
          const bool keep = sym ? (i < T && j <= i) : (i < R && j < T);
          if (lane == 0 && keep) sums[sym ? i * (i + 1) / 2 + j : i * T + j] += sum;
        }
      }
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < npairs; p += blockDim.x) partial[static_cast<int64_t>(piece) * npairs + p] = sums[p];
}

// Stage 2: one block per segment (blockDim >= T, a multiple of 32). Same arithmetic as solve.h / solve.py.
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
  // One warp per pair sums the segment's pieces (lane-strided, then a fixed butterfly):
  // 32 loads in flight instead of one thread walking every piece serially; the order
  // depends only on the piece count, so results stay deterministic.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int p = warp; p < npairs; p += nwarps) {
    int i = 0;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    const int j = p - i * (i + 1) / 2;
    double acc = 0.0;
    for (int64_t q = q0 + lane; q < q1; q += 32) acc += partial[q * npairs + p];
    acc = warp_sum(acc);
    if (lane == 0) {
      G[i * T + j] = acc;
      G[j * T + i] = acc;
    }
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

// Register accumulators of the combines, one per output row r < rows (MaxRows >= rows is a
// compile-time bound: the unrolled array is never indexed at run time, so it stays in
// registers). w is row-major with row stride `stride`; v is one input row's value.
template <int MaxRows, class Acc>
__device__ __forceinline__ void rows_first(Acc (&acc)[MaxRows], const Acc* w, int stride, int rows, Acc v) {
#pragma unroll
  for (int r = 0; r < MaxRows; ++r) acc[r] = r < rows ? w[r * stride] * v : Acc(0);
}

template <int MaxRows, class Acc>
__device__ __forceinline__ void rows_fma(Acc (&acc)[MaxRows], const Acc* w, int stride, int k, int rows, Acc v) {
#pragma unroll
  for (int r = 0; r < MaxRows; ++r)
    if (r < rows) acc[r] = fma(w[r * stride + k], v, acc[r]);
}

template <int MaxRows, class In, class Acc>
__device__ __forceinline__ void rows_store(In* out, int64_t n, int64_t c, const Acc (&acc)[MaxRows], int rows) {
#pragma unroll
  for (int r = 0; r < MaxRows; ++r)
    if (r < rows) out[r * n + c] = from_acc<In>(acc[r]);
}

// Stage 3: out[r, c] = sum_k W_s[r, k] x[k, c] over one piece; R = 1 or T.
// Each thread reads its column's T values of x once (the "none"
// combine once re-read them R times): R = 1 keeps one accumulator; R = T keeps the R
// accumulators in registers (MaxRows >= R, a compile-time bound so that the unrolled array
// is never indexed at run time and stays in registers) and streams the rows of x through
// them. Every output is the same fma chain in the same order (k ascending) as before.
template <class In, int MaxRows>
__global__ void __launch_bounds__(kThreads, 2) combine_kernel(const In* __restrict__ x, int T, int64_t n, PieceTable table,
                                                           int rows_out, const typename AccOf<In>::type* __restrict__ weights,
                                                           In* __restrict__ out) {
  typedef typename AccOf<In>::type Acc;
  __shared__ Acc w[kMaxTasks * kMaxTasks];
  const int piece = blockIdx.x;
  const int64_t s = table.seg[piece], lo = table.lo[piece], hi = table.hi[piece];
  for (int e = threadIdx.x; e < rows_out * T; e += blockDim.x) w[e] = weights[s * rows_out * T + e];
  __syncthreads();
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    if (MaxRows == 1) {
      Acc acc = w[0] * static_cast<Acc>(to_stage(x[c]));
      for (int k = 1; k < T; ++k) acc = fma(w[k], static_cast<Acc>(to_stage(x[k * n + c])), acc);
      out[c] = from_acc<In>(acc);
    } else {
      Acc acc[MaxRows];
      rows_first<MaxRows>(acc, w, T, rows_out, static_cast<Acc>(to_stage(x[c])));
#pragma unroll 1   // unrolled, ptxas preloads MaxRows weights per step ahead and spills
      for (int k = 1; k < T; ++k) rows_fma<MaxRows>(acc, w, T, k, rows_out, static_cast<Acc>(to_stage(x[k * n + c])));
      rows_store<MaxRows>(out, n, c, acc, rows_out);
    }
  }
}

// The accumulator bound of a combine over `rows` output rows (1, or T <= kMaxTasks).
inline int combine_max_rows(int rows) { return rows <= 1 ? 1 : rows <= 8 ? 8 : rows <= 16 ? 16 : 32; }

template <class In>
size_t pairs_smem_bytes(int npairs, int rows, int tile) {
  return ((npairs * 8 + 15) / 16) * 16 + static_cast<size_t>(rows) * tile * sizeof(typename StageOf<In>::type);
}

// The register tile of the Gram pass: 4 x 4 pairs per warp above T = 16 (8 shared-memory
// reads per 16 FMAs), 2 x 2 below (4 per 4; enough blocks to keep the 8 warps busy at
// T = 8), 1 x 4 for the cross product with one row of dY (5 per 4).
template <class In>
void launch_pairs(const In* y, int R, const In* x, int T, bool sym, int64_t n, const PieceTable& table, int tile,
                  size_t smem, double* partial, cudaStream_t stream) {
  const dim3 grid(table.npieces);
  if (!sym && R == 1) {
    pairs_partial_kernel<In, 1, 4><<<grid, kThreads, smem, stream>>>(y, R, x, T, sym, n, table, tile, partial);
  } else if (T > 16) {
    pairs_partial_kernel<In, 4, 4><<<grid, kThreads, smem, stream>>>(y, R, x, T, sym, n, table, tile, partial);
  } else {
    pairs_partial_kernel<In, 2, 2><<<grid, kThreads, smem, stream>>>(y, R, x, T, sym, n, table, tile, partial);
  }
}

// v[s][i][j] = sum of the pieces' partials of segment s, in piece order (deterministic).
__global__ void reduce_pairs_kernel(int npairs, PieceTable table, const double* __restrict__ partial,
                                    double* __restrict__ out) {
  const int s = blockIdx.x;
  const int64_t q0 = table.seg_first[s], q1 = table.seg_first[s + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int p = warp; p < npairs; p += nwarps) {   // a warp per pair, as in solve_kernel
    double acc = 0.0;
    for (int64_t q = q0 + lane; q < q1; q += 32) acc += partial[q * npairs + p];
    acc = warp_sum(acc);
    if (lane == 0) out[static_cast<int64_t>(s) * npairs + p] = acc;
  }
}

// dX[t, c] = sum_r M1_s[t, r] dY[r, c] + sum_m M2_s[t, m] X[m, c] over one piece.
// As in combine_kernel, each thread reads its column of dY and X once and keeps the T
// accumulators in registers (MaxRows >= T), fed r = 0..R-1 then m = 0..T-1: the same fma
// chain per output as the former per-output loop (which re-read dY and X T times).
// Launch bounds (256, 2): up to 128 registers (32 fp64 accumulators); with no minimum-blocks
// hint ptxas held the former kernel to 32 registers and spilled (check_cuda.sh fails on that).
template <class In, int MaxRows>
__global__ void __launch_bounds__(kThreads, 2) backward_combine_kernel(const In* __restrict__ dy, int R,
                                                                    const In* __restrict__ x, int T, int64_t n,
                                                                    PieceTable table,
                                                                    const typename AccOf<In>::type* __restrict__ m1,
                                                                    const typename AccOf<In>::type* __restrict__ m2,
                                                                    In* __restrict__ out) {
  typedef typename AccOf<In>::type Acc;
  __shared__ Acc w1[kMaxTasks * kMaxTasks];
  __shared__ Acc w2[kMaxTasks * kMaxTasks];
  const int piece = blockIdx.x;
  const int64_t s = table.seg[piece], lo = table.lo[piece], hi = table.hi[piece];
  for (int e = threadIdx.x; e < T * R; e += blockDim.x) w1[e] = m1[s * T * R + e];
  for (int e = threadIdx.x; e < T * T; e += blockDim.x) w2[e] = m2[s * T * T + e];
  __syncthreads();
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    Acc acc[MaxRows];
    rows_first<MaxRows>(acc, w1, R, T, static_cast<Acc>(to_stage(dy[c])));
#pragma unroll 1   // unrolled, ptxas preloads MaxRows weights per step ahead and spills
    for (int r = 1; r < R; ++r) rows_fma<MaxRows>(acc, w1, R, r, T, static_cast<Acc>(to_stage(dy[r * n + c])));
#pragma unroll 1
    for (int m = 0; m < T; ++m) rows_fma<MaxRows>(acc, w2, T, m, T, static_cast<Acc>(to_stage(x[m * n + c])));
    rows_store<MaxRows>(out, n, c, acc, T);
  }
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
  const size_t smem = pairs_smem_bytes<In>(tasks * (tasks + 1) / 2, tasks, tile);
  launch_pairs<In>(x, tasks, x, tasks, true, n, table, tile, smem, partial, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  solve_kernel<Acc><<<table.nsegments, kThreads, 0, stream>>>(tasks, table, partial, order, reduction, gram, coeffs, nproj,
                                                        static_cast<Acc*>(weights));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int rows_out = reduction == 2 ? tasks : 1;
  const Acc* w = static_cast<const Acc*>(weights);
  switch (combine_max_rows(rows_out)) {
    case 1: combine_kernel<In, 1><<<table.npieces, kThreads, 0, stream>>>(x, tasks, n, table, rows_out, w, out); break;
    case 8: combine_kernel<In, 8><<<table.npieces, kThreads, 0, stream>>>(x, tasks, n, table, rows_out, w, out); break;
    case 16: combine_kernel<In, 16><<<table.npieces, kThreads, 0, stream>>>(x, tasks, n, table, rows_out, w, out); break;
    default: combine_kernel<In, 32><<<table.npieces, kThreads, 0, stream>>>(x, tasks, n, table, rows_out, w, out); break;
  }
  return cudaGetLastError();
}

template <class In>
cudaError_t launch_cross(const In* y, int rows, const In* x, int tasks, int64_t n, const PieceTable& table,
                         double* partial, double* out, cudaStream_t stream) {
  if (tasks < 1 || tasks > kMaxTasks || rows < 1 || rows > kMaxTasks) return cudaErrorInvalidValue;
  const int tile = gram_tile_columns(rows + tasks, sizeof(In) == 8);
  const int npairs = rows * tasks;
  const size_t smem = pairs_smem_bytes<In>(npairs, rows + tasks, tile);
  launch_pairs<In>(y, rows, x, tasks, false, n, table, tile, smem, partial, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_pairs_kernel<<<table.nsegments, kThreads, 0, stream>>>(npairs, table, partial, out);
  return cudaGetLastError();
}

template <class In>
cudaError_t launch_backward_combine(const In* dy, int rows, const In* x, int tasks, int64_t n, const PieceTable& table,
                                    const void* m1, const void* m2, In* out, cudaStream_t stream) {
  typedef typename AccOf<In>::type Acc;
  if (tasks < 1 || tasks > kMaxTasks || rows < 1 || rows > kMaxTasks) return cudaErrorInvalidValue;
  const Acc* a1 = static_cast<const Acc*>(m1);
  const Acc* a2 = static_cast<const Acc*>(m2);
  switch (combine_max_rows(tasks < 2 ? 2 : tasks)) {
    case 8: backward_combine_kernel<In, 8><<<table.npieces, kThreads, 0, stream>>>(dy, rows, x, tasks, n, table, a1, a2, out); break;
    case 16: backward_combine_kernel<In, 16><<<table.npieces, kThreads, 0, stream>>>(dy, rows, x, tasks, n, table, a1, a2, out); break;
    default: backward_combine_kernel<In, 32><<<table.npieces, kThreads, 0, stream>>>(dy, rows, x, tasks, n, table, a1, a2, out); break;
  }
  return cudaGetLastError();
}

#define OL_INSTANTIATE(T_)                                                                                      \
  template cudaError_t launch_cross<T_>(const T_*, int, const T_*, int, int64_t, const PieceTable&, double*,     \
                                        double*, cudaStream_t);                                                 \
  template cudaError_t launch_backward_combine<T_>(const T_*, int, const T_*, int, int64_t, const PieceTable&,   \
                                                   const void*, const void*, T_*, cudaStream_t);
OL_INSTANTIATE(float)
OL_INSTANTIATE(double)
OL_INSTANTIATE(__half)
OL_INSTANTIATE(__nv_bfloat16)
#undef OL_INSTANTIATE

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
