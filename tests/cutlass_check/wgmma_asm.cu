// The operand order of our wgmma inline PTX (core/wgmma.cuh wgmma_ss, wgmma_rs)
// against CuTe's SM90 GMMA atoms (cute/arch/mma_sm90_gmma.hpp), made checkable without a GPU:
// compiled to PTX for sm_90a only (`nvcc -arch=sm_90a -ptx`), never run. Each pair of kernels
// ours_<case> / cute_<case> feeds the same values to one wgmma (descriptors and A registers from
// the kernel parameters, in the same order; accumulators loaded from and stored to `io` in register
// order d[0..]); tests/test_cutlass_crosscheck.py requires their PTX bodies to be identical up to
// the kernel name and whitespace: the same instruction, the descriptors / A registers in the same
// places, the same scale-d predicate and the same immediates after it (scale-a, scale-b, tnsp-a,
// tnsp-b; RS: no tnsp-a), and the accumulator registers in the same order.
#include <cstdint>
#include <utility>

#include "core/wgmma.cuh"

#include <cute/arch/mma_sm90_gmma.hpp>

namespace {

using cute::SM90::GMMA::Major;

template <int kN>
__device__ __forceinline__ void load(float (&d)[kN], const float* io) {
#pragma unroll
  for (int i = 0; i < kN; ++i) d[i] = io[threadIdx.x * kN + i];
}
template <int kN>
__device__ __forceinline__ void store(const float (&d)[kN], float* io) {
#pragma unroll
  for (int i = 0; i < kN; ++i) io[threadIdx.x * kN + i] = d[i];
}

// CuTe's fma(desc_a, desc_b, d00, d01, ...) / fma(a0, a1, a2, a3, desc_b, d00, ...).
template <class Op, int kN, size_t... I>
__device__ __forceinline__ void cute_ss(float (&d)[kN], uint64_t da, uint64_t db,
                                        std::index_sequence<I...>) {
  Op::fma(da, db, d[I]...);
}
template <class Op, int kN, size_t... I>
__device__ __forceinline__ void cute_rs(float (&d)[kN], const uint32_t (&a)[4], uint64_t db,
                                        std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], db, d[I]...);
}

}  // namespace

#define QWEN3X_SS_PAIR(NAME, T, N, CUTE_OP)                                                    \
  __global__ void ours_##NAME(uint64_t da, uint64_t db, float* io) {                           \
    float d[N / 2];                                                                            \
    load(d, io);                                                                               \
    qwen3x::wgmma_ss<T, N>(d, da, db);                                                         \
    store(d, io);                                                                              \
  }                                                                                            \
  __global__ void cute_##NAME(uint64_t da, uint64_t db, float* io) {                           \
    float d[N / 2];                                                                            \
    load(d, io);                                                                               \
    cute_ss<CUTE_OP>(d, da, db, std::make_index_sequence<N / 2>{});                            \
    store(d, io);                                                                              \
  }

#define QWEN3X_RS_PAIR(NAME, T, N, B, CUTE_OP)                                                 \
  __global__ void ours_##NAME(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t db, \
                              float* io) {                                                     \
    float d[N / 2];                                                                            \
    const uint32_t a[4] = {a0, a1, a2, a3};                                                    \
    load(d, io);                                                                               \
    qwen3x::wgmma_rs<T, N, qwen3x::WgmmaB::B>(d, a, db);                                       \
    store(d, io);                                                                              \
  }                                                                                            \
  __global__ void cute_##NAME(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t db, \
                              float* io) {                                                     \
    float d[N / 2];                                                                            \
    const uint32_t a[4] = {a0, a1, a2, a3};                                                    \
    load(d, io);                                                                               \
    cute_rs<CUTE_OP>(d, a, db, std::make_index_sequence<N / 2>{});                             \
    store(d, io);                                                                              \
  }

// SS, both operands K-major (tnsp-a = tnsp-b = 0), as the MoE GEMMs use them; RS with B K-major
// (tnsp-b = 0), as attention's Q K^T uses it, and with B MN-major (tnsp-b = 1), as its P V does.
namespace gmma = cute::SM90::GMMA;
using CuteSs64Bf16 = gmma::MMA_64x64x16_F32BF16BF16_SS<Major::K, Major::K>;
using CuteSs64Fp16 = gmma::MMA_64x64x16_F32F16F16_SS<Major::K, Major::K>;
using CuteSs128Bf16 = gmma::MMA_64x128x16_F32BF16BF16_SS<Major::K, Major::K>;
using CuteSs128Fp16 = gmma::MMA_64x128x16_F32F16F16_SS<Major::K, Major::K>;
using CuteRs64KBf16 = gmma::MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::K>;
using CuteRs64KFp16 = gmma::MMA_64x64x16_F32F16F16_RS<Major::K, Major::K>;
using CuteRs128Bf16 = gmma::MMA_64x128x16_F32BF16BF16_RS<Major::K, Major::MN>;
using CuteRs128Fp16 = gmma::MMA_64x128x16_F32F16F16_RS<Major::K, Major::MN>;

QWEN3X_SS_PAIR(ss64_bf16, __nv_bfloat16, 64, CuteSs64Bf16)
QWEN3X_SS_PAIR(ss64_fp16, __half, 64, CuteSs64Fp16)
QWEN3X_SS_PAIR(ss128_bf16, __nv_bfloat16, 128, CuteSs128Bf16)
QWEN3X_SS_PAIR(ss128_fp16, __half, 128, CuteSs128Fp16)
QWEN3X_RS_PAIR(rs64k_bf16, __nv_bfloat16, 64, kKMajor, CuteRs64KBf16)
QWEN3X_RS_PAIR(rs64k_fp16, __half, 64, kKMajor, CuteRs64KFp16)
QWEN3X_RS_PAIR(rs128_bf16, __nv_bfloat16, 128, kMNMajor, CuteRs128Bf16)
QWEN3X_RS_PAIR(rs128_fp16, __half, 128, kMNMajor, CuteRs128Fp16)
