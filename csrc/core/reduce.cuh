// Warp and block reductions over fp32 partial sums and maxima (butterfly shuffles, so
// every participating lane ends with the total).
#pragma once

#include <cuda_runtime.h>

#include "core/gpu_constants.h"

namespace qwen3x {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over aligned groups of kWidth lanes (kWidth a power of two <= 32); each
// group gets its own total. All 32 lanes must call it.
template <int kWidth = kWarpSize>
__device__ __forceinline__ float warp_reduce_sum(float v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0,
                "kWidth must be a power of two no larger than a warp");
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// Max over the whole warp; every lane gets it. All 32 lanes must call it.
__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  }
  return v;
}

// warp_reduce_sum / warp_reduce_max over N independent values at once: each level shuffles
// all N before it combines any, so their shuffle latencies overlap (one value after another,
// each butterfly waits out its own 5 round trips). Each value sees the single-value form's
// operations in its order: the results are bitwise the same.
template <int N, typename Combine>
__device__ __forceinline__ void warp_butterfly_n(float (&v)[N], Combine combine) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    float other[N];
#pragma unroll
    for (int n = 0; n < N; ++n) other[n] = __shfl_xor_sync(kFullWarpMask, v[n], offset);
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = combine(v[n], other[n]);
  }
}

template <int N>
__device__ __forceinline__ void warp_reduce_sum_n(float (&v)[N]) {
  warp_butterfly_n(v, [](float mine, float other) { return mine + other; });
}

template <int N>
__device__ __forceinline__ void warp_reduce_max_n(float (&v)[N]) {
  warp_butterfly_n(v, [](float mine, float other) { return fmaxf(mine, other); });
}

// Sum over the whole block (blockDim.x a multiple of 32, blockDim.y == 1);
// every thread gets the total. `warp_sums` holds one float per warp. Contains
// __syncthreads: every thread of the block must call it.
__device__ __forceinline__ float block_reduce_sum(float v, float* warp_sums) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < num_warps ? warp_sums[lane] : 0.0f;
  return warp_reduce_sum(v);
}

}  // namespace qwen3x
