// RMSNorm and fused residual-add + RMSNorm, with Hugging Face Qwen3 numerics:
//
//   s   = input + residual                 (add_rms_norm only; rounded to T)
//   var = mean(float(s)^2)                 (fp32)
//   n   = T(float(s) * rsqrt(var + eps))   (normalize in fp32, round to T)
//   y   = T(float(weight) * float(n))      (weight multiply in T, as HF does)
//
// Why it is shaped this way: the op is memory bound (one read of the row, one
// write), so the vector kernel reads each row exactly once with 16-byte loads,
// keeps it in registers across the reduction, and writes it with 16-byte
// stores. A row is owned by a whole block when it is long, or by one warp
// (several rows per block) when it is short, so no thread sits idle on wide
// rows and no block-wide barrier is paid on narrow ones. Rows whose hidden
// size is not a multiple of the vector width, or whose pointers/strides are
// not 16-byte aligned, take a simple scalar kernel that reads the row twice.
//
// Torch-free: raw pointers, sizes and element strides; the glue is norm.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/gpu_constants.h"
#include "core/reduce.cuh"
#include "core/vec.cuh"

namespace qwen3x::norm {

// 16-byte loads each thread aims to have in flight for its share of a row.
constexpr int kTargetVecsPerThread = 4;
// Register budget: a thread holds at most this many 16-byte vectors of its
// row (and as many of the weight and, for add_rms_norm, of the residual).
constexpr int kMaxVecsPerThread = 4;
// Most threads sharing one row. 512 (not 1024) leaves the register allocator
// 128 registers per thread, enough for the arrays above without spilling.
// Vector path limit: hidden <= kMaxVecsPerThread * kMaxThreadsPerRow * 16 /
// sizeof(T) = 16384 (bf16/fp16) or 8192 (fp32); wider rows go scalar.
constexpr int kMaxThreadsPerRow = 512;
// When a single warp owns a row, this many rows share one block.
constexpr int kRowsPerWarpBlock = 4;
// Block size of the scalar fallback (one block per row).
constexpr int kScalarThreads = 256;

// ---------------------------------------------------------------------------
// Vector kernel. Block = (threads_per_row, rows_per_block): blockDim.x threads
// share one row; blockDim.y > 1 only when blockDim.x == kWarpSize (then the
// reduction is warp-only and has no __syncthreads).
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
rms_norm_vec_kernel(T* __restrict__ out,                // [num_rows, hidden], row stride out_stride
                    T* __restrict__ residual_out,       // [num_rows, hidden], row stride residual_out_stride; input + residual (nullptr: plain rms_norm)
                    const T* __restrict__ input,        // [num_rows, hidden], row stride input_stride
                    const T* __restrict__ residual,     // [num_rows, hidden], row stride residual_stride (nullptr: plain rms_norm)
                    const T* __restrict__ weight,       // [hidden]
                    int64_t num_rows,
                    int hidden,                         // multiple of Vec16<T>::kSize
                    int64_t out_stride,                 // elements between rows of out
                    int64_t residual_out_stride,        // elements between rows of residual_out
                    int64_t input_stride,               // elements between rows of input
                    int64_t residual_stride,            // elements between rows of residual
                    float eps) {
  using Vec = Vec16<T>;
  constexpr int kVec = Vec::kSize;
  // Element pairs (core/vec.cuh): a held 16-bit vector stays in its 4 registers (element-wise,
  // bf16 took a register per element: 86 registers at hidden 4096, 5 rows in flight per SM).
  constexpr int kPairs = kVec / 2;
  __shared__ float warp_sums[kMaxThreadsPerRow / kWarpSize];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only possible when blockDim.y > 1, i.e. on the warp-per-row path, which
  // has no block barrier: returning early is safe.
  if (row >= num_rows) return;

  const bool add_residual = residual != nullptr;
  const int num_vecs = hidden / kVec;
  const T* x_row = input + row * input_stride;

  // One read of the row (and of the weight), all loads issued before use.
  Vec x[kMaxVecsPerThread];
  Vec w[kMaxVecsPerThread];
#pragma unroll
  for (int i = 0; i < kMaxVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
      x[i] = load_vec16(x_row + v * kVec);
      w[i] = load_vec16(weight + v * kVec);
    }
  }
  if (add_residual) {
    // All residual loads first: store_vec16 is a compiler barrier for loads.
    const T* r_row = residual + row * residual_stride;
    T* s_row = residual_out + row * residual_out_stride;
    Vec r[kMaxVecsPerThread];
#pragma unroll
    for (int i = 0; i < kMaxVecsPerThread; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < num_vecs) r[i] = load_vec16(r_row + v * kVec);
    }
#pragma unroll
    for (int i = 0; i < kMaxVecsPerThread; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < num_vecs) {
#pragma unroll
        for (int p = 0; p < kPairs; ++p) {
          const float2 a = pair_to_float2<T>(get_pair(x[i], p));
          const float2 b = pair_to_float2<T>(get_pair(r[i], p));
          set_pair(x[i], p, float2_to_pair<T>(a.x + b.x, a.y + b.y));
        }
        store_vec16(s_row + v * kVec, x[i]);
      }
    }
  }

  float sum_sq = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
#pragma unroll
      for (int p = 0; p < kPairs; ++p) {
        const float2 f = pair_to_float2<T>(get_pair(x[i], p));
        sum_sq += f.x * f.x;
        sum_sq += f.y * f.y;
      }
    }
  }
  sum_sq = blockDim.x == kWarpSize ? warp_reduce_sum(sum_sq) : block_reduce_sum(sum_sq, warp_sums);
  const float rstd = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);

  T* y_row = out + row * out_stride;
#pragma unroll
  for (int i = 0; i < kMaxVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
      Vec y;
#pragma unroll
      for (int p = 0; p < kPairs; ++p) {  // T(x * rstd), then the weight multiply in T
        const float2 f = pair_to_float2<T>(get_pair(x[i], p));
        set_pair(y, p, mul_pair_rn<T>(float2_to_pair<T>(f.x * rstd, f.y * rstd), get_pair(w[i], p)));
      }
      store_vec16(y_row + v * kVec, y);
    }
  }
}

// ---------------------------------------------------------------------------
// Scalar fallback: one block per row, any hidden size and alignment. Reads the
// row twice (the second read mostly hits L1/L2); recomputes input + residual
// on the second pass rather than re-reading residual_out.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kScalarThreads)
rms_norm_scalar_kernel(T* __restrict__ out,             // [num_rows, hidden], row stride out_stride
                       T* __restrict__ residual_out,    // [num_rows, hidden] or nullptr
                       const T* __restrict__ input,     // [num_rows, hidden], row stride input_stride
                       const T* __restrict__ residual,  // [num_rows, hidden] or nullptr
                       const T* __restrict__ weight,    // [hidden]
                       int64_t num_rows,
                       int hidden,
                       int64_t out_stride,
                       int64_t residual_out_stride,
                       int64_t input_stride,
                       int64_t residual_stride,
                       float eps) {
  __shared__ float warp_sums[kScalarThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const bool add_residual = residual != nullptr;
  const T* x_row = input + row * input_stride;
  const T* r_row = add_residual ? residual + row * residual_stride : nullptr;

  auto load_sum = [&](int c) -> T {
    return add_residual ? from_float<T>(to_float(x_row[c]) + to_float(r_row[c])) : x_row[c];
  };

  float sum_sq = 0.0f;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const T s = load_sum(c);
    if (add_residual) residual_out[row * residual_out_stride + c] = s;
    const float f = to_float(s);
    sum_sq += f * f;
  }
  sum_sq = block_reduce_sum(sum_sq, warp_sums);
  const float rstd = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);

  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float n = round_to<T>(to_float(load_sum(c)) * rstd);
    out[row * out_stride + c] = from_float<T>(to_float(weight[c]) * n);
  }
}

// ---------------------------------------------------------------------------
// Launcher. Picks the vector kernel when every pointer is 16-byte aligned,
// every row stride and `hidden` are multiples of the vector width, and the
// row fits the register budget; otherwise the scalar kernel.
// residual/residual_out: both nullptr for plain rms_norm.
// Requires num_rows <= kMaxGridX (checked by the glue). Does not check errors.
// ---------------------------------------------------------------------------
template <typename T>
void launch_rms_norm(T* out, T* residual_out, const T* input, const T* residual, const T* weight,
                     int64_t num_rows, int hidden, int64_t out_stride,
                     int64_t residual_out_stride, int64_t input_stride, int64_t residual_stride,
                     float eps, cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return;
  constexpr int kVec = Vec16<T>::kSize;
  const bool add_residual = residual != nullptr;

  const int num_vecs = hidden / kVec;
  const int threads_per_row =
      round_up(ceil_div(num_vecs, kTargetVecsPerThread), kWarpSize);
  const bool vec_ok =
      hidden % kVec == 0 && threads_per_row <= kMaxThreadsPerRow &&
      threads_per_row * kMaxVecsPerThread >= num_vecs && is_aligned(out, kVecBytes) &&
      is_aligned(input, kVecBytes) && is_aligned(weight, kVecBytes) && out_stride % kVec == 0 &&
      input_stride % kVec == 0 &&
      (!add_residual || (is_aligned(residual, kVecBytes) && is_aligned(residual_out, kVecBytes) &&
                         residual_stride % kVec == 0 && residual_out_stride % kVec == 0));

  if (vec_ok) {
    const int rows_per_block = threads_per_row == kWarpSize ? kRowsPerWarpBlock : 1;
    const dim3 block(threads_per_row, rows_per_block);
    const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(num_rows, rows_per_block)));
    rms_norm_vec_kernel<T><<<grid, block, 0, stream>>>(
        out, residual_out, input, residual, weight, num_rows, hidden, out_stride,
        residual_out_stride, input_stride, residual_stride, eps);
  } else {
    const dim3 grid(static_cast<unsigned>(num_rows));
    rms_norm_scalar_kernel<T><<<grid, kScalarThreads, 0, stream>>>(
        out, residual_out, input, residual, weight, num_rows, hidden, out_stride,
        residual_out_stride, input_stride, residual_stride, eps);
  }
}

}  // namespace qwen3x::norm
