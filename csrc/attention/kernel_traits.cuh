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
// statistics stay inside a quad of lanes (no shared memory). Except at decode
// (split keys, below): when the CTA's rows fit one warp, every warp takes the
// same 16 rows and a quarter of each tile's keys, and the four softmax states
// are merged once, through shared memory, after the last tile.
//
// Shared memory per CTA (bf16/fp16, kHeadDim = 128):
//   Q    kBlockM x 128                   = 16 KB  (reused for the output tile)
//   K    kStages x kBlockN x 128         = 32 KB
//   V    kStages x kBlockN x 128         = 32 KB
//   total                                  80 KB  -> 2 CTAs per SM on sm_80
//   (164 KB usable) and on sm_90 (227 KB usable), 8 warps per SM.
//   The overlapped Hopper loop (kOverlap) keeps kOverlapVStages V stages: 96 KB, still 2 per SM.
//
// Swizzle. A tile row is 128 elements = 256 bytes = 16 chunks of 16 bytes.
// Chunk c of row r is stored at chunk c ^ (r % 8) of that row: the 8 rows an
// ldmatrix phase (or a cp.async phase) touches at one logical chunk then land
// in 8 distinct 16-byte bank groups, so neither the cp.async writes nor the
// ldmatrix reads conflict. Every tile's rows start at a multiple of 8, so the
// xor term is the row's index within its block of 8.
//
// Hopper layout (the kWgmma mainloop, mainloop.cuh): each tile is two
// [rows][64] halves (head dims 0-63, then 64-127), rows of 128 bytes, chunk
// c < 8 of a half-row at c ^ (r % 8): wgmma's 128-byte-swizzle layout, K read
// K-major (Q K^T; Q itself goes to registers by ldmatrix) and V MN-major (P V),
// with every tile and half on a 1024-byte boundary (the kernel aligns the
// shared-memory base).
#pragma once

#include <cuda_runtime.h>

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

// Decode (split keys): a CTA whose packed rows fit one warp (seq.rows - row0 <= kSplitKeysMaxRows:
// every single-token decode of Qwen3, groups 2-16) has all kNumWarps warps compute the same 16
// rows, warp w on keys kKeysPerWarp w .. kKeysPerWarp (w + 1) - 1 of each tile, with its own
// online-softmax state; the warps' states are merged into warp 0 after the last tile.
constexpr int kSplitKeysMaxRows = kRowsPerWarp;
constexpr int kKeysPerWarp = kBlockN / kNumWarps;                 // 16
constexpr int kWarpScoreTilesN = kKeysPerWarp / kMmaN;            // 2 n8 tiles of scores
constexpr int kWarpKeyStepsK = kKeysPerWarp / kMmaK;              // 1 k16 step of P.V

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
static_assert(kKeysPerWarp % (2 * kMmaN) == 0 && kKeysPerWarp % kSwizzleRows == 0,
              "split keys: whole ldmatrix.x4 key pairs per warp, quarters on swizzle rows");
static_assert(kStages == 2, "the main loop's wait_group depth assumes double buffering");
static_assert(kSmemBytes <= 164 * 1024, "must fit sm_80's 164 KB per CTA");

// Element offset of (row, chunk) inside a [rows][kHeadDim] tile, swizzled.
__host__ __device__ constexpr int swizzled_offset(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row % kSwizzleRows)) * kChunkElems);
}

// ---- the Hopper (kWgmma) layout -------------------------------------------------------------
constexpr int kHalfDim = kHeadDim / 2;                       // 64 elements = one 128-byte row
constexpr int kHalfChunks = kChunksPerRow / 2;               // 8
constexpr int kSmemAllocWgmma = kSmemBytes + kWgmmaAtomBytes;  // room to align the base
// The overlapped Hopper loop (attention_fwd.cuh, kOverlap) issues tile t's Q K^T beside tile
// t - 1's P V, so V of tiles t - 1 and t are read while t + 1's loads: three V stages (K keeps
// two: tile t - 1's Q K^T has been waited for when t + 1's K is loaded).
constexpr int kOverlapVStages = 3;
constexpr int kSmemAllocOverlap =
    (kTileQElems + (kStages + kOverlapVStages) * kTileKVElems) * kElemBytes + kWgmmaAtomBytes;
static_assert(2 * (kSmemAllocOverlap + kSmemReservedPerCta) <= kHopperSmemPerSm,
              "two CTAs of the overlapped loop per sm_90 SM (228 KB, 1 KB reserved per CTA)");

// Element offset of (row, chunk) inside a tile of `rows` rows in the Hopper layout.
__host__ __device__ constexpr int wgmma_offset(int row, int chunk, int rows) {
  return (chunk / kHalfChunks) * rows * kHalfDim + row * kHalfDim +
         (((chunk % kHalfChunks) ^ (row % kSwizzleRows)) * kChunkElems);
}

// The tile layout of a mainloop: element offset of (row, chunk) in a tile of `rows` rows.
template <bool kWgmma>
__host__ __device__ constexpr int tile_offset(int row, int chunk, int rows) {
  return kWgmma ? wgmma_offset(row, chunk, rows) : swizzled_offset(row, chunk);
}

static_assert(kTileQElems * kElemBytes % kWgmmaAtomBytes == 0 &&
                  kTileKVElems * kElemBytes % kWgmmaAtomBytes == 0 &&
                  kBlockM * kHalfDim * kElemBytes % kWgmmaAtomBytes == 0 &&
                  kBlockN * kHalfDim * kElemBytes % kWgmmaAtomBytes == 0,
              "every Hopper tile and half-tile starts on a swizzle atom");
static_assert(kBlockM == 64 && kNumWarps == 4, "the Hopper mainloop: one warpgroup of m64");

// ---- launch parameters --------------------------------------------------------------------
// Strides are in elements (mask: bytes = elements). Two batch layouts share the kernel:
//   padded (cu_seqlens_q == nullptr): q [B, Hq, Sq, 128], k/v [B, Hkv, Skv, 128],
//     out [B, Sq, Hq, 128], lse [B, Hq, Sq]; every sequence has Sq queries and Skv keys
//     (or Skv_b = min(Skv, key_lengths[b])).
//   varlen (cu_seqlens_q, cu_seqlens_k != nullptr): q [Tq, Hq, 128], k/v [Tk, Hkv, 128] (batch
//     strides 0), out [Tq, Hq, 128], lse [Hq, Tq]; sequence b owns tokens cu_seqlens_q[b] ..
//     cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k/v.
// Both index out, lse and the split partials by "token" = b * Sq + s (padded) or
// cu_seqlens_q[b] + s (varlen): out row token * Hq + hq.
struct Params {
  const void* q;       // [B, Hq, Sq, 128] | [Tq, Hq, 128], strides q_*, last dim contiguous
  const void* k;       // [B, Hkv, Skv, 128] | [Tk, Hkv, 128], strides k_*, last dim contiguous
  const void* v;       // like k, strides v_*
  const uint8_t* mask;  // padded only: [B|1, 1|Hq, Sq, Skv] bool (1 = attend), strides mask_*,
                        // keys contiguous; or nullptr
  const int* cu_seqlens_q;  // varlen: [B + 1] int32 token offsets into q/out; nullptr = padded
  const int* cu_seqlens_k;  // varlen: [B + 1] int32 token offsets into k/v
  const void* key_lengths;  // padded only: [B] (or one value for all) int32/int64: sequence b
                            // sees keys j < min(Skv, key_lengths[b]); nullptr = all Skv
  void* out;           // [total_q, Hq, 128] contiguous, q's dtype
  float* lse;          // padded [B, Hq, Sq] | varlen [Hq, Tq], contiguous fp32, natural log
  float* partial_o;    // [num_splits, Hkv, total_q * group, 128] fp32, normalized per split
                       // (splits > 1)
  float* partial_lse;  // [num_splits, Hkv, total_q * group] fp32, log2 units (splits > 1)
  unsigned long long* split_flags;  // [row tiles * B * Hkv, num_splits] (splits > 1): each
                                   // split's arrival mark (combine.cuh), never split_tag at launch
  unsigned long long split_tag;     // this launch's mark: nonzero, drawn per launch

  int64_t q_batch_stride, q_head_stride, q_seq_stride;  // varlen: batch stride 0, seq = token
  int64_t k_batch_stride, k_head_stride, k_seq_stride;
  int64_t v_batch_stride, v_head_stride, v_seq_stride;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride;  // 0 = broadcast
  int64_t key_lengths_stride;  // 0 = one value for the whole batch
  bool key_lengths_int64;

  int batch;         // B
  int num_q_heads;   // Hq
  int num_kv_heads;  // Hkv
  int group;         // Hq / Hkv
  int seqlen_q;      // padded: Sq; varlen: max_seqlen_q (the grid covers seqlen_q * group rows)
  int seqlen_k;      // padded: Skv; varlen: unused by the kernels (the split plan's hint)
  int total_q;       // tokens of q/out: B * Sq | Tq
  int total_k;       // tokens of k/v: B * Skv | Tk (bounds cu_seqlens_k)
  float scale_log2;  // scale * log2(e): scores are kept in log2 units
  bool causal;       // bottom-right per sequence: query s sees keys j <= s + Skv_b - Sq_b
  bool proxy_fence;  // kWgmma: fence.proxy.async after each stage lands (core/mainloop_choice.h)
  bool pdl;          // host: launch with programmatic dependent launch (core/pdl.cuh)
                     // (Skv_b: the sequence's keys, after key_lengths)

  int num_splits;       // gridDim.z; 1 = write out/lse directly
  int tiles_per_split;  // K/V tiles per split; the last split takes every tile after the others
  bool cluster_combine;  // splits > 1, launched in clusters of (1, 1, num_splits) (sm_90): the
                         // splits merge through distributed shared memory, no partials, no marks
};

// One sequence's slice of the batch, as the kernels see it.
struct SeqSlice {
  int token0;         // its first query's token index (out, lse, partials)
  int seqlen_q;       // Sq_b
  int seqlen_k;       // Skv_b
  int rows;           // Sq_b * group: packed rows of one kv head
  int64_t q_offset;   // elements from p.q to its first query token (head 0)
  int64_t k_offset;   // elements from p.k to its first key token (head 0)
  int64_t v_offset;   // elements from p.v to its first value token (head 0)
  int64_t lse_offset; // lse index of (hq = 0, s = 0); + hq * lse_head_stride + s
  int64_t lse_head_stride;
};

// Sequence b. cu_seqlens values are clamped into [0, total] and made non-decreasing, so a
// malformed batch can give wrong rows but never an out-of-bounds access.
__device__ __forceinline__ SeqSlice seq_slice(const Params& p, int b) {
  SeqSlice s;
  if (p.cu_seqlens_q == nullptr) {
    s.token0 = b * p.seqlen_q;
    s.seqlen_q = p.seqlen_q;
    s.seqlen_k = p.seqlen_k;
    if (p.key_lengths != nullptr) {  // e.g. the filled part of a static cache
      const int64_t i = b * p.key_lengths_stride;
      const int64_t n = p.key_lengths_int64 ? static_cast<const int64_t*>(p.key_lengths)[i]
                                            : static_cast<const int32_t*>(p.key_lengths)[i];
      s.seqlen_k = static_cast<int>(min(max(n, int64_t{0}), static_cast<int64_t>(p.seqlen_k)));
    }
    s.q_offset = b * p.q_batch_stride;
    s.k_offset = b * p.k_batch_stride;
    s.v_offset = b * p.v_batch_stride;
    s.lse_head_stride = p.seqlen_q;
    s.lse_offset = static_cast<int64_t>(b) * p.num_q_heads * p.seqlen_q;
  } else {
    const int q0 = min(max(p.cu_seqlens_q[b], 0), p.total_q);
    const int q1 = min(max(p.cu_seqlens_q[b + 1], q0), p.total_q);
    const int k0 = min(max(p.cu_seqlens_k[b], 0), p.total_k);
    const int k1 = min(max(p.cu_seqlens_k[b + 1], k0), p.total_k);
    s.token0 = q0;
    s.seqlen_q = q1 - q0;
    s.seqlen_k = k1 - k0;
    s.q_offset = q0 * p.q_seq_stride;
    s.k_offset = k0 * p.k_seq_stride;
    s.v_offset = k0 * p.v_seq_stride;
    s.lse_head_stride = p.total_q;
    s.lse_offset = q0;
  }
  s.rows = s.seqlen_q * p.group;
  return s;
}

// lse index of (token, query head), the sequence found from the token (the combine, which
// works on workspace rows): padded layouts recover (b, s) from the token.
__device__ __forceinline__ int64_t lse_index(const Params& p, int token, int hq) {
  if (p.cu_seqlens_q != nullptr) return static_cast<int64_t>(hq) * p.total_q + token;
  const int b = token / p.seqlen_q;
  return (static_cast<int64_t>(b) * p.num_q_heads + hq) * p.seqlen_q + (token - b * p.seqlen_q);
}

}  // namespace qwen3x::attn
