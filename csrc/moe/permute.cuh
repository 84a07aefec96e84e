// MoE token permutation: a stable counting sort of the N = T * k picks by
// expert, with every expert's segment padded to a multiple of row_align
// (the layout a grouped expert GEMM reads). For flat pick n = t * k + j:
//
//   expert_offsets[e]  start of expert e's padded segment (offsets[0] = 0,
//                      offsets[E] = end of the last segment)
//   sorted_rows[s]     the pick at slot s: expert e's picks in ascending n
//                      at offsets[e] ..., then -1 up to offsets[e + 1];
//                      slots from offsets[E] to the end (the worst-case size
//                      N + E * (row_align - 1), known on the host) are -1
//   inverse[n]         the slot of pick n (sorted_rows[inverse[n]] == n)
//
// Exactly reference.moe_permute. Deterministic: a slot depends only on the
// ids, never on scheduling (no atomics decide a position).
//
// Why it is shaped this way:
// - The picks are cut into tiles, one block (kPermuteThreads threads) each.
//   The slot of pick n is  start[e] + (picks of e in earlier tiles) + (picks
//   of e earlier in n's tile). The count kernel writes each tile's histogram
//   [num_tiles, E]; the scatter kernel's blocks each sum those columns (all
//   tiles: segment sizes and starts; earlier tiles: its base per expert), so
//   no third launch and no grid-wide synchronization is needed. At most
//   kTargetTiles tiles bound that column read to kTargetTiles * E ints.
// - Inside a tile, kPermuteThreads picks at a time: __match_any_sync gives
//   each pick its peers (same expert) in its warp, hence its rank in the warp
//   and the warp's count per expert; one thread per expert then scans those
//   counts over the warps (in shared memory) into per-warp bases. Ascending
//   n is ascending (warp, lane), so the order is stable. Two block barriers
//   per kPermuteThreads picks.
// - Decode-sized inputs (N <= kSingleBlockMaxPicks) take one launch: a single
//   block counts the picks itself, then scatters them.
// - Padding and trailing slots are written -1 by the blocks (spread over
//   experts and slots), so every output element is written exactly once; no
//   memset.
// - moe_experts at decode (CombinePrep): the one-block launch also prepares
//   GEMM2's fused combine (gemm_epilogue.cuh epilogue_combine), as the
//   router's decode launch does for the moe op: each arrival counter starts
//   at its token's dropped picks (so the k-th arrival still completes it), and
//   a token with every pick dropped, which no GEMM2 CTA will visit, gets its
//   output row zeroed here (the combine kernel's empty sum). Then no combine
//   launch follows the GEMMs.
// - Both kernels are launched with programmatic dependent launch where the
//   device allows (core/pdl.cuh): they wait for the previous kernel first.
//
// Ids outside [0, E) are a checked precondition only on the reference path
// (checking here would need a host sync). The kernels never index with them:
// such a pick is not counted, gets no slot, and its inverse is -1.
// Requires N + E * (row_align - 1) < 2^31 (int32 outputs; the glue checks).
//
// Torch-free: raw pointers and sizes; the glue is moe.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/pdl.cuh"
#include "core/reduce.cuh"
#include "moe/limits.h"

namespace qwen3x::moe {

// Threads per permute block; also the picks a block ranks per step.
constexpr int kPermuteThreads = 512;
constexpr int kPermuteWarps = kPermuteThreads / kWarpSize;
static_assert(kMaxExperts <= kPermuteThreads, "one thread per expert in the per-expert steps");
// Up to this many picks, one block does everything in a single launch.
constexpr int64_t kSingleBlockMaxPicks = 4 * kPermuteThreads;
// Tiles the two-launch path aims for. More tiles spread the scatter over more
// SMs; each scatter block reads num_tiles * E tile counts.
constexpr int kTargetTiles = 128;
// Ids a thread has in flight in the counting loop.
constexpr int kCountUnroll = 4;
// Tile-count loads a thread has in flight when summing a column.
constexpr int kColumnUnroll = 8;

// GEMM2's fused combine, prepared by the one-block launch (moe_experts at decode).
struct CombinePrep {
  int* counters;      // [num_tokens, col_tiles]: set to the token's dropped picks; nullptr = none
  int col_tiles;      // GEMM2's column tiles (H / its BLOCK_N)
  int top_k;          // k: num_picks = num_tokens * k
  void* out;          // [num_tokens] rows of row_bytes: the experts' output (any dtype)
  int64_t row_bytes;  // a multiple of 16 (H % 128 == 0)
};

struct PermuteTiling {
  int64_t tile_picks;  // picks per tile (the last tile may be shorter)
  int num_tiles;       // 1: single launch, no workspace
};

// How the N picks are cut into tiles (the glue sizes the workspace with it).
inline PermuteTiling permute_tiling(int64_t num_picks) {
  if (num_picks <= kSingleBlockMaxPicks) return {kSingleBlockMaxPicks, 1};
  const int64_t tile =
      round_up<int64_t>(ceil_div<int64_t>(num_picks, kTargetTiles), kPermuteThreads);
  return {tile, static_cast<int>(ceil_div<int64_t>(num_picks, tile))};
}

namespace permute_detail {

// Expert of pick n, or kNoExpert past the tile's end or for an id outside [0, E).
template <typename IdT>
__device__ __forceinline__ int expert_of(const IdT* ids, int64_t n, int64_t end, int num_experts) {
  if (n >= end) return kNoExpert;
  const IdT id = ids[n];
  return id >= 0 && id < static_cast<IdT>(num_experts) ? static_cast<int>(id) : kNoExpert;
}

__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// CombinePrep's work, by the whole block, a warp per token: the token's dropped picks (ids
// outside [0, E)) counted once, stored in every counter of the token, and the token's output row
// set to zero (16-byte stores) when all k of its picks are dropped.
template <typename IdT>
__device__ __forceinline__ void prepare_combine(const CombinePrep& c, const IdT* ids,
                                                int64_t num_picks, int num_experts) {
  const int lane = threadIdx.x % kWarpSize;
  const int num_tokens = static_cast<int>(num_picks / c.top_k);
  const int64_t vecs_per_row = c.row_bytes / kVecBytes;
  for (int t = threadIdx.x / kWarpSize; t < num_tokens; t += blockDim.x / kWarpSize) {
    const int64_t n0 = static_cast<int64_t>(t) * c.top_k;
    int dropped = 0;
    for (int j = lane; j < c.top_k; j += kWarpSize) {
      dropped += expert_of(ids, n0 + j, n0 + c.top_k, num_experts) == kNoExpert ? 1 : 0;
    }
    dropped = __reduce_add_sync(kFullWarpMask, dropped);
    for (int i = lane; i < c.col_tiles; i += kWarpSize) {
      c.counters[static_cast<int64_t>(t) * c.col_tiles + i] = dropped;
    }
    if (dropped == c.top_k) {  // no GEMM2 CTA will visit the token: the combine's empty sum
      uint4* row = reinterpret_cast<uint4*>(c.out) + t * vecs_per_row;
      for (int64_t v = lane; v < vecs_per_row; v += kWarpSize) row[v] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Adds the valid picks in [begin, end) to histogram (shared, [num_experts]).
// Block-wide: every thread of the block calls it (the loop bounds are
// uniform, so each __match_any_sync sees all 32 lanes).
template <typename IdT>
__device__ __forceinline__ void count_tile(int* histogram, const IdT* ids, int64_t begin,
                                           int64_t end, int num_experts) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t base = begin; base < end; base += kCountUnroll * kPermuteThreads) {
    int e[kCountUnroll];
#pragma unroll
    for (int i = 0; i < kCountUnroll; ++i) {
      e[i] = expert_of(ids, base + i * kPermuteThreads + threadIdx.x, end, num_experts);
    }
#pragma unroll
    for (int i = 0; i < kCountUnroll; ++i) {
      const unsigned peers = __match_any_sync(kFullWarpMask, e[i]);
      if (e[i] != kNoExpert && lane == __ffs(peers) - 1) atomicAdd(&histogram[e[i]], __popc(peers));
    }
  }
}

// Exclusive prefix sum over the block of one int per thread, and the block
// total. Contains __syncthreads (all threads call it); warp_totals is shared
// [kPermuteWarps], used once.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_totals, int* total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int below = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int earlier = 0;
  int sum = 0;
#pragma unroll
  for (int w = 0; w < kPermuteWarps; ++w) {
    const int t = warp_totals[w];
    earlier += w < warp ? t : 0;
    sum += t;
  }
  *total = sum;
  return earlier + inclusive - v;
}

__device__ __forceinline__ void tile_range(int64_t num_picks, int64_t tile_picks, int64_t* begin,
                                           int64_t* end) {
  *begin = static_cast<int64_t>(blockIdx.x) * tile_picks;
  *end = *begin + tile_picks < num_picks ? *begin + tile_picks : num_picks;
}

// One step of the stable placement, by the whole block: thread i holds a pick of expert e
// (kNoExpert: no pick, or a dropped one), the picks of a step in ascending order of i. Returns the
// pick's slot (kEmptySlot for kNoExpert): its expert's next free slot at the step's start, plus
// that expert's picks in earlier warps of the step (their counts, scanned per expert by its
// owner) and in earlier lanes of its own warp (__match_any_sync). The owner of expert `expert`
// (< num_experts, else none) keeps the expert's next free slot in *next_slot, advanced past the
// step's picks. warp_base: shared [kPermuteWarps][kMaxExperts] scratch. Two __syncthreads.
__device__ __forceinline__ int place_step(int e, int (*warp_base)[kMaxExperts], int num_experts,
                                          int expert, int* next_slot) {
  const int lane = threadIdx.x % kWarpSize;
  int* my_warp_base = warp_base[threadIdx.x / kWarpSize];
  // This warp's counts per expert (the row is only this warp's: warp-level sync; the first
  // __syncwarp orders the previous step's reads of the row before the zeroing).
  __syncwarp();
  for (int i = lane; i < num_experts; i += kWarpSize) my_warp_base[i] = 0;
  __syncwarp();
  const unsigned peers = __match_any_sync(kFullWarpMask, e);
  const int rank = __popc(peers & lanes_below(lane));  // earlier picks of e in this warp
  if (e != kNoExpert && rank == 0) my_warp_base[e] = __popc(peers);
  __syncthreads();
  // Owned expert: counts over the warps -> first slot of each warp's picks.
  if (expert < num_experts) {
#pragma unroll
    for (int w = 0; w < kPermuteWarps; ++w) {
      const int c = warp_base[w][expert];
      warp_base[w][expert] = *next_slot;
      *next_slot += c;
    }
  }
  __syncthreads();
  return e == kNoExpert ? kEmptySlot : my_warp_base[e] + rank;
}

}  // namespace permute_detail

// The permutation of at most kPermuteThreads picks whose experts the block
// already holds in shared memory, all in [0, E), with their counts: the
// router's one-block decode launch (router.cuh, kPermute) ends with it, so
// that decode routes and permutes in one launch. One pick per thread, placed
// as the scatter kernel places a step's picks (place_step: warp match and a
// scan over the warps, no loop over earlier picks). Same outputs as the
// kernels below. Block-wide: contains __syncthreads; blockDim.x ==
// kPermuteThreads.
__device__ __forceinline__ void permute_one_block(
    int* __restrict__ sorted_rows,     // [num_slots]
    int* __restrict__ expert_offsets,  // [num_experts + 1]
    int* __restrict__ inverse,         // [num_picks]
    const int* s_ids,                  // shared [num_picks]: expert of pick n = t * k + j
    const int* s_counts,               // shared [num_experts]: picks per expert
    int (*s_warp_base)[kMaxExperts],   // shared [kPermuteWarps][kMaxExperts] scratch
    int* s_warp_totals,                // shared [kPermuteWarps] scratch
    int num_picks,                     // <= kPermuteThreads
    int num_experts,                   // <= kMaxExperts
    int row_align,                     // >= 1
    int num_slots) {                   // num_picks + num_experts * (row_align - 1)
  const int expert = threadIdx.x;  // kMaxExperts <= kPermuteThreads
  const bool owns_expert = expert < num_experts;
  const int count = owns_expert ? s_counts[expert] : 0;
  const int padded = (count + row_align - 1) / row_align * row_align;
  int used = 0;
  int next_slot = permute_detail::block_exclusive_scan(padded, s_warp_totals, &used);
  if (owns_expert) {
    expert_offsets[expert] = next_slot;
    for (int s = next_slot + count; s < next_slot + padded; ++s) sorted_rows[s] = kEmptySlot;
  }
  if (threadIdx.x == 0) expert_offsets[num_experts] = used;
  for (int s = used + static_cast<int>(threadIdx.x); s < num_slots; s += blockDim.x) {
    sorted_rows[s] = kEmptySlot;
  }

  const int n = threadIdx.x;
  const int e = n < num_picks ? s_ids[n] : kNoExpert;
  const int slot = permute_detail::place_step(e, s_warp_base, num_experts, expert, &next_slot);
  if (n < num_picks) {
    sorted_rows[slot] = n;
    inverse[n] = slot;
  }
}

// ---------------------------------------------------------------------------
// Count kernel (only when num_tiles > 1): one block per tile writes the tile's
// picks per expert. Grid = num_tiles, block = kPermuteThreads.
// ---------------------------------------------------------------------------
template <typename IdT>
__global__ void __launch_bounds__(kPermuteThreads)
moe_permute_count_kernel(int* __restrict__ tile_counts,       // [num_tiles, num_experts]
                         const IdT* __restrict__ expert_ids,  // [num_picks], flat t * k + j
                         int64_t num_picks,                   // N = T * k
                         int64_t tile_picks,                  // picks per tile
                         int num_experts) {                   // E <= kMaxExperts
  using namespace permute_detail;
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  __shared__ int histogram[kMaxExperts];
  const int expert = threadIdx.x;  // kMaxExperts <= kPermuteThreads
  if (expert < num_experts) histogram[expert] = 0;
  __syncthreads();
  int64_t begin, end;
  tile_range(num_picks, tile_picks, &begin, &end);
  count_tile(histogram, expert_ids, begin, end, num_experts);
  __syncthreads();
  if (expert < num_experts) {
    tile_counts[static_cast<int64_t>(blockIdx.x) * num_experts + expert] = histogram[expert];
  }
}

// ---------------------------------------------------------------------------
// Scatter kernel: one block per tile. Segment layout from the tile counts (or
// from its own count when tile_counts is nullptr, num_tiles == 1), then the
// stable placement of the tile's picks. Block 0 writes expert_offsets; every
// block writes its share of the -1 padding; with prep.counters (num_tiles ==
// 1 only), the block also prepares GEMM2's fused combine. Grid = num_tiles,
// block = kPermuteThreads.
// ---------------------------------------------------------------------------
template <typename IdT>
__global__ void __launch_bounds__(kPermuteThreads)
moe_permute_scatter_kernel(int* __restrict__ sorted_rows,          // [num_slots]
                           int* __restrict__ expert_offsets,       // [num_experts + 1]
                           int* __restrict__ inverse,              // [num_picks]
                           const IdT* __restrict__ expert_ids,     // [num_picks], flat t * k + j
                           const int* __restrict__ tile_counts,    // [num_tiles, num_experts], or nullptr (num_tiles == 1)
                           int64_t num_picks,                      // N = T * k
                           int64_t tile_picks,                     // picks per tile
                           int num_tiles,                          // gridDim.x
                           int num_experts,                        // E <= kMaxExperts
                           int row_align,                          // >= 1
                           int64_t num_slots,                      // N + E * (row_align - 1)
                           CombinePrep prep) {                     // counters nullptr: none
  using namespace permute_detail;
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  if (prep.counters != nullptr) prepare_combine(prep, expert_ids, num_picks, num_experts);
  __shared__ int histogram[kMaxExperts];                 // single-tile count
  __shared__ int warp_base[kPermuteWarps][kMaxExperts];  // per step: count, then first slot, per warp and expert
  __shared__ int warp_totals[kPermuteWarps];

  // Per-expert work: thread e owns expert e (kMaxExperts <= kPermuteThreads).
  const int expert = threadIdx.x;
  const bool owns_expert = expert < num_experts;
  int64_t begin, end;
  tile_range(num_picks, tile_picks, &begin, &end);
  // The first step's id, loaded before the segment math.
  int e = expert_of(expert_ids, begin + threadIdx.x, end, num_experts);

  // 1. Picks of the owned expert: in all tiles, and in the tiles before this one.
  int total = 0;
  int earlier = 0;
  if (tile_counts == nullptr) {
    if (owns_expert) histogram[expert] = 0;
    __syncthreads();
    count_tile(histogram, expert_ids, begin, end, num_experts);
    __syncthreads();
    if (owns_expert) total = histogram[expert];
  } else if (owns_expert) {
    const int tile = static_cast<int>(blockIdx.x);
    int t = 0;
    for (; t + kColumnUnroll <= num_tiles; t += kColumnUnroll) {
      int c[kColumnUnroll];
#pragma unroll
      for (int i = 0; i < kColumnUnroll; ++i) {
        c[i] = tile_counts[static_cast<int64_t>(t + i) * num_experts + expert];
      }
#pragma unroll
      for (int i = 0; i < kColumnUnroll; ++i) {
        total += c[i];
        earlier += t + i < tile ? c[i] : 0;
      }
    }
    for (; t < num_tiles; ++t) {
      const int c = tile_counts[static_cast<int64_t>(t) * num_experts + expert];
      total += c;
      earlier += t < tile ? c : 0;
    }
  }

  // 2. Padded segments: start of each, offsets, -1 padding.
  const int padded = owns_expert ? (total + row_align - 1) / row_align * row_align : 0;
  int used = 0;  // offsets[E]: slots covered by segments
  const int start = block_exclusive_scan(padded, warp_totals, &used);
  int next_slot = start + earlier;  // where this tile's next pick of the owned expert goes
  if (blockIdx.x == 0) {
    if (owns_expert) expert_offsets[expert] = start;
    if (threadIdx.x == 0) expert_offsets[num_experts] = used;
  }
  if (owns_expert && expert % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x)) {
    for (int s = start + total; s < start + padded; ++s) sorted_rows[s] = kEmptySlot;
  }
  for (int64_t s = used + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       s < num_slots; s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sorted_rows[s] = kEmptySlot;
  }

  // 3. Stable placement, kPermuteThreads picks per step.
  for (int64_t base = begin; base < end; base += kPermuteThreads) {
    const int64_t n = base + threadIdx.x;
    const int e_next = expert_of(expert_ids, n + kPermuteThreads, end, num_experts);
    const int slot = place_step(e, warp_base, num_experts, expert, &next_slot);
    if (n < end) {
      if (slot != kEmptySlot) sorted_rows[slot] = static_cast<int>(n);
      inverse[n] = slot;
    }
    e = e_next;
  }
}

// Launcher. tile_counts: workspace of permute_tiling(num_picks).num_tiles *
// num_experts ints when that is > 1 tile (else unused, may be nullptr).
// Preconditions (checked by the glue): 1 <= num_experts <= kMaxExperts,
// row_align >= 1, num_slots = num_picks + num_experts * (row_align - 1) < 2^31;
// prep.counters only when the picks take one tile (num_picks <=
// kSingleBlockMaxPicks). Returns the first PDL launch's error; the caller also
// checks cudaGetLastError().
template <typename IdT>
cudaError_t launch_moe_permute(int* sorted_rows, int* expert_offsets, int* inverse,
                               int* tile_counts, const IdT* expert_ids, int64_t num_picks,
                               int num_experts, int row_align, int64_t num_slots,
                               cudaStream_t stream, bool pdl, CombinePrep prep = {}) {
  const PermuteTiling tiling = permute_tiling(num_picks);
  const bool single = tiling.num_tiles == 1;
  if (prep.counters != nullptr && !single) return cudaErrorInvalidValue;  // one block prepares
  if (!single) {
    const cudaError_t err =
        launch_kernel(pdl, moe_permute_count_kernel<IdT>, dim3(tiling.num_tiles),
                      dim3(kPermuteThreads), 0, stream, tile_counts, expert_ids, num_picks,
                      tiling.tile_picks, num_experts);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(pdl, moe_permute_scatter_kernel<IdT>, dim3(tiling.num_tiles),
                       dim3(kPermuteThreads), 0, stream, sorted_rows, expert_offsets, inverse,
                       expert_ids, single ? nullptr : tile_counts, num_picks, tiling.tile_picks,
                       tiling.num_tiles, num_experts, row_align, num_slots, prep);
}

}  // namespace qwen3x::moe
