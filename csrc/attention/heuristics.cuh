// Host-side launch decisions of the attention kernel: the grid, and how many
// splits of the key range (split-KV) to use.
//
// Grid = (row tiles = ceil(Sq * group / kBlockM), B * Hkv, num_splits); for a varlen batch
// Sq is the caller's max_seqlen_q (rows of a longer sequence are marked NaN, not computed).
//
// Split heuristic. One wave is num_sms * ctas_per_sm resident CTAs (measured by
// the occupancy API for the device; kMinCtasPerSm when it cannot be asked) (80 KB of
// shared memory and 128 threads each: 2 per SM on sm_80 and sm_90). When the
// (row tile, b, kv head) CTAs fill at least one wave, the key range is not
// split. Otherwise (decode, small batch, long context) each CTA's key range is
// cut into num_splits chunks of whole K/V tiles, about kTargetWaves waves of
// CTAs, and at most kMaxSplits (kMaxClusterSize when the splits merge in a
// cluster, attention.cu). Which count near that: waves run one after
// another and a split's CTA reads 1/s of its keys, so the time goes as
// waves(s) / s, waves(s) = ceil(ctas * s / wave); a last wave left mostly
// empty costs nearly a full one (its few CTAs cannot draw the bandwidth). The
// plan takes, among s = 1 .. 2 * s_target (s_target = ceil(kTargetWaves *
// wave / ctas)), the s with the least waves(s) / s, ties to the one nearest
// s_target, then the smaller; but one split (no split) wherever no count does
// better than it: splitting then buys nothing and costs the partials' traffic
// and the merge, on one CTA per row tile (the third run, H200: Qwen3-0.6B
// prefill of 1k tokens, 256 CTAs of 64 rows, took 3 splits for a tie and ran
// in 72.8 us, where 2k tokens, unsplit, took 78.9). The second H100 run:
// batch 16, Hkv 4 (64 CTAs), 32k keys took s_target = 9 splits, 2.18 waves, 89% of copy, where Hkv 8 (128
// CTAs, 5 splits, 2.42 waves) reached 97%; now 8 splits, 1.94 waves. A split must earn its partials: the K/V
// bytes it reads are at least the traffic of the fp32 partials it writes and
// the combine reads back (min_tiles_per_split, from the rows a CTA holds): 3
// tiles for a full 64-row tile, 1 tile for a decode tile (group * Sq <= 31
// rows: 16 rows cost 16.5 KB of partials twice against 32 KB of K/V per tile).
// A decode grid far below a wave is latency bound, not bandwidth bound: a
// CTA's tiles run one after another (load, then one warp's 128 mma.sync), so
// one tile per CTA is the shortest chain. The tiles are then dealt evenly
// (tiles_per_split = ceil(tiles / splits)) and the split count recomputed so
// that no split is empty by construction (causality can still empty some:
// they write lse = -inf and O = 0, which the combine weighs 0).
//
// Example, H100 (132 SMs), decode of Qwen3-4B (B = 1, Hkv = 8, Sq = 1, 4 rows
// per CTA): 8 CTAs; 131072 keys = 2048 tiles -> 66 wanted, dealt as 64 splits
// of 32 tiles; 1024 keys = 16 tiles -> 16 splits of 1 tile (128 CTAs). The
// first H100 run had at least 4 tiles per split: 4 splits of 4 tiles there,
// 14.5 us against cuDNN's 11.9 us.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention/kernel_traits.cuh"
#include "core/gpu_constants.h"

namespace qwen3x::attn {

constexpr int kTargetWaves = 2;       // aim for this many waves of CTAs when splitting
constexpr int kMaxSplits = 128;       // bounds the workspace and the combine's loop

struct SplitPlan {
  int num_splits;
  int tiles_per_split;
};

// Fewest K/V tiles per split for CTAs of rows_per_cta packed rows: the tiles' K and V bytes
// (kBlockN keys x 128 x 2 operands x 2 bytes = 32 KB each) at least the partials' traffic (per
// row 128 fp32 outputs and an lse, written by the split and read by the combine).
inline int64_t min_tiles_per_split(int64_t rows_per_cta) {
  constexpr int64_t kTileBytes = 2LL * kBlockN * kHeadDim * kElemBytes;
  constexpr int64_t kPartialRowBytes = (kHeadDim + 1) * 4LL;
  const int64_t rows = std::min<int64_t>(std::max<int64_t>(rows_per_cta, 1), kBlockM);
  return std::max<int64_t>(ceil_div<int64_t>(2 * rows * kPartialRowBytes, kTileBytes), 1);
}

// Row tiles of the grid (gridDim.x): enough for Sq * group packed rows at kBlockM each, at least 1.
inline int row_tiles(const Params& p) {
  return static_cast<int>(std::max<int64_t>(
      ceil_div<int64_t>(static_cast<int64_t>(p.seqlen_q) * p.group, kBlockM), 1));
}

inline SplitPlan plan_splits(int64_t ctas,          // CTAs with work: row tiles * B * Hkv
                             int64_t seqlen_k,      // Skv (varlen: the max_seqlen_k hint)
                             int64_t rows_per_cta,  // packed rows of a CTA: min(Sq * group, kBlockM)
                             int num_sms,
                             int ctas_per_sm = kMinCtasPerSm,  // resident CTAs per SM
                             int max_splits = kMaxSplits) {    // the combine's limit (<= kMaxSplits)
  const int64_t tiles = ceil_div<int64_t>(seqlen_k, kBlockN);
  const int64_t wave = static_cast<int64_t>(std::max(num_sms, 1)) * std::max(ctas_per_sm, 1);
  int64_t splits = 1;
  if (ctas > 0 && ctas < wave) {
    const int64_t target = ceil_div<int64_t>(kTargetWaves * wave, ctas);
    const int64_t most = std::max<int64_t>(
        std::min({2 * target, tiles / min_tiles_per_split(rows_per_cta),
                  static_cast<int64_t>(std::min(max_splits, kMaxSplits))}),
        1);
    const auto waves = [&](int64_t s) { return ceil_div<int64_t>(ctas * s, wave); };
    const auto distance = [&](int64_t s) { return s > target ? s - target : target - s; };
    for (int64_t s = 2; s <= most; ++s) {
      // waves(s) / s < waves(splits) / splits, or equal and nearer the target (but never a tie
      // with one split: a split that does not shorten the time only adds partials and a merge)
      const int64_t lhs = waves(s) * splits, rhs = waves(splits) * s;
      if (lhs < rhs || (lhs == rhs && splits > 1 && distance(s) < distance(splits))) splits = s;
    }
  }
  const int64_t per_split = std::max<int64_t>(ceil_div<int64_t>(tiles, splits), 1);
  splits = std::max<int64_t>(ceil_div<int64_t>(tiles, per_split), 1);
  return {static_cast<int>(splits), static_cast<int>(per_split)};
}

// Whether the splits of a decode plan should merge inside thread block clusters (attention.cu's
// default, QWEN3X_ATTENTION_COMBINE=auto, where clusters can run at all) rather than through L2:
// where the cluster plan's clusters (one per CTA with work, each of its splits) are all resident at
// once, one wave (a cluster's CTAs share a GPC, so the occupancy API's count of resident clusters,
// not SMs x CTAs per SM / splits, says how many). The fourth GPU run (H200, 2026-11-28,
// benchmarks/NOTES.md): at batch 1 (4 or 8 clusters of 15-16 CTAs) the cluster merge took
// 0.59-0.91x the L2 one's time at 1k-32k keys, every layout; at batch 16 (64-128 clusters of 4-8
// splits: several waves, same split counts either way) 1.07-1.12x, so grids of several waves keep
// the L2 merge (its CTAs need not be co-resident).
inline bool cluster_combine_pays(int64_t ctas,           // CTAs with work: row tiles * B * Hkv
                                 int num_splits,         // the cluster plan's (<= kMaxClusterSize)
                                 int resident_clusters)  // of num_splits CTAs, at once (0: none)
{
  return num_splits > 1 && ctas <= resident_clusters;
}

}  // namespace qwen3x::attn
