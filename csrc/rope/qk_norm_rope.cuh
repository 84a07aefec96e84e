// Fused per-head RMSNorm (q_norm / k_norm) + rotary embedding for Qwen3
// attention, applied to q and k heads in a single launch.
//
// For every head x (head_dim 128) of token t, with w = q_weight or k_weight:
//   rstd  = rsqrt(mean(float(x)^2) + eps)                  (fp32)
//   n[i]  = T(w[i] * T(float(x[i]) * rstd))                 (HF's q_norm / k_norm
//           exactly: normalized value and weight product each rounded to T)
//   angle = float(pos[t]) * inv_freq[i % 64]                (fp32, as HF)
//   c, s  = cosf(angle) * attention_scaling, sinf(angle) * attention_scaling
//   out[i]      = n[i] * c - n[i + 64] * s                  (i < 64)
//   out[i + 64] = n[i + 64] * c + n[i] * s                  (NeoX rotate_half)
//   in fp32, rounded to T once at the end (HF rounds cos, sin and each product
//   and sum to T: this is the more accurate of the two).
// sin/cos are accurate (core/trig.cuh, ~1 ulp, not __sincosf): angles reach
// ~1.3e5 rad at 131k positions, where the fast intrinsic loses all accuracy,
// and libdevice's sincosf would put its slow path's array on the stack.
//
// Why it is shaped this way (memory bound; a head is 256 bytes in bf16/fp16). On the H100 the
// first version ran at 53-67% of the copy ceiling with ~1,340 instructions per warp: close to
// instruction bound, so this one is shaped to issue fewer.
// - Each lane holds a rotation pair: a 16-byte vector of the first half (elements e .. e+kVec-1,
//   e < 64) and the vector 64 elements on (its rotate_half partners). 8 lanes cover a 16-bit head
//   (16 for fp32), so a warp step works on 4 heads (2). The rotation needs no shuffle, and the
//   norm's sum of squares is a butterfly over the head's lanes only.
// - A warp handles kHeadsPerWarp heads of ONE token, and the lanes share the token's sin/cos:
//   the heads of a step need the same kVec frequencies per lane, so each lane computes
//   kVec / kHeadsPerIter of them (2 accurate sincos, not kVec) and takes the rest with
//   __shfl_sync; all of the warp's loads are issued before any of this, as cp.async into
//   shared memory (register loads let ptxas move the second step's loads below the first
//   step's math to save registers, halving the bytes a warp has in flight).
// - Element pairs (core/vec.cuh, third version): a 16-bit vector stays packed in its 4
//   registers, the norm's rounding and weight multiply are one pack (F2FP) and one pair multiply
//   (HMUL2) per two elements, a lane past the last head gets zeros from its cp.async instead of
//   a branch, and q / k addresses are selected, then computed once. bf16, sm_90a:
//   663 SASS instructions in all (was 925), 64 registers (was 78; kMinBlocksPerSm).
// - q and k heads share the launch: head h < num_q_heads is q head h, the rest
//   are k heads. Inputs and outputs take arbitrary token and head strides
//   (e.g. slices of a fused qkv projection); in-place is out == in.
// - With a KV cache (kCache, the decode path of a static cache): the launch
//   also carries the v heads, after the k heads; k heads (normed, rotated) and
//   v heads (copied as they are) go to cache slot slots[s] of their batch row
//   instead of k_out, so k is written once and v needs no copy kernel.
//
// Torch-free: raw pointers, sizes and element strides; the glue is rope.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/mma.cuh"
#include "core/pdl.cuh"
#include "core/qwen3.h"
#include "core/reduce.cuh"
#include "core/trig.cuh"
#include "core/vec.cuh"

namespace qwen3x::rope {

// Heads (of one token) one warp processes; amortizes the sin/cos of the token.
constexpr int kHeadsPerWarp = 8;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpsPerBlock * kWarpSize;
// Resident blocks per SM asked of ptxas (__launch_bounds__), i.e. a register budget: 8 (64
// registers, 32 warps) for the prefill variant (9, 56 registers, spills on sm_80); 6 (80) for the
// cache variant (decode: a few tokens, nothing to gain from occupancy), which ptxas, left to
// itself, squeezed to 64 registers with a spill on sm_80.
constexpr int kMinBlocksPerSm = 8;
constexpr int kMinBlocksPerSmCache = 6;

// How a 128-wide head maps onto lanes for element type T: lane l of a head holds the vectors at
// elements (l * kVec) and (l * kVec + 64).
template <typename T>
struct HeadLayout {
  static constexpr int kVec = Vec16<T>::kSize;                      // elements per vector
  static constexpr int kLanesPerHead = kRotaryHalf / kVec;          // 8 (16-bit) or 16 (fp32)
  static constexpr int kHeadsPerIter = kWarpSize / kLanesPerHead;   // heads per warp step
  static constexpr int kIters = kHeadsPerWarp / kHeadsPerIter;      // steps per warp
  static constexpr int kFreqsPerLane = kVec / kHeadsPerIter;        // sincos each lane computes
  static_assert(kRotaryHalf % kVec == 0 && kWarpSize % kLanesPerHead == 0, "head must tile a warp");
  static_assert(kHeadsPerWarp % kHeadsPerIter == 0, "kHeadsPerWarp must fill whole steps");
  static_assert(kVec % kHeadsPerIter == 0 && kFreqsPerLane == 2, "inv_freq is read as float2");
};

// Dynamic shared memory of a block: the cp.async staging of its warps' loads,
// [warp][step][lo, hi][lane] 16-byte vectors (8 KB for 16-bit types, 16 KB for fp32).
template <typename T>
constexpr int StagingBytes = kWarpsPerBlock * HeadLayout<T>::kIters * 2 * kWarpSize * kVecBytes;

// Where the heads of one tensor live: element (t, h, d) is at
// ptr[t * token_stride + h * head_stride + d].
struct HeadStrides {
  int64_t token;
  int64_t head;
};

// A KV cache [B, Hkv, S_max, 128]: element (b, h, slot, d) at
// ptr[b * batch + h * head + slot * slot_stride + d].
struct CacheStrides {
  int64_t batch;
  int64_t head;
  int64_t slot;
};

// Where k and v go in the kCache variant. Tokens are [B, S] flattened: token t
// is batch row t / seqlen at sequence position s = t % seqlen, stored at slot
// slots[s] (HF's cache_position); a slot outside [0, max_slots) is not written.
template <typename T>
struct CacheWrite {
  T* k_cache;              // [B, Hkv, S_max, 128], strides k_strides
  T* v_cache;              // [B, Hkv, S_max, 128], strides v_strides
  const T* v;              // [num_tokens, Hkv, 128] values, strides v_in
  CacheStrides k_strides;
  CacheStrides v_strides;
  HeadStrides v_in;
  const void* slots;       // [S] int64 if slots_int64 else int32
  bool slots_int64;
  int64_t seqlen;          // S
  int64_t max_slots;       // S_max
};

template <typename T, bool kCache>
__global__ void __launch_bounds__(kThreadsPerBlock, kCache ? kMinBlocksPerSmCache : kMinBlocksPerSm)
qk_norm_rope_kernel(T* q_out,                          // [num_tokens, num_q_heads, 128], strides q_out_strides
                    T* k_out,                          // [num_tokens, num_kv_heads, 128], strides k_out_strides (unused with kCache)
                    const T* q_in,                     // [num_tokens, num_q_heads, 128], strides q_in_strides (may equal q_out)
                    const T* k_in,                     // [num_tokens, num_kv_heads, 128], strides k_in_strides (may equal k_out)
                    const T* __restrict__ q_weight,    // [128]
                    const T* __restrict__ k_weight,    // [128]
                    const void* __restrict__ positions,  // [num_tokens], int64 if positions_int64 else int32
                    bool positions_int64,
                    const float* __restrict__ inv_freq,  // [64]
                    int64_t num_tokens,
                    int num_q_heads,
                    int num_kv_heads,
                    HeadStrides q_out_strides,
                    HeadStrides k_out_strides,
                    HeadStrides q_in_strides,
                    HeadStrides k_in_strides,
                    float attention_scaling,
                    float eps,
                    const CacheWrite<T> cache) {  // used with kCache only
  pdl_wait();  // first: the previous kernel's outputs (core/pdl.cuh)
  pdl_launch_dependents();
  using L = HeadLayout<T>;
  using Vec = Vec16<T>;
  constexpr int kVec = L::kVec;

  const int lane = threadIdx.x % kWarpSize;
  const int num_qk_heads = num_q_heads + num_kv_heads;
  const int num_heads = num_qk_heads + (kCache ? num_kv_heads : 0);  // + the v heads
  const int groups_per_token = ceil_div(num_heads, kHeadsPerWarp);
  const int64_t warp_id =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t token = warp_id / groups_per_token;  // one division (a % would be a second)
  // Whole warps exit together and the kernel has no block barrier.
  if (token >= num_tokens) return;
  const int head_base = static_cast<int>(warp_id - token * groups_per_token) * kHeadsPerWarp;

  const int head_slot = lane / L::kLanesPerHead;  // which head of a step this lane works on
  const int lane_in_head = lane % L::kLanesPerHead;
  const int elem0 = lane_in_head * kVec;  // this lane's elements: elem0 + j and elem0 + 64 + j

  // This token's rows of the four tensors.
  const T* const q_in_token = q_in + token * q_in_strides.token;
  const T* const k_in_token = k_in + token * k_in_strides.token;
  T* const q_out_token = q_out + token * q_out_strides.token;
  T* const k_out_token = kCache ? nullptr : k_out + token * k_out_strides.token;  // kCache: k_out unused

  // ---- Issue every load of the warp before any math. ----------------------
  // cp.async into this lane's own staging slots, a commit group per step: no register holds the
  // data while the sin/cos is computed, so nothing moves the loads later (register loads of the
  // second step went below the first step's math: ptxas saving registers, 1 KB in flight per
  // warp instead of 2). A lane reads back only what it copied itself: its own wait suffices.
  extern __shared__ __align__(16) unsigned char stage_raw[];  // StagingBytes<T>: [warp][step][lo, hi][lane]
  Vec(*const my_stage)[2][kWarpSize] = reinterpret_cast<Vec(*)[2][kWarpSize]>(stage_raw) +
                                       (threadIdx.x / kWarpSize) * L::kIters;
  bool valid[L::kIters];
  bool is_q[L::kIters];
  bool is_v[L::kIters];  // kCache: a v head, copied without norm or rotation
  int head_in_tensor[L::kIters];
#pragma unroll
  for (int it = 0; it < L::kIters; ++it) {
    const int h = head_base + it * L::kHeadsPerIter + head_slot;
    valid[it] = h < num_heads;
    // A lane past the token's last head copies nothing (cp.async zero-fills its slots: no
    // branch, and no read of a head another lane rewrites in place), computes on zeros and
    // stores nothing; its lanes' sums stay among themselves (the butterfly spans one head).
    const int head = valid[it] ? h : head_base;  // an address in range, never read
    is_q[it] = head < num_q_heads;
    is_v[it] = kCache && head >= num_qk_heads;
    head_in_tensor[it] = is_q[it] ? head : (is_v[it] ? head - num_qk_heads : head - num_q_heads);
    // Select the tensor, then address once (not two addresses and a select).
    const T* src = (is_q[it] ? q_in_token : k_in_token) +
                   head_in_tensor[it] * (is_q[it] ? q_in_strides.head : k_in_strides.head);
    if (kCache && is_v[it]) {
      src = cache.v + token * cache.v_in.token + head_in_tensor[it] * cache.v_in.head;
    }
    cp_async_16(smem_u32(&my_stage[it][0][lane]), src + elem0, valid[it]);  // elem0 .. + kVec - 1
    cp_async_16(smem_u32(&my_stage[it][1][lane]), src + elem0 + kRotaryHalf, valid[it]);  // partners
    cp_async_commit();
  }
  const int64_t pos = positions_int64 ? static_cast<const int64_t*>(positions)[token]
                                      : static_cast<const int32_t*>(positions)[token];
  // ---- cos/sin of this lane's kVec frequencies, once per token. ------------
  // Lane (i, g) (i = lane_in_head, g = head_slot) computes frequencies elem0 + g * 2 + {0, 1};
  // frequency elem0 + j is then in lane (i, j / 2), register j % 2.
  float cos_v[kVec];
  float sin_v[kVec];
  {
    const float* own_freqs = inv_freq + elem0 + head_slot * L::kFreqsPerLane;  // 8-byte aligned
    const float2 freq = *reinterpret_cast<const float2*>(own_freqs);
    const float pos_f = static_cast<float>(pos);
    float own_cos[L::kFreqsPerLane], own_sin[L::kFreqsPerLane];
    sincos_accurate(__fmul_rn(pos_f, freq.x), &own_sin[0], &own_cos[0]);
    sincos_accurate(__fmul_rn(pos_f, freq.y), &own_sin[1], &own_cos[1]);
#pragma unroll
    for (int m = 0; m < L::kFreqsPerLane; ++m) {
      own_cos[m] *= attention_scaling;
      own_sin[m] *= attention_scaling;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int src_lane = lane_in_head + (j / L::kFreqsPerLane) * L::kLanesPerHead;
      cos_v[j] = __shfl_sync(kFullWarpMask, own_cos[j % L::kFreqsPerLane], src_lane);
      sin_v[j] = __shfl_sync(kFullWarpMask, own_sin[j % L::kFreqsPerLane], src_lane);
    }
  }

  // kCache: where this token's k and v go (after the sin/cos, not before: two fewer 64-bit values
  // held across it; before, sm_80 spilled a register).
  int64_t batch_row = 0, slot = -1;
  if constexpr (kCache) {
    batch_row = token / cache.seqlen;
    const int64_t s = token - batch_row * cache.seqlen;
    slot = cache.slots_int64 ? static_cast<const int64_t*>(cache.slots)[s]
                             : static_cast<const int32_t*>(cache.slots)[s];
  }

  // ---- Norm + rotate + store, one step (4 or 2 heads per warp) at a time. --
  // Element pairs (core/vec.cuh): a 16-bit vector stays in its 4 registers, and the norm's
  // rounding and weight multiply are one pack and one pair multiply per two elements.
  constexpr int kPairs = kVec / 2;
#pragma unroll
  for (int it = 0; it < L::kIters; ++it) {
    cp_async_wait_for_group<L::kIters>(it);  // this step's copies (later steps' may be in flight)
    const Vec lo = my_stage[it][0][lane];  // elements elem0 .. elem0 + kVec - 1
    const Vec hi = my_stage[it][1][lane];  // elements elem0 + 64 .. (their rotate_half partners)
    float2 a[kPairs];  // elements elem0 + 2p, elem0 + 2p + 1
    float2 b[kPairs];  // their rotate_half partners, 64 on
    float sum_sq = 0.0f;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {  // element order: a[j], b[j], a[j + 1], b[j + 1]
      a[p] = pair_to_float2<T>(get_pair(lo, p));
      b[p] = pair_to_float2<T>(get_pair(hi, p));
      sum_sq = fmaf(a[p].x, a[p].x, sum_sq);
      sum_sq = fmaf(b[p].x, b[p].x, sum_sq);
      sum_sq = fmaf(a[p].y, a[p].y, sum_sq);
      sum_sq = fmaf(b[p].y, b[p].y, sum_sq);
    }
    // This step's weights (L1 hits after the first warps; issued here, used after the norm's
    // shuffles, so that neither weight vector pair stays in registers across the steps).
    const T* weight = is_q[it] ? q_weight : k_weight;
    const Vec w_lo = load_vec16(weight + elem0);
    const Vec w_hi = load_vec16(weight + elem0 + kRotaryHalf);
    sum_sq = warp_reduce_sum<L::kLanesPerHead>(sum_sq);
    const float rstd = rsqrtf(sum_sq * (1.0f / kHeadDim) + eps);

    Vec y_lo, y_hi;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      // HF's q_norm / k_norm: T(x * rstd), then the weight multiply in T.
      const float2 na = pair_to_float2<T>(
          mul_pair_rn<T>(float2_to_pair<T>(a[p].x * rstd, a[p].y * rstd), get_pair(w_lo, p)));
      const float2 nb = pair_to_float2<T>(
          mul_pair_rn<T>(float2_to_pair<T>(b[p].x * rstd, b[p].y * rstd), get_pair(w_hi, p)));
      const float c0 = cos_v[2 * p], c1 = cos_v[2 * p + 1];
      const float s0 = sin_v[2 * p], s1 = sin_v[2 * p + 1];
      // rotate_half: out[i] = n[i] cos - n[i + 64] sin, out[i + 64] = n[i + 64] cos + n[i] sin.
      set_pair(y_lo, p,
               float2_to_pair<T>(fmaf(na.x, c0, -nb.x * s0), fmaf(na.y, c1, -nb.y * s1)));
      set_pair(y_hi, p,
               float2_to_pair<T>(fmaf(nb.x, c0, na.x * s0), fmaf(nb.y, c1, na.y * s1)));
    }
    if constexpr (kCache) {
      if (valid[it] && !is_q[it]) {  // k or v head -> its cache slot (if in range)
        if (slot >= 0 && slot < cache.max_slots) {
          // Field by field: a reference to either struct would put both (kernel parameters,
          // registers) into local memory.
          const int64_t batch_stride = is_v[it] ? cache.v_strides.batch : cache.k_strides.batch;
          const int64_t head_stride = is_v[it] ? cache.v_strides.head : cache.k_strides.head;
          const int64_t slot_stride = is_v[it] ? cache.v_strides.slot : cache.k_strides.slot;
          T* dst = (is_v[it] ? cache.v_cache : cache.k_cache) + batch_row * batch_stride +
                   head_in_tensor[it] * head_stride + slot * slot_stride;
#pragma unroll
          for (int p = 0; p < kPairs; ++p) {  // a v head as it came (per pair: no Vec& select)
            if (is_v[it]) {
              set_pair(y_lo, p, get_pair(lo, p));
              set_pair(y_hi, p, get_pair(hi, p));
            }
          }
          store_vec16(dst + elem0, y_lo);
          store_vec16(dst + elem0 + kRotaryHalf, y_hi);
        }
        continue;
      }
    }
    if (valid[it]) {
      T* dst = (is_q[it] ? q_out_token : k_out_token) +
               head_in_tensor[it] * (is_q[it] ? q_out_strides.head : k_out_strides.head);
      store_vec16(dst + elem0, y_lo);
      store_vec16(dst + elem0 + kRotaryHalf, y_hi);
    }
  }
}

// Launcher. Preconditions (ensured by the glue): every pointer is 16-byte
// aligned and every token/head/cache stride is a whole number of 16-byte
// vectors; head_dim is contiguous; num_tokens <= max_qk_norm_rope_tokens(heads
// of the launch). With `cache` (k_cache != nullptr) k and v go to the cache,
// and k_out is not written. Does not check errors.
template <typename T>
void launch_qk_norm_rope(T* q_out, T* k_out, const T* q_in, const T* k_in, const T* q_weight,
                         const T* k_weight, const void* positions, bool positions_int64,
                         const float* inv_freq, int64_t num_tokens, int num_q_heads,
                         int num_kv_heads, HeadStrides q_out_strides, HeadStrides k_out_strides,
                         HeadStrides q_in_strides, HeadStrides k_in_strides,
                         float attention_scaling, float eps, const CacheWrite<T>& cache,
                         cudaStream_t stream, bool pdl = false) {
  const bool with_cache = cache.k_cache != nullptr;
  const int num_heads = num_q_heads + num_kv_heads * (with_cache ? 2 : 1);
  if (num_tokens == 0 || num_heads == 0) return;
  const int64_t num_warps = num_tokens * ceil_div(num_heads, kHeadsPerWarp);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(num_warps, kWarpsPerBlock)));
  auto kernel = with_cache ? qk_norm_rope_kernel<T, true> : qk_norm_rope_kernel<T, false>;
  // An error of the launch is also the thread's last error, which the caller checks.
  (void)launch_kernel(pdl, kernel, grid, dim3(kThreadsPerBlock), StagingBytes<T>, stream, q_out,
                      k_out, q_in, k_in, q_weight, k_weight, positions, positions_int64, inv_freq,
                      num_tokens, num_q_heads, num_kv_heads, q_out_strides, k_out_strides,
                      q_in_strides, k_in_strides, attention_scaling, eps, cache);
}

// Most tokens one launch can cover for a given head count.
inline int64_t max_qk_norm_rope_tokens(int num_heads) {
  return kMaxGridX * kWarpsPerBlock / ceil_div(num_heads, kHeadsPerWarp);
}

}  // namespace qwen3x::rope
