// Hopper warpgroup tensor-core primitives (sm_90a only), as thin inline-PTX
// wrappers, for kernels whose operand tiles are already in shared memory:
//
//   wgmma_desc_sw128       shared-memory matrix descriptor of a K-major tile
//                          stored with the 128-byte swizzle
//   wgmma_ss<T, N>         wgmma.mma_async m64nNk16 (N = 64, 128), bf16 or fp16
//                          inputs from shared memory (both K-major), fp32 accumulators
//   wgmma_rs<T, N, B>      A from registers, B a K-major or MN-major shared-memory tile
//   wgmma_fence / wgmma_commit / wgmma_wait<N>, wgmma_fence_operands
//   fence_proxy_async      makes this thread's shared-memory writes visible to
//                          the async proxy that wgmma reads through
//
// MN-major (B = a [K][N] tile with N contiguous, e.g. V [keys][head dims]):
// 64-element (128-byte) rows along N, row k at byte 128 k, chunk c at c ^ (k % 8),
// 8-row groups along K 1024 bytes apart (stride byte offset) and 64-column
// blocks along N `leading byte offset` apart (CUTLASS's canonical
// ((8,n),(8,k)):((1,LBO),(8,SBO)) in 16-byte units).
//
// The K-major tile layout the descriptor describes ("K-major, SWIZZLE_128B" in the PTX
// ISA's terms): rows of 64 16-bit elements = 128 bytes, row r at byte
// 128 r of the tile, its 16-byte chunk c stored at chunk c ^ (r % 8); 8-row
// groups 1024 bytes apart; the tile 1024-byte aligned (the swizzle is applied
// to absolute shared-memory address bits [4, 7) ^ [7, 10)). That is exactly
// the cp.async layout of the mma.sync kernels (chunk ^ row % 8), so the same
// copies feed both. A k16 step inside the 64-wide tile is the start address
// plus 32 bytes per step (the hardware swizzles the summed address).
//
// Accumulators of m64nNk16 (fp32): warp w of the warpgroup owns rows
// 16 w .. 16 w + 15; lane (g = lane / 4, t = lane % 4) holds, for each n8
// block j, d[4 j + 0, 1] = D[16 w + g][8 j + 2 t, + 1] and d[4 j + 2, 3] =
// D[16 w + g + 8][8 j + 2 t, + 1]: per warp, the C fragments of mma.m16n8k16
// (core/mma.cuh) for n8 tiles j = 0 .. N / 8 - 1, so epilogues written for
// mma.sync fragments take wgmma accumulators unchanged.
//
// Everything here exists only where __CUDA_ARCH_FEAT_SM90_ALL is defined (an
// sm_90a compilation); elsewhere the wrappers trap, and the host must not
// launch kernels that use them (QWEN3X_HAS_SM90A, set by CMake when the build
// includes sm_90a, tells it). Under QWEN3X_EMULATOR (tests/emulator) each
// wrapper calls the emulation of its instruction.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/gpu_constants.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QWEN3X_WGMMA_ENABLED 1
#endif

namespace qwen3x {

// Whether this compilation pass can run wgmma code: an sm_90a device pass, the emulator, or the
// host pass (which only names kernels). A kernel whose wgmma path is dead in a pass (sm_80) traps
// there instead of instantiating that path: build time, and no unreachable machine code.
#if !defined(__CUDA_ARCH__) || defined(QWEN3X_WGMMA_ENABLED) || defined(QWEN3X_EMULATOR)
constexpr bool kWgmmaInThisPass = true;
#else
constexpr bool kWgmmaInThisPass = false;
#endif

// Descriptor fields (PTX ISA, "Matrix Descriptor Format" of wgmma).
constexpr int kWgmmaSwizzleBytes = 128;       // row length of a swizzle atom
constexpr int kWgmmaAtomRows = 8;             // rows of a swizzle atom
static_assert(kWgmmaAtomBytes == kWgmmaSwizzleBytes * kWgmmaAtomRows, "core/gpu_constants.h");
constexpr uint64_t kWgmmaLayoutSwizzle128 = 1;  // bits 62-63
constexpr int kWgmmaStepBytes = 16 * 2;       // one k16 step of 16-bit elements

// Descriptor of a SW128 tile starting at shared address smem_addr (16-byte
// units in bits 0-13). K-major (the default arguments): leading byte offset
// (bits 16-29) unused by swizzled K-major layouts, set to 16 bytes (1) as the
// ISA asks; stride byte offset (bits 32-45) = 1024 bytes between 8-row groups.
// MN-major: leading = bytes between 64-element atoms along M / N, stride =
// bytes between 8-row groups along K. Base offset 0 (atoms 1024-aligned).
__host__ __device__ __forceinline__ uint64_t wgmma_desc_sw128(
    uint32_t smem_addr, uint32_t leading_bytes = 16, uint32_t stride_bytes = kWgmmaAtomBytes) {
  constexpr uint64_t kAddrMask = 0x3FFFF;  // 18-bit shared address, 14 bits after >> 4
  constexpr uint64_t kFieldMask = 0x3FFF;  // 14-bit offset fields, in 16-byte units
  return ((static_cast<uint64_t>(smem_addr) & kAddrMask) >> 4) |
         (((static_cast<uint64_t>(leading_bytes) >> 4) & kFieldMask) << 16) |
         (((static_cast<uint64_t>(stride_bytes) >> 4) & kFieldMask) << 32) |
         (kWgmmaLayoutSwizzle128 << 62);
}

// Orders this warp's accumulator register accesses before the wgmma that follows.
__device__ __forceinline__ void wgmma_fence() {
#if defined(QWEN3X_WGMMA_ENABLED)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(QWEN3X_EMULATOR)
  emu::wgmma_fence();
#else
  __trap();
#endif
}

// Closes the group of wgmma issued since the previous commit.
__device__ __forceinline__ void wgmma_commit() {
#if defined(QWEN3X_WGMMA_ENABLED)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(QWEN3X_EMULATOR)
  emu::wgmma_commit();
#else
  __trap();
#endif
}

// Waits until at most kPending of this warp's wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(QWEN3X_WGMMA_ENABLED)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#elif defined(QWEN3X_EMULATOR)
  emu::wgmma_wait(kPending);
#else
  __trap();
#endif
}

// Shared-memory writes of this thread (generic proxy: st.shared, cp.async)
// become visible to async-proxy reads (wgmma operands) ordered after it.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(QWEN3X_WGMMA_ENABLED)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(QWEN3X_EMULATOR)
  emu::fence_proxy_async();
#else
  __trap();
#endif
}

// Keeps the compiler from moving accumulator reads or writes across a wgmma
// issue / wait point (the registers change asynchronously in between).
template <int kRegs>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
#if !defined(QWEN3X_EMULATOR)
    asm volatile("" : "+f"(d[i])::"memory");
#endif
  }
}
// The same for A operands in registers: they must be final before wgmma.fence.
template <int kRegs>
__device__ __forceinline__ void wgmma_fence_operands(uint32_t (&a)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
#if !defined(QWEN3X_EMULATOR)
    asm volatile("" : "+r"(a[i])::"memory");
#endif
  }
}

// ---- the wgmma variants ------------------------------------------------------------------
// Register lists of the accumulators (fp32) and of A (four b32 registers,
// eight 16-bit values: the mma.m16n8k16 A fragment of the warp's 16 rows).
#define QWEN3X_WGMMA_D32_OPS                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define QWEN3X_WGMMA_D64_OPS                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "            \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define QWEN3X_WGMMA_D32(d)                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),  \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),            \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),            \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define QWEN3X_WGMMA_D64(d)                                                                     \
  QWEN3X_WGMMA_D32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),        \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),            \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),            \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),            \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),            \
      "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// One wgmma in a scope that sets the scale-d predicate p from operand P_OP
// (always 1 here: accumulate). TYPES is "bf16.bf16" or "f16.f16".
#define QWEN3X_WGMMA_ASM(SHAPE, TYPES, OPERANDS, P_OP)                                          \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " P_OP ", 0;\n"                                            \
  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPES " " OPERANDS ";\n}\n"
// The asm statement for T = bf16 or fp16; OUTS one (macro) argument, the inputs after it.
#define QWEN3X_WGMMA_BY_TYPE(T, SHAPE, OPERANDS, P_OP, OUTS, ...)                              \
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {                                            \
    asm volatile(QWEN3X_WGMMA_ASM(SHAPE, "bf16.bf16", OPERANDS, P_OP) : OUTS : __VA_ARGS__);   \
  } else {                                                                                      \
    static_assert(std::is_same_v<T, __half>, "wgmma: bf16 or fp16");                           \
    asm volatile(QWEN3X_WGMMA_ASM(SHAPE, "f16.f16", OPERANDS, P_OP) : OUTS : __VA_ARGS__);     \
  }

namespace wgmma_detail {
constexpr int kAccumulate = 1;  // scale-d: D = A B + D
}  // namespace wgmma_detail

// d (kN / 2 fp32 per thread, layout above: n8 blocks j < kN / 8) += A[64 x 16] x
// B[kN x 16]^T, both K-major SW128 tiles in shared memory (descriptors at the k
// step's start), kN = 64 or 128. After the descriptors: scale-d (p), scale-a =
// scale-b = 1 (no negation), tnsp-a = tnsp-b = 0 (both K-major).
template <typename T, int kN>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kN == 64 || kN == 128, "wgmma_ss: N = 64 or 128");
#if defined(QWEN3X_WGMMA_ENABLED)
  if constexpr (kN == 128) {
    QWEN3X_WGMMA_BY_TYPE(T, "m64n128k16", QWEN3X_WGMMA_D64_OPS ", %64, %65, p, 1, 1, 0, 0", "%66",
                         QWEN3X_WGMMA_D64(d), "l"(desc_a), "l"(desc_b),
                         "r"(wgmma_detail::kAccumulate))
  } else {
    QWEN3X_WGMMA_BY_TYPE(T, "m64n64k16", QWEN3X_WGMMA_D32_OPS ", %32, %33, p, 1, 1, 0, 0", "%34",
                         QWEN3X_WGMMA_D32(d), "l"(desc_a), "l"(desc_b),
                         "r"(wgmma_detail::kAccumulate))
  }
#elif defined(QWEN3X_EMULATOR)
  emu::wgmma_issue<T>("wgmma.m64nNk16 SS", kN, d, nullptr, desc_a, desc_b);
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  __trap();
#endif
}

// How B lies in shared memory for the RS form (its tnsp-b operand).
enum class WgmmaB { kKMajor = 0, kMNMajor = 1 };

// d (kN / 2 fp32 per thread) += A[64 x 16] x B, A from registers (a = the warp's
// mma.m16n8k16 A fragment of its 16 rows, as core/mma.cuh's A fragments), B a SW128 tile
// in shared memory: K-major ([kN][16], B^T as wgmma_ss reads it; tnsp-b = 0) or MN-major
// ([16][kN], N contiguous: rows of B are its K index; tnsp-b = 1). kN = 64 or 128. After the
// descriptor: scale-d (p), scale-a = scale-b = 1, tnsp-b.
template <typename T, int kN, WgmmaB kB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4],
                                         uint64_t desc_b) {
  static_assert(kN == 64 || kN == 128, "wgmma_rs: N = 64 or 128");
#if defined(QWEN3X_WGMMA_ENABLED)
  constexpr int kTransB = static_cast<int>(kB);
  if constexpr (kN == 128) {
    QWEN3X_WGMMA_BY_TYPE(T, "m64n128k16",
                         QWEN3X_WGMMA_D64_OPS ", {%64, %65, %66, %67}, %68, p, 1, 1, %70", "%69",
                         QWEN3X_WGMMA_D64(d), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                         "l"(desc_b), "r"(wgmma_detail::kAccumulate), "n"(kTransB))
  } else {
    QWEN3X_WGMMA_BY_TYPE(T, "m64n64k16",
                         QWEN3X_WGMMA_D32_OPS ", {%32, %33, %34, %35}, %36, p, 1, 1, %38", "%37",
                         QWEN3X_WGMMA_D32(d), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                         "l"(desc_b), "r"(wgmma_detail::kAccumulate), "n"(kTransB))
  }
#elif defined(QWEN3X_EMULATOR)
  emu::wgmma_issue<T>(kB == WgmmaB::kMNMajor ? "wgmma.m64nNk16 RS (B MN-major)"
                                             : "wgmma.m64nNk16 RS (B K-major)",
                      kN, d, a, 0, desc_b, kB == WgmmaB::kMNMajor);
#else
  (void)d;
  (void)a;
  (void)desc_b;
  __trap();
#endif
}

#undef QWEN3X_WGMMA_D32_OPS
#undef QWEN3X_WGMMA_D64_OPS
#undef QWEN3X_WGMMA_D32
#undef QWEN3X_WGMMA_D64
#undef QWEN3X_WGMMA_ASM
#undef QWEN3X_WGMMA_BY_TYPE

}  // namespace qwen3x
