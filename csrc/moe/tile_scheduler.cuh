// Tile scheduler of the grouped expert GEMMs: which expert and which picks a
// CTA works on, found on the device from the permutation (no host sync).
//
// The grid is (max_row_tiles(...), column tiles) (gemm_config.h): an upper
// bound on the row tiles, known on the host from T, k, E and BLOCK_M. Row tile
// x covers slots [x * BLOCK_M, (x + 1) * BLOCK_M) of sorted_rows. Every
// expert segment is padded to a multiple of BLOCK_M by moe_permute, so a tile
// lies inside one segment; tiles at or past expert_offsets[E] (the end of the
// last segment) have no work and exit before touching shared memory.
//
// The tile's expert is the unique e with offsets[e] <= row0 < offsets[e + 1]
// (empty experts have offsets[e] == offsets[e + 1] and never match): the
// threads test all E candidates at once (one coalesced load round trip, not a
// log2(E)-step chain of dependent loads as a binary search would be) and the
// matching thread publishes e in shared memory. The tile's picks (sorted_rows,
// -1 for padding) go to shared memory alongside, for the A gather and the
// epilogues.
//
// through_l2: every read goes through L2 (ld.global.cg), for a CTA that reads the
// permutation before its programmatic-launch wait (GEMM2, grouped_gemm.cuh):
// the data is final there, but this SM's L1 is not coherent with it.
#pragma once

#include <cuda_runtime.h>

#include "core/vec.cuh"

namespace qwen3x::moe {

struct RowTile {
  int row0;    // first slot of the tile
  int expert;  // its expert
};

// Fills s_expert / s_picks (and s_route: route_weight[pick] as float, 0 for
// padding, when route_weights != nullptr) and returns the tile, or
// expert = -1 when the tile has no work (then nothing was written; the caller
// returns). Ends with __syncthreads when there is work; the early-exit
// decision is uniform over the block.
template <typename V>
__device__ __forceinline__ V load_scheduling(const V* p, bool l2) {
  return l2 ? __ldcg(p) : __ldg(p);
}

template <int kBlockM, int kThreads, typename T>
__device__ __forceinline__ RowTile schedule_row_tile(
    int* s_expert,                     // shared [1]
    int* s_picks,                      // shared [kBlockM]: flat pick t * k + j, or -1
    float* s_route,                    // shared [kBlockM]: routing weight of the pick, or unused
    const int* __restrict__ sorted_rows,     // [num_slots]
    const int* __restrict__ expert_offsets,  // [num_experts + 1]
    const T* __restrict__ route_weights,     // [num_picks] or nullptr
    int num_experts,
    bool through_l2) {
  const int row0 = static_cast<int>(blockIdx.x) * kBlockM;
  const int used = load_scheduling(expert_offsets + num_experts, through_l2);
  if (row0 >= used) return {row0, -1};
  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    if (load_scheduling(expert_offsets + e, through_l2) <= row0 &&
        row0 < load_scheduling(expert_offsets + e + 1, through_l2)) {
      *s_expert = e;
    }
  }
  for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
    const int pick = load_scheduling(sorted_rows + row0 + i, through_l2);
    s_picks[i] = pick;
    if (route_weights != nullptr) {
      s_route[i] = pick >= 0 ? to_float(load_scheduling(route_weights + pick, through_l2)) : 0.0f;
    }
  }
  __syncthreads();
  return {row0, *s_expert};
}

}  // namespace qwen3x::moe
