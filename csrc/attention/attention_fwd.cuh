// Attention forward for Qwen3 (head_dim 128, bf16/fp16): one tensor-core
// kernel for prefill and decode, GQA-packed, causal and/or boolean-masked,
// with split-KV for small grids (the splits merged by the CTA that finishes
// last, combine.cuh), and the launcher that runs it.
//
//   out[b, s, hq, :] = softmax_j(scale * q[b, hq, s, :] . k[b, hq / group, j, :]
//                                 over visible j) @ v[b, hq / group, :, :]
//   lse[b, hq, s]    = logsumexp_j of the same scaled scores (natural log)
//   visible(s, j)    = j < Skv && (!causal || j <= s + Skv - Sq) && mask[b, hq, s, j]
//
// for a padded batch (Sq, Skv the same for every b, or Skv_b = min(Skv,
// key_lengths[b])) or a packed variable-length one (Sq_b, Skv_b from cu_seqlens;
// no mask): kernel_traits.cuh, Params. Keys past Skv_b are never loaded.
//
// CTA (row tile x, b * Hkv + kvh, split z) -- see kernel_traits.cuh for the
// row packing r = s * group + h, tiles and shared memory:
//   1. cp.async Q rows and the first K/V tile (one group), then for each K/V
//      tile of the CTA's key range: prefetch the next tile into the other
//      buffer, wait for the current one, S = Q K^T (mma), mask, online
//      softmax (the scale folded into its exponent), O += P V (mma). Q fragments
//      are read from shared memory once, before the first tile, and stay in
//      registers. (kWgmma: the wait and the proxy fence come before the prefetch,
//      one barrier per tile; kOverlap, the default variant of that loop (the serial one is the
//      A/B): each tile's softmax runs beside the previous tile's P V, three V stages.)
//   2. Key range: tiles [z * tiles_per_split, (z + 1) * tiles_per_split)
//      (the last split: to the end), clipped at the last key any of the
//      CTA's rows sees causally; tiles wholly above the diagonal are never
//      loaded. A tile is masked element by
//      element only when it may hold an invisible key for some row (the causal
//      diagonal, the end of the keys, or a mask tensor); other tiles only
//      scale.
//   3. Decode (kSplitKeys: the CTA's packed rows fit one warp, seq.rows - row0 <=
//      kSplitKeysMaxRows; mma.sync only): every warp computes the same 16 rows
//      (warp 0's), warp w on keys 16 w .. 16 w + 15 of each tile (Q K^T 8 x 2 =
//      16 mma, P V 1 x 16 = 16 mma) with its own online softmax; after the last
//      tile the four states are merged into warp 0 through the freed K stages
//      (OnlineSoftmax::merge_split_keys), and the epilogue writes warp 0's rows.
//      Otherwise warps whose 16 rows are all past the last packed row still load
//      and synchronize, but skip the math.
//   4. Epilogue (epilogue.cuh): the output directly, or the split's partials and,
//      for the last of the tile's splits to finish, the combine (combine.cuh).
//
// kWgmma (sm_90a, mainloop.cuh): the Hopper layout and warpgroup wgmma for
// S = Q K^T and O += P V (A operands from registers: the Q fragments, as in step 1,
// and P); every warp takes part (wgmma is warpgroup-wide), rows past the
// sequence compute harmlessly on zero-filled Q and are never written. The
// host picks it for tiles that are mostly full (prefill), see
// attention.cu.
//
// Torch-free: raw pointers, sizes and element strides; the glue is
// attention.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/combine.cuh"
#include "attention/epilogue.cuh"
#include "attention/heuristics.cuh"
#include "attention/kernel_traits.cuh"
#include "attention/mainloop.cuh"
#include "attention/softmax.cuh"
#include "core/cluster.cuh"
#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mma.cuh"
#include "core/pdl.cuh"
#include "core/wgmma.cuh"

namespace qwen3x::attn {

// One row tile [row0, row0 + kBlockM) of sequence b, kv head kvh, key split `split`: steps
// 1-4 above. kSplitKeys: the tile's rows fit warp 0 (step 3), mma.sync only. kOverlap: the
// Hopper loop with tile t's softmax beside tile t - 1's P V (below), kWgmma only.
template <typename T, bool kWgmma, bool kSplitKeys, bool kOverlap>
__device__ __forceinline__ void attention_tile(const Params& p, T* sQ, int b, int kvh, int split,
                                               int row0, int tid) {
  const SeqSlice seq = seq_slice(p, b);
  T* sK = sQ + kTileQElems;             // [kStages][kBlockN][128]
  T* sV = sK + kStages * kTileKVElems;  // [kStages (kOverlap: kOverlapVStages)][kBlockN][128]
  static_assert(!(kWgmma && kSplitKeys), "split keys is the mma.sync mainloop's decode path");
  static_assert(kWgmma || !kOverlap, "the overlapped loop is a Hopper (wgmma) loop");
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int row_warp = kSplitKeys ? 0 : warp;  // whose 16 rows this warp computes

  // ---- the CTA's key tiles -----------------------------------------------------------------
  const int causal_offset = seq.seqlen_k - seq.seqlen_q;  // query s sees keys <= s + offset
  const int s_last = (min(row0 + kBlockM, seq.rows) - 1) / p.group;
  int key_end = seq.seqlen_k;  // exclusive
  if (p.causal) key_end = max(0, min(key_end, s_last + causal_offset + 1));
  const int key_tiles = ceil_div(key_end, kBlockN);
  const int tile_begin = split * p.tiles_per_split;
  // The last split takes every remaining tile: a varlen sequence longer than the plan's hint
  // costs time, never keys.
  const int tile_end =
      split == p.num_splits - 1 ? key_tiles : min(tile_begin + p.tiles_per_split, key_tiles);
  const int visible_last = all_visible_last(p, seq, row0);  // for every row of the CTA
  const bool has_mask = p.mask != nullptr;

  // ---- this lane's two rows ----------------------------------------------------------------
  RowLimit limit[kRowHalves];
  row_limits(limit, p, seq, b, kvh, row0 + row_warp * kRowsPerWarp, lane);

  // ---- prologue: Q and the first K/V tile --------------------------------------------------
  const uint32_t sQ_addr = smem_u32(sQ);
  const uint32_t sK_addr = smem_u32(sK);
  const uint32_t sV_addr = smem_u32(sV);
  constexpr uint32_t kTileKVBytes = kTileKVElems * kElemBytes;
  KVLoader<T, kWgmma> k_loader, v_loader;
  k_loader.init(static_cast<const T*>(p.k) + seq.k_offset + kvh * p.k_head_stride, p.k_seq_stride,
                tile_begin, tid);
  v_loader.init(static_cast<const T*>(p.v) + seq.v_offset + kvh * p.v_head_stride, p.v_seq_stride,
                tile_begin, tid);
  load_q_tile<T, kWgmma, kSplitKeys ? kSplitKeysMaxRows : kBlockM>(p, seq, sQ_addr, kvh, row0, tid);
  if (tile_begin < tile_end) {
    k_loader.load(sK_addr, seq.seqlen_k);
    v_loader.load(sV_addr, seq.seqlen_k);
  }
  cp_async_commit();

  const bool warp_active = row0 + row_warp * kRowsPerWarp < seq.rows;
  float o[kHeadTilesN][4];
#pragma unroll
  for (int j = 0; j < kHeadTilesN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
  }
  OnlineSoftmax softmax;
  softmax.init();
  uint32_t qf[kHeadStepsK][4];  // Q fragments, loaded at the first tile, kept in registers

  // ---- main loop ---------------------------------------------------------------------------
  if constexpr (kOverlap) {
    // Hopper, FA3's intra-warpgroup overlap: tile t's Q K^T and then tile t - 1's P V go out as
    // two wgmma groups; tile t's softmax runs once the first is done, beside the second, which
    // is waited for only at the top of the next iteration (a basic block away: ptxas would
    // otherwise hoist the wait above the softmax, as it did in a first version). Then o takes
    // tile t's rescale and P is packed (its registers are the in-flight P V's A operand until
    // then: a pack during it serializes every wgmma, ptxas note C7513). The same operations on o
    // in the same order as the loop below ("rescale, then P V" per tile), so the same bits.
    // Iteration t:
    //   wait for tile t's copies, proxy fence;
    //   wait for P V of t - 2; o *= alpha of t - 1; P of t - 1 packed;
    //   barrier (every warp is past Q K^T of t - 1 and P V of t - 2), then t + 1's copies into
    //   K stage (t + 1) % 2 and V stage (t + 1) % 3 (V of t - 1 is read until the next iteration);
    //   issue Q K^T of t and P V of t - 1, wait for the first; softmax of t.
    const auto wait_copies = [&] {  // this thread's copies landed, and visible to wgmma's proxy
      cp_async_wait<0>();
      if (p.proxy_fence) fence_proxy_async();
    };
    const auto prefetch_next = [&](int tile) {  // one commit group, empty after the last tile
      const int t = tile - tile_begin;
      if (tile + 1 < tile_end) {
        k_loader.advance();
        v_loader.advance();
        k_loader.load(sK_addr + ((t + 1) % kStages) * kTileKVBytes, seq.seqlen_k);
        v_loader.load(sV_addr + ((t + 1) % kOverlapVStages) * kTileKVBytes, seq.seqlen_k);
      }
      cp_async_commit();
    };
    const auto mask_and_exponentiate = [&](float (&s)[kScoreTilesN][4], int tile,
                                           float (&alpha)[kRowHalves]) {
      const int key0 = tile * kBlockN;
      mask_scores(s, has_mask || key0 + kBlockN - 1 > visible_last, limit, key0, lane);
      softmax.exponentiate(s, p.scale_log2, alpha);
    };
    float s[kScoreTilesN][4];    // the newest tile's scores, then its p
    float alpha[kRowHalves];     // the factor o owes for the newest tile's max
    uint32_t pf[kKeyStepsK][4];  // P of the tile before it, which its (in-flight) P V reads
    // o takes alpha once P V of the tile before is done; p (s) is packed into pf after that wait
    const auto finish_previous = [&] {
      warpgroup_wait_pv(o);
      wgmma_fence_operands(reinterpret_cast<float(&)[kScoreTilesN * 4]>(s));
      OnlineSoftmax::rescale(o, alpha);
      OnlineSoftmax::pack_p<T>(s, pf);
    };
    if (tile_begin < tile_end) {  // the first tile: Q K^T alone
      wait_copies();
      __syncthreads();
      prefetch_next(tile_begin);
      load_q_fragments<T, true>(qf, sQ_addr, warp, lane);
      warpgroup_qk<T>(s, qf, sK_addr);
      mask_and_exponentiate(s, tile_begin, alpha);
    }
    for (int tile = tile_begin + 1; tile < tile_end; ++tile) {
      const int t = tile - tile_begin;
      wait_copies();
      finish_previous();
      __syncthreads();
      prefetch_next(tile);
      const uint32_t v_prev = sV_addr + ((t - 1) % kOverlapVStages) * kTileKVBytes;
      warpgroup_qk_then_pv<T>(s, qf, sK_addr + (t % kStages) * kTileKVBytes, o, pf, v_prev);
      mask_and_exponentiate(s, tile, alpha);
    }
    if (tile_begin < tile_end) {  // the last tile's P V
      finish_previous();
      warpgroup_pv<T>(o, pf, sV_addr + ((tile_end - 1 - tile_begin) % kOverlapVStages) * kTileKVBytes);
    }
  } else {
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const uint32_t stage_offset = ((tile - tile_begin) % kStages) * kTileKVBytes;
      // The next tile's copies into the other buffer, as one commit group (empty after the last
      // tile, so that the wait depths below hold throughout).
      const auto prefetch_next = [&] {
        if (tile + 1 < tile_end) {
          const uint32_t next_offset = kTileKVBytes - stage_offset;  // the other buffer
          k_loader.advance();
          v_loader.advance();
          k_loader.load(sK_addr + next_offset, seq.seqlen_k);
          v_loader.load(sV_addr + next_offset, seq.seqlen_k);
        }
        cp_async_commit();
      };
      if constexpr (kWgmma) {
        // Compute bound: this tile's copies are the only group in flight when it waits, so the
        // proxy fence (a MEMBAR in SASS) has no later copies it could wait for; the barrier makes
        // every thread's copies visible and frees the other buffer (every warp is past the
        // previous tile's wgmma), which the prefetch then refills while this tile computes.
        cp_async_wait<0>();
        if (p.proxy_fence) fence_proxy_async();  // this thread's copies, to wgmma's proxy
        __syncthreads();
        prefetch_next();
      } else {
        // Decode is bandwidth bound: the next tile's copies go out before this tile's wait (two
        // tiles in flight); the previous iteration's closing barrier freed their buffer.
        prefetch_next();
        cp_async_wait<kStages - 1>();  // all but the newest group: this tile
        __syncthreads();
      }

      if constexpr (kWgmma) {
        if (tile == tile_begin) load_q_fragments<T, true>(qf, sQ_addr, warp, lane);
        float s[kScoreTilesN][4];
        warpgroup_qk<T>(s, qf, sK_addr + stage_offset);
        const int key0 = tile * kBlockN;
        const bool mask_tile = has_mask || key0 + kBlockN - 1 > visible_last;
        mask_scores(s, mask_tile, limit, key0, lane);
        uint32_t pf[kKeyStepsK][4];
        softmax.update<T>(s, p.scale_log2, o, pf);
        warpgroup_pv<T>(o, pf, sV_addr + stage_offset);
      } else if (warp_active) {  // always with kSplitKeys (warp 0's rows, which hold row0)
        // the whole tile, or with kSplitKeys the warp's quarter of its keys
        constexpr int kTiles = kSplitKeys ? kWarpScoreTilesN : kScoreTilesN;
        const int first_key = kSplitKeys ? warp * kKeysPerWarp : 0;  // in the tile
        if (tile == tile_begin) load_q_fragments<T, false>(qf, sQ_addr, row_warp, lane);
        const uint32_t keys_offset = stage_offset + first_key * kRowBytes;
        float s[kTiles][4];
        warp_qk<T>(s, qf, sK_addr + keys_offset, lane);
        const int key0 = tile * kBlockN + first_key;
        const bool mask_tile = has_mask || key0 + kTiles * kMmaN - 1 > visible_last;
        mask_scores(s, mask_tile, limit, key0, lane);
        uint32_t pf[kTiles / 2][4];
        softmax.update<T>(s, p.scale_log2, o, pf);
        warp_pv<T>(o, pf, sV_addr + keys_offset, lane);
      }
      if constexpr (!kWgmma) {
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
      }
    }
  }
  cp_async_wait<0>();  // nothing may land in sQ while it holds the output tile
  __syncthreads();
  if constexpr (kSplitKeys) {  // the K stages are free: the warps' states into warp 0
    softmax.merge_split_keys(o, reinterpret_cast<float4*>(sK), warp, lane);
  }

  // ---- epilogue ----------------------------------------------------------------------------
  float inv_l[kRowHalves], lse2[kRowHalves];
  softmax.finalize(inv_l, lse2);
  if (p.num_splits == 1) {
    write_output<T>(p, seq, sQ, o, inv_l, lse2, kvh, row0, warp, lane, tid);
  } else if (p.cluster_combine) {  // the V stages hold the rows' O, the Q tile their lse
    static_assert(kBlockM * kHeadDim * sizeof(float) <= kStages * kTileKVElems * kElemBytes &&
                      kBlockM * sizeof(float) <= kTileQElems * kElemBytes,
                  "a split's fp32 rows fit the V stages, their lse the Q tile");
    combine_in_cluster<T>(p, seq, o, inv_l, lse2, kvh, split, row0, warp, lane,
                          reinterpret_cast<float*>(sV), reinterpret_cast<float*>(sQ));
  } else {
    write_partial(p, seq, o, inv_l, lse2, kvh, split, row0, warp, lane);
    combine_if_last<T>(p, seq, kvh, split, row0, warp, lane, tid, reinterpret_cast<int*>(sQ));
  }
}

// CTA (x, b * Hkv + kvh, split z): row tile x of sequence b. The grid covers every sequence of
// a padded batch; a varlen sequence longer than the caller's max_seqlen_q gets NaN in the rows
// beyond the grid (never stale memory). (A CTA loop over row tiles would cover them, but costs
// the main loop the registers it needs: ptxas then spills.)
template <typename T, bool kWgmma, bool kOverlap = false>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
attention_fwd_kernel(const __grid_constant__ Params p) {
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* base = smem;
  if constexpr (kWgmma) {  // wgmma tiles start on a 1024-byte swizzle atom
    base += round_up<uint32_t>(smem_u32(smem), kWgmmaAtomBytes) - smem_u32(smem);
  }
  T* sQ = reinterpret_cast<T*>(base);  // [kBlockM][128], later the output tile; then K, V
  const int b = blockIdx.y / p.num_kv_heads;
  const int kvh = blockIdx.y - b * p.num_kv_heads;
  if (p.cu_seqlens_q != nullptr && blockIdx.z == 0) {  // varlen bookkeeping, by split 0, before
                                                       // the tile (nothing stays live)
    if (blockIdx.x == 0) clear_outside_tokens<T>(p, b, kvh, threadIdx.x);
    if (blockIdx.x == gridDim.x - 1) {
      mark_uncovered_rows<T>(p, seq_slice(p, b), kvh, gridDim.x * kBlockM, threadIdx.x);
    }
  }
  const int row0 = blockIdx.x * kBlockM;
  const int rows = seq_slice(p, b).rows;
  if (row0 < rows) {
    if constexpr (!kWgmma) {
      if (rows - row0 <= kSplitKeysMaxRows) {  // decode: one warp's rows, the keys split (step 3)
        attention_tile<T, false, true, false>(p, sQ, b, kvh, blockIdx.z, row0, threadIdx.x);
        return;
      }
    }
    if constexpr (kWgmma && !kWgmmaInThisPass) {
      __trap();  // never launched: the host runs the wgmma kernels on sm_90 only (mainloop_choice.h)
    } else {
      attention_tile<T, kWgmma, false, kOverlap>(p, sQ, b, kvh, blockIdx.z, row0, threadIdx.x);
    }
  }
}

// Dynamic shared memory of a mainloop's kernel.
template <bool kWgmma, bool kOverlap = false>
constexpr int smem_bytes() {
  return kOverlap ? kSmemAllocOverlap : kWgmma ? kSmemAllocWgmma : kSmemBytes;
}

// Launches the forward kernel on grid (row_tiles(p), B * Hkv, p.num_splits). When
// p.num_splits > 1 and not p.cluster_combine, p.partial_o / p.partial_lse must hold num_splits *
// Hkv * total_q * group rows and p.split_flags row_tiles(p) * B * Hkv * num_splits slots, none
// equal to p.split_tag. 1 <= num_splits <= kMaxSplits (the combine's registers hold that many
// splits' lse; plan_splits never asks for more), and with p.cluster_combine 2 <= num_splits <=
// kMaxClusterSize: cudaErrorInvalidValue otherwise, nothing launched. p.cluster_combine only on
// sm_90 devices, where attention_resident_clusters(num_splits) is not 0.
// kWgmma (and kOverlap) only on sm_90 devices with sm_90a code in the build.
template <typename T, bool kWgmma, bool kOverlap = false>
cudaError_t launch_attention(const Params& p, cudaStream_t stream) {
  static_assert(kWgmma || !kOverlap, "the overlapped loop is a Hopper (wgmma) loop");
  constexpr auto kernel = attention_fwd_kernel<T, kWgmma, kOverlap>;
  constexpr int kSmem = smem_bytes<kWgmma, kOverlap>();
  if (p.num_splits < 1 || p.num_splits > kMaxSplits) return cudaErrorInvalidValue;
  if (p.cluster_combine && (p.num_splits < 2 || p.num_splits > kMaxClusterSize)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.total_q == 0) return cudaSuccess;
  cudaError_t err = allow_dynamic_smem<kernel>(kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(row_tiles(p), p.batch * p.num_kv_heads, p.num_splits);
  if (p.cluster_combine) {  // the splits of a (row tile, b, kv head): one cluster
    err = launch_kernel_cluster(p.pdl, dim3(1, 1, p.num_splits), kernel, grid, dim3(kThreads),
                                kSmem, stream, p);
  } else {
    err = launch_kernel(p.pdl, kernel, grid, dim3(kThreads), kSmem, stream, p);
  }
  return err == cudaSuccess ? cudaGetLastError() : err;
}

// f.template operator()<kWgmma, kOverlap>() for the loop a call runs (kOverlap only with kWgmma):
// the glue's and the emulator runner's one dispatch onto the kernel's instantiations.
template <typename F>
decltype(auto) with_loop(bool wgmma, bool overlap, F&& f) {
  if (!wgmma) return f.template operator()<false, false>();
  return overlap ? f.template operator()<true, true>() : f.template operator()<true, false>();
}

// How many clusters of `num_splits` CTAs of the forward kernel (the splits of one (row tile, b, kv
// head)) can be resident at once on the current device, 0 if none (for p.cluster_combine; the
// caller knows it is sm_90).
template <typename T, bool kWgmma, bool kOverlap = false>
int attention_resident_clusters(int num_splits) {
  constexpr auto kernel = attention_fwd_kernel<T, kWgmma, kOverlap>;
  constexpr int kSmem = smem_bytes<kWgmma, kOverlap>();
  return allow_dynamic_smem<kernel>(kSmem) == cudaSuccess ? resident_clusters<kernel>(num_splits, kThreads, kSmem)
                                                         : 0;
}

}  // namespace qwen3x::attn
