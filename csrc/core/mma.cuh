// Warp-level tensor-core and asynchronous-copy primitives (sm_80+), as thin
// inline-PTX wrappers, so kernels read like the PTX ISA's fragment tables:
//
//   cp_async_16       cp.async.cg 16 bytes global -> shared, zero-filled when
//                     the source is out of range (src_bytes = 0)
//   ldmatrix_x4       four 8x8 b16 matrices shared -> registers (.trans too)
//   mma_16816         mma.sync.m16n8k16, bf16 or fp16 inputs, fp32 accumulate
//   pack_float2       two fp32 -> one b16x2 register (round to nearest even)
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + t, g = lane / 4, t = lane % 4;
// "x2" = the pair (2t, 2t + 1), lower column in the lower 16 bits):
//   A 16x16 (row-major):  a0 = A[g][x2]      a1 = A[g + 8][x2]
//                         a2 = A[g][x2 + 8]  a3 = A[g + 8][x2 + 8]
//   B 16x8 ("col"):       b0 = B[x2][g]      b1 = B[x2 + 8][g]   (pairs along k)
//   C/D 16x8 fp32:        c0, c1 = C[g][2t], C[g][2t + 1]
//                         c2, c3 = C[g + 8][2t], C[g + 8][2t + 1]
// ldmatrix: lanes 8j .. 8j + 7 give the 8 row addresses (16 bytes each) of
// matrix j, and register j of lane i receives row i / 4, elements
// 2 (i % 4), 2 (i % 4) + 1 of matrix j (the transpose of that with .trans).
//
// Device code only; the instructions need sm_80 or newer. Under QWEN3X_EMULATOR
// (tests/emulator: these kernels' source run on the CPU) each wrapper calls the
// emulation of its instruction instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace qwen3x {

// Shared-memory address of a generic pointer, as the .shared instructions want it.
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte asynchronous copy global -> shared, bypassing L1 (.cg). With
// src_bytes == 0 nothing is read and the 16 destination bytes are zeroed.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem_ptr,
                                            bool in_range) {
#if defined(QWEN3X_EMULATOR)
  emu::cp_async_16(smem_addr, gmem_ptr, in_range);
#else
  const int src_bytes = in_range ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem_ptr),
               "r"(src_bytes)
               : "memory");
#endif
}

// Closes the group of cp.async issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(QWEN3X_EMULATOR)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(QWEN3X_EMULATOR)
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Waits for group `group` of kGroups committed in order (0 first): at most kGroups - 1 - group
// may stay in flight. `group` must fold to a constant (an unrolled loop's index).
template <int kGroups>
__device__ __forceinline__ void cp_async_wait_for_group(int group) {
  static_assert(kGroups >= 1 && kGroups <= 4, "up to 4 groups");
  switch (kGroups - 1 - group) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
#if defined(QWEN3X_EMULATOR)
  emu::ldmatrix_x4(r, smem_addr, /*trans=*/false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
#if defined(QWEN3X_EMULATOR)
  emu::ldmatrix_x4(r, smem_addr, /*trans=*/true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
#endif
}

// d += A * B for one m16n8k16 tile; T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_16816 takes bf16 or fp16 operands");
#if defined(QWEN3X_EMULATOR)
  emu::mma_16816<T>(d, a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// (lo, hi) -> one register holding T(lo) in bits 0-15 and T(hi) in bits 16-31.
template <typename T>
__device__ __forceinline__ uint32_t pack_float2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

// 2^x with the MUFU unit (ex2.approx.ftz: ~2 ulp, 2^-inf = +0); softmax inputs
// are <= 0 after subtracting the row max, so no overflow.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(QWEN3X_EMULATOR)
  return emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

}  // namespace qwen3x
