// The MoE router's GEMM at decode sizes ("the gate": transformers' router linear, no bias):
//
//   logits[t, e] = sum_h hidden[t, h] * weight[e, h]    (fp32 sums, rounded once to T)
//
// for a few tokens (T <= kGateMaxTokens). At batch 1 this is a 512 KB (30B-A3B: E 128 x H 2048)
// read of the weight for 1 token: torch's F.linear runs it as a cuBLAS GEMM, which the fourth GPU
// run timed at 4.9 us of a 39.8 us MoE layer (benchmarks/NOTES.md), and a cuBLAS launch cannot
// overlap the routing launch after it. Here a launch with programmatic dependent launch
// (core/pdl.cuh), whose every weight load is in flight at once.
//
// Why it is shaped this way:
// - CTA = kGateWarps warps on kGateExpertsPerCta experts; kGateSlices warps per expert, each
//   summing one contiguous slice of H (grid E / kGateExpertsPerCta: 64 CTAs for E = 128, all
//   streaming at once). A lane holds its slice's 16-byte weight chunks lane, lane + 32, ... in
//   registers (at most kGateChunksPerLane: H <= 4096, Qwen3-MoE's widest; all issued before any
//   is used), so the weight costs one DRAM round trip, beside the hidden rows' L2 one.
// - The tokens' hidden rows (T x H x 2 bytes, at most kGateMaxSmemBytes) are staged once per CTA
//   in shared memory by cp.async (L2 hits: the previous kernel wrote them), read back as 16-byte
//   chunks in the weight chunks' order (a warp's 32 lanes on 512 consecutive bytes: no bank
//   conflicts).
// - A lane sums its chunks in order into one fp32 per token; the warp's lanes by an xor butterfly
//   (core/reduce.cuh), four tokens' butterflies side by side; the slices in slice order (one
//   thread per (expert, token)). A fixed order, so the logits are bitwise reproducible; they are
//   F.linear's up to the summation order (cuBLAS's is its own, and changes with T).
// - pdl_wait() comes first: the hidden rows are the previous kernel's output, and the weight may
//   have been written by it too (an optimizer step, a load): nothing is read before.
//
// Requirements (the glue checks them, else it runs at::linear): 16-bit T, 1 <= T <= kGateMaxTokens,
// H a positive multiple of kGateHMultiple up to kGateMaxHidden, T * H * sizeof(T) <=
// kGateMaxSmemBytes, 16-byte aligned rows (data and row strides), logits [T, E] contiguous.
// Torch-free: the glue is moe.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mma.cuh"
#include "core/pdl.cuh"
#include "core/reduce.cuh"
#include "core/vec.cuh"

namespace qwen3x::moe {

// ---- tuning knobs -------------------------------------------------------------------------
constexpr int kGateWarps = 4;            // warps per CTA
constexpr int kGateSlices = 2;           // warps per expert, each on 1 / kGateSlices of H
constexpr int kGateChunksPerLane = 8;    // 16-byte weight chunks a lane holds: H <= 4096
constexpr int kGateMaxTokens = 16;       // the decode sizes the kernel serves (accumulators per lane)
constexpr int kGateTokensPerReduce = 4;  // tokens whose warp butterflies run side by side
constexpr int kGateMaxSmemBytes = 96 * 1024;  // staged hidden rows: within every sm_80+ GPU's opt-in
                                              // (99 KB on sm_86 / sm_89): 12 tokens at H 4096

// ---- derived constants --------------------------------------------------------------------
constexpr int kGateThreads = kGateWarps * kWarpSize;
constexpr int kGateExpertsPerCta = kGateWarps / kGateSlices;
constexpr int kGateChunkElems = kVecBytes / 2;  // 16-bit elements per 16-byte chunk
// H in whole chunks per slice, and at most one chunk per lane and j.
constexpr int kGateHMultiple = kGateChunkElems * kGateSlices;
constexpr int kGateMaxHidden = kGateChunksPerLane * kWarpSize * kGateChunkElems * kGateSlices;  // 4096
static_assert(kGateWarps % kGateSlices == 0, "whole experts per CTA");
static_assert(kGateMaxTokens % kGateTokensPerReduce == 0, "whole groups of tokens per reduction");

// Dynamic shared memory of a call: its hidden rows, in whole rounds of one 16-byte chunk per
// thread (every lane of a warp issues each of its copies; the last round's spare ones zero-fill
// the padding).
inline int gate_smem_bytes(int64_t num_tokens, int64_t hidden_size) {
  const int64_t chunks = num_tokens * hidden_size / kGateChunkElems;
  return static_cast<int>(round_up<int64_t>(chunks, kGateThreads) * kVecBytes);
}

// Whether the kernel serves [num_tokens, hidden_size] (16-bit, aligned rows: the glue's part).
inline bool gate_kernel_serves(int64_t num_tokens, int64_t hidden_size) {
  return num_tokens >= 1 && num_tokens <= kGateMaxTokens && hidden_size > 0 &&
         hidden_size <= kGateMaxHidden && hidden_size % kGateHMultiple == 0 &&
         num_tokens * hidden_size * 2 <= kGateMaxSmemBytes;
}

// CTA x: experts kGateExpertsPerCta x .. + kGateExpertsPerCta - 1 of logits[:, e].
template <typename T>
__global__ void __launch_bounds__(kGateThreads)
moe_gate_kernel(T* __restrict__ logits,             // [num_tokens, num_experts], contiguous
                const T* __restrict__ hidden,       // [num_tokens, hidden_size], rows hidden_stride apart
                const T* __restrict__ weight,       // [num_experts, hidden_size], rows weight_stride apart
                int num_tokens,                     // 1 .. kGateMaxTokens
                int hidden_size,                    // H, a multiple of kGateHMultiple
                int num_experts,                    // E
                int64_t hidden_stride,              // elements, a multiple of kGateChunkElems
                int64_t weight_stride) {            // elements, a multiple of kGateChunkElems
  static_assert(sizeof(T) == 2, "16-bit elements (bf16, fp16)");
  pdl_wait();  // first: the hidden rows (and possibly the weight) are the previous kernel's
  pdl_launch_dependents();
  extern __shared__ __align__(16) unsigned char gate_smem[];  // (16: kVecBytes)
  T* s_hidden = reinterpret_cast<T*>(gate_smem);  // [num_tokens][hidden_size], then padding
  __shared__ float s_partial[kGateWarps][kGateMaxTokens];  // each warp's sum per token

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int expert = blockIdx.x * kGateExpertsPerCta + warp / kGateSlices;
  const bool has_expert = expert < num_experts;  // (a last CTA's spare warps: no loads, no sums)
  const int row_chunks = hidden_size / kGateChunkElems;
  const int slice_chunks = row_chunks / kGateSlices;
  const int slice0 = (warp % kGateSlices) * slice_chunks;  // the slice's first chunk in the row
  const T* w_row = weight + static_cast<int64_t>(has_expert ? expert : 0) * weight_stride;

  // This lane's weight chunks lane + 32 j of the slice, every load issued before any is used.
  Vec16<T> w[kGateChunksPerLane];
#pragma unroll
  for (int j = 0; j < kGateChunksPerLane; ++j) {
    const int c = lane + j * kWarpSize;
    if (has_expert && c < slice_chunks) {
      w[j] = load_vec16(w_row + (slice0 + c) * kGateChunkElems);
    } else {
      w[j] = Vec16<T>{};  // (never multiplied: past the lane's chunks)
    }
  }

  // The hidden rows into shared memory, every chunk of every token in flight at once (whole
  // rounds: chunk i of the rows lands at byte 16 i; past the last, zeros into the padding).
  const int chunks = num_tokens * row_chunks;
  for (int i = threadIdx.x; i < round_up(chunks, kGateThreads); i += kGateThreads) {
    const int t = min(i, chunks - 1) / row_chunks;
    const int c = min(i, chunks - 1) - t * row_chunks;
    cp_async_16(smem_u32(s_hidden + i * kGateChunkElems), hidden + t * hidden_stride + c * kGateChunkElems,
                i < chunks);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // The weight in fp32 once (zeros past the slice), then token by token: at T = 1 the executed
  // code is one straight run (a warp's path through the unrolled tokens ends at its first break).
  const int my_chunks = has_expert ? min(kGateChunksPerLane, max(0, ceil_div(slice_chunks - lane, kWarpSize))) : 0;
  float wf[kGateChunksPerLane][kGateChunkElems];
#pragma unroll
  for (int j = 0; j < kGateChunksPerLane; ++j) {
#pragma unroll
    for (int p = 0; p < kGateChunkElems / 2; ++p) {
      const float2 f = pair_to_float2<T>(get_pair(w[j], p));
      wf[j][2 * p] = f.x;
      wf[j][2 * p + 1] = f.y;
    }
  }
  const T* x_lane = s_hidden + (slice0 + lane) * kGateChunkElems;  // chunk lane + 32 j: + 32 j chunks
  float acc[kGateMaxTokens];
#pragma unroll
  for (int t = 0; t < kGateMaxTokens; ++t) acc[t] = 0.0f;
#pragma unroll
  for (int t = 0; t < kGateMaxTokens; ++t) {
    if (t >= num_tokens) break;  // (warp-uniform: num_tokens is the launch's)
#pragma unroll
    for (int j = 0; j < kGateChunksPerLane; ++j) {
      if (j >= my_chunks) break;  // (the lane's chunks ascend with j)
      const Vec16<T> x = *reinterpret_cast<const Vec16<T>*>(x_lane + t * hidden_size + j * kWarpSize * kGateChunkElems);
#pragma unroll
      for (int p = 0; p < kGateChunkElems / 2; ++p) {
        const float2 f = pair_to_float2<T>(get_pair(x, p));
        acc[t] = fmaf(f.x, wf[j][2 * p], acc[t]);
        acc[t] = fmaf(f.y, wf[j][2 * p + 1], acc[t]);
      }
    }
  }

  // Each warp's sums per token (butterflies of kGateTokensPerReduce tokens side by side), then the
  // slices of an expert in slice order.
#pragma unroll
  for (int t0 = 0; t0 < kGateMaxTokens; t0 += kGateTokensPerReduce) {
    if (t0 >= num_tokens) break;  // (warp-uniform: num_tokens is the launch's)
    float group[kGateTokensPerReduce];
#pragma unroll
    for (int g = 0; g < kGateTokensPerReduce; ++g) group[g] = acc[t0 + g];
    warp_reduce_sum_n(group);
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < kGateTokensPerReduce; ++g) s_partial[warp][t0 + g] = group[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kGateExpertsPerCta * num_tokens; i += kGateThreads) {
    const int local = i / num_tokens;  // the CTA's expert
    const int t = i - local * num_tokens;
    const int e = blockIdx.x * kGateExpertsPerCta + local;
    if (e >= num_experts) continue;
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kGateSlices; ++s) sum += s_partial[local * kGateSlices + s][t];
    logits[static_cast<int64_t>(t) * num_experts + e] = from_float<T>(sum);
  }
}

// Launches the gate on `stream` (pdl: core/pdl.cuh). Requires gate_kernel_serves(num_tokens,
// hidden_size), num_experts >= 1 and 16-byte aligned rows; returns the launch's error.
template <typename T>
cudaError_t launch_moe_gate(T* logits, const T* hidden, const T* weight, int64_t num_tokens,
                            int64_t hidden_size, int64_t num_experts, int64_t hidden_stride,
                            int64_t weight_stride, cudaStream_t stream, bool pdl = false) {
  if (!gate_kernel_serves(num_tokens, hidden_size) || num_experts < 1) return cudaErrorInvalidValue;
  constexpr auto kernel = moe_gate_kernel<T>;
  const int smem = gate_smem_bytes(num_tokens, hidden_size);
  cudaError_t err = allow_dynamic_smem<kernel>(kGateMaxSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(num_experts, kGateExpertsPerCta)));
  return launch_kernel(pdl, kernel, grid, dim3(kGateThreads), smem, stream, logits, hidden, weight,
                       static_cast<int>(num_tokens), static_cast<int>(hidden_size),
                       static_cast<int>(num_experts), hidden_stride, weight_stride);
}

}  // namespace qwen3x::moe
