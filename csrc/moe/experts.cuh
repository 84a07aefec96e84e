// The MoE experts pipeline after the permutation, launched on one stream with
// no host synchronization (CUDA-graph capturable), deterministic (no float
// atomics anywhere):
//
//   1. GEMM1 (grouped_gemm.cuh, kGateUp): act[slot] = silu(x W_gate^T) * (x W_up^T),
//      x gathered from hidden_states by sorted_rows inside the A loads
//   2. GEMM2 (kDown): y[pick] = T(T(act[slot] W_down^T) * route_weight[pick])
//   3. combine (combine.cuh): out[t] = T(sum_j float(y[t * k + j])) over the
//      picks not dropped; with combine_counters (at decode: the moe op's router
//      launch or moe_experts' permutation launch prepared them), in GEMM2's
//      epilogue instead (gemm_epilogue.cuh epilogue_combine), bitwise the same
//
// The regime (gemm_config.h) fixes one tile config for both GEMMs; the
// permutation must have been made with row_align = that config's BLOCK_M.
// `wgmma` picks the Hopper mainloop for the prefill regime (same BLOCK_M);
// the caller sets it only on sm_90 devices with sm_90a code in the build.
//
// Torch-free: raw pointers, sizes and element strides; the glue is moe.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe/combine.cuh"
#include "moe/gemm_config.h"
#include "moe/grouped_gemm.cuh"

namespace qwen3x::moe {

template <typename T>
struct ExpertsArgs {
  T* out;                      // [T, H] contiguous
  T* act;                      // workspace [row_tiles * BLOCK_M, I] contiguous
  T* y;                        // workspace [T * k, H] contiguous
  const T* hidden;             // [T, H], row stride hidden_stride
  int64_t hidden_stride;
  const T* gate_up;            // [E, 2I, H], last dim contiguous
  int64_t gate_up_expert_stride;
  int64_t gate_up_row_stride;
  const T* down;               // [E, H, I], last dim contiguous
  int64_t down_expert_stride;
  int64_t down_row_stride;
  const T* route_weights;      // [T * k] in T
  const int* sorted_rows;      // [T * k + E * (BLOCK_M - 1)]
  const int* expert_offsets;   // [E + 1]
  const int* inverse;          // [T * k]
  int64_t num_tokens;          // T
  int top_k;                   // k
  int num_experts;             // E
  int hidden_size;             // H
  int inter_size;              // I
  int64_t row_tiles;           // max_row_tiles(T * k, E, BLOCK_M)
  bool proxy_fence;            // wgmma mainloop: fence each stage into the async proxy
  int* combine_counters;       // [T, H / BLOCK_N], each the token's dropped picks (0 when all
                               // are routed): the combine in GEMM2; nullptr: the combine kernel
  bool pdl;                    // launch with programmatic dependent launch (core/pdl.cuh)
};

template <typename T, typename Cfg>
cudaError_t launch_moe_experts_with(const ExpertsArgs<T>& a, cudaStream_t stream) {
  ExpertGemmParams<T> g1{};
  g1.a = a.hidden;
  g1.a_stride = a.hidden_stride;
  g1.w = a.gate_up;
  g1.w_expert_stride = a.gate_up_expert_stride;
  g1.w_row_stride = a.gate_up_row_stride;
  g1.out = a.act;
  g1.out_stride = a.inter_size;
  g1.sorted_rows = a.sorted_rows;
  g1.expert_offsets = a.expert_offsets;
  g1.route_weights = nullptr;
  g1.num_experts = a.num_experts;
  g1.top_k = a.top_k;
  g1.k_dim = a.hidden_size;
  g1.n_out = a.inter_size;
  g1.proxy_fence = a.proxy_fence;
  g1.pdl = a.pdl;
  cudaError_t err = launch_moe_expert_gemm<T, Cfg, GemmKind::kGateUp>(g1, a.row_tiles, stream);
  if (err != cudaSuccess) return err;

  ExpertGemmParams<T> g2 = g1;
  g2.a = a.act;
  g2.a_stride = a.inter_size;
  g2.w = a.down;
  g2.w_expert_stride = a.down_expert_stride;
  g2.w_row_stride = a.down_row_stride;
  g2.out = a.y;
  g2.out_stride = a.hidden_size;
  g2.route_weights = a.route_weights;
  g2.k_dim = a.inter_size;
  g2.n_out = a.hidden_size;
  g2.combine_counters = a.combine_counters;
  g2.combine_inverse = a.inverse;
  g2.combine_out = a.out;
  err = launch_moe_expert_gemm<T, Cfg, GemmKind::kDown>(g2, a.row_tiles, stream);
  if (err != cudaSuccess) return err;

  if (a.combine_counters == nullptr) {
    return launch_moe_combine<T>(a.out, a.y, a.inverse, a.num_tokens, a.hidden_size, a.top_k,
                                 stream, a.pdl);
  }
  return cudaSuccess;
}

// Returns the first error of raising a kernel's shared-memory limit or of a PDL
// launch; the caller also checks cudaGetLastError().
template <typename T>
cudaError_t launch_moe_experts(const ExpertsArgs<T>& args, GemmRegime regime, bool wgmma,
                               cudaStream_t stream) {
  switch (regime) {
    case GemmRegime::kDecode: return launch_moe_experts_with<T, DecodeGemmConfig>(args, stream);
    case GemmRegime::kMid: return launch_moe_experts_with<T, MidGemmConfig>(args, stream);
    default:
      return wgmma ? launch_moe_experts_with<T, PrefillWgmmaGemmConfig>(args, stream)
                   : launch_moe_experts_with<T, PrefillGemmConfig>(args, stream);
  }
}

}  // namespace qwen3x::moe
