// Writing a CTA's result, after the last K/V tile.
//
// num_splits == 1 (write_output): O / l is rounded to T and staged through
// the (free by then) Q tile in shared memory, so that every thread then
// stores whole 16-byte chunks of out [B, Sq, Hq, 128] (a packed row r = s *
// group + h is one contiguous 256-byte head of token s). lse [B, Hq, Sq] in
// natural log.
//
// num_splits > 1 (write_partial): O / l stays fp32 and goes to the split's
// slice of the workspace partial_o [splits, Hkv, total_q * group, 128] (8-byte
// stores, a quad writes 32 contiguous bytes), lse in log2 units to
// partial_lse [splits, Hkv, total_q * group]; combine.cuh merges the splits.
//
// clear_outside_tokens: a varlen batch's tokens outside every sequence get
// out = 0 and lse = -inf.
// mark_uncovered_rows: varlen rows beyond the grid (a max_seqlen_q hint below
// the longest sequence) get NaN out and lse.
// (Both by the CTAs of split 0 only, whether or not the key range is split.)
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
__device__ __forceinline__ void write_output(const Params& p, const SeqSlice& seq,
                                             T* sO,  // [kBlockM][128] swizzled (the Q tile)
                                             const float (&o)[kHeadTilesN][4],
                                             const float (&inv_l)[kRowHalves],
                                             const float (&lse2)[kRowHalves], int kvh, int row0,
                                             int warp, int lane, int tid) {
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
    if (lane % 4 == 0 && r < seq.rows) {
      const int s = r / p.group;
      const int hq = kvh * p.group + (r - s * p.group);
      p.lse[seq.lse_offset + hq * seq.lse_head_stride + s] = lse2[half] * kLn2;
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
    if (r < seq.rows) {
      const int s = r / p.group;
      const int hq = kvh * p.group + (r - s * p.group);
      const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(sO + swizzled_offset(local_row, chunk));
      store_vec16(out + (static_cast<int64_t>(seq.token0 + s) * p.num_q_heads + hq) * kHeadDim +
                      chunk * kChunkElems,
                  v);
    }
  }
}

__device__ __forceinline__ void write_partial(const Params& p, const SeqSlice& seq,
                                              const float (&o)[kHeadTilesN][4],
                                              const float (&inv_l)[kRowHalves],
                                              const float (&lse2)[kRowHalves], int kvh, int split,
                                              int row0, int warp, int lane) {
  // Partial row of (split, kvh, packed row r of the sequence): the workspace has
  // total_q * group rows per (split, kv head), token-major like out.
  const int64_t slice_rows =
      (static_cast<int64_t>(split) * p.num_kv_heads + kvh) * p.total_q * p.group +
      static_cast<int64_t>(seq.token0) * p.group;
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int r = row0 + warp * kRowsPerWarp + lane / 4 + 8 * half;
    if (r >= seq.rows) continue;
    float* dst = p.partial_o + (slice_rows + r) * kHeadDim + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
      *reinterpret_cast<float2*>(dst + j * kMmaN) =
          make_float2(o[j][2 * half] * inv_l[half], o[j][2 * half + 1] * inv_l[half]);
    }
    if (lane % 4 == 0) p.partial_lse[slice_rows + r] = lse2[half];
  }
}

// Varlen, run by the CTAs of row tile 0, split 0: sequence 0 clears the tokens before
// cu_seqlens_q[0], sequence B - 1 those from cu_seqlens_q[B] on, for the kv head's query heads.
template <typename T>
__device__ __forceinline__ void clear_outside_tokens(const Params& p, int b, int kvh, int tid) {
  if (p.cu_seqlens_q == nullptr) return;
  const int first = min(max(p.cu_seqlens_q[0], 0), p.total_q);
  const int last = min(max(p.cu_seqlens_q[p.batch], first), p.total_q);
  T* out = static_cast<T*>(p.out);
  const Vec16<T> zero{};
  const int chunks_per_token = p.group * kChunksPerRow;  // the group's heads, 16-byte chunks
  for (int range = 0; range < 2; ++range) {
    const bool mine = range == 0 ? b == 0 : b == p.batch - 1;
    const int begin = range == 0 ? 0 : last;
    const int end = range == 0 ? first : p.total_q;
    if (!mine || begin >= end) continue;
    const int64_t chunks = static_cast<int64_t>(end - begin) * chunks_per_token;
    for (int64_t i = tid; i < chunks; i += kThreads) {
      const int token = begin + static_cast<int>(i / chunks_per_token);
      const int c = static_cast<int>(i % chunks_per_token);
      const int hq = kvh * p.group + c / kChunksPerRow;
      store_vec16(out + (static_cast<int64_t>(token) * p.num_q_heads + hq) * kHeadDim +
                      (c % kChunksPerRow) * kChunkElems,
                  zero);
    }
    for (int64_t i = tid; i < static_cast<int64_t>(end - begin) * p.group; i += kThreads) {
      const int token = begin + static_cast<int>(i / p.group);
      const int hq = kvh * p.group + static_cast<int>(i % p.group);
      p.lse[static_cast<int64_t>(hq) * p.total_q + token] = -INFINITY;
    }
  }
}

// Varlen, run by the CTAs of the last row tile, split 0: the sequence's packed rows from
// `covered` on (which no CTA computes) get NaN out and lse.
template <typename T>
__device__ __forceinline__ void mark_uncovered_rows(const Params& p, const SeqSlice& seq, int kvh,
                                                    int covered, int tid) {
  if (covered >= seq.rows) return;
  const int64_t rows = seq.rows - covered;
  T* out = static_cast<T*>(p.out);
  Vec16<T> nan;
#pragma unroll
  for (int e = 0; e < Vec16<T>::kSize; ++e) nan.data[e] = from_float<T>(NAN);
  for (int64_t i = tid; i < rows * kChunksPerRow; i += kThreads) {
    const int r = covered + static_cast<int>(i / kChunksPerRow);
    const int s = r / p.group;
    const int hq = kvh * p.group + (r - s * p.group);
    store_vec16(out + (static_cast<int64_t>(seq.token0 + s) * p.num_q_heads + hq) * kHeadDim +
                    (i % kChunksPerRow) * kChunkElems,
                nan);
    if (i % kChunksPerRow == 0) p.lse[seq.lse_offset + hq * seq.lse_head_stride + s] = NAN;
  }
}

}  // namespace qwen3x::attn
