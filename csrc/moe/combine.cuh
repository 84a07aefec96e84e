// MoE combine: the k weighted expert outputs of each token summed in a fixed
// order,
//
//   out[t, :] = T( sum_{j = 0 .. k-1} float(y[t * k + j, :]) )   (fp32, one rounding)
//
// skipping picks the permutation dropped (an expert id outside [0, E):
// inverse[n] == -1; the GEMMs never wrote their y rows). No atomics: bitwise
// reproducible, and the same order as reference.moe_experts (pick order).
//
// Why it is shaped this way: memory bound (read k rows, write one). One
// thread per 16-byte vector of a token's row (coalesced across the warp);
// H is a multiple of 8 elements and every row 16-byte aligned (the glue
// guarantees: y and out are fresh contiguous tensors, H % 128 == 0).
//
// Torch-free: raw pointers and sizes; launched from experts.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/pdl.cuh"
#include "core/vec.cuh"

namespace qwen3x::moe {

constexpr int kCombineThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
moe_combine_kernel(T* __restrict__ out,            // [num_tokens, hidden], contiguous
                   const T* __restrict__ y,        // [num_tokens * top_k, hidden], contiguous
                   const int* __restrict__ inverse,  // [num_tokens * top_k]: slot, -1 = dropped
                   int64_t num_tokens,
                   int hidden,                     // a multiple of Vec16<T>::kSize
                   int top_k) {
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  using Vec = Vec16<T>;
  const int64_t vecs_per_row = hidden / Vec::kSize;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (idx >= num_tokens * vecs_per_row) return;
  const int64_t token = idx / vecs_per_row;
  const int64_t col = (idx - token * vecs_per_row) * Vec::kSize;

  float sum[Vec::kSize];
#pragma unroll
  for (int e = 0; e < Vec::kSize; ++e) sum[e] = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    const int64_t n = token * top_k + j;
    if (__ldg(inverse + n) < 0) continue;
    const Vec v = load_vec16(y + n * hidden + col);
#pragma unroll
    for (int e = 0; e < Vec::kSize; ++e) sum[e] += to_float(v.data[e]);
  }
  Vec o;
#pragma unroll
  for (int e = 0; e < Vec::kSize; ++e) o.data[e] = from_float<T>(sum[e]);
  store_vec16(out + token * hidden + col, o);
}

template <typename T>
cudaError_t launch_moe_combine(T* out, const T* y, const int* inverse, int64_t num_tokens,
                               int hidden, int top_k, cudaStream_t stream, bool pdl) {
  const int64_t vecs = num_tokens * (hidden / Vec16<T>::kSize);
  if (vecs == 0) return cudaSuccess;
  const int64_t blocks = ceil_div<int64_t>(vecs, kCombineThreads);
  return launch_kernel(pdl, moe_combine_kernel<T>, dim3(static_cast<unsigned>(blocks)),
                       dim3(kCombineThreads), 0, stream, out, y, inverse, num_tokens, hidden,
                       top_k);
}

}  // namespace qwen3x::moe
