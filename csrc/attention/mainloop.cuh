// The data movement and tensor-core math of one attention tile:
//
//   load_q_tile      global -> shared: the CTA's kBlockM packed rows of Q (decode: 16)
//   KVLoader         global -> shared: kBlockN keys of K and of V of one kv head
//   load_q_fragments shared -> registers: a warp's 16 x 128 Q block as A fragments (both
//                    mainloops: once per CTA, they stay in registers for every tile)
//   warp_qk          S[16 x 64] = Q K^T    (8 k16 steps x 8 n8 tiles = 64 mma)
//   warp_pv          O[16 x 128] += P V    (4 k16 steps x 16 n8 tiles = 64 mma)
//   (decode, split keys: a warp's 16 keys of the tile, 8 x 2 = 16 mma and 1 x 16 = 16 mma)
//
// Loads are 16-byte cp.async into the swizzled tiles of kernel_traits.cuh;
// rows past the end (packed rows >= rows, keys >= Skv) are zero-filled, so
// padding V rows contribute exactly 0 (never NaN garbage times P = 0).
//
// ldmatrix address maps (lane = 0..31; x4 matrix j is fed by lanes 8j..8j+7):
//   Q (A, non-trans): row = 16 w + lane % 8 + 8 ((lane / 8) % 2), chunk = 2 kk + lane / 16
//                     -> a0..a3 of k16 step kk
//   K (B, non-trans): key = 16 np + lane % 8 + 8 (lane / 16), chunk = 2 kk + (lane / 8) % 2
//                     -> {b0, b1} of n8 tile 2 np, then of n8 tile 2 np + 1
//   V (B, .trans):    key = 16 kc + lane % 8 + 8 ((lane / 8) % 2), chunk = 2 dp + lane / 16
//                     -> {b0, b1} of head tile 2 dp, then of head tile 2 dp + 1
// All row bases are multiples of 8, so every lane's swizzle term is lane % 8.
// (Checked against a CPU model of ldmatrix/mma semantics.)
//
// The Hopper mainloop (kWgmma = true: sm_90a builds on sm_90 GPUs) loads the
// same rows into the Hopper layout of kernel_traits.cuh and replaces the
// warp-level math by warpgroup-level wgmma, A from registers, B from shared memory:
//   warpgroup_qk     S[64 x 64] = Q K^T: 8 k16 steps of m64n64k16, Q the warps' A
//                    fragments (load_q_fragments), K K-major
//   warpgroup_pv     O[64 x 128] += P V: 4 k16 steps of m64n128k16, P from the
//                    registers (the same A fragments softmax.cuh makes for
//                    mma.sync), V MN-major
// Why Q sits in registers: shared memory serves an SM 128 bytes a clock, and Q K^T as SS
// wgmma (A = Q from shared memory) would need all of it at the tensor cores' full rate
// (m64n64k16 reads 2 KB of A and 2 KB of B in 32 clocks), beside the cp.async writes and P V's
// reads of V; the RS form reads only K (benchmarks/NOTES.md, "Q in registers").
// Warp w's accumulators are the mma.sync C fragments of its 16 rows (s[8][4],
// o[16][4]; core/wgmma.cuh), so softmax and epilogue are shared. Each waits
// for its wgmma group before returning; issue_qk / issue_pv are their wgmma
// instructions alone (no fence, commit or wait). warpgroup_qk_then_pv issues both, Q K^T
// first, and returns with P V still running (the overlapped loop, attention_fwd.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/kernel_traits.cuh"
#include "core/mma.cuh"
#include "core/wgmma.cuh"

namespace qwen3x::attn {

// The CTA's Q rows [row0, row0 + kRows) of sequence `seq` -> sQ. Packed row r is query
// position s = r / group of query head kvh * group + r % group; rows >= seq.rows are zero.
// kRows: kBlockM, or at decode (split keys) the kSplitKeysMaxRows rows every warp computes: the
// tile's other rows are never read there, and each pass of 8 rows costs every thread an integer
// division and a copy (six of the eight passes, in the prologue that every decode CTA runs once).
template <typename T, bool kWgmma, int kRows = kBlockM>
__device__ __forceinline__ void load_q_tile(const Params& p, const SeqSlice& seq,
                                            uint32_t sQ,  // [kBlockM][128] in tile_offset<kWgmma>
                                            int kvh, int row0, int tid) {
  static_assert(kRows % kLoadRowsPerPass == 0 && kRows <= kBlockM, "whole passes of the Q tile");
  static_assert(!kWgmma || kRows == kBlockM, "the Hopper layout's offsets are the whole tile's");
  const T* q = static_cast<const T*>(p.q) + seq.q_offset;
  const int chunk = tid % kChunksPerRow;
#pragma unroll
  for (int i = 0; i < kRows / kLoadRowsPerPass; ++i) {
    const int local_row = tid / kChunksPerRow + i * kLoadRowsPerPass;
    const int r = row0 + local_row;
    const bool in_range = r < seq.rows;
    const T* src = q;  // never read when out of range
    if (in_range) {
      const int s = r / p.group;
      const int h = r - s * p.group;
      src = q + static_cast<int64_t>(kvh * p.group + h) * p.q_head_stride + s * p.q_seq_stride +
            chunk * kChunkElems;
    }
    cp_async_16(sQ + tile_offset<kWgmma>(local_row, chunk, kBlockM) * kElemBytes, src, in_range);
  }
}

// Per-thread cursor of the K (or V) loader: the thread copies chunk tid % 16
// of rows tid / 16 + 8 i (i < kBlockN / 8) of every tile.
template <typename T, bool kWgmma>
struct KVLoader {
  // Bytes between rows 8 apart of one chunk (same swizzle term).
  static constexpr uint32_t kPassBytes =
      (tile_offset<kWgmma>(kLoadRowsPerPass, 0, kBlockN) - tile_offset<kWgmma>(0, 0, kBlockN)) *
      kElemBytes;

  const T* src;        // this thread's chunk of key tid / 16 of the current tile
  const T* fallback;   // this thread's chunk of key 0: the (never read) source of zero-filled rows
  int64_t pass_step;   // elements between rows 8 apart (8 * seq_stride)
  int64_t tile_step;   // elements between tiles (kBlockN * seq_stride)
  uint32_t dst;        // shared byte offset of (row tid / 16, chunk tid % 16) in a tile
  int first_key;       // key of row tid / 16 of the current tile
  int tile_key;        // key of the current tile's first row

  __device__ __forceinline__ void init(const T* head,  // [Skv, 128] rows seq_stride apart
                                       int64_t seq_stride, int tile, int tid) {
    const int row = tid / kChunksPerRow;
    const int chunk = tid % kChunksPerRow;
    tile_key = tile * kBlockN;
    first_key = tile_key + row;
    src = head + first_key * seq_stride + chunk * kChunkElems;
    fallback = head + chunk * kChunkElems;
    pass_step = kLoadRowsPerPass * seq_stride;
    tile_step = kBlockN * seq_stride;
    dst = tile_offset<kWgmma>(row, chunk, kBlockN) * kElemBytes;
  }

  // Copies the current tile into the tile at shared address tile_base; rows at
  // keys >= seqlen_k are zero-filled (nothing is read; their source address is
  // key 0's, inside the tensor, so memory checkers see no stray address). A
  // tile is loaded only when seqlen_k > 0. A tile wholly in range (every one but
  // a sequence's last, unless it ends on a tile) skips the per-row test and
  // select: a row costs its copy and one pointer step.
  __device__ __forceinline__ void load(uint32_t tile_base, int seqlen_k) const {
    const T* row_src = src;
    if (tile_key + kBlockN <= seqlen_k) {
#pragma unroll
      for (int i = 0; i < kBlockN / kLoadRowsPerPass; ++i) {
        cp_async_16(tile_base + dst + i * kPassBytes, row_src, true);
        row_src += pass_step;
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kBlockN / kLoadRowsPerPass; ++i) {
      const bool in_range = first_key + i * kLoadRowsPerPass < seqlen_k;
      cp_async_16(tile_base + dst + i * kPassBytes, in_range ? row_src : fallback, in_range);
      row_src += pass_step;
    }
  }

  __device__ __forceinline__ void advance() {
    src += tile_step;
    first_key += kBlockN;
    tile_key += kBlockN;
  }
};

// A fragments of the warp's 16 rows x 128 head dims (qf[kk]: head dims 16 kk .. 16 kk + 15),
// for mma.sync and for wgmma's RS form alike. Either layout puts the 8 rows of an ldmatrix
// phase at one logical chunk in 8 distinct bank groups (chunk ^ row % 8).
template <typename T, bool kWgmma>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[kHeadStepsK][4],
                                                 uint32_t sQ,  // [kBlockM][128], tile_offset<kWgmma>
                                                 int warp, int lane) {
  const int row = warp * kRowsPerWarp + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < kHeadStepsK; ++kk) {
    ldmatrix_x4(qf[kk], sQ + tile_offset<kWgmma>(row, 2 * kk + lane / 16, kBlockM) * kElemBytes);
  }
}

// Byte offset, inside a swizzled tile, of (row, chunk) for chunk = 2 c + c_lane
// (c_lane in {0, 1}): as 2 c + c_lane == 2 c ^ c_lane and the swizzle is an
// xor, it is lane_offset(row, c_lane) ^ (2 c * 16 bytes), the xor touching
// only the chunk bits (rows are 256 bytes). So each k step costs one LOP, and
// the row blocks become immediate offsets of ldmatrix.
__device__ __forceinline__ uint32_t lane_offset(int row, int c_lane) {
  return swizzled_offset(row, c_lane) * kElemBytes;
}
__device__ __forceinline__ uint32_t chunk_pair_xor(int c) { return 2 * c * kVecBytes; }
constexpr uint32_t kRowBytes = kHeadDim * kElemBytes;  // 256

// s[nt][.] = C fragments of Q K^T for keys 8 nt .. 8 nt + 7 of sK (fp32, unscaled): the whole
// tile (kTiles = kScoreTilesN), or at decode a warp's kKeysPerWarp keys (kTiles =
// kWarpScoreTilesN, sK = the tile + its first key's row: a multiple of 8 rows, so the lanes'
// swizzle terms stay lane % 8).
template <typename T, int kTiles>
__device__ __forceinline__ void warp_qk(float (&s)[kTiles][4],
                                        const uint32_t (&qf)[kHeadStepsK][4],
                                        uint32_t sK,  // [kTiles * 8][128] swizzled
                                        int lane) {
  static_assert(kTiles % 2 == 0, "ldmatrix.x4 loads pairs of n8 tiles");
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
  }
  const uint32_t off = lane_offset(lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < kHeadStepsK; ++kk) {
    const uint32_t base = sK + (off ^ chunk_pair_xor(kk));
#pragma unroll
    for (int np = 0; np < kTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, base + np * 2 * kMmaN * kRowBytes);
      mma_16816<T>(s[2 * np], qf[kk], b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
    }
  }
}

// o[j][.] += P V for head dims 8 j .. 8 j + 7; pf[kc] = A fragments of P for
// keys 16 kc .. 16 kc + 15 of sV (the whole tile, kSteps = kKeyStepsK; at decode a warp's
// kKeysPerWarp keys, kSteps = kWarpKeyStepsK, sV = the tile + its first key's row). Each o
// tile accumulates over kc in ascending order.
template <typename T, int kSteps>
__device__ __forceinline__ void warp_pv(float (&o)[kHeadTilesN][4],
                                        const uint32_t (&pf)[kSteps][4],
                                        uint32_t sV,  // [kSteps * 16][128] swizzled
                                        int lane) {
  const uint32_t off = lane_offset(lane % 8 + 8 * ((lane / 8) % 2), lane / 16);
#pragma unroll
  for (int dp = 0; dp < kHeadTilesN / 2; ++dp) {
    const uint32_t base = sV + (off ^ chunk_pair_xor(dp));
#pragma unroll
    for (int kc = 0; kc < kSteps; ++kc) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, base + kc * kMmaK * kRowBytes);
      mma_16816<T>(o[2 * dp], pf[kc], b[0], b[1]);
      mma_16816<T>(o[2 * dp + 1], pf[kc], b[2], b[3]);
    }
  }
}

// ---- Hopper: warpgroup-level wgmma -----------------------------------------------------------
constexpr uint32_t kHalfTileKVBytes = kBlockN * kHalfDim * kElemBytes;  // 8 KB
constexpr int kStepsPerHalf = kHalfDim / kMmaK;                         // 4 k16 steps per half
constexpr uint32_t kKeyStepBytes = kMmaK * kHalfDim * kElemBytes;       // 16 V rows: 2 KB

// Issues (no fence, commit or wait) S[64 x 64] += Q K^T for the warpgroup: s[nt][.] holds the
// warp's 16 rows, keys 8 nt .. 8 nt + 7; A = the warps' Q fragments, B = K K-major (k16 step
// kk: half kk / 4, 32 bytes per step).
template <typename T>
__device__ __forceinline__ void issue_qk(float (&s)[kScoreTilesN][4], uint32_t (&qf)[kHeadStepsK][4],
                                         uint32_t sK) {  // [kBlockN][128], Hopper layout
  float(&d)[kScoreTilesN * 4] = reinterpret_cast<float(&)[kScoreTilesN * 4]>(s);
#pragma unroll
  for (int kk = 0; kk < kHeadStepsK; ++kk) {
    const uint32_t step = (kk % kStepsPerHalf) * kWgmmaStepBytes;
    wgmma_rs<T, kBlockN, WgmmaB::kKMajor>(
        d, qf[kk], wgmma_desc_sw128(sK + (kk / kStepsPerHalf) * kHalfTileKVBytes + step));
  }
}

// Issues (no fence, commit or wait) O[64 x 128] += P V for the warpgroup: o[j][.] holds the
// warp's 16 rows, head dims 8 j .. 8 j + 7; pf[kc] = A fragments of P for keys 16 kc ..
// 16 kc + 15. V MN-major: 16 keys per step (2 KB), the second half of the head dims
// kHalfTileKVBytes on (leading byte offset), 8-key groups 1024 bytes apart.
template <typename T>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadTilesN][4], uint32_t (&pf)[kKeyStepsK][4],
                                         uint32_t sV) {  // [kBlockN][128], Hopper layout
  float(&d)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
#pragma unroll
  for (int kc = 0; kc < kKeyStepsK; ++kc) {
    wgmma_rs<T, kHeadDim, WgmmaB::kMNMajor>(
        d, pf[kc], wgmma_desc_sw128(sV + kc * kKeyStepBytes, kHalfTileKVBytes, kWgmmaAtomBytes));
  }
}

// s = Q K^T (fp32, unscaled), waited for.
template <typename T>
__device__ __forceinline__ void warpgroup_qk(float (&s)[kScoreTilesN][4],
                                             uint32_t (&qf)[kHeadStepsK][4],
                                             uint32_t sK) {  // [kBlockN][128], Hopper layout
  float(&d)[kScoreTilesN * 4] = reinterpret_cast<float(&)[kScoreTilesN * 4]>(s);
  uint32_t(&a)[kHeadStepsK * 4] = reinterpret_cast<uint32_t(&)[kHeadStepsK * 4]>(qf);
#pragma unroll
  for (int i = 0; i < kScoreTilesN * 4; ++i) d[i] = 0.0f;
  wgmma_fence_operands(d);
  wgmma_fence_operands(a);
  wgmma_fence();
  issue_qk<T>(s, qf, sK);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(d);
}

// The overlapped Hopper loop's pair (attention_fwd.cuh, kOverlap): S = Q K^T of this tile and
// then O += P V of the previous one, two groups in that order; returns once the first is done
// (s waited for), the second still running: o and pf stay untouched until wait_pv().
template <typename T>
__device__ __forceinline__ void warpgroup_qk_then_pv(float (&s)[kScoreTilesN][4],
                                                     uint32_t (&qf)[kHeadStepsK][4],
                                                     uint32_t sK,  // this tile's K, Hopper layout
                                                     float (&o)[kHeadTilesN][4],
                                                     uint32_t (&pf)[kKeyStepsK][4],
                                                     uint32_t sV) {  // the previous tile's V
  float(&ds)[kScoreTilesN * 4] = reinterpret_cast<float(&)[kScoreTilesN * 4]>(s);
  float(&dout)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
  uint32_t(&aq)[kHeadStepsK * 4] = reinterpret_cast<uint32_t(&)[kHeadStepsK * 4]>(qf);
  uint32_t(&ap)[kKeyStepsK * 4] = reinterpret_cast<uint32_t(&)[kKeyStepsK * 4]>(pf);
#pragma unroll
  for (int i = 0; i < kScoreTilesN * 4; ++i) ds[i] = 0.0f;
  wgmma_fence_operands(ds);
  wgmma_fence_operands(aq);
  wgmma_fence_operands(dout);  // rescaled after the previous pair's wait
  wgmma_fence_operands(ap);    // P packed before the fence
  wgmma_fence();
  issue_qk<T>(s, qf, sK);
  wgmma_commit();
  issue_pv<T>(o, pf, sV);
  wgmma_commit();
  wgmma_wait<1>();  // groups complete in order: Q K^T's is done
  wgmma_fence_operands(ds);
}

// Waits for the P V group warpgroup_qk_then_pv left running.
__device__ __forceinline__ void warpgroup_wait_pv(float (&o)[kHeadTilesN][4]) {
  float(&d)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
  wgmma_wait<0>();
  wgmma_fence_operands(d);
}

// o += P V, waited for.
template <typename T>
__device__ __forceinline__ void warpgroup_pv(float (&o)[kHeadTilesN][4],
                                             uint32_t (&pf)[kKeyStepsK][4],
                                             uint32_t sV) {  // [kBlockN][128], Hopper layout
  float(&d)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
  uint32_t(&a)[kKeyStepsK * 4] = reinterpret_cast<uint32_t(&)[kKeyStepsK * 4]>(pf);
  wgmma_fence_operands(d);
  wgmma_fence_operands(a);  // P packed before the fence
  wgmma_fence();
  issue_pv<T>(o, pf, sV);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(d);
}

}  // namespace qwen3x::attn
