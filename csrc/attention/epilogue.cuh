// Writing a CTA's result, after the last K/V tile.
//
// num_splits == 1 (write_output): O / l is rounded to T and staged through
// the (free by then) Q tile in shared memory, so that every thread then
// stores whole 16-byte chunks of out [B, Sq, Hq, 128] (a packed row r = s *
// group + h is one contiguous 256-byte head of token s). lse [B, Hq, Sq] in
// natural log.
//
// num_splits > 1 (write_partial): O / l stays fp32 and goes to the split's
// slice of the workspace partial_o [splits, B * Hkv, rows, 128] (8-byte
// stores, a quad writes 32 contiguous bytes), lse in log2 units to
// partial_lse [splits, B * Hkv, rows]; combine.cuh merges the splits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/kernel_traits.cuh"
#include "attention/softmax.cuh"
#include "core/mma.cuh"
#include "core/vec.cuh"

namespace qwen3x::attn {

// Requires: all warps past their last read of sQ (a __syncthreads before).
template <typename T>
__device__ __forceinline__ void write_output(const Params& p,
                                             T* sO,  // [kBlockM][128] swizzled (the Q tile)
                                             const float (&o)[kHeadTilesN][4],
                                             const float (&inv_l)[kRowHalves],
                                             const float (&lse2)[kRowHalves], int b, int kvh,
                                             int row0, int warp, int lane, int tid) {
  // 1. registers -> shared (4-byte stores: the 8 rows of a warp phase hit 8
  //    distinct chunk columns thanks to the swizzle, so no bank conflicts).
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int local_row = warp * kRowsPerWarp + lane / 4 + 8 * half;
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
      const uint32_t packed =
          pack_float2<T>(o[j][2 * half] * inv_l[half], o[j][2 * half + 1] * inv_l[half]);
      *reinterpret_cast<uint32_t*>(sO + swizzled_offset(local_row, j) + 2 * (lane % 4)) = packed;
    }
    const int r = row0 + local_row;
    if (lane % 4 == 0 && r < p.rows) {
      const int s = r / p.group;
      const int hq = kvh * p.group + (r - s * p.group);
      p.lse[(static_cast<int64_t>(b) * p.num_q_heads + hq) * p.seqlen_q + s] = lse2[half] * kLn2;
    }
  }
  __syncthreads();
  // 2. shared -> global, 16-byte chunks, whole rows per pass.
  T* out = static_cast<T*>(p.out);
  const int chunk = tid % kChunksPerRow;
#pragma unroll
  for (int i = 0; i < kBlockM / kLoadRowsPerPass; ++i) {
    const int local_row = tid / kChunksPerRow + i * kLoadRowsPerPass;
    const int r = row0 + local_row;
    if (r < p.rows) {
      const int s = r / p.group;
      const int hq = kvh * p.group + (r - s * p.group);
      const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(sO + swizzled_offset(local_row, chunk));
      store_vec16(out + ((static_cast<int64_t>(b) * p.seqlen_q + s) * p.num_q_heads + hq) * kHeadDim +
                      chunk * kChunkElems,
                  v);
    }
  }
}

__device__ __forceinline__ void write_partial(const Params& p, const float (&o)[kHeadTilesN][4],
                                              const float (&inv_l)[kRowHalves],
                                              const float (&lse2)[kRowHalves], int bh, int split,
                                              int row0, int warp, int lane) {
  const int64_t slice_rows =
      (static_cast<int64_t>(split) * p.batch * p.num_kv_heads + bh) * p.rows;  // first row of (split, bh)
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int r = row0 + warp * kRowsPerWarp + lane / 4 + 8 * half;
    if (r >= p.rows) continue;
    float* dst = p.partial_o + (slice_rows + r) * kHeadDim + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
      *reinterpret_cast<float2*>(dst + j * kMmaN) =
          make_float2(o[j][2 * half] * inv_l[half], o[j][2 * half + 1] * inv_l[half]);
    }
    if (lane % 4 == 0) p.partial_lse[slice_rows + r] = lse2[half];
  }
}

}  // namespace qwen3x::attn
