// SwiGLU activation of a fused gate/up projection:
//   out[r, i] = T( float(T(silu(float(gate[r, i])))) * float(up[r, i]) )
//   gate = input[r, :I], up = input[r, I:]
// Numerics follow Hugging Face's act_fn(gate) * up in dtype T: torch's silu
// computes x / (1 + exp(-x)) in fp32 and rounds to T, then the multiply is a
// separate T op (fp32 product rounded to T: for 16-bit T one rounding of the
// exact product, a pair multiply here, HMUL2). For 16-bit T these kernels' silu
// uses the fast exponential and division (MUFU.EX2, MUFU.RCP; the expert GEMM's
// epilogue keeps the accurate one, silu_mul): __expf's error is 2 + |1.17 x| ulp
// of fp32 (CUDA's table), at |x| <= 10 still 2^8 (fp16) to 2^11 (bf16) times
// finer than T's rounding, which it moves by one ulp in rare elements; where
// 1 + e^-x passes 2^126 (x in about (-88.7, -87.3]) the reciprocal flushes and
// silu is -0 where it is ~-1e-36. Both within the tolerance rule (DESIGN.md:
// absolute floor 1e-6). The accurate expf and IEEE
// divide (~25 instructions an element) left the kernel near instruction bound
// (the third run: 0.77-0.94x the faster of Liger and torch.compile at 16k
// tokens). fp32 T keeps them (there its ulp is theirs).
//
// Why it is shaped this way: purely memory bound (read 2I, write I per row).
// Grid = (rows, column blocks) so a single long row (decode) still spreads
// over several blocks and many rows need no index division. Each thread moves
// kVecsPerThread 16-byte vectors of gate and of up, all loads issued before
// the math, and works on element pairs (core/vec.cuh: a 16-bit vector stays in
// its 4 registers). When I is not a multiple of the vector width, or the data
// is not 16-byte aligned, a scalar kernel with the same grid shape runs instead.
//
// Torch-free: raw pointers, sizes and element strides; the glue is
// activation.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/gpu_constants.h"
#include "core/vec.cuh"

namespace qwen3x::activation {

// 16-byte vectors (of gate, and of up) each thread handles.
constexpr int kVecsPerThread = 2;
// Upper bound on threads per block; narrower rows get fewer (whole warps).
constexpr int kMaxThreads = 256;
// Elements per thread of the scalar fallback.
constexpr int kScalarElemsPerThread = 4;

// x / (1 + e^-x) in fp32 with expf and an IEEE divide: torch's F.silu.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// The same with the fast exponential and division (MUFU.EX2, MUFU.RCP; error in the header).
__device__ __forceinline__ float silu_fast(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// The silu of silu_and_mul for outputs of type T: fast for 16-bit T (see the header).
template <typename T>
__device__ __forceinline__ float silu_for(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return silu(x);
  } else {
    return silu_fast(x);
  }
}

// T(float(T(silu(gate))) * float(up)) with the accurate silu: the expert GEMM's epilogue
// (gemm_epilogue.cuh), where the silu's cost is nothing beside the GEMM's.
template <typename T>
__device__ __forceinline__ T silu_mul(T gate, T up) {
  return from_float<T>(round_to<T>(silu(to_float(gate))) * to_float(up));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
silu_and_mul_vec_kernel(T* __restrict__ out,          // [num_rows, inter], row stride out_stride
                        const T* __restrict__ input,  // [num_rows, 2 * inter], row stride input_stride
                        int64_t inter,                // I, a multiple of Vec16<T>::kSize
                        int64_t out_stride,
                        int64_t input_stride) {
  using Vec = Vec16<T>;
  constexpr int kVec = Vec::kSize;
  const int64_t row = blockIdx.x;
  const int64_t num_vecs = inter / kVec;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x * kVecsPerThread + threadIdx.x;
  const T* gate_row = input + row * input_stride;
  const T* up_row = gate_row + inter;
  T* out_row = out + row * out_stride;

  Vec gate[kVecsPerThread];
  Vec up[kVecsPerThread];
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int64_t v = first + i * blockDim.x;
    if (v < num_vecs) {
      gate[i] = load_vec16(gate_row + v * kVec);
      up[i] = load_vec16(up_row + v * kVec);
    }
  }
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int64_t v = first + i * blockDim.x;
    if (v < num_vecs) {
      Vec y;
#pragma unroll
      for (int p = 0; p < kVec / 2; ++p) {  // T(silu(gate)), times up in T
        const float2 g = pair_to_float2<T>(get_pair(gate[i], p));
        const Pair<T> act = float2_to_pair<T>(silu_for<T>(g.x), silu_for<T>(g.y));
        set_pair(y, p, mul_pair_rn<T>(act, get_pair(up[i], p)));
      }
      store_vec16(out_row + v * kVec, y);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
silu_and_mul_scalar_kernel(T* __restrict__ out,          // [num_rows, inter], row stride out_stride
                           const T* __restrict__ input,  // [num_rows, 2 * inter], row stride input_stride
                           int64_t inter,
                           int64_t out_stride,
                           int64_t input_stride) {
  const int64_t row = blockIdx.x;
  const int64_t first =
      static_cast<int64_t>(blockIdx.y) * blockDim.x * kScalarElemsPerThread + threadIdx.x;
  const T* gate_row = input + row * input_stride;
  const T* up_row = gate_row + inter;
  T* out_row = out + row * out_stride;
#pragma unroll
  for (int i = 0; i < kScalarElemsPerThread; ++i) {
    const int64_t c = first + i * blockDim.x;
    if (c < inter) {
      const float act = round_to<T>(silu_for<T>(to_float(gate_row[c])));
      out_row[c] = from_float<T>(act * to_float(up_row[c]));
    }
  }
}

// Whether the vector kernel can run; the glue also uses it to size the grid.
template <typename T>
bool silu_and_mul_vectorizable(const T* out, const T* input, int64_t inter, int64_t out_stride,
                               int64_t input_stride) {
  constexpr int kVec = Vec16<T>::kSize;
  return inter % kVec == 0 && out_stride % kVec == 0 && input_stride % kVec == 0 &&
         is_aligned(out, kVecBytes) && is_aligned(input, kVecBytes);
}

// Column blocks per row needed for `inter` (the glue checks it fits gridDim.y).
template <typename T>
int64_t silu_and_mul_column_blocks(int64_t inter, bool vectorized, int* threads) {
  const int64_t items = vectorized ? inter / Vec16<T>::kSize : inter;
  const int64_t per_thread = vectorized ? kVecsPerThread : kScalarElemsPerThread;
  const int64_t want = round_up<int64_t>(ceil_div<int64_t>(items, per_thread), kWarpSize);
  *threads = static_cast<int>(want < kMaxThreads ? want : kMaxThreads);
  return ceil_div<int64_t>(items, *threads * per_thread);
}

// Launcher. Preconditions (checked by the glue): num_rows <= kMaxGridX and
// the column blocks fit gridDim.y. Does not check errors.
template <typename T>
void launch_silu_and_mul(T* out, const T* input, int64_t num_rows, int64_t inter,
                         int64_t out_stride, int64_t input_stride, cudaStream_t stream) {
  if (num_rows == 0 || inter == 0) return;
  const bool vectorized = silu_and_mul_vectorizable(out, input, inter, out_stride, input_stride);
  int threads = 0;
  const int64_t col_blocks = silu_and_mul_column_blocks<T>(inter, vectorized, &threads);
  const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(col_blocks));
  if (vectorized) {
    silu_and_mul_vec_kernel<T><<<grid, threads, 0, stream>>>(out, input, inter, out_stride,
                                                             input_stride);
  } else {
    silu_and_mul_scalar_kernel<T><<<grid, threads, 0, stream>>>(out, input, inter, out_stride,
                                                                input_stride);
  }
}

}  // namespace qwen3x::activation
