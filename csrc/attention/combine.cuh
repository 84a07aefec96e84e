// Split-KV combine: merges the num_splits partial results of every packed row
// into out and lse, in a fixed order (deterministic):
//
//   L   = log2 sum_i 2^(lse2_i)        (max-shifted; -inf when every split is empty)
//   out = sum_i 2^(lse2_i - L) O_i      (i = 0, 1, ..., num_splits - 1)
//   lse = L * ln 2
//
// One warp per workspace row (kv head, token, h); lane l owns head dims 4 l .. 4 l + 3
// (16-byte fp32 loads of each split's O_i). The split weights are reduced with
// a fixed butterfly over lanes (lane l sums splits l, l + 32, ... in order).
// An empty split (lse2 = -inf, O = 0) gets weight 0. Rows that see no key at
// all, and a varlen batch's tokens outside every sequence, get out = 0, lse = -inf.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "core/pdl.cuh"

#include "attention/kernel_traits.cuh"
#include "core/gpu_constants.h"
#include "core/mma.cuh"
#include "core/reduce.cuh"
#include "core/vec.cuh"

namespace qwen3x::attn {

constexpr int kCombineWarps = 4;  // rows per combine block
constexpr int kCombineThreads = kCombineWarps * kWarpSize;
constexpr int kCombineDimsPerLane = kHeadDim / kWarpSize;  // 4
static_assert(kCombineDimsPerLane == 4, "a lane owns one float4 of each split's row");

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
attention_combine_kernel(const Params p) {
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / kWarpSize;
  // Workspace rows: [splits][Hkv][token * group + h]; out row token * Hq + kvh * group + h.
  const int64_t rows_per_head = static_cast<int64_t>(p.total_q) * p.group;
  const int64_t rows_per_split = p.num_kv_heads * rows_per_head;
  if (row >= rows_per_split) return;
  const int kvh = static_cast<int>(row / rows_per_head);
  const int64_t r = row - kvh * rows_per_head;
  const int token = static_cast<int>(r / p.group);
  const int hq = kvh * p.group + static_cast<int>(r - static_cast<int64_t>(token) * p.group);
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(token) * p.num_q_heads + hq) * kHeadDim +
           lane * kCombineDimsPerLane;
  const float* lse_row = p.partial_lse + row;  // split i at lse_row[i * rows_per_split]

  float lse2 = -INFINITY;
  float acc[kCombineDimsPerLane] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (!token_outside(p, token)) {  // else no split wrote this row: out = 0, lse = -inf
    float max2 = -INFINITY;
    for (int i = lane; i < p.num_splits; i += kWarpSize) {
      max2 = fmaxf(max2, lse_row[i * rows_per_split]);
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      max2 = fmaxf(max2, __shfl_xor_sync(kFullWarpMask, max2, offset));
    }
    const float base = max2 == -INFINITY ? 0.0f : max2;
    float sum = 0.0f;
    for (int i = lane; i < p.num_splits; i += kWarpSize) {
      sum += exp2f(lse_row[i * rows_per_split] - base);
    }
    sum = warp_reduce_sum(sum);
    // sum == 0: no split saw a key. A NaN partial lse (NaN inputs, or a row marked uncovered,
    // whose partial O nobody wrote) makes sum NaN: out and lse become NaN without reading O.
    if (isnan(sum)) {
      lse2 = NAN;
#pragma unroll
      for (int d = 0; d < kCombineDimsPerLane; ++d) acc[d] = NAN;
    } else if (sum > 0.0f) {
      lse2 = base + log2f(sum);
      const float* o_row = p.partial_o + row * kHeadDim + lane * kCombineDimsPerLane;
      for (int i = 0; i < p.num_splits; ++i) {
        const float w = exp2f(lse_row[i * rows_per_split] - lse2);
        const float4 oi = *reinterpret_cast<const float4*>(o_row + i * rows_per_split * kHeadDim);
        acc[0] += w * oi.x;
        acc[1] += w * oi.y;
        acc[2] += w * oi.z;
        acc[3] += w * oi.w;
      }
    }
  }
  const uint2 packed = make_uint2(pack_float2<T>(acc[0], acc[1]), pack_float2<T>(acc[2], acc[3]));
  *reinterpret_cast<uint2*>(out) = packed;
  if (lane == 0) p.lse[lse_index(p, token, hq)] = lse2 * kLn2;
}

}  // namespace qwen3x::attn
