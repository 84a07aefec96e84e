// Tile shapes of the grouped expert GEMMs (grouped_gemm.cuh) and the
// heuristic that picks one per call. Host-safe (no CUDA headers): the glue
// needs BLOCK_M before it permutes (row_align) and to size the workspaces.
//
// Both GEMMs compute C[rows, N] = A[rows, K] x W[N, K]^T per expert, fp32
// accumulate, kBlockK = 64 (one 128-byte swizzled smem row per operand row),
// cp.async multi-stage pipeline, with one of two mainloops:
//   kMmaSync  mma.sync.m16n8k16 from ldmatrix fragments (sm_80+), warps in a
//             kWarpsM x kWarpsN grid
//   kWgmma    Hopper wgmma.m64n128k16 straight from shared memory (sm_90a):
//             warpgroup g computes rows [64 g, 64 g + 64) x all kBlockN = 128
//             columns, so as a "warp grid" it is kBlockM / 16 warps x 1, each
//             warp's accumulators the mma.sync fragments of its 16 rows
//             (core/wgmma.cuh), and the loads and epilogues are shared
//
// Regimes (rows per expert = T * k / E, the mean under uniform routing):
//   decode   <= 16 rows/expert: weight-bandwidth bound, most tiles hold a few
//            real rows. BLOCK_M 16 (least padding work), BLOCK_N 64 (more CTAs
//            streaming weights: GEMM1 I / 32 and GEMM2 H / 64 column tiles per
//            expert), 4 warps side by side along N, 7 stages (70 KB: 3 CTAs per
//            sm_90 SM, 2 per sm_80 SM). Where the grid is one wave the weight
//            bytes in flight set the streaming rate (Little's law): at batch 1
//            (30B-A3B, 8 experts: 192 GEMM1 CTAs) each CTA keeps 6 stages = 48 KB
//            of weights in flight, 9.2 MB over the GPU. With 6 stages (7.7 MB)
//            an H200 streamed GEMM1 at 2.75 TB/s, 64% of its copy, while the
//            235B-A22B layer (384 CTAs, twice the bytes in flight) reached 74%
//            overall (benchmarks/NOTES.md). 7 is the most that keeps 3 CTAs per
//            Hopper SM: at many waves (16-64 tokens) an SM keeps 18 stages in
//            flight (6 stages: 15), and GEMM2's CTAs still fit beside GEMM1's
//            at batch 1 (its weights issued before its programmatic wait).
//   mid      <= 64 rows/expert: BLOCK_M 64, BLOCK_N 128, 2 x 4 warps of 32 x 32,
//            4 stages (96 KB, 2 CTAs per SM on sm_90).
//   prefill  otherwise: BLOCK_M 128, BLOCK_N 128, 2 x 4 warps of 64 x 32,
//            3 stages (96 KB, 2 CTAs per SM on sm_90). On sm_90 with an
//            sm_90a build, the same tile with the kWgmma mainloop (two
//            warpgroups of 64 x 128): mma.sync reaches at most about 2/3 of
//            H100's tensor peak, wgmma all of it.
// Four configs x two GEMMs x {bf16, fp16} = 16 GEMM kernels (build time).
//
// Shape requirements that follow (the glue checks them): K of both GEMMs
// (H and I) a multiple of kBlockK = 64; GEMM1's output width I a multiple of
// the widest BLOCK_N / 2 = 64 (gate and up halves of a tile); GEMM2's output
// width H a multiple of the widest BLOCK_N = 128. Qwen3-MoE: H 2048 / 4096,
// I 768 / 1536.
#pragma once

#include <cstdint>

#include "core/gpu_constants.h"

namespace qwen3x::moe {

// Elements per operand row of one k step (64 x 16-bit = 128 bytes = 8 chunks).
constexpr int kGemmBlockK = 64;
// Bytes per cp.async / per swizzle chunk.
constexpr int kGemmChunkBytes = 16;
// Rows sharing one xor swizzle pattern (8 chunks of 16 bytes per row).
constexpr int kGemmSwizzleRows = 8;

enum class GemmMainloop { kMmaSync, kWgmma };

// wgmma's fixed shapes: m64 rows per warpgroup of 4 warps; the kernel uses n128.
constexpr int kWgmmaRows = 64;
constexpr int kWgmmaWarps = 4;
constexpr int kWgmmaN = 128;

template <int kBlockM_, int kBlockN_, int kWarpsM_, int kWarpsN_, int kStages_,
          GemmMainloop kMainloop_ = GemmMainloop::kMmaSync>
struct GemmConfig {
  static constexpr int kBlockM = kBlockM_;  // rows of a tile (and the permute's row_align)
  static constexpr int kBlockN = kBlockN_;  // weight rows of a tile (GEMM1: half gate, half up)
  static constexpr int kBlockK = kGemmBlockK;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBlockM / kWarpsM;  // rows per warp
  static constexpr int kWarpN = kBlockN / kWarpsN;  // weight rows (output columns) per warp
  static constexpr int kMmaM = kWarpM / 16;          // m16 tiles per warp
  static constexpr int kMmaN = kWarpN / 8;           // n8 tiles per warp
  // cp.async of 16-bit elements: chunks per tile row, rows per pass of all threads.
  static constexpr int kChunksPerRow = kBlockK * 2 / kGemmChunkBytes;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kALoads = kBlockM / kRowsPerPass;  // 16-byte copies per thread per stage
  static constexpr int kBLoads = kBlockN / kRowsPerPass;
  static constexpr int kStageElems = (kBlockM + kBlockN) * kBlockK;
  static constexpr int kSmemBytes = kStages * kStageElems * 2;
  static constexpr GemmMainloop kMainloop = kMainloop_;
  static constexpr bool kWgmma = kMainloop == GemmMainloop::kWgmma;
  // Dynamic shared memory to ask for: the wgmma tiles start at the next
  // 1024-byte boundary of the dynamic allocation.
  static constexpr int kSmemAllocBytes = kSmemBytes + (kWgmma ? kWgmmaAtomBytes : 0);

  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tiles of whole m16 / n16 blocks");
  static_assert(kMmaN % 2 == 0,
                "B fragments load two n8 tiles per ldmatrix.x4; GEMM1 pairs gate/up halves");
  static_assert(kChunksPerRow == kGemmSwizzleRows, "swizzle assumes 8 chunks per row");
  static_assert(kRowsPerPass % kGemmSwizzleRows == 0, "every pass starts on a swizzle period");
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0,
                "whole load passes per operand tile");
  static_assert(kStages >= 2, "a pipeline needs two stages");
  static_assert(!kWgmma || (kWarpsN == 1 && kWarpM == 16 && kBlockM % kWgmmaRows == 0 &&
                            kBlockN == kWgmmaN),
                "wgmma: warpgroups of 4 warps x 16 rows over all kWgmmaN columns");
  static_assert(!kWgmma || ((kBlockM * kBlockK * 2) % kWgmmaAtomBytes == 0 &&
                            (kStageElems * 2) % kWgmmaAtomBytes == 0),
                "wgmma: every A / B tile of every stage on a swizzle-atom boundary");
};

using DecodeGemmConfig = GemmConfig<16, 64, 1, 4, 7>;
// The decode tile's occupancy its comment assumes: 3 CTAs on an sm_90 SM.
constexpr int kDecodeCtasPerHopperSm = 3;
static_assert(kDecodeCtasPerHopperSm * (DecodeGemmConfig::kSmemAllocBytes + kSmemReservedPerCta) <= kHopperSmemPerSm,
              "the decode tile's stages must leave 3 CTAs per sm_90 SM");
using MidGemmConfig = GemmConfig<64, 128, 2, 4, 4>;
using PrefillGemmConfig = GemmConfig<128, 128, 2, 4, 3>;
using PrefillWgmmaGemmConfig = GemmConfig<128, 128, 8, 1, 3, GemmMainloop::kWgmma>;
static_assert(PrefillWgmmaGemmConfig::kBlockM == PrefillGemmConfig::kBlockM &&
                  PrefillWgmmaGemmConfig::kThreads == PrefillGemmConfig::kThreads,
              "the two prefill mainloops share the permutation's row_align and the loads");

// The shape requirements, from the widest config.
constexpr int kExpertsKMultiple = kGemmBlockK;                    // H and I
constexpr int kExpertsIMultiple = PrefillGemmConfig::kBlockN / 2;  // GEMM1 output width
constexpr int kExpertsHMultiple = PrefillGemmConfig::kBlockN;      // GEMM2 output width
static_assert(MidGemmConfig::kBlockN <= kExpertsHMultiple &&
                  DecodeGemmConfig::kBlockN <= kExpertsHMultiple,
              "requirements come from the widest tile");

// Mean rows per expert up to which a regime is chosen.
constexpr int64_t kDecodeMaxRowsPerExpert = 16;
constexpr int64_t kMidMaxRowsPerExpert = 64;

enum class GemmRegime { kDecode, kMid, kPrefill };

inline GemmRegime select_gemm_regime(int64_t num_picks, int64_t num_experts) {
  if (num_picks <= kDecodeMaxRowsPerExpert * num_experts) return GemmRegime::kDecode;
  if (num_picks <= kMidMaxRowsPerExpert * num_experts) return GemmRegime::kMid;
  return GemmRegime::kPrefill;
}

inline int regime_block_m(GemmRegime r) {
  switch (r) {
    case GemmRegime::kDecode: return DecodeGemmConfig::kBlockM;
    case GemmRegime::kMid: return MidGemmConfig::kBlockM;
    default: return PrefillGemmConfig::kBlockM;
  }
}

// GEMM2's output columns per tile (its column tiles: H / this).
inline int regime_block_n(GemmRegime r) {
  switch (r) {
    case GemmRegime::kDecode: return DecodeGemmConfig::kBlockN;
    case GemmRegime::kMid: return MidGemmConfig::kBlockN;
    default: return PrefillGemmConfig::kBlockN;
  }
}

// Upper bound on the row tiles of a permutation of num_picks picks over
// num_experts experts padded to block_m: sum_e ceil(c_e / block_m) is at most
// (picks + E (block_m - 1)) / block_m (the padded slots) and at most
// min(E, picks) + picks / block_m (one partial tile per non-empty expert).
// The GEMM grid's row dimension and the activation workspace use it.
inline int64_t max_row_tiles(int64_t num_picks, int64_t num_experts, int64_t block_m) {
  const int64_t by_slots = (num_picks + num_experts * (block_m - 1)) / block_m;
  const int64_t nonempty = num_picks < num_experts ? num_picks : num_experts;
  const int64_t by_picks = nonempty + num_picks / block_m;
  return by_slots < by_picks ? by_slots : by_picks;
}

}  // namespace qwen3x::moe
