// Shared host-side helpers of the torch glue (CPU and CUDA): argument checks, segment
// tables. Torch headers allowed here; the kernels themselves never include this.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace ortholora {

// 0 = sum, 1 = mean, 2 = none.
int reduction_code(c10::string_view reduction);

// Validates offsets [0, ..., N] (strictly increasing) and returns them as int64.
std::vector<int64_t> check_offsets(at::IntArrayRef offsets, int64_t n);

// Validates grads [T, N] (float64/32/16/bf16) and returns it contiguous.
at::Tensor check_grads(const at::Tensor& grads, const char* name);

// Validates order ([T, T] or [S, T, T], int64/int32, same device) -> contiguous int64 [S, T, T].
at::Tensor check_order(const at::Tensor& order, int64_t s, int64_t t, const at::Device& device);

// Contiguous column pieces: every segment cut at the multiples of `chunk`, in column
// order. chunk_first[k] is the first piece of chunk k (size nchunks + 1).
struct Pieces {
  std::vector<int64_t> seg, lo, hi, chunk_first, seg_first;  // seg_first: S + 1 entries
  int64_t chunk = 0, nchunks = 0;
};
Pieces make_pieces(const std::vector<int64_t>& offs, int64_t chunk);

}  // namespace ortholora
