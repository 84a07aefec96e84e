// Epilogues of the grouped expert GEMMs (grouped_gemm.cuh): fp32 accumulators
// of a warp -> rounded outputs, with the numerics of the reference
// (reference.moe_experts, each torch op rounding to the activation dtype T):
//
//   SwiGLU (GEMM1):   g = T(acc_gate), u = T(acc_up)          (F.linear's outputs)
//                     act = T(float(T(silu(g))) * float(u))   (F.silu(gate) * up)
//   weighted (GEMM2): y = T(float(T(acc)) * w), w = route weight already in T
//                                                             (F.linear, then * weights)
//
// Accumulator layout of mma.m16n8k16: lane (g = lane / 4, t = lane % 4) holds
// rows g and g + 8 of each m16 tile, columns 2t and 2t + 1 of each n8 tile;
// a lane writes those two columns as one 4-byte store. Rows whose slot is
// padding (pick < 0) are skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "activation/silu_and_mul.cuh"
#include "core/mma.cuh"
#include "core/vec.cuh"

namespace qwen3x::moe {

namespace epilogue_detail {

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = pack_float2<T>(lo, hi);  // 4-byte aligned: even column
}

}  // namespace epilogue_detail

// act[row0 + r, col0 + c] for the warp's rows and its kWarpN / 2 columns:
// n8 tile ni (gate) pairs with n8 tile ni + kMmaN / 2 (up), same columns.
template <typename T, typename Cfg>
__device__ __forceinline__ void epilogue_swiglu(
    const float (&acc)[Cfg::kMmaM][Cfg::kMmaN][4],
    T* __restrict__ act,        // [row_tiles * BLOCK_M, I], row stride act_stride
    int64_t act_stride,
    const int* s_picks,         // shared [BLOCK_M]: pick of each tile row, -1 = padding
    int row0,                   // first slot of the tile
    int col0,                   // first output column of the tile
    int warp_m, int warp_n, int lane) {
  constexpr int kHalfTiles = Cfg::kMmaN / 2;
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * Cfg::kWarpM + mi * 16 + g + 8 * h;
      if (s_picks[r] < 0) continue;
      T* dst = act + static_cast<int64_t>(row0 + r) * act_stride + col0 +
               warp_n * (Cfg::kWarpN / 2) + 2 * t;
#pragma unroll
      for (int ni = 0; ni < kHalfTiles; ++ni) {
        const float* gate = &acc[mi][ni][2 * h];
        const float* up = &acc[mi][ni + kHalfTiles][2 * h];
        const T a0 = activation::silu_mul(from_float<T>(gate[0]), from_float<T>(up[0]));
        const T a1 = activation::silu_mul(from_float<T>(gate[1]), from_float<T>(up[1]));
        epilogue_detail::store_pair(dst + ni * 8, to_float(a0), to_float(a1));
      }
    }
  }
}

// y[pick, col0 + c] = T(float(T(acc)) * w) for the warp's rows and kWarpN columns.
template <typename T, typename Cfg>
__device__ __forceinline__ void epilogue_weighted(
    const float (&acc)[Cfg::kMmaM][Cfg::kMmaN][4],
    T* __restrict__ y,          // [T * k, H], row stride y_stride, row = flat pick
    int64_t y_stride,
    const int* s_picks,         // shared [BLOCK_M]: pick of each tile row, -1 = padding
    const float* s_route,       // shared [BLOCK_M]: routing weight (a T value) of each pick
    int col0,                   // first output column of the tile
    int warp_m, int warp_n, int lane) {
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * Cfg::kWarpM + mi * 16 + g + 8 * h;
      const int pick = s_picks[r];
      if (pick < 0) continue;
      const float w = s_route[r];
      T* dst = y + static_cast<int64_t>(pick) * y_stride + col0 + warp_n * Cfg::kWarpN + 2 * t;
#pragma unroll
      for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
        epilogue_detail::store_pair(dst + ni * 8, round_to<T>(acc[mi][ni][2 * h]) * w,
                                    round_to<T>(acc[mi][ni][2 * h + 1]) * w);
      }
    }
  }
}

// The combine in GEMM2 (the moe op at decode: experts.cuh). Every pick of a token arrives
// once at counters[token][col_tile] after writing its y columns; the CTA whose arrival is the
// k-th sums the token's k rows of y over the tile's columns, in pick order j = 0 .. k-1 as the
// combine kernel does (combine.cuh: fp32, one rounding), so the output is the same bitwise
// whichever CTA finishes last; a dropped pick (inverse -1: an expert id outside [0, E), whose
// y row no CTA wrote) is skipped there as well. Counters start at the token's dropped picks (0
// for the router's picks), so its k-th arrival overall completes it; a token with every pick
// dropped never arrives, and its row was zeroed before (permute.cuh CombinePrep). The arrival follows the CTA's y stores and a
// device-wide fence (release); the last CTA fences again before reading (acquire) and reads
// through L2, since other SMs wrote those rows during this kernel.
template <typename T, typename Cfg>
__device__ __forceinline__ void epilogue_combine(
    T* __restrict__ out,        // [T, H] contiguous
    const T* y,                 // [T * k, H], row stride y_stride: this kernel's output
    int64_t y_stride,
    int* __restrict__ counters,  // [T, col_tiles], the token's dropped picks at launch
    const int* inverse,         // [T * k]: slot of each pick, -1 = dropped
    const int* s_picks,         // shared [BLOCK_M]: pick of each tile row, -1 = padding
    int* s_last,                // shared [BLOCK_M]: scratch
    int col_tile, int col_tiles, int hidden, int top_k, int tid) {
  using Vec = Vec16<T>;
  constexpr int kVecsPerRow = Cfg::kBlockN / Vec::kSize;  // a tile row's columns, 16 bytes each
  __threadfence();  // this thread's y stores, device-wide, before its CTA's arrivals
  __syncthreads();
  for (int r = tid; r < Cfg::kBlockM; r += Cfg::kThreads) {
    const int pick = s_picks[r];
    int last = -1;  // the token this row completes, if it is the k-th arrival
    if (pick >= 0) {
      const int token = pick / top_k;
      if (atomicAdd(counters + static_cast<int64_t>(token) * col_tiles + col_tile, 1) == top_k - 1) {
        last = token;
      }
    }
    s_last[r] = last;
  }
  __threadfence();  // the other arrivals' y stores, before this CTA's reads below
  __syncthreads();
  const int col0 = col_tile * Cfg::kBlockN;
  for (int i = tid; i < Cfg::kBlockM * kVecsPerRow; i += Cfg::kThreads) {
    const int token = s_last[i / kVecsPerRow];
    if (token < 0) continue;
    const int col = col0 + (i % kVecsPerRow) * Vec::kSize;
    float sum[Vec::kSize];
#pragma unroll
    for (int e = 0; e < Vec::kSize; ++e) sum[e] = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int64_t n = static_cast<int64_t>(token) * top_k + j;
      if (inverse[n] < 0) continue;  // dropped: no y row
      const Vec v = load_vec16_l2(y + n * y_stride + col);
#pragma unroll
      for (int e = 0; e < Vec::kSize; ++e) sum[e] += to_float(v.data[e]);
    }
    Vec o;
#pragma unroll
    for (int e = 0; e < Vec::kSize; ++e) o.data[e] = from_float<T>(sum[e]);
    store_vec16(out + static_cast<int64_t>(token) * hidden + col, o);
  }
}

}  // namespace qwen3x::moe
