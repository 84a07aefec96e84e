// 16-byte vectors and element conversions shared by the memory-bound kernels.
//
// A thread moves data in 16-byte packets (8 x bf16/fp16 or 4 x fp32), which
// the compiler emits as a single LDG.E.128 / STG.E.128 when the address is
// 16-byte aligned (ptr must point to global memory). Callers guarantee that alignment (the glue checks pointers
// and strides, and falls back to scalar code or a contiguous copy otherwise).
//
// Conversions are explicit intrinsics with round-to-nearest-even, the rounding
// torch uses for float -> bf16/fp16, so "round to dtype" here matches torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "core/gpu_constants.h"

namespace qwen3x {

template <typename T>
struct alignas(kVecBytes) Vec16 {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T data[kSize];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* ptr) {
  Vec16<T> v;
  *reinterpret_cast<uint4*>(&v) = *reinterpret_cast<const uint4*>(ptr);
  return v;
}

// A 16-byte load served by L2, not this SM's L1 (ld.global.cg): for data another
// CTA wrote during this kernel, read after a fence that orders it (L1 is not
// coherent across SMs).
template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16_l2(const T* ptr) {
  Vec16<T> v;
  *reinterpret_cast<uint4*>(&v) = __ldcg(reinterpret_cast<const uint4*>(ptr));
  return v;
}

// Stores go through inline PTX: NVVM otherwise sometimes splits a 16-byte
// store of separately computed elements into 2- or 4-byte stores (seen in
// silu_and_mul). The "memory" clobber keeps it ordered with every other
// access, so issue a kernel's loads before its first store.
template <typename T>
__device__ __forceinline__ void store_vec16(T* ptr, const Vec16<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
#if defined(QWEN3X_EMULATOR)
  emu::store_global_16(ptr, &raw);
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(ptr), "r"(raw.x), "r"(raw.y), "r"(raw.z), "r"(raw.w)
               : "memory");
#endif
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: what a torch op computing in fp32 and returning a
// T tensor hands to the next op.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

}  // namespace qwen3x
