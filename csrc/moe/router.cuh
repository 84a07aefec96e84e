// MoE router, Hugging Face Qwen3-MoE numerics, for one [T, E] block of logits:
//
//   p[e]      = exp(x[e] - max(x)) / sum_e' exp(x[e'] - max(x))   (fp32, x = float(logit))
//   ids[t, :] = the top_k experts by p, descending; equal p -> lower expert first
//   w[t, j]   = p[ids[t, j]] / sum_j' p[ids[t, j']]   when norm_topk_prob, else p[ids[t, j]]
//               (fp32, rounded once to the logits' dtype T)
//   tokens_per_expert[e] = number of (t, j) with ids[t, j] == e
//
// Why it is shaped this way:
// - A warp per token (up to 4 tokens side by side: RouterTokensPerPass). Lane l
//   holds experts e = l + 32 * i (i < kSlots) in registers: every load
//   instruction of the warp reads 32 consecutive logits (coalesced), and it is
//   the element-to-lane map of PyTorch's warp softmax
//   (PersistentSoftmax.cuh: per-lane sums in slot order from 0, then an xor
//   butterfly 16, 8, 4, 2, 1; masked slots add exact zeros, so narrower torch
//   warps for E < 32 sum the same way). With the same expf and an IEEE divide,
//   p is expected to be bitwise equal to torch.softmax(x, -1, dtype=float32),
//   so top-k picks the same experts as the reference.
// - Top-k is k rounds of a warp argmax, two redux.sync per round: the max of a
//   32-bit order key of p, then the min expert index among the lanes that hold
//   it. The key (bits(p) + 1, NaN above everything, 0 = already picked or no
//   expert) orders p exactly and leaves p recoverable from the key, so no
//   value shuffle is needed. Ties go to the lower expert index, as the
//   reference specifies (torch.topk leaves tie order unspecified, and CPU and
//   CUDA differ; with bf16 logits ties are common, so HF may pick another of
//   the tied experts). Every round picks a distinct expert
//   in [0, E), whatever the logits (NaN included), so downstream indexing is
//   always in bounds.
// - Lane j keeps pick j; the renormalizing sum adds the picks in descending
//   order; lanes < k then write one coalesced row of weights and of ids.
// - Counts: a per-block shared-memory histogram (shared atomics), flushed with
//   one global integer atomicAdd per non-zero expert per block. Integer adds
//   commute, so the counts are deterministic. The grid is capped at a few
//   blocks per SM (warps loop over tokens) to bound those global atomics.
//   tokens_per_expert is zeroed by a memset in the same stream first, except
//   for a one-block grid (up to kRouterOneBlockMaxTokens = 64 tokens, each
//   warp routing up to 4 side by side), which stores every count itself: one
//   launch instead of a memset and a launch.
//
// - With kPermute (the moe op at decode: one block, and T * k picks at most
//   kPermuteThreads: route_one_launch), the block also permutes its picks for
//   the expert GEMMs (permute.cuh, permute_one_block) from the ids and counts
//   it holds in shared memory: routing and permutation in one launch instead
//   of three (memset, router, permutation) or two. It also zeroes the arrival
//   counters of the expert GEMM2's fused combine when given
//   (gemm_epilogue.cuh epilogue_combine): no memset for them either.
//
// E <= 128 uses kSlots = 4 (Qwen3-MoE), E <= 512 kSlots = 16: two register
// footprints per dtype. No host synchronization; graph-capturable.
//
// Torch-free: raw pointers, sizes and element strides; the glue is moe.cu.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/gpu_constants.h"
#include "core/pdl.cuh"
#include "core/reduce.cuh"
#include "core/vec.cuh"
#include "moe/limits.h"
#include "moe/permute.cuh"

namespace qwen3x::moe {

// Warps per router block.
constexpr int kRouterWarps = 16;
// Up to this many tokens one block routes them all (its warps loop over them): no memset, no
// global atomics, a programmatic launch. Above, blocks of kRouterWarps tokens add their counts.
constexpr int64_t kRouterOneBlockMaxTokens = 64;
constexpr int kRouterThreads = kRouterWarps * kWarpSize;
// Grid cap: blocks per SM (32 warps). Each block flushes up to E global
// atomics, so more blocks mean more contention on tokens_per_expert; warps
// loop over tokens.
constexpr int kRouterBlocksPerSm = 2;
static_assert(kRouterThreads == kPermuteThreads, "the kPermute block is a permute block too");

// moe_permute's outputs, for the kPermute variant.
struct RoutePermutation {
  int* sorted_rows;     // [num_slots]
  int* expert_offsets;  // [num_experts + 1]
  int* inverse;         // [T * top_k]
  int row_align;        // >= 1
  int num_slots;        // T * top_k + num_experts * (row_align - 1)
  int* zero_counters;   // [num_counters] set to 0 (GEMM2's fused combine), or nullptr
  int num_counters;
};

// Whether T tokens route in one block.
inline bool router_one_block(int64_t num_tokens) {
  return num_tokens >= 1 && num_tokens <= kRouterOneBlockMaxTokens;
}
// Whether T tokens with k picks each route and permute in one launch (kPermute: one pick per
// thread of the block). Up to 64 tokens with Qwen3-MoE's k = 8.
inline bool route_one_launch(int64_t num_tokens, int64_t top_k) {
  return router_one_block(num_tokens) && num_tokens * top_k <= kPermuteThreads;
}
// Experts per lane: the small footprint (E <= 128) and the large (E <= 512).
constexpr int kRouterSlotsSmall = 4;
constexpr int kRouterSlotsLarge = kMaxExperts / kWarpSize;
// Tokens a warp routes side by side: their loads, butterflies and k rounds of redux are
// independent chains, so one warp's latencies overlap (one token at a time, a warp of the
// one-block grid spent ~1 us per token waiting on them: 64 tokens took 14 us against 6.5 for
// one). 4 with the small footprint (the one-block grid's 64 tokens in one pass of its 16
// warps); 1 with the large, whose 16 slots a token already fill the registers.
template <int kSlots>
struct RouterTokensPerPass {
  static constexpr int value = kSlots <= kRouterSlotsSmall ? 4 : 1;
};
static_assert(kRouterOneBlockMaxTokens == RouterTokensPerPass<kRouterSlotsSmall>::value * kRouterWarps,
              "the one-block grid routes its tokens in one pass");
static_assert(kRouterSlotsLarge * kWarpSize == kMaxExperts, "kMaxExperts must be whole warps");
static_assert(kRouterSlotsLarge <= 32, "a lane's taken slots are the bits of one word");
static_assert(kMaxTopK <= kWarpSize, "one lane holds each pick");

namespace router_detail {

// Key of a taken slot or of a slot with no expert behind it (e >= E); every
// real candidate has a key >= 1.
constexpr unsigned kTakenKey = 0u;
// Key of a NaN probability: above every number, as torch.topk orders NaN.
constexpr unsigned kNanKey = 0xffffffffu;
// "No candidate" in the argmin over expert indices.
constexpr unsigned kNoCandidate = 0xffffffffu;

// p >= 0 (or NaN) -> a key whose unsigned order is p's order. Non-negative
// floats order like their bit patterns; + 1 keeps 0 free for kTakenKey
// (bits(+inf) + 1 = 0x7f800001 < kNanKey).
__device__ __forceinline__ unsigned prob_key(float p) {
  return isnan(p) ? kNanKey : __float_as_uint(fabsf(p)) + 1u;
}

__device__ __forceinline__ float key_prob(unsigned key) {
  return key == kNanKey ? __uint_as_float(0x7fffffffu) : __uint_as_float(key - 1u);
}

// Warp-wide unsigned max / min, all 32 lanes: one redux.sync each (the extension targets sm_80+).
__device__ __forceinline__ unsigned warp_max_u32(unsigned v) { return __reduce_max_sync(kFullWarpMask, v); }

__device__ __forceinline__ unsigned warp_min_u32(unsigned v) { return __reduce_min_sync(kFullWarpMask, v); }

}  // namespace router_detail

// One pass of a warp: the kGroup tokens base + g * step (g < kGroup), routed side by side (their
// loads, butterflies and k rounds of redux are independent chains, so their latencies overlap).
// Writes their weights and ids, and adds their picks to the block's histogram (and, with kPermute,
// to s_ids).
template <typename T, int kSlots, int kGroup, bool kPermute>
__device__ __forceinline__ void route_pass(T* __restrict__ weights, int* __restrict__ expert_ids,
                                           const T* __restrict__ logits, int64_t base, int64_t step,
                                           int64_t logits_stride, int num_experts, int top_k,
                                           bool norm_topk_prob, int* histogram, int* s_ids) {
  using namespace router_detail;
  const int lane = threadIdx.x % kWarpSize;
  // This lane's slots of each token; slots past E read as -inf (exp: an exact 0).
  float x[kGroup][kSlots];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const T* row = logits + (base + g * step) * logits_stride;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = lane + i * kWarpSize;
      x[g][i] = e < num_experts ? to_float(row[e]) : -INFINITY;
    }
  }

  // Softmax in fp32, summed in torch's order (see the header); the tokens' butterflies are
  // independent, so their shuffle latencies overlap.
  unsigned key[kGroup][kSlots];
  float row_max[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    row_max[g] = x[g][0];
#pragma unroll
    for (int i = 1; i < kSlots; ++i) row_max[g] = fmaxf(row_max[g], x[g][i]);
  }
  warp_reduce_max_n(row_max);
  float sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    sum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      x[g][i] = expf(x[g][i] - row_max[g]);
      sum[g] += x[g][i];
    }
  }
  warp_reduce_sum_n(sum);
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = lane + i * kWarpSize;
      key[g][i] = e < num_experts ? prob_key(x[g][i] / sum[g]) : kTakenKey;
    }
  }

  // k rounds of warp argmax per token; lane j keeps round j's pick. A lane's taken slots are
  // bits of `taken`, not writes to key[]: a store to key[winner / 32] is a runtime index, which
  // puts the array in local memory (ptxas did so for sm_80 and sm_89).
  float my_prob[kGroup];
  int my_expert[kGroup];
  float picked_sum[kGroup];
  unsigned taken[kGroup];  // bit i: slot i already picked
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    my_prob[g] = 0.0f;
    my_expert[g] = 0;
    picked_sum[g] = 0.0f;
    taken[g] = 0;
  }
  for (int j = 0; j < top_k; ++j) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      // This lane's best slot: slots ascend in expert index, so a strict > keeps the lowest.
      unsigned best = kTakenKey;  // every real candidate's key is above it
      int best_slot = 0;
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const unsigned k_i = ((taken[g] >> i) & 1u) ? kTakenKey : key[g][i];
        if (k_i > best) {
          best = k_i;
          best_slot = i;
        }
      }
      const unsigned top = warp_max_u32(best);  // >= 1: an untaken expert always remains (k <= E)
      const unsigned candidate =
          best == top ? static_cast<unsigned>(lane + best_slot * kWarpSize) : kNoCandidate;
      const int winner = static_cast<int>(warp_min_u32(candidate));
      const float prob = key_prob(top);
      picked_sum[g] += prob;
      if (lane == j) {
        my_prob[g] = prob;
        my_expert[g] = winner;
      }
      if (lane == winner % kWarpSize) taken[g] |= 1u << (winner / kWarpSize);
    }
  }

#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (lane < top_k) {
      const float w = norm_topk_prob ? my_prob[g] / picked_sum[g] : my_prob[g];
      const int64_t out = (base + g * step) * top_k + lane;
      weights[out] = from_float<T>(w);
      expert_ids[out] = my_expert[g];
      atomicAdd(&histogram[my_expert[g]], 1);
      if constexpr (kPermute) s_ids[out] = my_expert[g];  // out < T * k <= kPermuteThreads
    }
  }
}

template <typename T, int kSlots, bool kPermute>
__global__ void __launch_bounds__(kRouterThreads)
moe_router_kernel(T* __restrict__ weights,               // [num_tokens, top_k]
                  int* __restrict__ expert_ids,          // [num_tokens, top_k]
                  int* __restrict__ tokens_per_expert,   // [num_experts]: the pick counts (zero on entry unless gridDim.x == 1)
                  const T* __restrict__ logits,          // [num_tokens, num_experts], row stride logits_stride
                  int64_t num_tokens,                    // T; warps loop over tokens
                  int64_t logits_stride,                 // elements between rows of logits
                  int num_experts,                       // E <= kSlots * 32
                  int top_k,                             // 1 <= k <= min(E, kMaxTopK)
                  bool norm_topk_prob,                   // divide the k weights by their sum
                  const RoutePermutation perm) {         // kPermute only (gridDim.x == 1, T * k <= kPermuteThreads)
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  using namespace router_detail;
  __shared__ int histogram[kMaxExperts];  // picks per expert by this block
  // kPermute: the picks' experts, the placement's per-warp counts, the scan's warp totals.
  __shared__ int s_ids[kPermute ? kPermuteThreads : 1];
  __shared__ int s_warp_base[kPermute ? kPermuteWarps : 1][kMaxExperts];
  __shared__ int s_warp_totals[kPermute ? kPermuteWarps : 1];

  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kRouterWarps;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  constexpr int kGroup = RouterTokensPerPass<kSlots>::value;
  for (int64_t base = first_token; base < num_tokens; base += kGroup * warps_in_grid) {
    // This warp's tokens from base on (the grid-stride order): a pass routes up to kGroup of them,
    // every one real (a dummy token would cost a live one's instructions).
    const int64_t left = ceil_div<int64_t>(num_tokens - base, warps_in_grid);
    const auto pass = [&](auto group) {
      route_pass<T, kSlots, decltype(group)::value, kPermute>(
          weights, expert_ids, logits, base, warps_in_grid, logits_stride, num_experts, top_k,
          norm_topk_prob, histogram, s_ids);
    };
    if constexpr (kGroup == 4) {
      if (left >= 4) {
        pass(std::integral_constant<int, 4>{});
      } else if (left == 3) {
        pass(std::integral_constant<int, 3>{});
      } else if (left == 2) {
        pass(std::integral_constant<int, 2>{});
      } else {
        pass(std::integral_constant<int, 1>{});
      }
    } else {
      static_assert(kGroup == 1, "a pass of 4 tokens or of 1");
      pass(std::integral_constant<int, 1>{});
    }
  }

  __syncthreads();
  const bool whole_grid = gridDim.x == 1;  // this block's counts are the counts
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int count = histogram[e];
    if (whole_grid) {
      tokens_per_expert[e] = count;
    } else if (count != 0) {
      atomicAdd(&tokens_per_expert[e], count);
    }
  }
  if constexpr (kPermute) {
    for (int i = threadIdx.x; i < perm.num_counters; i += blockDim.x) perm.zero_counters[i] = 0;
    permute_one_block(perm.sorted_rows, perm.expert_offsets, perm.inverse, s_ids, histogram,
                      s_warp_base, s_warp_totals, static_cast<int>(num_tokens) * top_k,
                      num_experts, perm.row_align, perm.num_slots);
  }
}

// Launcher: zeroes tokens_per_expert (cudaMemsetAsync) unless one block does it
// all, and runs the kernel; with `perm` (requires route_one_launch(num_tokens, top_k))
// the kPermute variant, which also writes moe_permute's outputs. Preconditions
// (checked by the glue): 1 <= num_experts <= kMaxExperts,
// 1 <= top_k <= min(num_experts, kMaxTopK), num_tokens * top_k < 2^31,
// num_sms >= 1. Returns the memset's or the launch's error (`pdl`: core/pdl.cuh); the caller
// also checks cudaGetLastError().
template <typename T>
cudaError_t launch_moe_router(T* weights, int* expert_ids, int* tokens_per_expert,
                              const T* logits, int64_t num_tokens, int64_t logits_stride,
                              int num_experts, int top_k, bool norm_topk_prob, int num_sms,
                              cudaStream_t stream, const RoutePermutation* perm = nullptr,
                              bool pdl = false) {
  const int64_t max_blocks = static_cast<int64_t>(num_sms) * kRouterBlocksPerSm;
  const int64_t want = router_one_block(num_tokens) ? 1 : ceil_div<int64_t>(num_tokens, kRouterWarps);
  const dim3 grid(static_cast<unsigned>(want < max_blocks ? want : max_blocks));
  if (grid.x != 1) {  // no tokens (no launch) or several blocks adding their counts
    const cudaError_t err = cudaMemsetAsync(
        tokens_per_expert, 0, static_cast<size_t>(num_experts) * sizeof(int), stream);
    if (err != cudaSuccess || num_tokens == 0) return err;
  }
  const RoutePermutation none{};
  // After a memset the launch is an ordinary one: PDL overlaps kernels, not a memset node.
  const bool programmatic = pdl && grid.x == 1;
  auto run = [&](auto kernel) {
    return launch_kernel(programmatic, kernel, grid, dim3(kRouterThreads), 0, stream, weights,
                         expert_ids, tokens_per_expert, logits, num_tokens, logits_stride,
                         num_experts, top_k, norm_topk_prob, perm != nullptr ? *perm : none);
  };
  const bool small = num_experts <= kRouterSlotsSmall * kWarpSize;
  if (perm != nullptr) {
    return run(small ? moe_router_kernel<T, kRouterSlotsSmall, true>
                     : moe_router_kernel<T, kRouterSlotsLarge, true>);
  }
  return run(small ? moe_router_kernel<T, kRouterSlotsSmall, false>
                   : moe_router_kernel<T, kRouterSlotsLarge, false>);
}

}  // namespace qwen3x::moe
