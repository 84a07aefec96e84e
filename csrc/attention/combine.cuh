// Split-KV combine, fused into the forward kernel: the CTA that finishes a (row tile, b, kv head)
// last merges the num_splits partial results of the tile's packed rows into out and lse, in a
// fixed order (deterministic, whichever CTA finishes last):
//
//   L   = log2 sum_i 2^(lse2_i)        (max-shifted; -inf when every split is empty)
//   out = sum_i 2^(lse2_i - L) O_i      (i = 0, 1, ..., num_splits - 1)
//   lse = L * ln 2
//
// Who is last (combine_if_last): each split's CTA, after its partials, writes this launch's tag
// into its slot of split_flags[tile][split] and, after a device-wide fence, reads the tile's
// num_splits slots (one warp, each lane its own slots, all reads in flight together; strong
// relaxed loads, core/vec.cuh, not atomic reads: num_splits^2 atomics on a tile's few lines queue
// at L2, one of the suspects in the H200 run's batch-1 times growing with the split count). Of CTAs
// that finish together at least one sees every mark (the fences are sequentially consistent: no
// two can both miss the other's mark), and more than one may: each then writes the same bits.
// The combiner sets the slots back to 0, so that a CUDA graph's replays (same tag) start clean; a
// fresh workspace holds whatever the allocator's last user left, which is never the tag (a 64-bit
// value drawn per launch, attention.cu). No memset, no second kernel: a decode step's attention
// is one launch.
//
// The other way (p.cluster_combine, sm_90, at most kMaxClusterSize splits; attention.cu's default
// for decode where all the plan's clusters can be resident at once, QWEN3X_ATTENTION_COMBINE=cluster
// forces it): the tile's splits are one thread block cluster; each keeps its rows in its own
// shared memory and, after a cluster barrier, the cluster's warps merge the rows reading the other
// CTAs' shared memory (combine_in_cluster, below). Same arithmetic, same order, same bits; what it
// drops is the workspace's round trips through L2, the device-wide fences and the marks, and one
// CTA doing a tile's whole merge (batch-1 decode 0.59-0.91x the L2 merge's time on an H200,
// NOTES.md).
//
// combine_row: one warp per workspace row (kv head, token, h); lane l owns head dims
// 4 l .. 4 l + 3 (16-byte fp32 loads of each split's O_i: through L2, or from the split CTA's
// shared memory in a cluster). The split weights are reduced with a fixed butterfly over lanes
// (lane l sums splits l, l + 32, ... in order). An empty split (lse2 = -inf, O = 0) gets weight 0;
// rows that see no key at all get out = 0, lse = -inf; a NaN partial lse (NaN inputs) gives NaN
// out and lse.
// Its cost is L2 round trips in a chain, on the one combining CTA of each tile: the first H200
// run (2026-11-27, benchmarks/NOTES.md) timed batch-1 decode at 24-31 us for 1k keys (16 splits;
// the separate combine kernel this replaced: 14 us on the H100) and 39-55 us for 8k (64 splits),
// growing with the rows a warp merges and with the split count, while the version then read
// each lse three times and had its O loop's loads wait in small batches. Now: one pass for the
// lse values, then the O rows kCombineLoadsInFlight at a time.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/heuristics.cuh"
#include "attention/kernel_traits.cuh"
#include "attention/softmax.cuh"
#include "core/cluster.cuh"
#include "core/gpu_constants.h"
#include "core/mma.cuh"
#include "core/reduce.cuh"
#include "core/vec.cuh"

namespace qwen3x::attn {

constexpr int kCombineDimsPerLane = kHeadDim / kWarpSize;  // 4
static_assert(kCombineDimsPerLane == 4, "a lane owns one float4 of each split's row");
constexpr int kCombineSplitsPerLane = kMaxSplits / kWarpSize;  // lse registers a lane holds: 4
static_assert(kCombineSplitsPerLane * kWarpSize == kMaxSplits, "whole rounds of 32 splits");
// O loads a lane issues before it adds any of them (16 float4 = 64 registers): the combine is a
// chain of L2 round trips (other SMs wrote the partials), so it waits once per this many splits.
constexpr int kCombineLoadsInFlight = 16;

// Where combine_row reads a row's splits: split i's lse (log2 units) and this lane's 4 of its 128
// normalized O values.
// GlobalSplits: the workspace (partial_lse, partial_o), through L2 (other SMs wrote them).
struct GlobalSplits {
  const float* lse_row;    // split i at lse_row[i * rows_per_split]
  const float* o_row;      // this lane's 4 floats of split 0's row
  int64_t rows_per_split;  // Hkv * total_q * group
  __device__ __forceinline__ float lse(int i) const { return __ldcg(lse_row + i * rows_per_split); }
  __device__ __forceinline__ float4 o(int i) const {
    return __ldcg(reinterpret_cast<const float4*>(o_row + i * rows_per_split * kHeadDim));
  }
};
// ClusterSplits: the shared memory of split i's CTA, cluster rank i (combine_in_cluster): the
// row's lse and this lane's 4 O values at the same shared offsets in every CTA of the cluster
// (stash_offset).
struct ClusterSplits {
  uint32_t lse_addr;  // shared::cta address of the row's lse in this CTA
  uint32_t o_addr;    // ... of this lane's 4 floats of the row's O
  __device__ __forceinline__ float lse(int i) const { return ld_shared_cluster(map_shared_rank(lse_addr, i)); }
  __device__ __forceinline__ float4 o(int i) const { return ld_shared_cluster_v4(map_shared_rank(o_addr, i)); }
};

// Workspace row `row` of [Hkv][total_q * group] (its kv head, token and query head) into out and
// lse, from the row's num_splits partial results in `splits`. Two passes: the lse values (lane l
// reads splits l, l + 32, ... once, and keeps them), then the O rows, kCombineLoadsInFlight at a
// time, each split's weight taken from the lane that holds its lse. The sums run in split order
// 0, 1, ... whatever the batching, and both sources give the same bits.
template <typename T, typename Splits>
__device__ __noinline__ void combine_row(const Params& p, int64_t row, int lane, const Splits splits) {
  // Workspace rows: [splits][Hkv][token * group + h]; out row token * Hq + kvh * group + h.
  const int64_t rows_per_head = static_cast<int64_t>(p.total_q) * p.group;
  const int kvh = static_cast<int>(row / rows_per_head);
  const int64_t r = row - kvh * rows_per_head;
  const int token = static_cast<int>(r / p.group);
  const int hq = kvh * p.group + static_cast<int>(r - static_cast<int64_t>(token) * p.group);
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(token) * p.num_q_heads + hq) * kHeadDim +
           lane * kCombineDimsPerLane;

  float lse_s[kCombineSplitsPerLane];  // this lane's splits: lane + 32 j (-inf past num_splits)
#pragma unroll
  for (int j = 0; j < kCombineSplitsPerLane; ++j) {
    const int i = lane + j * kWarpSize;
    lse_s[j] = i < p.num_splits ? splits.lse(i) : -INFINITY;
  }
  float max2 = -INFINITY;
#pragma unroll
  for (int j = 0; j < kCombineSplitsPerLane; ++j) max2 = fmaxf(max2, lse_s[j]);
  max2 = warp_reduce_max(max2);
  const float base = max2 == -INFINITY ? 0.0f : max2;
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kCombineSplitsPerLane; ++j) {
    if (lane + j * kWarpSize < p.num_splits) sum += exp2f(lse_s[j] - base);
  }
  sum = warp_reduce_sum(sum);
  // sum == 0: no split saw a key. A NaN partial lse makes sum NaN: out and lse become NaN
  // without reading O.
  float lse2 = -INFINITY;
  float acc[kCombineDimsPerLane] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (isnan(sum)) {
    lse2 = NAN;
#pragma unroll
    for (int d = 0; d < kCombineDimsPerLane; ++d) acc[d] = NAN;
  } else if (sum > 0.0f) {
    lse2 = base + log2f(sum);
    float w_s[kCombineSplitsPerLane];  // the weights of this lane's splits
#pragma unroll
    for (int j = 0; j < kCombineSplitsPerLane; ++j) w_s[j] = exp2f(lse_s[j] - lse2);
#pragma unroll
    for (int j = 0; j < kCombineSplitsPerLane; ++j) {  // splits 32 j .. 32 j + 31
#pragma unroll
      for (int t0 = 0; t0 < kWarpSize; t0 += kCombineLoadsInFlight) {
        const int i0 = j * kWarpSize + t0;
        if (i0 >= p.num_splits) break;
        float4 oi[kCombineLoadsInFlight];
#pragma unroll
        for (int t = 0; t < kCombineLoadsInFlight; ++t) {
          oi[t] = i0 + t < p.num_splits ? splits.o(i0 + t) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int t = 0; t < kCombineLoadsInFlight; ++t) {
          const float w = __shfl_sync(kFullWarpMask, w_s[j], t0 + t);
          if (i0 + t < p.num_splits) {
            acc[0] += w * oi[t].x;
            acc[1] += w * oi[t].y;
            acc[2] += w * oi[t].z;
            acc[3] += w * oi[t].w;
          }
        }
      }
    }
  }
  const uint2 packed = make_uint2(pack_float2<T>(acc[0], acc[1]), pack_float2<T>(acc[2], acc[3]));
  *reinterpret_cast<uint2*>(out) = packed;
  if (lane == 0) p.lse[lse_index(p, token, hq)] = lse2 * kLn2;
}

// After this CTA's write_partial (every thread): if every split of the CTA's (row tile, b, kv
// head) has written its partials, merge the tile's rows. s_flag: one int of shared memory no
// thread uses any more (the Q tile's first word).
template <typename T>
__device__ __forceinline__ void combine_if_last(const Params& p, const SeqSlice& seq, int kvh,
                                                int split, int row0, int warp, int lane, int tid,
                                                int* s_flag) {
  unsigned long long* flags =
      p.split_flags + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * p.num_splits;
  __threadfence();  // this thread's partial stores, device-wide, before the CTA's mark
  __syncthreads();
  if (warp == 0) {  // the mark, then the tile's marks read by the warp's lanes at once
    if (lane == 0) {
      atomicExch(flags + split, p.split_tag);
      __threadfence();  // the mark before the reads below (which __syncwarp orders after it)
    }
    __syncwarp();
    bool mine = true;  // every slot this lane reads holds the tag (no early exit: reads overlap)
    // Strong loads, not atomic reads: every split's CTA reads all the tile's slots, num_splits^2
    // operations on the same lines, which as atomics queue one after another at L2.
    for (int i = lane; i < p.num_splits; i += kWarpSize) mine &= load_relaxed_gpu(flags + i) == p.split_tag;
    const bool all = __all_sync(kFullWarpMask, mine);
    if (all) {
      for (int i = lane; i < p.num_splits; i += kWarpSize) store_relaxed_gpu(flags + i, 0ULL);  // for the next replay
    }
    if (lane == 0) *s_flag = all;
  }
  __syncthreads();
  if (!*s_flag) return;
  __threadfence();  // the other splits' partials, before this CTA's reads of them
  const int64_t tile_row0 =
      static_cast<int64_t>(kvh) * p.total_q * p.group + static_cast<int64_t>(seq.token0) * p.group + row0;
  const int rows = min(kBlockM, seq.rows - row0);
  const int64_t rows_per_split = static_cast<int64_t>(p.num_kv_heads) * p.total_q * p.group;
  for (int r = warp; r < rows; r += kNumWarps) {
    const int64_t row = tile_row0 + r;
    combine_row<T>(p, row, lane,
                   GlobalSplits{p.partial_lse + row, p.partial_o + row * kHeadDim + lane * kCombineDimsPerLane,
                                rows_per_split});
  }
}

// Float offset of (row, column) in a split's stash of its rows [kBlockM][128] fp32: the 16-byte
// chunks of row r xor-swizzled by r % 8, so that the 8 rows one store of a warp writes (lanes / 4)
// fall in 8 different bank groups (a 512-byte row stride alone puts them all in one).
__device__ __forceinline__ int stash_offset(int row, int col) {
  constexpr int kChunkFloats = 4;
  constexpr int kSwizzle = 8;
  return row * kHeadDim + ((col / kChunkFloats) ^ (row % kSwizzle)) * kChunkFloats + col % kChunkFloats;
}

// The in-cluster combine (p.cluster_combine: the grid launched in clusters of (1, 1, num_splits),
// so split z is cluster rank z): each split's CTA keeps its rows' O / l (fp32, the values
// write_partial would store) and lse in its own shared memory, a cluster barrier makes them
// visible, and the tile's rows are merged by the cluster's warps side by side (warp w of split z
// takes rows z * kNumWarps + w, then every num_splits * kNumWarps-th), each reading the other CTAs'
// shared memory (DSMEM) with combine_row's arithmetic and order: the same bits as the L2 path.
// A second barrier keeps every CTA resident until the others have read it. No workspace, no
// device-wide fences, no marks: the cost is two cluster barriers and the DSMEM reads.
// sO: [kBlockM][128] fp32 (stash_offset), sL: [kBlockM] fp32, shared memory no thread reads any
// more. The second barrier is relaxed: the DSMEM loads it waits for have returned (their values
// are in the stores to out), and a release would first wait for those stores to be acknowledged.
template <typename T>
__device__ __forceinline__ void combine_in_cluster(const Params& p, const SeqSlice& seq,
                                                   const float (&o)[kHeadTilesN][4],
                                                   const float (&inv_l)[kRowHalves],
                                                   const float (&lse2)[kRowHalves], int kvh, int split,
                                                   int row0, int warp, int lane, float* sO, float* sL) {
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int local_row = warp * kRowsPerWarp + lane / 4 + 8 * half;
    if (row0 + local_row >= seq.rows) continue;
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
      *reinterpret_cast<float2*>(sO + stash_offset(local_row, j * kMmaN + 2 * (lane % 4))) =
          make_float2(o[j][2 * half] * inv_l[half], o[j][2 * half + 1] * inv_l[half]);
    }
    if (lane % 4 == 0) sL[local_row] = lse2[half];
  }
  cluster_sync();  // every split's rows, visible to the cluster
  const int64_t tile_row0 =
      static_cast<int64_t>(kvh) * p.total_q * p.group + static_cast<int64_t>(seq.token0) * p.group + row0;
  const int rows = min(kBlockM, seq.rows - row0);
  for (int r = split * kNumWarps + warp; r < rows; r += p.num_splits * kNumWarps) {
    combine_row<T>(p, tile_row0 + r, lane,
                   ClusterSplits{smem_u32(sL + r), smem_u32(sO + stash_offset(r, lane * kCombineDimsPerLane))});
  }
  cluster_sync_relaxed();  // nobody leaves while its shared memory may still be read
}

}  // namespace qwen3x::attn
