// Grouped expert GEMM of the MoE experts: one launch covers every expert.
// A CTA owns one BLOCK_M row tile of one expert's segment (tile_scheduler.cuh)
// and one column tile, and computes
//
//   C[tile rows, tile cols] = A[rows, K] x W_e[cols, K]^T      (fp32 accumulate)
//
//   kGateUp (GEMM1): A row r = hidden_states[sorted_rows[r] / k] (the gather
//     happens in the A loads: no permuted copy of the activations), W_e =
//     gate_up_proj[e] ([2I, H]); the epilogue writes act[r] = silu(g) * u
//     (gemm_epilogue.cuh). A tile computes BLOCK_N / 2 gate columns [n, n +
//     BLOCK_N / 2) and the same up columns [I + n, ...): each warp's kWarpN
//     weight rows are its kWarpN / 2 gate rows then the matching up rows, so
//     n8 tile i (gate) and n8 tile i + kMmaN / 2 (up) of a warp hold the same
//     output columns in the same lanes and SwiGLU needs no data exchange.
//   kDown (GEMM2): A row r = act[r], W_e = down_proj[e] ([H, I]); the
//     epilogue writes y[sorted_rows[r]] = round(round(acc) * route weight),
//     and with combine_counters set, the CTA completing a token's column tile
//     also writes its combined output (at decode: one launch fewer).
//
// Padding slots (sorted_rows = -1) are zero-filled by the copies (no global
// read) and skipped by the epilogues, so act rows of padding slots are never
// written nor read.
//
// Mainloop: operand tiles [rows][kBlockK = 64] in shared memory, 128 bytes
// per row = 8 chunks of 16 bytes, chunk c of row r stored at chunk c ^ (r % 8)
// (the 8 rows an ldmatrix phase reads hit 8 distinct 16-byte bank groups;
// a cp.async pass writes whole rows). kStages-deep cp.async pipeline, one
// __syncthreads per k step: wait for stage kt, barrier, refill the slot that
// step kt - 1 consumed, compute stage kt. Fragments come from ldmatrix.x4:
//   A (row-major 16x16 at rows m0..m0+15, k step kk): lane -> row m0 + lane % 8
//     + 8 ((lane / 8) % 2), chunk 2 kk + lane / 16 -> a0..a3 of mma.m16n8k16
//   B (W rows n0..n0+15 = two n8 tiles): lane -> row n0 + lane % 8 + 8 (lane / 16),
//     chunk 2 kk + (lane / 8) % 2 -> {b0, b1} of tile n0 / 8, then of the next
// (W is [N, K] with K contiguous, i.e. the "col" B operand without .trans.)
// Every row base is a multiple of 8, so a lane's swizzle term is lane % 8.
//
// The kWgmma mainloop (Hopper, gemm_config.h) keeps the loads, the barrier
// schedule and the epilogues, and replaces the ldmatrix / mma.sync k steps:
// this swizzled layout is wgmma's K-major 128-byte-swizzle layout once the
// stages start on 1024-byte boundaries, so warpgroup g issues, per k16 step,
// one wgmma.m64n128k16 on A rows [64 g, 64 g + 64) and all 128 B rows
// straight from shared memory, issues the refill copies while they run, and
// waits for its wgmmas before the next barrier (so the slot the next refill
// overwrites is no longer read). Each thread fences its landed copies into
// the async proxy before the barrier.
//
// Torch-free: a params struct of raw pointers, sizes and element strides;
// the glue is moe.cu, the pipeline launcher experts.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mma.cuh"
#include "core/pdl.cuh"
#include "core/wgmma.cuh"
#include "moe/gemm_config.h"
#include "moe/gemm_epilogue.cuh"
#include "moe/tile_scheduler.cuh"

namespace qwen3x::moe {

enum class GemmKind { kGateUp, kDown };

template <typename T>
struct ExpertGemmParams {
  const T* a;                 // kGateUp: hidden_states [T, K]; kDown: act [row_tiles * BLOCK_M, K]
  int64_t a_stride;           // elements between rows of a (a multiple of 8)
  const T* w;                 // [E, n_w, K]: gate_up_proj (n_w = 2 n_out) / down_proj (n_out)
  int64_t w_expert_stride;    // elements between experts of w
  int64_t w_row_stride;       // elements between rows of w (a multiple of 8)
  T* out;                     // kGateUp: act [row_tiles * BLOCK_M, n_out]; kDown: y [T * k, n_out]
  int64_t out_stride;         // elements between rows of out
  const int* sorted_rows;     // [num_slots]: flat pick t * k + j per slot, -1 for padding
  const int* expert_offsets;  // [E + 1]: padded segment starts, multiples of BLOCK_M
  const T* route_weights;     // [T * k] routing weights in T (kDown), nullptr (kGateUp)
  int num_experts;            // E
  int top_k;                  // k
  int k_dim;                  // K: H (kGateUp) or I (kDown), a multiple of kBlockK
  int n_out;                  // output width: I (kGateUp) or H (kDown)
  bool proxy_fence;           // kWgmma: fence.proxy.async after each stage lands
  // kDown with the combine fused (gemm_epilogue.cuh epilogue_combine), else nullptr:
  int* combine_counters;      // [T, column tiles] arrival counters, each token's dropped picks at launch
  const int* combine_inverse;  // [T * k]: slot of each pick, -1 = dropped
  T* combine_out;             // [T, n_out] contiguous: the combined output
  bool pdl;                   // host: launch with programmatic dependent launch (core/pdl.cuh)
};

namespace gemm_detail {

// Element offset of (row, chunk) in a [rows][kBlockK] swizzled tile.
__host__ __device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kGemmBlockK + ((chunk ^ (row % kGemmSwizzleRows)) * (kGemmChunkBytes / 2));
}

// Row of W_e that row `r` of the B tile of column tile `col_tile` holds.
template <typename Cfg, GemmKind kKind>
__device__ __forceinline__ int weight_row(int r, int col_tile, int n_out) {
  if constexpr (kKind == GemmKind::kGateUp) {
    constexpr int kHalf = Cfg::kWarpN / 2;  // gate (or up) rows per warp
    const int warp_col = r / Cfg::kWarpN;
    const int within = r % Cfg::kWarpN;
    const int is_up = within / kHalf;
    return is_up * n_out + col_tile * (Cfg::kBlockN / 2) + warp_col * kHalf + within % kHalf;
  } else {
    return col_tile * Cfg::kBlockN + r;
  }
}

// The Hopper k loop: per k tile, wait for its copies, fence them into the async
// proxy, barrier, one wgmma.m64n128k16 per warpgroup per k16 step straight from
// shared memory, the refill of the slot step kt - 1 read while they run, then
// wait for them (the next barrier frees this slot for refilling).
template <typename T, typename Cfg, typename LoadStage>
__device__ __forceinline__ void mainloop_wgmma(float (&acc)[Cfg::kMmaM][Cfg::kMmaN][4],
                                               uint32_t smem_base, int k_tiles,
                                               const LoadStage& load_stage, int warp,
                                               bool proxy_fence) {
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  constexpr uint32_t kBOffsetBytes = Cfg::kBlockM * kBlockK * 2;
  static_assert(Cfg::kMmaM == 1 && Cfg::kMmaN * 8 == kWgmmaN, "acc = one warpgroup's 64 registers");
  float(&d)[kWgmmaN / 2] = reinterpret_cast<float(&)[kWgmmaN / 2]>(acc);
  const uint32_t a_group_offset = (warp / kWgmmaWarps) * kWgmmaRows * kBlockK * 2;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    if (proxy_fence) fence_proxy_async();  // this thread's copies of stage kt, to the async proxy
    __syncthreads();      // stage kt complete; every warpgroup done with kt - 1

    const uint32_t sA = smem_base + (kt % Cfg::kStages) * kStageBytes;
    const uint32_t sB = sA + kBOffsetBytes;
    wgmma_fence_operands(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      wgmma_ss<T, kWgmmaN>(d, wgmma_desc_sw128(sA + a_group_offset + kk * kWgmmaStepBytes),
                           wgmma_desc_sw128(sB + kk * kWgmmaStepBytes));
    }
    wgmma_commit();
    // While the tensor cores work: refill the slot step kt - 1 read (its wgmmas
    // completed before this step's barrier).
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();
    wgmma_wait<0>();  // before the next barrier: the slot kt reads is refilled at kt + 1
    wgmma_fence_operands(d);
  }
}

// The sm_80 k loop: per k tile, wait for its copies, barrier, refill the slot
// step kt - 1 read, then ldmatrix fragments and mma.sync per k16 step.
template <typename T, typename Cfg, typename LoadStage>
__device__ __forceinline__ void mainloop_mma_sync(float (&acc)[Cfg::kMmaM][Cfg::kMmaN][4],
                                                  uint32_t smem_base, int k_tiles,
                                                  const LoadStage& load_stage, int warp_m,
                                                  int warp_n, int lane) {
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kChunkElems = kGemmChunkBytes / 2;
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  constexpr uint32_t kBOffsetBytes = Cfg::kBlockM * kBlockK * 2;
  // ldmatrix lane addresses (before the k step and m/n tile offsets).
  const int swz = lane % kGemmSwizzleRows;
  const int a_row = warp_m * Cfg::kWarpM + lane % 8 + 8 * ((lane / 8) % 2);
  const int a_chunk = lane / 16;
  const int b_row = warp_n * Cfg::kWarpN + lane % 8 + 8 * (lane / 16);
  const int b_chunk = (lane / 8) % 2;

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // stage kt visible to all; slot (kt - 1) % kStages free
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const uint32_t sA = smem_base + (kt % Cfg::kStages) * kStageBytes;
    const uint32_t sB = sA + kBOffsetBytes;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t a[Cfg::kMmaM][4];
#pragma unroll
      for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
        const int row = a_row + mi * 16;
        ldmatrix_x4(a[mi], sA + (row * kBlockK + (((2 * kk + a_chunk) ^ swz) * kChunkElems)) * 2);
      }
      uint32_t b[Cfg::kMmaN][2];
#pragma unroll
      for (int np = 0; np < Cfg::kMmaN / 2; ++np) {
        const int row = b_row + np * 16;
        uint32_t r[4];
        ldmatrix_x4(r, sB + (row * kBlockK + (((2 * kk + b_chunk) ^ swz) * kChunkElems)) * 2);
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
          mma_16816<T>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
        }
      }
    }
  }
}

}  // namespace gemm_detail

template <typename T, typename Cfg, GemmKind kKind>
__global__ void __launch_bounds__(Cfg::kThreads)
moe_expert_gemm_kernel(const ExpertGemmParams<T> p) {
  // Programmatic dependent launch (core/pdl.cuh). GEMM1 waits first: its permutation may be the
  // previous kernel's output. GEMM2 always follows GEMM1, whose CTAs all waited for everything
  // before GEMM1 at their start, and GEMM2 is launched only once every GEMM1 CTA is past that
  // wait: the permutation and the routing weights are final when GEMM2 starts; only act (GEMM1's
  // output) is not. So GEMM2 reads its tile (through L2: this SM's L1 is not coherent) and issues
  // its first stages' weight copies before waiting, overlapping GEMM1's tail, and writes nothing
  // before the wait. Without PDL the wait returns at once.
  constexpr bool kEarly = kKind == GemmKind::kDown;
  if constexpr (!kEarly) {
    pdl_wait();
    pdl_launch_dependents();
  }
  using namespace gemm_detail;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kChunkElems = kGemmChunkBytes / 2;
  // kStages x {A [kBlockM][64], B [kBlockN][64]}, swizzled (kWgmma: from the
  // first 1024-byte boundary of the allocation)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int s_expert;
  __shared__ int s_picks[kBlockM];
  __shared__ float s_route[kBlockM];
  __shared__ int s_last[kKind == GemmKind::kDown ? kBlockM : 1];  // epilogue_combine's scratch

  const RowTile tile = schedule_row_tile<kBlockM, Cfg::kThreads>(
      &s_expert, s_picks, s_route, p.sorted_rows, p.expert_offsets,
      kKind == GemmKind::kDown ? p.route_weights : static_cast<const T*>(nullptr), p.num_experts,
      /*through_l2=*/kEarly);
  if (tile.expert < 0) {
    if constexpr (kEarly) pdl_wait();  // this grid completes after GEMM1, whichever CTAs work
    return;
  }

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const int col_tile = blockIdx.y;

  // ---- Copy sources: thread copies chunk `chunk` of rows load_row + i * kRowsPerPass.
  const int chunk = tid % Cfg::kChunksPerRow;
  const int load_row = tid / Cfg::kChunksPerRow;
  const T* a_src[Cfg::kALoads];
  bool a_valid[Cfg::kALoads];
#pragma unroll
  for (int i = 0; i < Cfg::kALoads; ++i) {
    const int r = load_row + i * Cfg::kRowsPerPass;
    const int pick = s_picks[r];
    a_valid[i] = pick >= 0;
    int64_t src_row = 0;  // padding: nothing is read, the address stays valid
    if (a_valid[i]) src_row = kKind == GemmKind::kGateUp ? pick / p.top_k : tile.row0 + r;
    a_src[i] = p.a + src_row * p.a_stride + chunk * kChunkElems;
  }
  const T* w_expert = p.w + static_cast<int64_t>(tile.expert) * p.w_expert_stride;
  const T* b_src[Cfg::kBLoads];
#pragma unroll
  for (int i = 0; i < Cfg::kBLoads; ++i) {
    const int r = load_row + i * Cfg::kRowsPerPass;
    b_src[i] = w_expert + static_cast<int64_t>(weight_row<Cfg, kKind>(r, col_tile, p.n_out)) *
                              p.w_row_stride +
               chunk * kChunkElems;
  }
  // Passes start on multiples of 8 rows: one swizzled offset per thread.
  const int store_offset = swizzled(load_row, chunk);
  constexpr int kPassElems = Cfg::kRowsPerPass * kBlockK;
  uint32_t smem_base = smem_u32(smem_raw);
  if constexpr (Cfg::kWgmma) {
    smem_base = round_up<uint32_t>(smem_base, kWgmmaAtomBytes);
  }
  constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
  constexpr uint32_t kBOffsetBytes = kBlockM * kBlockK * 2;

  auto load_a = [&](int stage, int k_tile) {
    const uint32_t sA = smem_base + stage * kStageBytes;
    const int k0 = k_tile * kBlockK;
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      cp_async_16(sA + (store_offset + i * kPassElems) * 2, a_src[i] + k0, a_valid[i]);
    }
  };
  auto load_b = [&](int stage, int k_tile) {
    const uint32_t sB = smem_base + stage * kStageBytes + kBOffsetBytes;
    const int k0 = k_tile * kBlockK;
#pragma unroll
    for (int i = 0; i < Cfg::kBLoads; ++i) {
      cp_async_16(sB + (store_offset + i * kPassElems) * 2, b_src[i] + k0, true);
    }
  };
  auto load_stage = [&](int stage, int k_tile) {
    load_a(stage, k_tile);
    load_b(stage, k_tile);
  };

  float acc[Cfg::kMmaM][Cfg::kMmaN][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMmaM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < Cfg::kMmaN; ++ni) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;
    }
  }

  // Prologue: stages 0 .. kStages - 2, one commit group each. GEMM2 issues their weights before
  // its wait, uncommitted, so the first group holds them all (the mainloop's first wait covers
  // them) and each group then adds its stage's rows of act.
  const int k_tiles = p.k_dim / kBlockK;
  if constexpr (kEarly) {
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) {
      if (s < k_tiles) load_b(s, s);
    }
    pdl_wait();  // act, GEMM1's output, from here on
    pdl_launch_dependents();
  }
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) {
      if constexpr (kEarly) {
        load_a(s, s);
      } else {
        load_stage(s, s);
      }
    }
    cp_async_commit();
  }

  if constexpr (Cfg::kWgmma) {
    mainloop_wgmma<T, Cfg>(acc, smem_base, k_tiles, load_stage, warp, p.proxy_fence);
  } else {
    mainloop_mma_sync<T, Cfg>(acc, smem_base, k_tiles, load_stage, warp_m, warp_n, lane);
  }
  cp_async_wait<0>();  // only empty groups remain; leave nothing in flight

  if constexpr (kKind == GemmKind::kGateUp) {
    epilogue_swiglu<T, Cfg>(acc, p.out, p.out_stride, s_picks, tile.row0,
                            col_tile * (Cfg::kBlockN / 2), warp_m, warp_n, lane);
  } else {
    epilogue_weighted<T, Cfg>(acc, p.out, p.out_stride, s_picks, s_route,
                              col_tile * Cfg::kBlockN, warp_m, warp_n, lane);
    if (p.combine_counters != nullptr) {
      epilogue_combine<T, Cfg>(p.combine_out, p.out, p.out_stride, p.combine_counters,
                               p.combine_inverse, s_picks, s_last, col_tile,
                               static_cast<int>(gridDim.y), p.n_out, p.top_k, tid);
    }
  }
}

// Column tiles of a GEMM (grid.y).
template <typename Cfg, GemmKind kKind>
inline int gemm_col_tiles(int n_out) {
  return kKind == GemmKind::kGateUp ? n_out / (Cfg::kBlockN / 2) : n_out / Cfg::kBlockN;
}

// Launch over grid (row_tiles, column tiles). Preconditions (glue): K a
// multiple of kBlockK, n_out a multiple of the column tile, strides multiples
// of 8 elements and pointers 16-byte aligned, row_tiles = max_row_tiles(...)
// of the permutation made with row_align = Cfg::kBlockM. Returns the error of
// raising the shared-memory limit or of a PDL launch; the caller also checks
// cudaGetLastError().
template <typename T, typename Cfg, GemmKind kKind>
cudaError_t launch_moe_expert_gemm(const ExpertGemmParams<T>& p, int64_t row_tiles,
                                   cudaStream_t stream) {
  constexpr int kDefaultSmemLimit = 48 * 1024;
  auto* kernel = moe_expert_gemm_kernel<T, Cfg, kKind>;
  if constexpr (Cfg::kSmemAllocBytes > kDefaultSmemLimit) {
    const cudaError_t err =
        allow_dynamic_smem<moe_expert_gemm_kernel<T, Cfg, kKind>>(Cfg::kSmemAllocBytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(gemm_col_tiles<Cfg, kKind>(p.n_out)));
  return launch_kernel(p.pdl, kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemAllocBytes, stream, p);
}

}  // namespace qwen3x::moe
