// Tile shapes, thread layout, shared-memory layout and launch parameters of the
// attention forward kernel (attention_fwd.cuh). Everything the other
// attention/*.cuh files agree on lives here, as named constants.
//
// Rows. A CTA owns one (batch b, kv head kvh) and kBlockM consecutive "rows"
// of the packed GQA index r = s * group + h (query position s < Sq, head h <
// group = Hq / Hkv in the kv head's group: query head kvh * group + h). So a
// decode step (Sq = 1) puts the group's heads into the rows of one tile and
// reads each K/V tile once for all of them; a prefill tile holds
// kBlockM / group query positions. Causal and mask limits depend on s only.
//
// Warps. kNumWarps warps, warp w owns rows 16 w .. 16 w + 15 of the tile (one
// m16 MMA row block) and all kBlockN keys of a score tile, so the softmax row
// statistics stay inside a quad of lanes (no shared memory).
//
// Shared memory per CTA (bf16/fp16, kHeadDim = 128):
//   Q    kBlockM x 128                   = 16 KB  (reused for the output tile)
//   K    kStages x kBlockN x 128         = 32 KB
//   V    kStages x kBlockN x 128         = 32 KB
//   total                                  80 KB  -> 2 CTAs per SM on sm_80
//   (164 KB usable) and on sm_90 (227 KB usable), 8 warps per SM.
//
// Swizzle. A tile row is 128 elements = 256 bytes = 16 chunks of 16 bytes.
// Chunk c of row r is stored at chunk c ^ (r % 8) of that row: the 8 rows an
// ldmatrix phase (or a cp.async phase) touches at one logical chunk then land
// in 8 distinct 16-byte bank groups, so neither the cp.async writes nor the
// ldmatrix reads conflict. Every tile's rows start at a multiple of 8, so the
// xor term is the row's index within its block of 8.
#pragma once

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/qwen3.h"

namespace qwen3x::attn {

// ---- tuning knobs -------------------------------------------------------------------------
constexpr int kNumWarps = 4;                    // warps per CTA
constexpr int kRowsPerWarp = 16;                // one m16 MMA block of rows per warp
constexpr int kBlockM = kNumWarps * kRowsPerWarp;  // packed (s, h) rows per CTA: 64
constexpr int kBlockN = 64;                     // keys per K/V tile
constexpr int kStages = 2;                      // K/V shared-memory buffers (double buffering)
constexpr int kMinCtasPerSm = 2;                // occupancy the launch bounds ask for

constexpr float kLn2 = 0.693147180559945309f;  // lse: log2 units -> natural log

// ---- derived constants --------------------------------------------------------------------
constexpr int kThreads = kNumWarps * kWarpSize;                   // 128
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;                  // mma.sync.m16n8k16
constexpr int kElemBytes = 2;                                     // bf16 / fp16
constexpr int kChunkElems = kVecBytes / kElemBytes;               // 8 elements per 16-byte chunk
constexpr int kChunksPerRow = kHeadDim / kChunkElems;             // 16
constexpr int kSwizzleRows = 8;                                   // rows per xor pattern
constexpr int kLoadRowsPerPass = kThreads / kChunksPerRow;        // 8 rows per cp.async pass
constexpr int kScoreTilesN = kBlockN / kMmaN;                     // 8 n8 tiles of scores per warp
constexpr int kHeadTilesN = kHeadDim / kMmaN;                     // 16 n8 tiles of output per warp
constexpr int kHeadStepsK = kHeadDim / kMmaK;                     // 8 k16 steps of Q.K^T
constexpr int kKeyStepsK = kBlockN / kMmaK;                       // 4 k16 steps of P.V

constexpr int kTileQElems = kBlockM * kHeadDim;
constexpr int kTileKVElems = kBlockN * kHeadDim;
constexpr int kSmemBytes = (kTileQElems + 2 * kStages * kTileKVElems) * kElemBytes;  // 80 KB

static_assert(kRowsPerWarp == kMmaM, "a warp owns exactly one m16 block of rows");
static_assert(kThreads % kChunksPerRow == 0, "a cp.async pass covers whole rows");
static_assert(kBlockM % kLoadRowsPerPass == 0 && kBlockN % kLoadRowsPerPass == 0,
              "tiles load in whole passes");
static_assert(kLoadRowsPerPass == kSwizzleRows,
              "loader rows of one thread share one xor pattern (row % 8 == tid / 16)");
static_assert(kBlockN % (2 * kMmaN) == 0 && kHeadDim % (2 * kMmaN) == 0,
              "ldmatrix.x4 loads pairs of n8 tiles");
static_assert(kStages == 2, "the main loop's wait_group depth assumes double buffering");
static_assert(kSmemBytes <= 164 * 1024, "must fit sm_80's 164 KB per CTA");

// Element offset of (row, chunk) inside a [rows][kHeadDim] tile, swizzled.
__host__ __device__ constexpr int swizzled_offset(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row % kSwizzleRows)) * kChunkElems);
}

// ---- launch parameters --------------------------------------------------------------------
// Strides are in elements (mask: bytes = elements). Sizes as in the op's
// contract: q [B, Hq, Sq, 128], k/v [B, Hkv, Skv, 128], out [B, Sq, Hq, 128].
struct Params {
  const void* q;       // [B, Hq, Sq, 128], strides q_batch/head/seq, last dim contiguous
  const void* k;       // [B, Hkv, Skv, 128], strides k_batch/head/seq, last dim contiguous
  const void* v;       // [B, Hkv, Skv, 128], strides v_batch/head/seq, last dim contiguous
  const uint8_t* mask;  // [B|1, 1|Hq, Sq, Skv] bool (1 = attend), strides mask_*, keys contiguous; or nullptr
  void* out;           // [B, Sq, Hq, 128] contiguous, q's dtype
  float* lse;          // [B, Hq, Sq] contiguous fp32, natural log
  float* partial_o;    // [num_splits, B * Hkv, rows, 128] fp32, normalized per split (splits > 1)
  float* partial_lse;  // [num_splits, B * Hkv, rows] fp32, log2 units (splits > 1)

  int64_t q_batch_stride, q_head_stride, q_seq_stride;
  int64_t k_batch_stride, k_head_stride, k_seq_stride;
  int64_t v_batch_stride, v_head_stride, v_seq_stride;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride;  // 0 = broadcast

  int batch;         // B
  int num_q_heads;   // Hq
  int num_kv_heads;  // Hkv
  int group;         // Hq / Hkv
  int seqlen_q;      // Sq
  int seqlen_k;      // Skv
  int rows;          // Sq * group: packed rows per (b, kv head)
  float scale_log2;  // scale * log2(e): scores are kept in log2 units
  bool causal;       // bottom-right: query s sees keys j <= s + Skv - Sq

  int num_splits;       // gridDim.z; 1 = write out/lse directly
  int tiles_per_split;  // K/V tiles per split (>= all tiles when num_splits == 1)
};

}  // namespace qwen3x::attn
