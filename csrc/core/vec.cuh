// 16-byte vectors, element pairs and conversions shared by the memory-bound
// kernels, and the gpu-scope relaxed flag accesses of the cross-CTA protocols.
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
#include <type_traits>

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

// A gpu-scope relaxed (morally strong) 64-bit load and store, served by L2: for flags that
// other CTAs write during the kernel. Strong, so a sequentially consistent fence orders them as
// it orders atomics; unlike an atomic read (atomicAdd(p, 0)), a load does not queue at the L2's
// atomic unit behind every other CTA's operations on the same line.
__device__ __forceinline__ unsigned long long load_relaxed_gpu(const unsigned long long* p) {
#if defined(QWEN3X_EMULATOR)
  return __atomic_load_n(p, __ATOMIC_RELAXED);
#else
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#endif
}

__device__ __forceinline__ void store_relaxed_gpu(unsigned long long* p, unsigned long long v) {
#if defined(QWEN3X_EMULATOR)
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
#else
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
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

// ---- Element pairs ---------------------------------------------------------
// Elements 2p and 2p + 1 of a 16-byte vector. For the 16-bit types a pair is
// one 32-bit word, as the vector arrived in registers. Reading a word's halves
// with a shift and a mask (bf16) or the half-word conversion (fp16) keeps a
// held vector in 4 registers and costs one instruction per element; element by
// element, the compiler gives each bf16 a register of its own (a PRMT at the
// load, a shift at the use). Packing two floats is one instruction
// (F2FP.PACK_AB), and a pair multiply (HMUL2) is one for two elements.
template <typename T>
struct PairOf {
  using type = uint32_t;  // bf16 / fp16: element 2p in the low half
};
template <>
struct PairOf<float> {
  using type = float2;
};
template <typename T>
using Pair = typename PairOf<T>::type;

template <typename T>
__device__ __forceinline__ Pair<T> get_pair(const Vec16<T>& v, int p) {
  Pair<T> r;
  memcpy(&r, &v.data[2 * p], sizeof(r));
  return r;
}

template <typename T>
__device__ __forceinline__ void set_pair(Vec16<T>& v, int p, Pair<T> r) {
  memcpy(&v.data[2 * p], &r, sizeof(r));
}

template <typename T>
__device__ __forceinline__ float2 pair_to_float2(Pair<T> p) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // A bf16 is the top half of the fp32 of the same value.
    return make_float2(__uint_as_float(p << 16), __uint_as_float(p & 0xffff0000u));
  } else {
    __half2 h;
    memcpy(&h, &p, sizeof(h));
    return __half22float2(h);
  }
}

// (a, b) rounded to T (nearest even), as one pair.
template <typename T>
__device__ __forceinline__ Pair<T> float2_to_pair(float a, float b) {
  if constexpr (std::is_same_v<T, float>) {
    return make_float2(a, b);
  } else {
    uint32_t w;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
      memcpy(&w, &h, sizeof(w));
    } else {
      const __half2 h = __floats2half2_rn(a, b);
      memcpy(&w, &h, sizeof(w));
    }
    return w;
  }
}

// x * w element-wise, each product rounded once to T: torch's T x T multiply
// (which computes the product in fp32, exact for two 16-bit operands, and
// rounds it to T).
template <typename T>
__device__ __forceinline__ Pair<T> mul_pair_rn(Pair<T> x, Pair<T> w) {
  if constexpr (std::is_same_v<T, float>) {
    return make_float2(x.x * w.x, x.y * w.y);
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
    T2 a, b;
    memcpy(&a, &x, sizeof(a));
    memcpy(&b, &w, sizeof(b));
    const T2 r = __hmul2_rn(a, b);
    uint32_t out;
    memcpy(&out, &r, sizeof(out));
    return out;
  }
}

}  // namespace qwen3x
