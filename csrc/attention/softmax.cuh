// Masking and online softmax over the score tiles of one warp (FlashAttention-2
// numerics), in log2 units, the softmax scale folded into the exponent:
//
//   s      = q . k                                fp32 (the mma's), -inf where not visible
//   m      = the row's softmax base: its running max of x = s * scale * log2(e) (max(s) times
//            the scale: rounding is monotone and the scale positive, so this is the max of the
//            rounded x), moved only when some row of the warp has risen more than
//            kRescaleLog2 above its base (-inf while nothing is visible)
//   p      = 2^(s * scale * log2(e) - m)          one FFMA and one ex2 per element, < 2^8;
//                                                 fp32, cast to T only for P V
//   l      = l * 2^(m_old - m) + sum(p)           fp32, from the fp32 p
//   O      = O * 2^(m_old - m) + P V              (the multiply skipped while no base moves:
//                                                 the factor is exactly 1)
//   final: O / l, lse = (m + log2 l) * ln 2       (l == 0: O = 0, lse = -inf; exact for any
//                                                 base, so a base below the max is no error)
//
// A row with nothing visible yet has m = -inf; its exponent base is taken as
// 0 instead, so p = 2^(-inf) = 0 and the rescale 2^(-inf - 0) = 0: never
// (-inf) - (-inf) = NaN. The scale must be positive and finite (attention.cu checks): a masked
// -inf times it stays -inf.
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
// How far (log2 units) a row's max may rise above its softmax base before the base moves and O
// and l are rescaled (FlashAttention-4's conditional rescale): p stays below 2^8 = 256, well
// inside T's range, and a settled max rescales nothing.
constexpr float kRescaleLog2 = 8.0f;

// What limits the keys one row sees.
struct RowLimit {
  int last_key;         // keys j <= last_key are in range and causally visible (-1: none)
  const uint8_t* mask;  // the row's mask, mask[j] != 0 = attend (keys contiguous); or nullptr
};

// When mask_tile: s = -inf where (row, key) is not visible (raw scores: the scale is applied in
// OnlineSoftmax's exponent). s holds keys key0 .. key0 + 8 kTiles - 1 (the tile, or at decode
// the warp's quarter of it).
template <int kTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kTiles][4], bool mask_tile,
                                            const RowLimit (&limit)[kRowHalves], int key0,
                                            int lane) {
  if (!mask_tile) return;
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int lane_key0 = key0 + 2 * (lane % 4);
    const int visible_cols = limit[half].last_key - lane_key0;  // column c visible iff c <= this
    const uint8_t* mask = limit[half].mask == nullptr ? nullptr : limit[half].mask + lane_key0;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
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

// Keys <= this are in range and causally visible for every packed row from first_row on (a tile
// of rows needs no element-wise mask for a key tile that ends there).
__device__ __forceinline__ int all_visible_last(const Params& p, const SeqSlice& seq, int first_row) {
  return p.causal ? min(seq.seqlen_k - 1, first_row / p.group + seq.seqlen_k - seq.seqlen_q)
                  : seq.seqlen_k - 1;
}

// The limits of this lane's two rows (rows first_row + lane / 4 and + 8 of the packed index of
// sequence b, kv head kvh): the last key each sees, and its mask row (padded batches).
__device__ __forceinline__ void row_limits(RowLimit (&limit)[kRowHalves], const Params& p,
                                           const SeqSlice& seq, int b, int kvh, int first_row,
                                           int lane) {
  const int causal_offset = seq.seqlen_k - seq.seqlen_q;  // query s sees keys <= s + offset
#pragma unroll
  for (int half = 0; half < kRowHalves; ++half) {
    const int r = first_row + lane / 4 + 8 * half;
    limit[half] = {-1, nullptr};
    if (r < seq.rows) {
      const int s = r / p.group;
      const int hq = kvh * p.group + (r - s * p.group);
      limit[half].last_key = p.causal ? min(seq.seqlen_k - 1, s + causal_offset) : seq.seqlen_k - 1;
      if (p.mask != nullptr) {  // padded batches only
        limit[half].mask = p.mask + b * p.mask_batch_stride + hq * p.mask_head_stride +
                           s * p.mask_q_stride;
      }
    }
  }
}

struct OnlineSoftmax {
  float m[kRowHalves];  // softmax base of x per row (log2 units; its max, or up to kRescaleLog2
                        // below it), -inf = nothing visible yet
  float l[kRowHalves];  // this lane's share of the running sum of 2^(x - m)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      m[half] = -INFINITY;
      l[half] = 0.0f;
    }
  }

  // Folds one tile of raw scores into the state: rescales o, turns s into p (fp32) and packs p
  // into the A fragments of P V. (At decode, s is the warp's quarter of the tile.)
  template <typename T, int kTiles>
  __device__ __forceinline__ void update(float (&s)[kTiles][4], float scale_log2,
                                         float (&o)[kHeadTilesN][4],
                                         uint32_t (&pf)[kTiles / 2][4]) {
    float alpha[kRowHalves];
    exponentiate(s, scale_log2, alpha);
    rescale(o, alpha);
    pack_p<T>(s, pf);
  }

  // update() without touching o or pf (the Hopper loop that overlaps this with the previous
  // tile's P V, which reads pf and accumulates into o meanwhile): m and l take the tile, s
  // becomes p (fp32); alpha = 2^(m_old - m) per row (exactly 1 where the base stays), the factor
  // o still owes (rescale(), after that P V, then pack_p()).
  template <int kTiles>
  __device__ __forceinline__ void exponentiate(float (&s)[kTiles][4], float scale_log2,
                                               float (&alpha)[kRowHalves]) {
    float m_tile[kRowHalves];  // max(m, the tile's scaled max) per row
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 2));
      m_tile[half] = fmaxf(m[half], tile_max * scale_log2);
    }
    // The bases move only when some row of the warp gains more than kRescaleLog2 (a row's first
    // visible key is an infinite gain; a row that still sees nothing, -inf to -inf, is NaN: no
    // gain), warp-uniformly; otherwise they stay, alpha is exactly 1 and rescale() skips O.
    const bool move = !__all_sync(kFullWarpMask, !(m_tile[0] - m[0] > kRescaleLog2) &&
                                                     !(m_tile[1] - m[1] > kRescaleLog2));
#pragma unroll
    for (int half = 0; half < kRowHalves; ++half) {
      float base = m[half] == -INFINITY ? 0.0f : m[half];  // the base stays (-inf: nothing seen yet)
      alpha[half] = 1.0f;
      if (move) {
        base = m_tile[half] == -INFINITY ? 0.0f : m_tile[half];
        alpha[half] = fast_exp2(m[half] - base);
        m[half] = m_tile[half];
      }
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pv = fast_exp2(fmaf(s[nt][2 * half + c], scale_log2, -base));
          s[nt][2 * half + c] = pv;
          sum += pv;
        }
      }
      l[half] = l[half] * alpha[half] + sum;
    }
  }

  // p (fp32, from exponentiate) -> the A fragments of P V: the C fragments of n8 tiles 2 kc,
  // 2 kc + 1 are the A fragment of k16 step kc.
  template <typename T, int kTiles>
  __device__ __forceinline__ static void pack_p(const float (&s)[kTiles][4],
                                                uint32_t (&pf)[kTiles / 2][4]) {
#pragma unroll
    for (int kc = 0; kc < kTiles / 2; ++kc) {
      pf[kc][0] = pack_float2<T>(s[2 * kc][0], s[2 * kc][1]);
      pf[kc][1] = pack_float2<T>(s[2 * kc][2], s[2 * kc][3]);
      pf[kc][2] = pack_float2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      pf[kc][3] = pack_float2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
    }
  }

  // o *= alpha, row by row. Skipped (a warp-uniform branch) when every alpha of the warp is
  // exactly 1 (no base moved: the same bits), which after a row tile's first key tiles is nearly
  // every tile: 64 multiplies saved.
  __device__ __forceinline__ static void rescale(float (&o)[kHeadTilesN][4],
                                                 const float (&alpha)[kRowHalves]) {
    if (__all_sync(kFullWarpMask, alpha[0] == 1.0f && alpha[1] == 1.0f)) return;
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e / 2];
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

  // Decode with split keys (kernel_traits.cuh): after the last tile, warp w's (m, l, o) cover
  // the CTA's 16 rows over keys kKeysPerWarp w .. kKeysPerWarp (w + 1) - 1 of every tile.
  // Warps 1.. store theirs in xchg; warp 0 merges all of them in the order w = 0, 1, 2, 3
  // (deterministic), as update() folds a tile into the state:
  //   m = max_w m_w,  alpha_w = 2^(m_w - base)  (base = m, or 0 while m = -inf),
  //   l = sum_w l_w alpha_w,  O = sum_w alpha_w O_w
  // l stays a per-lane share (finalize() sums the quad); m is the same in a quad's lanes. A
  // warp that saw no key (m_w = -inf, l_w = 0, O_w = 0) adds exactly 0; NaN in l_w or O_w
  // stays NaN (0 * NaN). Every thread calls it (one barrier inside). Warps 1.. keep their own
  // unmerged state: their rows (16 w ..) are past the CTA's rows, never written out.
  // xchg: kSplitKeysXchgBytes of shared memory nobody else touches from the call on (the K
  // stages, after the main loop's last wait and barrier). Layout: float4 per lane, lanes
  // consecutive (16-byte stores and loads, one wavefront per 8 lanes: conflict-free):
  //   [warp - 1][j][lane] = o[j][0..3], then [warp - 1][lane] = {m[0], m[1], l[0], l[1]}.
  __device__ __forceinline__ void merge_split_keys(float (&o)[kHeadTilesN][4], float4* xchg,
                                                   int warp, int lane) {
    constexpr int kOther = kNumWarps - 1;
    float4* xs = xchg + kOther * kHeadTilesN * kWarpSize;  // the (m, l) of warps 1..
    if (warp > 0) {
      float4* dst = xchg + (warp - 1) * kHeadTilesN * kWarpSize + lane;
#pragma unroll
      for (int j = 0; j < kHeadTilesN; ++j) {
        dst[j * kWarpSize] = make_float4(o[j][0], o[j][1], o[j][2], o[j][3]);
      }
      xs[(warp - 1) * kWarpSize + lane] = make_float4(m[0], m[1], l[0], l[1]);
    }
    __syncthreads();
    if (warp != 0) return;
    float alpha[kNumWarps][kRowHalves];
    {
      float4 st[kOther];
#pragma unroll
      for (int w = 0; w < kOther; ++w) st[w] = xs[w * kWarpSize + lane];
#pragma unroll
      for (int half = 0; half < kRowHalves; ++half) {
        float m_w[kNumWarps], l_w[kNumWarps];
        m_w[0] = m[half];
        l_w[0] = l[half];
#pragma unroll
        for (int w = 1; w < kNumWarps; ++w) {
          m_w[w] = half == 0 ? st[w - 1].x : st[w - 1].y;
          l_w[w] = half == 0 ? st[w - 1].z : st[w - 1].w;
        }
        float m_new = m_w[0];
#pragma unroll
        for (int w = 1; w < kNumWarps; ++w) m_new = fmaxf(m_new, m_w[w]);
        const float base = m_new == -INFINITY ? 0.0f : m_new;
        float l_new = 0.0f;
#pragma unroll
        for (int w = 0; w < kNumWarps; ++w) {
          alpha[w][half] = fast_exp2(m_w[w] - base);
          l_new += l_w[w] * alpha[w][half];
        }
        m[half] = m_new;
        l[half] = l_new;
      }
    }
#pragma unroll
    for (int j = 0; j < kHeadTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[0][e / 2];
#pragma unroll
      for (int w = 1; w < kNumWarps; ++w) {
        const float4 ow = xchg[((w - 1) * kHeadTilesN + j) * kWarpSize + lane];
        o[j][0] += ow.x * alpha[w][0];
        o[j][1] += ow.y * alpha[w][0];
        o[j][2] += ow.z * alpha[w][1];
        o[j][3] += ow.w * alpha[w][1];
      }
    }
  }
};

// Shared memory merge_split_keys exchanges through: every warp but 0 stores its o and (m, l).
constexpr int kSplitKeysXchgBytes =
    (kNumWarps - 1) * (kHeadTilesN + 1) * kWarpSize * static_cast<int>(sizeof(float4));  // 25.5 KB
static_assert(kSplitKeysXchgBytes <= kStages * kTileKVElems * kElemBytes,
              "the split-key merge fits the K stages");

}  // namespace qwen3x::attn
