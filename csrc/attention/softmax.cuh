// Masking and online softmax over the score tiles of one warp (FlashAttention-2
// numerics), in log2 units:
//
//   x      = (q . k) * scale * log2(e)            fp32, -inf where not visible
//   m      = running row max of x                 (-inf while nothing is visible)
//   p      = 2^(x - m)                            fp32; cast to T only for P V
//   l      = l * 2^(m_old - m) + sum(p)           fp32, from the fp32 p
//   O      = O * 2^(m_old - m) + P V
//   final: O / l, lse = (m + log2 l) * ln 2       (l == 0: O = 0, lse = -inf)
//
// A row with nothing visible yet has m = -inf; its exponent base is taken as
// 0 instead, so p = 2^(-inf) = 0 and the rescale 2^(-inf - 0) = 0: never
// (-inf) - (-inf) = NaN.
//
// Fragment ownership: lane 4 g + t holds rows g ("half" 0) and g + 8 (half 1)
// of the warp's 16 rows, columns 8 nt + 2 t + {0, 1} of n8 tile nt. A row's
// 64 columns sit in the 4 lanes of a quad: row max is two xor-shuffles; the
// row sum stays per lane until finalize() (one fixed butterfly: deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/kernel_traits.cuh"
#include "core/mma.cuh"
#include "core/reduce.cuh"

namespace qwen3x::attn {

constexpr int kRowHalves = 2;  // rows g and g + 8 of each lane

// What limits the keys one row sees.
struct RowLimit {
  int last_key;         // keys j <= last_key are in range and causally visible (-1: none)
  const uint8_t* mask;  // the row's mask, mask[j] != 0 = attend (keys contiguous); or nullptr
};

// x = scores * scale_log2; then, when mask_tile, -inf where (row, key) is not visible.
__device__ __forceinline__ void scale_and_mask(float (&s)[kScoreTilesN][4], float scale_log2,
                                               bool mask_tile, const RowLimit (&limit)[kRowHalves],
                                               int key0, int lane) {
#pragma unroll
  for (int nt = 0; nt < kScoreTilesN; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
  }
  if (!mask_tile) return;
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int lane_key0 = key0 + 2 * (lane % 4);
    const int visible_cols = limit[half].last_key - lane_key0;  // column c visible iff c <= this
    const uint8_t* mask = limit[half].mask == nullptr ? nullptr : limit[half].mask + lane_key0;
#pragma unroll
    for (int nt = 0; nt < kScoreTilesN; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = nt * kMmaN + c;
        bool visible = col <= visible_cols;
        if (visible && mask != nullptr) visible = mask[col] != 0;
        if (!visible) s[nt][2 * half + c] = -INFINITY;
      }
    }
  }
}

struct OnlineSoftmax {
  float m[kRowHalves];  // running max of x per row (log2 units), -inf = nothing visible yet
  float l[kRowHalves];  // this lane's share of the running sum of 2^(x - m)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      m[half] = -INFINITY;
      l[half] = 0.0f;
    }
  }

  // Folds one tile of x into the state: rescales o, turns s into p (fp32) and
  // packs p into the A fragments of P V.
  template <typename T>
  __device__ __forceinline__ void update(float (&s)[kScoreTilesN][4],
                                         float (&o)[kHeadTilesN][4],
                                         uint32_t (&pf)[kKeyStepsK][4]) {
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kScoreTilesN; ++nt) {
        tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 2));
      const float m_new = fmaxf(m[half], tile_max);
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = fast_exp2(m[half] - base);
      m[half] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kScoreTilesN; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pv = fast_exp2(s[nt][2 * half + c] - base);
          s[nt][2 * half + c] = pv;
          sum += pv;
        }
      }
      l[half] = l[half] * alpha + sum;
#pragma unroll
      for (int j = 0; j < kHeadTilesN; ++j) {
        o[j][2 * half] *= alpha;
        o[j][2 * half + 1] *= alpha;
      }
    }
    // C fragments of n8 tiles 2 kc, 2 kc + 1 are the A fragment of k16 step kc.
#pragma unroll
    for (int kc = 0; kc < kKeyStepsK; ++kc) {
      pf[kc][0] = pack_float2<T>(s[2 * kc][0], s[2 * kc][1]);
      pf[kc][1] = pack_float2<T>(s[2 * kc][2], s[2 * kc][3]);
      pf[kc][2] = pack_float2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      pf[kc][3] = pack_float2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
    }
  }

  // Row totals over the quad; returns 1 / l (0 when nothing was visible) and
  // lse2 = m + log2(l) (-inf when nothing was visible) for each half. A NaN total
  // (NaN in q, k or v) stays NaN in both, so the output and the split-KV combine
  // show it rather than reading it as "nothing visible".
  __device__ __forceinline__ void finalize(float (&inv_l)[kRowHalves],
                                           float (&lse2)[kRowHalves]) const {
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      float total = l[half];
      total += __shfl_xor_sync(kFullWarpMask, total, 1);
      total += __shfl_xor_sync(kFullWarpMask, total, 2);
      const bool seen = !(total == 0.0f);  // true for NaN
      inv_l[half] = seen ? 1.0f / total : 0.0f;
      lse2[half] = seen ? m[half] + log2f(total) : -INFINITY;
    }
  }
};

}  // namespace qwen3x::attn
