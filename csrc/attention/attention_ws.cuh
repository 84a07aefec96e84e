// Warp-specialized Hopper attention forward for prefill (sm_90a): an A/B
// candidate for the kWgmma path of attention_fwd.cuh, selected by
// QWEN3X_ATTENTION_WS=1 or =pingpong (attention.cu). Same math, numerics, row packing,
// masks, varlen and epilogue; only the CTA's shape and its synchronization
// differ. benchmarks/NOTES.md ("Prefill attention against cuDNN") says why and
// what it must measure to replace the other.
//
// CTA = two consumer warpgroups + a producer warpgroup (kWsThreads = 384):
//   consumer g (warps 4g .. 4g + 3) owns packed rows row0 + 64 g .. + 63: its
//     Q tile, S = Q K^T and O += P V by wgmma (mainloop.cuh), online softmax,
//     its own epilogue; it never issues a K/V load. Per key tile t it issues one
//     wgmma group, P V of tile t - 1 and Q K^T of tile t, then runs the softmax
//     of tile t. Without kPingPong the consumers never meet, so they drift apart
//     and one's softmax runs beside the other's wgmma by chance (as two CTAs per
//     SM do in the 64-row kernel); with it (=pingpong) they take turns issuing
//     their groups, TURN(g) barriers of 256 threads, so that they must.
//   producer (warpgroup 2) gives back registers (setmaxnreg) for the consumers to
//     take; then its first warp (warp 8) streams the CTA's K/V tiles into
//     kWsStages stages with cp.async and hands each over with named barriers
//     (core/warp_specialization.cuh), and its other three warps exit:
//       FULL(stage, g)  160 threads: the producer arrives once tile t's copies
//                       have landed and been fenced for the async proxy;
//                       consumer g syncs before its wgmma read the stage.
//       EMPTY(stage)    288 threads: both consumers arrive after their P V of
//                       the stage has completed; the producer syncs before it
//                       refills the stage.
//     The producer waits for EMPTY of tile t - 1 only after it has published
//     tile t (and tile t + 1 is in flight), so a consumer finishing a tile
//     finds the next one ready.
// Against the 64-row kernel: each K/V tile serves 128 rows (half the L2->SM
// traffic and half the cp.async instructions per FLOP), three stages in
// flight instead of one prefetch, no CTA-wide barrier in the loop; one CTA
// per SM (128 KB of shared memory). Registers: 384 threads leave the launch
// bounds 168 a thread (core/warp_specialization.cuh), the consumers' loop needs
// more (Q in registers, as in the 64-row kernel; 174 in the first build): the
// producer drops to kWsProducerRegs, the consumers rise to kWsConsumerRegs.
//
// Not here: split-KV (prefill grids fill the GPU; the host keeps the 64-row
// kernel where the plan would split) and the decode split-keys path.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention/epilogue.cuh"
#include "attention/kernel_traits.cuh"
#include "attention/mainloop.cuh"
#include "attention/softmax.cuh"
#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mma.cuh"
#include "core/pdl.cuh"
#include "core/warp_specialization.cuh"
#include "core/wgmma.cuh"

namespace qwen3x::attn {

// ---- tuning knobs -------------------------------------------------------------------------
constexpr int kWsConsumers = 2;  // consumer warpgroups, kBlockM rows each
constexpr int kWsStages = 3;     // K/V stages in shared memory

// ---- derived constants --------------------------------------------------------------------
constexpr int kWsBlockM = kWsConsumers * kBlockM;                   // 128 packed rows per CTA
constexpr int kWsConsumerThreads = kWsConsumers * kThreads;         // 256
constexpr int kWsThreads = kWsConsumerThreads + kThreads;           // 384: + the producer warpgroup
constexpr int kWsLaunchRegs = 168;    // what __launch_bounds__(384, 1) leaves a thread (3 warps per
                                      // scheduler: 3 x 168 x 32 <= 16384, the scheduler's file)
constexpr int kWsProducerRegs = 40;   // setmaxnreg of the producer warpgroup
constexpr int kWsConsumerRegs = 232;  // setmaxnreg of each consumer warpgroup
constexpr int kWsTileKVBytes = kTileKVElems * kElemBytes;           // 16 KB: one K or V tile
constexpr int kWsSmemBytes =
    kWsBlockM * kHeadDim * kElemBytes + 2 * kWsStages * kWsTileKVBytes;  // 32 + 96 = 128 KB
constexpr int kWsSmemAlloc = kWsSmemBytes + kWgmmaAtomBytes;        // room to align the base
// Named barrier ids (0 is __syncthreads'): FULL(s, g), EMPTY(s), a consumer's own, TURN(g).
constexpr int kBarFull = 1;
constexpr int kBarEmpty = kBarFull + kWsStages * kWsConsumers;      // 7
constexpr int kBarConsumer = kBarEmpty + kWsStages;                 // 10
constexpr int kBarTurn = kBarConsumer + kWsConsumers;               // 12: TURN(g), kPingPong
constexpr int kFullThreads = kThreads + kWarpSize;                  // a consumer + the loading warp
constexpr int kEmptyThreads = kWsConsumerThreads + kWarpSize;       // both consumers + that warp
constexpr int kTurnThreads = kWsConsumerThreads;                    // both consumers

static_assert(kBarTurn + kWsConsumers <= 16, "a CTA has 16 named barriers");
static_assert(kWsConsumers == 2, "the ping-pong order is written for two consumers");
static_assert(kWsProducerRegs + kWsConsumers * kWsConsumerRegs <= (kWsConsumers + 1) * kWsLaunchRegs,
              "the consumers take no more registers than the producer gives back");
static_assert(kWsStages >= 2, "the producer publishes tile t before it waits to refill t - 1");
static_assert(kWsSmemAlloc <= 227 * 1024, "must fit sm_90's 227 KB per CTA");
static_assert(kBlockN % kSwizzleRows == 0 && kChunksPerRow % (kWarpSize / kSwizzleRows) == 0,
              "the producer's lanes cover whole tiles");

__device__ __forceinline__ int full_barrier(int stage, int consumer) {
  return kBarFull + stage * kWsConsumers + consumer;
}
__device__ __forceinline__ int empty_barrier(int stage) { return kBarEmpty + stage; }
__device__ __forceinline__ int turn_barrier(int consumer) { return kBarTurn + consumer; }

// The loading warp's copies of one K (or V) tile into the Hopper layout: lane l copies chunks
// l / 8 + 4 c (c < 4) of rows l % 8 + 8 j (j < 8). A lane keeps one row % 8, so its swizzle
// term is fixed and its destinations are 4 offsets plus multiples of 8 rows; the 8 lanes of a
// quarter warp write one logical chunk of 8 consecutive rows: 8 distinct bank groups.
template <typename T>
struct WarpTileLoader {
  static constexpr int kChunkSteps = kChunksPerRow / (kWarpSize / kSwizzleRows);  // 4
  static constexpr int kRowSteps = kBlockN / kSwizzleRows;                        // 8
  static constexpr uint32_t kRowStepBytes =
      (wgmma_offset(kSwizzleRows, 0, kBlockN) - wgmma_offset(0, 0, kBlockN)) * kElemBytes;

  const T* src;        // this lane's first chunk of its first row in the current tile
  const T* fallback;   // the same chunk of key 0: the (never read) source of zero-filled rows
  int64_t row_step;    // elements between rows 8 apart
  int64_t tile_step;   // elements between tiles
  int first_key;       // key of the lane's first row in the current tile
  int lane;

  __device__ __forceinline__ void init(const T* head,  // [Skv, 128] rows seq_stride apart
                                       int64_t seq_stride, int lane_) {
    lane = lane_;
    first_key = lane % kSwizzleRows;
    src = head + first_key * seq_stride + (lane / kSwizzleRows) * kChunkElems;
    fallback = head + (lane / kSwizzleRows) * kChunkElems;
    row_step = kSwizzleRows * seq_stride;
    tile_step = kBlockN * seq_stride;
  }

  // Copies the current tile to the tile at shared address tile_base; keys >= seqlen_k are
  // zero-filled (nothing read). A row step at a time, not unrolled: the producer runs on
  // kWsProducerRegs registers, and 64 precomputed addresses would not fit.
  __device__ __forceinline__ void load(uint32_t tile_base, int seqlen_k) const {
    const int row = lane % kSwizzleRows;
    uint32_t dst = tile_base + wgmma_offset(row, lane / kSwizzleRows, kBlockN) * kElemBytes;
    const T* row_src = src;
#pragma unroll 1
    for (int j = 0; j < kRowSteps; ++j) {
      const bool in_range = first_key + j * kSwizzleRows < seqlen_k;
      const T* from = in_range ? row_src : fallback;
#pragma unroll
      for (int c = 0; c < kChunkSteps; ++c) {
        // chunk lane / 8 + 4 c: the xor with row % 8 touches its low 3 bits only, so its offset
        // from chunk lane / 8 is that of the 4 c (in the same half: + 4 c chunks, or the next)
        const int chunk = lane / kSwizzleRows + c * (kWarpSize / kSwizzleRows);
        const uint32_t offset = (wgmma_offset(row, chunk, kBlockN) -
                                 wgmma_offset(row, lane / kSwizzleRows, kBlockN)) * kElemBytes;
        cp_async_16(dst + offset, from + c * (kWarpSize / kSwizzleRows) * kChunkElems, in_range);
      }
      row_src += row_step;
      dst += kRowStepBytes;
    }
  }

  __device__ __forceinline__ void advance() {
    src += tile_step;
    first_key += kBlockN;
  }
};

// The producer's loading warp: tiles 0 .. num_tiles - 1 of the kv head into stages t % kWsStages.
template <typename T>
__device__ __forceinline__ void produce_kv(const Params& p, const SeqSlice& seq, int kvh,
                                           uint32_t sK,  // [kWsStages][kBlockN][128] Hopper layout
                                           uint32_t sV,  // [kWsStages][kBlockN][128] Hopper layout
                                           int num_tiles, int lane) {
  WarpTileLoader<T> k_loader, v_loader;
  k_loader.init(static_cast<const T*>(p.k) + seq.k_offset + kvh * p.k_head_stride, p.k_seq_stride,
                lane);
  v_loader.init(static_cast<const T*>(p.v) + seq.v_offset + kvh * p.v_head_stride, p.v_seq_stride,
                lane);
  const auto load_tile = [&](int stage) {
    k_loader.load(sK + stage * kWsTileKVBytes, seq.seqlen_k);
    v_loader.load(sV + stage * kWsTileKVBytes, seq.seqlen_k);
    k_loader.advance();
    v_loader.advance();
  };
  // Prologue: tiles 0 .. kWsStages - 2, one commit group each (empty past the last tile).
#pragma unroll
  for (int t = 0; t < kWsStages - 1; ++t) {
    if (t < num_tiles) load_tile(t);
    cp_async_commit();
  }
  // Step t: groups in flight are tiles t .. t + kWsStages - 2.
  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<kWsStages - 2>();          // tile t has landed (this lane's copies)
    if (p.proxy_fence) fence_proxy_async();  // ... and is visible to wgmma's proxy
#pragma unroll
    for (int g = 0; g < kWsConsumers; ++g) {
      named_barrier_arrive(full_barrier(t % kWsStages, g), kFullThreads);
    }
    const int next = t + kWsStages - 1;
    if (next < num_tiles) {
      // Its stage held tile next - kWsStages = t - 1 (none for the first fill).
      if (next >= kWsStages) named_barrier_sync(empty_barrier(next % kWsStages), kEmptyThreads);
      load_tile(next % kWsStages);
    }
    cp_async_commit();
  }
}

// One consumer block's wgmma group: O += P V (kPv, V of the previous tile) and S = Q K^T (kQk, K
// of this tile), fenced, issued and committed; wait_block waits for it.
template <typename T, bool kPv, bool kQk>
__device__ __forceinline__ void issue_block(float (&o)[kHeadTilesN][4], float (&s)[kScoreTilesN][4],
                                            uint32_t (&qf)[kHeadStepsK][4], uint32_t (&pf)[kKeyStepsK][4],
                                            uint32_t sV, uint32_t sK) {
  float(&o_regs)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
  float(&s_regs)[kScoreTilesN * 4] = reinterpret_cast<float(&)[kScoreTilesN * 4]>(s);
  uint32_t(&q_regs)[kHeadStepsK * 4] = reinterpret_cast<uint32_t(&)[kHeadStepsK * 4]>(qf);
  uint32_t(&p_regs)[kKeyStepsK * 4] = reinterpret_cast<uint32_t(&)[kKeyStepsK * 4]>(pf);
  if constexpr (kQk) {
#pragma unroll
    for (int i = 0; i < kScoreTilesN * 4; ++i) s_regs[i] = 0.0f;
    wgmma_fence_operands(s_regs);
    wgmma_fence_operands(q_regs);
  }
  if constexpr (kPv) {
    wgmma_fence_operands(o_regs);
    wgmma_fence_operands(p_regs);  // P packed before the fence
  }
  wgmma_fence();
  if constexpr (kPv) issue_pv<T>(o, pf, sV);
  if constexpr (kQk) issue_qk<T>(s, qf, sK);
  wgmma_commit();
}

template <bool kPv, bool kQk>
__device__ __forceinline__ void wait_block(float (&o)[kHeadTilesN][4], float (&s)[kScoreTilesN][4]) {
  wgmma_wait<0>();
  if constexpr (kPv) wgmma_fence_operands(reinterpret_cast<float(&)[kHeadTilesN * 4]>(o));
  if constexpr (kQk) wgmma_fence_operands(reinterpret_cast<float(&)[kScoreTilesN * 4]>(s));
}

// Consumer warpgroup `consumer`: packed rows [row0, row0 + kBlockM) over the CTA's num_tiles
// key tiles (rows past the sequence compute on zero-filled Q and are never written; tiles past a
// row's causal limit are masked whole). tid: the thread's index in the warpgroup.
template <typename T, bool kPingPong>
__device__ __forceinline__ void consume_rows(const Params& p, const SeqSlice& seq, int b, int kvh,
                                             T* sQ,        // [kBlockM][128], this warpgroup's
                                             uint32_t sK,  // [kWsStages][kBlockN][128]
                                             uint32_t sV,  // [kWsStages][kBlockN][128]
                                             int row0, int num_tiles, int consumer, int tid) {
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int own_barrier = kBarConsumer + consumer;
  const int visible_last = all_visible_last(p, seq, row0);  // for every row of the warpgroup
  const bool has_mask = p.mask != nullptr;
  RowLimit limit[kRowHalves];
  row_limits(limit, p, seq, b, kvh, row0 + warp * kRowsPerWarp, lane);

  // Q: this warpgroup's rows, then into registers for every tile.
  const uint32_t sQ_addr = smem_u32(sQ);
  load_q_tile<T, true>(p, seq, sQ_addr, kvh, row0, tid);
  cp_async_commit();
  cp_async_wait<0>();
  named_barrier_sync(own_barrier, kThreads);
  uint32_t qf[kHeadStepsK][4];
  load_q_fragments<T, true>(qf, sQ_addr, warp, lane);

  float o[kHeadTilesN][4];
#pragma unroll
  for (int j = 0; j < kHeadTilesN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
  }
  OnlineSoftmax softmax;
  softmax.init();
  // Block t issues P V of tile t - 1 and Q K^T of tile t as one wgmma group (block 0: Q K^T
  // alone; block num_tiles: P V alone), then the softmax of tile t turns S into P for the next
  // block. The first and last blocks are their own code: a wgmma on a path that a runtime
  // condition may skip makes ptxas wait after every wgmma (its C7520). kPingPong: the two
  // consumers take turns issuing their blocks (TURN barriers), so that one's softmax runs while
  // the other's wgmma do; consumer 0 goes first.
  float s[kScoreTilesN][4];
  uint32_t pf[kKeyStepsK][4];
  const auto block = [&](int t, auto pv, auto qk) {  // pv, qk: std::bool_constant
    if constexpr (qk()) {
      named_barrier_sync(full_barrier(t % kWsStages, consumer), kFullThreads);
    }
    if constexpr (kPingPong) named_barrier_sync(turn_barrier(consumer), kTurnThreads);
    issue_block<T, pv(), qk()>(o, s, qf, pf,
                               sV + ((t + kWsStages - 1) % kWsStages) * kWsTileKVBytes,  // t - 1
                               sK + (t % kWsStages) * kWsTileKVBytes);
    if constexpr (kPingPong) {  // the other consumer's turn (consumer 1's last block has no next)
      if (consumer == 0 || qk()) named_barrier_arrive(turn_barrier(1 - consumer), kTurnThreads);
    }
    wait_block<pv(), qk()>(o, s);
    // Tile t - 1's stage is read; the producer refills it with tile t - 1 + kWsStages, if any.
    if constexpr (pv()) {
      if (t - 1 + kWsStages < num_tiles) {
        named_barrier_arrive(empty_barrier((t - 1) % kWsStages), kEmptyThreads);
      }
    }
    if constexpr (qk()) {
      const int key0 = t * kBlockN;
      scale_and_mask(s, p.scale_log2, has_mask || key0 + kBlockN - 1 > visible_last, limit, key0,
                     lane);
      softmax.update<T>(s, o, pf);
    }
  };
  if (num_tiles > 0) {
    if constexpr (kPingPong) {
      if (consumer == 1) named_barrier_arrive(turn_barrier(0), kTurnThreads);
    }
    block(0, std::false_type{}, std::true_type{});
    for (int t = 1; t < num_tiles; ++t) block(t, std::true_type{}, std::true_type{});
    block(num_tiles, std::true_type{}, std::false_type{});
  }

  float inv_l[kRowHalves], lse2[kRowHalves];
  softmax.finalize(inv_l, lse2);
  // Every warp of the warpgroup is past its ldmatrix of sQ (wgmma orders nothing across warps).
  named_barrier_sync(own_barrier, kThreads);
  write_output<T>(p, seq, sQ, o, inv_l, lse2, kvh, row0, warp, lane, tid,
                  [&] { named_barrier_sync(own_barrier, kThreads); });
}

// CTA (x, b * Hkv + kvh): packed rows x' * kWsBlockM .. + kWsBlockM - 1 of sequence b (x' = x, or
// gridDim.x - 1 - x when causal), every key tile up to the last row's causal limit.
template <typename T, bool kPingPong>
__global__ void __launch_bounds__(kWsThreads, 1)
attention_ws_kernel(const __grid_constant__ Params p) {
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  extern __shared__ __align__(128) unsigned char smem[];
  // wgmma tiles start on a 1024-byte swizzle atom
  unsigned char* base =
      smem + (round_up<uint32_t>(smem_u32(smem), kWgmmaAtomBytes) - smem_u32(smem));
  T* sQ = reinterpret_cast<T*>(base);  // [kWsConsumers][kBlockM][128], later the output tiles
  const uint32_t sK = smem_u32(sQ + kWsBlockM * kHeadDim);   // [kWsStages][kBlockN][128]
  const uint32_t sV = sK + kWsStages * kWsTileKVBytes;       // [kWsStages][kBlockN][128]
  const int b = blockIdx.y / p.num_kv_heads;
  const int kvh = blockIdx.y - b * p.num_kv_heads;
  const int tid = threadIdx.x;
  if (p.cu_seqlens_q != nullptr && tid < kThreads) {  // varlen bookkeeping, consumer 0 (before
                                                      // its tile: nothing stays live)
    if (blockIdx.x == 0) clear_outside_tokens<T>(p, b, kvh, tid);
    if (blockIdx.x == gridDim.x - 1) {
      mark_uncovered_rows<T>(p, seq_slice(p, b), kvh, gridDim.x * kWsBlockM, tid);
    }
  }
  const SeqSlice seq = seq_slice(p, b);
  // Causal: the last row tiles see the most keys; CTAs start in blockIdx order, so they take the
  // row tiles from the last down (longest first), and the grid's tail is its shortest CTAs.
  const int row_tile = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int row0 = row_tile * kWsBlockM;
  if (row0 >= seq.rows) return;  // the whole CTA, before any barrier
  int key_end = seq.seqlen_k;   // exclusive: the CTA's last row's causal limit
  if (p.causal) {
    const int s_last = (min(row0 + kWsBlockM, seq.rows) - 1) / p.group;
    key_end = max(0, min(key_end, s_last + seq.seqlen_k - seq.seqlen_q + 1));
  }
  const int num_tiles = ceil_div(key_end, kBlockN);
  if (tid >= kWsConsumerThreads) {
    set_max_registers<kWsProducerRegs, false>();
    if (tid < kWsConsumerThreads + kWarpSize) {  // the loading warp; the other three exit
      produce_kv<T>(p, seq, kvh, sK, sV, num_tiles, tid % kWarpSize);
    }
  } else {
    set_max_registers<kWsConsumerRegs, true>();
    const int consumer = tid / kThreads;
    consume_rows<T, kPingPong>(p, seq, b, kvh, sQ + consumer * kTileQElems, sK, sV,
                               row0 + consumer * kBlockM, num_tiles, consumer, tid % kThreads);
  }
}

// Launches the warp-specialized kernel on grid (row_tiles(p, kWsBlockM), B * Hkv). Requires
// p.num_splits == 1; sm_90 devices with sm_90a code in the build only.
template <typename T, bool kPingPong>
cudaError_t launch_attention_ws(const Params& p, cudaStream_t stream) {
  if (p.batch == 0 || p.total_q == 0) return cudaSuccess;
  cudaError_t err = allow_dynamic_smem<attention_ws_kernel<T, kPingPong>>(kWsSmemAlloc);
  if (err != cudaSuccess) return err;
  const dim3 grid(row_tiles(p, kWsBlockM), p.batch * p.num_kv_heads, 1);
  err = launch_kernel(p.pdl, attention_ws_kernel<T, kPingPong>, grid, dim3(kWsThreads),
                      kWsSmemAlloc, stream, p);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace qwen3x::attn
