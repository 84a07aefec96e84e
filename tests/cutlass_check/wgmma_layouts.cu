// Host-only cross-check of the Hopper wgmma operand encodings (core/wgmma.cuh and its two users,
// attention/mainloop.cuh and moe/grouped_gemm.cuh) against NVIDIA CUTLASS's CuTe, an independent
// implementation of the same hardware conventions. No GPU is needed: nothing here runs on a device,
// nothing touches shared memory; shared-memory "pointers" are plain numbers (byte addresses) that
// CuTe only does arithmetic on.
//
// For every operand tile the kernels hand to wgmma, at every k16 step they issue, for every
// pipeline stage, at several 1024-aligned shared-memory bases, and for bf16 and fp16:
//   desc.*    our 64-bit descriptor (wgmma_desc_sw128 with the kernel's address arithmetic) ==
//             CuTe's: the canonical SW128 atom (GMMA::Layout_K_SW128_Atom / Layout_MN_SW128_Atom)
//             tiled to our tile shape (tile_to_shape), partitioned by a TiledMMA of the same wgmma
//             atom (partition_A / partition_B) and turned into descriptors by make_fragment_A / _B
//             (make_gmma_desc + DescriptorIterator: the path CUTLASS's SM90 GEMM mainloops take);
//             the k-step descriptor is the fragment's element (0, 0, k).
//   ldsm.*    attention's Q K^T takes Q from registers: every Q element's shared byte address as
//             load_q_fragments' ldmatrix reads it into the register and half that CuTe's RS A
//             layout (ALayout_64x16) gives it == CuTe's address of that element.
//   layout.*  every element's shared byte address under our layout functions (as the kernels'
//             loaders store it) == CuTe's address of the same element (Swizzle<3,4,3> applied to
//             the absolute byte address of the tiled atom, CuTe's position-dependent swizzle_ptr).
//   frag.*    the accumulator (CLayout_64xN, N = 64, 128; the TiledMMA's C layout for MoE's two
//             warpgroups) and register-A (ALayout_64x16) thread/value -> (m, n) / (m, k) maps ==
//             the conventions our code uses (core/wgmma.cuh header, softmax.cuh's P packing, the
//             epilogues' row/column formulas).
//
// The one substitution: CuTe's make_gmma_desc takes the start address from
// cute::cast_smem_ptr_to_uint(ptr), which is __cvta_generic_to_shared on a device and, on the host,
// prints an error and returns 0. The overload below (namespace cutlass, found by argument-dependent
// lookup for the uint128_t const* that make_gmma_desc passes, and preferred as an exact match)
// returns the pointer's value instead, i.e. the shared byte address we chose. Everything else
// (layout type, LBO / SBO from the tensor's strides, base offset, k-step advance) is CuTe's.
//
// The kernels' descriptor address arithmetic lives in device functions that issue wgmma, so it is
// restated here; each restated kernel line is quoted on a "MIRRORS <file>: <text>" comment, and
// tests/test_cutlass_crosscheck.py checks that every quoted text still occurs in that file (a
// change to the kernel then fails the test until the restatement follows it). Pure helpers (the
// offset functions, wgmma_desc_sw128, the constants) are the real code.
//
// The CuTe side runs as CUTLASS's SM90 collective mainloops do; where our storage differs from
// CuTe's default tiling order (V's two dim-halves), the order is chosen to describe our storage and
// the element-address check (layout.*) confirms that it does.
//
// Prints one line per check family and a final "mismatches: N"; exits 1 when N > 0.
#include <cstdint>
#include <cstdio>
#include <string>

#include "attention/kernel_traits.cuh"
#include "attention/mainloop.cuh"
#include "core/wgmma.cuh"
#include "moe/gemm_config.h"
#include "moe/grouped_gemm.cuh"

#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

namespace cutlass {
// The substitution described above (cute/arch/util.hpp cast_smem_ptr_to_uint, host side).
__host__ __device__ inline uint32_t cast_smem_ptr_to_uint(uint128_t const* ptr) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ptr));
}
}  // namespace cutlass

namespace {

using namespace cute;
using qwen3x::wgmma_desc_sw128;

// ---- bookkeeping ---------------------------------------------------------------------------
struct Family {
  explicit Family(const char* n) : name(n) {}
  const char* name;
  long compared = 0;
  long mismatched = 0;
  std::string sample;  // the first comparison, for the log
};
constexpr int kMaxReports = 12;  // per family

bool report(Family& f) {  // counts a mismatch; true while it should be printed
  ++f.mismatched;
  return f.mismatched <= kMaxReports;
}

void print_desc(const char* who, uint64_t d) {
  std::printf("      %-5s 0x%016llx  start %#x (addr %#x)  LBO %u B  SBO %u B  base_offset %u  "
              "layout %u\n",
              who, static_cast<unsigned long long>(d), unsigned(d & 0x3FFF),
              unsigned(d & 0x3FFF) << 4, unsigned((d >> 16) & 0x3FFF) << 4,
              unsigned((d >> 32) & 0x3FFF) << 4, unsigned((d >> 49) & 0x7),
              unsigned((d >> 62) & 0x3));
}

void check_desc(Family& f, const std::string& where, uint64_t ours, uint64_t theirs) {
  if (f.compared++ == 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "ours 0x%016llx CuTe 0x%016llx (%s)",
                  static_cast<unsigned long long>(ours), static_cast<unsigned long long>(theirs),
                  where.c_str());
    f.sample = buf;
  }
  if (ours == theirs) return;
  if (report(f)) {
    std::printf("  MISMATCH %s %s: bits differing 0x%016llx\n", f.name, where.c_str(),
                static_cast<unsigned long long>(ours ^ theirs));
    print_desc("ours", ours);
    print_desc("CuTe", theirs);
  }
}

void check_value(Family& f, const std::string& where, long ours, long theirs) {
  ++f.compared;
  if (ours == theirs) return;
  if (report(f)) {
    std::printf("  MISMATCH %s %s: ours %ld (%#lx), CuTe %ld (%#lx)\n", f.name, where.c_str(),
                ours, ours, theirs, theirs);
  }
}

// The same for a fragment map's column-major tile index m + rows * n, printed as coordinates.
void check_coord(Family& f, const std::string& where, long ours, long theirs, long rows) {
  ++f.compared;
  if (ours == theirs) return;
  if (report(f)) {
    std::printf("  MISMATCH %s %s: ours (%ld, %ld), CuTe (%ld, %ld)\n", f.name, where.c_str(),
                ours % rows, ours / rows, theirs % rows, theirs / rows);
  }
}

std::string fmt(const char* format, long a = 0, long b = 0, long c = 0, long d = 0, long e = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, format, a, b, c, d, e);
  return buf;
}

// A CuTe shared-memory tensor of layout `layout` whose first element sits at byte `addr`.
template <class T, class Layout>
auto smem_tensor(uint32_t addr, Layout const& layout) {
  return make_tensor(make_smem_ptr(reinterpret_cast<T*>(static_cast<uintptr_t>(addr))), layout);
}

// The shared byte address CuTe gives element `coord` of a swizzled smem tensor: the layout's offset
// added to the pointer, then the pointer's swizzle applied to the absolute address (swizzle_ptr).
template <class Tensor, class... Coord>
uint32_t cute_address(Tensor const& t, Coord... coord) {
  auto p = t.data() + t.layout()(coord...);
  return static_cast<uint32_t>(
      reinterpret_cast<uintptr_t>(raw_pointer_cast(decltype(p)::apply_swizzle(p.get()))));
}

// The element types and their wgmma atoms (K = K-major, MN = MN-major operand).
template <class T>
struct Atoms;
template <>
struct Atoms<cutlass::bfloat16_t> {
  static constexpr const char* name = "bf16";
  using SS64 = SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  using SS128 = SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
  using RS64_K = SM90_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>;
  using RS128_MN = SM90_64x128x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>;
};
template <>
struct Atoms<cutlass::half_t> {
  static constexpr const char* name = "fp16";
  using SS64 = SM90_64x64x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
  using SS128 = SM90_64x128x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>;
  using RS64_K = SM90_64x64x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::K>;
  using RS128_MN = SM90_64x128x16_F32F16F16_RS<GMMA::Major::K, GMMA::Major::MN>;
};

// 1024-aligned shared-memory bases (what the kernels' round_up to kWgmmaAtomBytes yields), chosen
// so that the stages reach high address bits (the largest MoE stage ends below 2^18 = the 18-bit
// shared window the descriptor encodes).
// MIRRORS csrc/moe/grouped_gemm.cuh: smem_base = round_up<uint32_t>(smem_base, kWgmmaAtomBytes);
// MIRRORS csrc/attention/attention_fwd.cuh: base += round_up<uint32_t>(smem_u32(smem), kWgmmaAtomBytes) - smem_u32(smem);
// MIRRORS csrc/attention/attention_fwd.cuh: T* sQ = reinterpret_cast<T*>(base);
constexpr uint32_t kBases[] = {0x400, 0xB000, 0x1C400};
static_assert(kBases[0] % qwen3x::kWgmmaAtomBytes == 0 && kBases[1] % qwen3x::kWgmmaAtomBytes == 0 &&
                  kBases[2] % qwen3x::kWgmmaAtomBytes == 0,
              "bases as the kernels align them");

// =============================================================================================
// MoE grouped GEMM, kWgmma mainloop (PrefillWgmmaGemmConfig: two warpgroups x m64n128k16)
// =============================================================================================
namespace moe = qwen3x::moe;
using MoeCfg = moe::PrefillWgmmaGemmConfig;
constexpr int kMoeBlockK = MoeCfg::kBlockK;
// MIRRORS csrc/moe/grouped_gemm.cuh: constexpr uint32_t kStageBytes = Cfg::kStageElems * 2;
constexpr uint32_t kMoeStageBytes = MoeCfg::kStageElems * 2;
// MIRRORS csrc/moe/grouped_gemm.cuh: constexpr uint32_t kBOffsetBytes = Cfg::kBlockM * kBlockK * 2;
constexpr uint32_t kMoeBOffsetBytes = MoeCfg::kBlockM * kMoeBlockK * 2;

// Our descriptors, as mainloop_wgmma computes them for stage `stage`, warp `warp`, k16 step kk.
uint64_t moe_desc_a(uint32_t smem_base, int stage, int warp, int kk) {
  // MIRRORS csrc/moe/grouped_gemm.cuh: const uint32_t sA = smem_base + (kt % Cfg::kStages) * kStageBytes;
  const uint32_t sA = smem_base + stage * kMoeStageBytes;
  // MIRRORS csrc/moe/grouped_gemm.cuh: const uint32_t a_group_offset = (warp / kWgmmaWarps) * kWgmmaRows * kBlockK * 2;
  const uint32_t a_group_offset = (warp / moe::kWgmmaWarps) * moe::kWgmmaRows * kMoeBlockK * 2;
  // MIRRORS csrc/moe/grouped_gemm.cuh: wgmma_ss<T, kWgmmaN>(d, wgmma_desc_sw128(sA + a_group_offset + kk * kWgmmaStepBytes),
  return wgmma_desc_sw128(sA + a_group_offset + kk * qwen3x::kWgmmaStepBytes);
}
uint64_t moe_desc_b(uint32_t smem_base, int stage, int kk) {
  const uint32_t sA = smem_base + stage * kMoeStageBytes;
  // MIRRORS csrc/moe/grouped_gemm.cuh: const uint32_t sB = sA + kBOffsetBytes;
  const uint32_t sB = sA + kMoeBOffsetBytes;
  // MIRRORS csrc/moe/grouped_gemm.cuh: wgmma_desc_sw128(sB + kk * kWgmmaStepBytes));
  return wgmma_desc_sw128(sB + kk * qwen3x::kWgmmaStepBytes);
}

template <class T>
void check_moe(Family& desc_a, Family& desc_b, Family& layout) {
  static_assert(MoeCfg::kWgmma && MoeCfg::kBlockN == moe::kWgmmaN && kMoeBlockK == 64, "config");
  using Op = typename Atoms<T>::SS128;
  // Two warpgroups stacked along M (rows 64 g .. 64 g + 63), as MoeCfg lays them out.
  using WarpgroupsM = Int<MoeCfg::kBlockM / moe::kWgmmaRows>;
  auto tiled = make_tiled_mma(Op{}, Layout<Shape<WarpgroupsM, _1, _1>>{});
  auto layout_a = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                make_shape(Int<MoeCfg::kBlockM>{}, Int<kMoeBlockK>{}));
  auto layout_b = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                make_shape(Int<MoeCfg::kBlockN>{}, Int<kMoeBlockK>{}));
  const char* tn = Atoms<T>::name;
  for (uint32_t base : kBases) {
    for (int stage = 0; stage < MoeCfg::kStages; ++stage) {
      const uint32_t a_addr = base + stage * kMoeStageBytes;
      const uint32_t b_addr = a_addr + kMoeBOffsetBytes;
      auto sA = smem_tensor<T>(a_addr, layout_a);
      auto sB = smem_tensor<T>(b_addr, layout_b);
      // (a) descriptors, per warp (each warpgroup's threads agree; warp w's thread 32 w asks)
      for (int warp = 0; warp < MoeCfg::kThreads / 32; ++warp) {
        auto thr = tiled.get_slice(warp * 32);
        auto frag_a = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K) descriptors
        auto frag_b = thr.make_fragment_B(thr.partition_B(sB));
        static_assert(decltype(size<1>(frag_a))::value == 1 &&
                          decltype(size<1>(frag_b))::value == 1 &&
                          decltype(size<2>(frag_a))::value == kMoeBlockK / 16,
                      "one wgmma per warpgroup per k16 step");
        for (int kk = 0; kk < kMoeBlockK / 16; ++kk) {
          const std::string where =
              tn + fmt(" base %#lx stage %ld warp %ld kk %ld", base, stage, warp, kk);
          check_desc(desc_a, where, moe_desc_a(base, stage, warp, kk), uint64_t(frag_a(0, 0, kk)));
          check_desc(desc_b, where, moe_desc_b(base, stage, kk), uint64_t(frag_b(0, 0, kk)));
        }
      }
      // (b) every element, at the address the kernel's cp.async stores it:
      //   store_offset = swizzled(load_row, chunk) (load_row = tid / kChunksPerRow, chunk = tid %
      //   kChunksPerRow), copy i of A at sA + (store_offset + i * kPassElems) * 2 holds row
      //   load_row + i * kRowsPerPass, k = 8 chunk .. 8 chunk + 7 (the same for B, kBLoads)
      // MIRRORS csrc/moe/grouped_gemm.cuh: const int store_offset = swizzled(load_row, chunk);
      // MIRRORS csrc/moe/grouped_gemm.cuh: cp_async_16(sA + (store_offset + i * kPassElems) * 2, a_src[i] + k0, a_valid[i]);
      // MIRRORS csrc/moe/grouped_gemm.cuh: cp_async_16(sB + (store_offset + i * kPassElems) * 2, b_src[i] + k0, true);
      constexpr int kPassElems = MoeCfg::kRowsPerPass * kMoeBlockK;
      constexpr int kChunkElems = moe::kGemmChunkBytes / 2;
      for (int operand = 0; operand < 2; ++operand) {
        const uint32_t tile = operand == 0 ? a_addr : b_addr;
        const int loads = operand == 0 ? MoeCfg::kALoads : MoeCfg::kBLoads;
        for (int tid = 0; tid < MoeCfg::kThreads; ++tid) {
          const int chunk = tid % MoeCfg::kChunksPerRow;
          const int load_row = tid / MoeCfg::kChunksPerRow;
          const int store_offset = moe::gemm_detail::swizzled(load_row, chunk);
          for (int i = 0; i < loads; ++i) {
            for (int e = 0; e < kChunkElems; ++e) {
              const int row = load_row + i * MoeCfg::kRowsPerPass;
              const int k = chunk * kChunkElems + e;
              const uint32_t ours = tile + (store_offset + i * kPassElems) * 2 + e * 2;
              const uint32_t theirs =
                  operand == 0 ? cute_address(sA, row, k) : cute_address(sB, row, k);
              check_value(layout,
                          std::string(tn) + (operand == 0 ? " A" : " B") +
                              fmt(" base %#lx stage %ld row %ld k %ld", base, stage, row, k),
                          ours, theirs);
            }
          }
        }
      }
    }
  }
}

// =============================================================================================
// Attention, kWgmma mainloop: S = Q K^T (m64n64k16 RS: Q fragments by ldmatrix, K K-major),
// O += P V (m64n128k16 RS, V MN-major)
// =============================================================================================
namespace attn = qwen3x::attn;
// Shared layout of attention_fwd.cuh (element offsets there, bytes here).
// MIRRORS csrc/attention/attention_fwd.cuh: T* sK = sQ + kTileQElems;
constexpr uint32_t kQBytes = attn::kTileQElems * attn::kElemBytes;
// MIRRORS csrc/attention/attention_fwd.cuh: T* sV = sK + kStages * kTileKVElems;
constexpr uint32_t kKStagesBytes = attn::kStages * attn::kTileKVElems * attn::kElemBytes;
// MIRRORS csrc/attention/attention_fwd.cuh: constexpr uint32_t kTileKVBytes = kTileKVElems * kElemBytes;
constexpr uint32_t kTileKVBytes = attn::kTileKVElems * attn::kElemBytes;

// MIRRORS csrc/attention/attention_fwd.cuh: const uint32_t stage_offset = ((tile - tile_begin) % kStages) * kTileKVBytes;
uint32_t attn_sK(uint32_t base, int stage) {
  // MIRRORS csrc/attention/attention_fwd.cuh: warpgroup_qk<T>(s, qf, sK_addr + stage_offset);
  return base + kQBytes + stage * kTileKVBytes;
}
uint32_t attn_sV(uint32_t base, int stage) {
  // MIRRORS csrc/attention/attention_fwd.cuh: warpgroup_pv<T>(o, pf, sV_addr + stage_offset);
  return base + kQBytes + kKStagesBytes + stage * kTileKVBytes;
}

// Our descriptors, as warpgroup_qk / warpgroup_pv compute them.
uint64_t attn_desc_k(uint32_t sK, int kk) {
  // MIRRORS csrc/attention/mainloop.cuh: const uint32_t step = (kk % kStepsPerHalf) * kWgmmaStepBytes;
  const uint32_t step = (kk % attn::kStepsPerHalf) * qwen3x::kWgmmaStepBytes;
  // MIRRORS csrc/attention/mainloop.cuh: wgmma_desc_sw128(sK + (kk / kStepsPerHalf) * kHalfTileKVBytes + step));
  return wgmma_desc_sw128(sK + (kk / attn::kStepsPerHalf) * attn::kHalfTileKVBytes + step);
}
uint64_t attn_desc_v(uint32_t sV, int kc) {
  // MIRRORS csrc/attention/mainloop.cuh: d, pf[kc], wgmma_desc_sw128(sV + kc * kKeyStepBytes, kHalfTileKVBytes, kWgmmaAtomBytes));
  return wgmma_desc_sw128(sV + kc * attn::kKeyStepBytes, attn::kHalfTileKVBytes,
                          qwen3x::kWgmmaAtomBytes);
}

// The shared byte address load_q_fragments' ldmatrix.x4 reads for lane `lane` of warp `warp` at
// k16 step kk: the start of the 8-element row of matrix lane / 8 that this lane supplies.
uint32_t attn_q_ldsm_row(uint32_t sQ, int warp, int lane, int kk) {
  // MIRRORS csrc/attention/mainloop.cuh: const int row = warp * kRowsPerWarp + lane % 8 + 8 * ((lane / 8) % 2);
  const int row = warp * attn::kRowsPerWarp + lane % 8 + 8 * ((lane / 8) % 2);
  // MIRRORS csrc/attention/mainloop.cuh: ldmatrix_x4(qf[kk], sQ + tile_offset<kWgmma>(row, 2 * kk + lane / 16, kBlockM) * kElemBytes);
  return sQ + attn::tile_offset<true>(row, 2 * kk + lane / 16, attn::kBlockM) * attn::kElemBytes;
}

// Our byte address of (row, head dim d) of a [rows][128] tile in the Hopper layout.
uint32_t attn_ours(uint32_t tile, int row, int d, int rows) {
  return tile + attn::tile_offset<true>(row, d / attn::kChunkElems, rows) * attn::kElemBytes +
         (d % attn::kChunkElems) * attn::kElemBytes;
}

template <class T>
void check_attention(Family& ldsm_q, Family& desc_k, Family& desc_v, Family& layout) {
  static_assert(qwen3x::kHeadDim == 128 && attn::kBlockM == 64 && attn::kBlockN == 64, "shapes");
  using Atom = Atoms<T>;
  auto tiled_qk = make_tiled_mma(typename Atom::RS64_K{});
  auto tiled_pv = make_tiled_mma(typename Atom::RS128_MN{});
  // Q [64 rows][128 dims] and K [64 keys][128 dims], K-major: the SW128 atom (8 x 64) tiled over
  // (rows, dims) in CuTe's default (column-major) order, i.e. all row groups of dims 0-63, then all
  // of dims 64-127: our two [rows][64] halves.
  auto layout_q = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                make_shape(Int<attn::kBlockM>{}, Int<qwen3x::kHeadDim>{}));
  auto layout_k = tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                make_shape(Int<attn::kBlockN>{}, Int<qwen3x::kHeadDim>{}));
  // V as wgmma's B operand: (N = 128 head dims, K = 64 keys), MN-major (dims contiguous). The MN
  // SW128 atom (64 dims x 8 keys) tiled with the K (key) mode first, then N: all 8-key groups of
  // dims 0-63, then those of dims 64-127 (Step<_2, _1>) -- our [half][key][64] storage. (CuTe's
  // default order would put the two dim-halves of one 8-key group next to each other instead; both
  // are canonical GMMA MN layouts, make_gmma_desc derives LBO / SBO from whichever it is given.)
  auto layout_v = tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                make_shape(Int<qwen3x::kHeadDim>{}, Int<attn::kBlockN>{}),
                                Step<_2, _1>{});
  const char* tn = Atom::name;
  for (uint32_t base : kBases) {
    const uint32_t sQ = base;
    auto tQ = smem_tensor<T>(sQ, layout_q);
    auto thr_qk = tiled_qk.get_slice(0);
    auto thr_pv = tiled_pv.get_slice(0);
    // Q K^T's A operand, registers: load_q_fragments' ldmatrix.x4 hands lane L, in register j,
    // elements 2 (L % 4), + 1 of row L / 4 of matrix j, whose row address lane 8 j + L / 4
    // supplied. That must be, for every thread, register and half h, the element CuTe's RS A
    // layout assigns to value 2 j + h (ALayout_64x16: (thread, value) -> m + 64 k), at k step kk
    // (head dims 16 kk ..), read from CuTe's address of that element of Q.
    {
      using AL = typename MMA_Traits<typename Atom::RS64_K>::ALayout;
      static_assert(is_same<AL, GMMA::ALayout_64x16>::value, "the RS atom's A layout");
      for (int tid = 0; tid < 128; ++tid) {
        const int warp = tid / 32, lane = tid % 32;
        for (int kk = 0; kk < attn::kHeadStepsK; ++kk) {
          for (int j = 0; j < 4; ++j) {
            const uint32_t row_start = attn_q_ldsm_row(sQ, warp, 8 * j + lane / 4, kk);
            for (int h = 0; h < 2; ++h) {
              const int mk = AL{}(tid, 2 * j + h);
              const int m = mk % 64, k = mk / 64;
              check_value(ldsm_q, std::string(tn) + fmt(" base %#lx tid %ld kk %ld", base, tid, kk) +
                                      fmt(" a[%ld] half %ld", j, h),
                          row_start + (2 * (lane % 4) + h) * attn::kElemBytes,
                          cute_address(tQ, m, attn::kMmaK * kk + k));
            }
          }
        }
      }
    }
    for (int row = 0; row < attn::kBlockM; ++row) {
      for (int d = 0; d < qwen3x::kHeadDim; ++d) {
        check_value(layout, std::string(tn) + fmt(" Q base %#lx row %ld dim %ld", base, row, d),
                    attn_ours(sQ, row, d, attn::kBlockM), cute_address(tQ, row, d));
      }
    }
    // The Q loader's stores (load_q_tile): row tid / 16 + 8 i, chunk tid % 16, via tile_offset.
    // MIRRORS csrc/attention/mainloop.cuh: cp_async_16(sQ + tile_offset<kWgmma>(local_row, chunk, kBlockM) * kElemBytes, src, in_range);
    for (int stage = 0; stage < attn::kStages; ++stage) {
      const uint32_t sK = attn_sK(base, stage);
      const uint32_t sV = attn_sV(base, stage);
      auto tK = smem_tensor<T>(sK, layout_k);
      auto tV = smem_tensor<T>(sV, layout_v);
      auto frag_k = thr_qk.make_fragment_B(thr_qk.partition_B(tK));
      auto frag_v = thr_pv.make_fragment_B(thr_pv.partition_B(tV));
      static_assert(decltype(size<2>(frag_v))::value == attn::kKeyStepsK, "4 k16 steps of P V");
      for (int kk = 0; kk < attn::kHeadStepsK; ++kk) {
        check_desc(desc_k, std::string(tn) + fmt(" base %#lx stage %ld kk %ld", base, stage, kk),
                   attn_desc_k(sK, kk), uint64_t(frag_k(0, 0, kk)));
      }
      for (int kc = 0; kc < attn::kKeyStepsK; ++kc) {
        check_desc(desc_v, std::string(tn) + fmt(" base %#lx stage %ld kc %ld", base, stage, kc),
                   attn_desc_v(sV, kc), uint64_t(frag_v(0, 0, kc)));
      }
      // Every element at the address the K / V loader stores it (KVLoader::init / load): thread
      // tid copies chunk tid % 16 of keys tid / 16 + 8 i to tile + dst + i * kPassBytes.
      // MIRRORS csrc/attention/mainloop.cuh: dst = tile_offset<kWgmma>(row, chunk, kBlockN) * kElemBytes;
      // MIRRORS csrc/attention/mainloop.cuh: cp_async_16(tile_base + dst + i * kPassBytes, in_range ? row_src : fallback, in_range);
      constexpr uint32_t kPassBytes = attn::KVLoader<__nv_bfloat16, true>::kPassBytes;
      for (int tid = 0; tid < attn::kThreads; ++tid) {
        const int row = tid / attn::kChunksPerRow;
        const int chunk = tid % attn::kChunksPerRow;
        const uint32_t dst = attn::tile_offset<true>(row, chunk, attn::kBlockN) * attn::kElemBytes;
        for (int i = 0; i < attn::kBlockN / attn::kLoadRowsPerPass; ++i) {
          for (int e = 0; e < attn::kChunkElems; ++e) {
            const int key = row + i * attn::kLoadRowsPerPass;
            const int d = chunk * attn::kChunkElems + e;
            const uint32_t off = dst + i * kPassBytes + e * attn::kElemBytes;
            const std::string where =
                fmt(" base %#lx stage %ld key %ld dim %ld", base, stage, key, d);
            check_value(layout, std::string(tn) + " K" + where, sK + off, cute_address(tK, key, d));
            // V's CuTe tensor is (N = dim, K = key)
            check_value(layout, std::string(tn) + " V" + where, sV + off, cute_address(tV, d, key));
          }
        }
      }
    }
    // Q's loader, every element (the function the stores use, through load_q_tile's indexing).
    for (int tid = 0; tid < attn::kThreads; ++tid) {
      const int chunk = tid % attn::kChunksPerRow;
      for (int i = 0; i < attn::kBlockM / attn::kLoadRowsPerPass; ++i) {
        // MIRRORS csrc/attention/mainloop.cuh: const int local_row = tid / kChunksPerRow + i * kLoadRowsPerPass;
        const int local_row = tid / attn::kChunksPerRow + i * attn::kLoadRowsPerPass;
        for (int e = 0; e < attn::kChunkElems; ++e) {
          const int d = chunk * attn::kChunkElems + e;
          const uint32_t ours =
              sQ + attn::tile_offset<true>(local_row, chunk, attn::kBlockM) * attn::kElemBytes +
              e * attn::kElemBytes;
          check_value(layout, tn + fmt(" Q-loader base %#lx row %ld dim %ld", base, local_row, d),
                      ours, cute_address(tQ, local_row, d));
        }
      }
    }
  }
}

// =============================================================================================
// Register fragments
// =============================================================================================
// Our accumulator convention (core/wgmma.cuh header): thread tid of the warpgroup (warp w = tid /
// 32, lane = 4 g + t), register d[4 j + e] = D[16 w + g + 8 (e / 2)][8 j + 2 t + e % 2].
void ours_c(int tid, int v, int& m, int& n) {
  const int w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int j = v / 4, e = v % 4;
  m = 16 * w + g + 8 * (e / 2);
  n = 8 * j + 2 * t + e % 2;
}

// The atom's CLayout ((thread, value) -> m + 64 n) against ours_c.
template <class Op>
void check_c_layout(Family& f, const char* what, int n_cols) {
  using CL = typename MMA_Traits<Op>::CLayout;  // (thread, value) -> m + 64 n
  static_assert(decltype(size<0>(CL{}))::value == 128, "a warpgroup");
  if (int(size<1>(CL{})) != n_cols / 2) {
    check_value(f, std::string(what) + " values per thread", n_cols / 2, int(size<1>(CL{})));
    return;
  }
  for (int tid = 0; tid < 128; ++tid) {
    for (int v = 0; v < n_cols / 2; ++v) {
      int m, n;
      ours_c(tid, v, m, n);
      check_coord(f, std::string(what) + fmt(" tid %ld d[%ld] (m, n)", tid, v), m + 64 * n,
                  CL{}(tid, v), 64);
    }
  }
}

template <class T>
void check_fragments(Family& frag_c, Family& frag_a) {
  using Atom = Atoms<T>;
  const std::string tn = Atom::name;
  // 1. The atoms' own C layouts (CLayout_64x64, CLayout_64x128) against the header's convention.
  check_c_layout<typename Atom::SS64>(frag_c, (tn + " CLayout m64n64k16 SS").c_str(), 64);
  check_c_layout<typename Atom::SS128>(frag_c, (tn + " CLayout m64n128k16 SS").c_str(), 128);
  check_c_layout<typename Atom::RS128_MN>(frag_c, (tn + " CLayout m64n128k16 RS").c_str(), 128);

  // 2. Attention: s[nt][e] (= d[4 nt + e], warpgroup_qk's reinterpret_cast) and o[j][e] are read
  //    by softmax / masking / the epilogue as row = 16 warp + lane / 4 + 8 half (half = e / 2),
  //    column = 8 nt + 2 (lane % 4) + e % 2: the TiledMMA's C layouts of the two 1-warpgroup MMAs.
  // MIRRORS csrc/attention/mainloop.cuh: float(&d)[kScoreTilesN * 4] = reinterpret_cast<float(&)[kScoreTilesN * 4]>(s);
  // MIRRORS csrc/attention/mainloop.cuh: float(&d)[kHeadTilesN * 4] = reinterpret_cast<float(&)[kHeadTilesN * 4]>(o);
  // MIRRORS csrc/attention/epilogue.cuh: const int local_row = warp * kRowsPerWarp + lane / 4 + 8 * half;
  // MIRRORS csrc/attention/epilogue.cuh: pack_float2<T>(o[j][2 * half] * inv_l[half], o[j][2 * half + 1] * inv_l[half]);
  // MIRRORS csrc/attention/epilogue.cuh: *reinterpret_cast<uint32_t*>(sO + swizzled_offset(local_row, j) + 2 * (lane % 4)) = packed;
  {
    auto tv_s = make_tiled_mma(typename Atom::SS64{}).get_layoutC_TV();      // -> m + 64 n
    auto tv_o = make_tiled_mma(typename Atom::RS128_MN{}).get_layoutC_TV();  // -> m + 64 n
    for (int tid = 0; tid < attn::kThreads; ++tid) {
      const int warp = tid / 32, lane = tid % 32;
      for (int nt = 0; nt < attn::kScoreTilesN; ++nt) {
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int row = warp * attn::kRowsPerWarp + lane / 4 + 8 * half;
          const int key = 8 * nt + 2 * (lane % 4) + e % 2;
          check_coord(frag_c, tn + fmt(" attention s[%ld][%ld] tid %ld (row, key)", nt, e, tid),
                      row + 64 * key, tv_s(tid, 4 * nt + e), 64);
        }
      }
      for (int j = 0; j < attn::kHeadTilesN; ++j) {
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int row = warp * attn::kRowsPerWarp + lane / 4 + 8 * half;
          const int dim = j * attn::kChunkElems + 2 * (lane % 4) + e % 2;  // chunk j of the row
          check_coord(frag_c, tn + fmt(" attention o[%ld][%ld] tid %ld (row, dim)", j, e, tid),
                      row + 64 * dim, tv_o(tid, 4 * j + e), 64);
        }
      }
    }
  }

  // 3. MoE: acc[0][ni][e] (= d[4 ni + e], mainloop_wgmma's reinterpret_cast) of warp `warp` of
  //    the 256 threads (two warpgroups stacked along M) is read by the epilogues as row = warp_m *
  //    kWarpM + mi * 16 + g + 8 h, column (B row) = warp_n * kWarpN + ni * 8 + 2 t + e % 2, with
  //    warp_m = warp / kWarpsN, warp_n = warp % kWarpsN: the 2x1 TiledMMA's C layout.
  // MIRRORS csrc/moe/grouped_gemm.cuh: float(&d)[kWgmmaN / 2] = reinterpret_cast<float(&)[kWgmmaN / 2]>(acc);
  // MIRRORS csrc/moe/gemm_epilogue.cuh: const int r = warp_m * Cfg::kWarpM + mi * 16 + g + 8 * h;
  // MIRRORS csrc/moe/gemm_epilogue.cuh: T* dst = y + static_cast<int64_t>(pick) * y_stride + col0 + warp_n * Cfg::kWarpN + 2 * t;
  // MIRRORS csrc/moe/gemm_epilogue.cuh: epilogue_detail::store_pair(dst + ni * 8, round_to<T>(acc[mi][ni][2 * h]) * w,
  {
    auto tiled = make_tiled_mma(typename Atom::SS128{},
                                Layout<Shape<Int<MoeCfg::kBlockM / moe::kWgmmaRows>, _1, _1>>{});
    auto tv = tiled.get_layoutC_TV();  // (thread, value) -> m + kBlockM n
    for (int tid = 0; tid < MoeCfg::kThreads; ++tid) {
      const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
      const int warp_m = warp / MoeCfg::kWarpsN, warp_n = warp % MoeCfg::kWarpsN;
      for (int ni = 0; ni < MoeCfg::kMmaN; ++ni) {
        for (int e = 0; e < 4; ++e) {
          const int mi = 0, h = e / 2;
          const int r = warp_m * MoeCfg::kWarpM + mi * 16 + g + 8 * h;
          const int col = warp_n * MoeCfg::kWarpN + ni * 8 + 2 * t + e % 2;
          check_coord(frag_c, tn + fmt(" moe acc[0][%ld][%ld] tid %ld (row, B row)", ni, e, tid),
                      r + MoeCfg::kBlockM * col, tv(tid, 4 * ni + e), MoeCfg::kBlockM);
        }
      }
    }
  }

  // 4. The register A operand of P V. softmax.cuh packs pf[kc][r] = pack_float2(lo, hi) (lo in the
  //    low 16 bits) of S accumulators: r = 0: s[2 kc][0, 1], 1: s[2 kc][2, 3],
  //    2: s[2 kc + 1][0, 1], 3: s[2 kc + 1][2, 3]; with s's convention above, the 16-bit value
  //    (r, lo / hi = h) holds P[row 16 w + g + 8 (r % 2)][key 16 kc + 8 (r / 2) + 2 t + h]. CuTe's
  //    RS atom passes its A values as recast<uint32_t>: register r = values 2 r (low half) and
  //    2 r + 1 (high half) of ALayout_64x16 (thread, value) -> m + 64 k.
  // MIRRORS csrc/attention/softmax.cuh: pf[kc][0] = pack_float2<T>(s[2 * kc][0], s[2 * kc][1]);
  // MIRRORS csrc/attention/softmax.cuh: pf[kc][1] = pack_float2<T>(s[2 * kc][2], s[2 * kc][3]);
  // MIRRORS csrc/attention/softmax.cuh: pf[kc][2] = pack_float2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
  // MIRRORS csrc/attention/softmax.cuh: pf[kc][3] = pack_float2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
  {
    using Op = typename Atom::RS128_MN;
    using AL = typename MMA_Traits<Op>::ALayout;
    static_assert(is_same<AL, GMMA::ALayout_64x16>::value, "the RS atom's A layout");
    static_assert(decltype(size<1>(AL{}))::value == 8, "8 16-bit A values per thread");
    auto tv_a = make_tiled_mma(Op{}).get_layoutA_TV();  // the TiledMMA's view of the same
    for (int tid = 0; tid < 128; ++tid) {
      const int w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
      // s[tile][e] of the packing, per register r: tile offset r / 2, e = 2 (r % 2) + h
      for (int r = 0; r < 4; ++r) {
        for (int h = 0; h < 2; ++h) {
          const int e = 2 * (r % 2) + h;
          const int tile = r / 2;  // n8 tile 2 kc + tile of S = keys 8 tile.. of the k16 step
          const int m = 16 * w + g + 8 * (e / 2);
          const int k = 8 * tile + 2 * t + e % 2;
          const int v = 2 * r + h;
          check_coord(frag_a, tn + fmt(" ALayout_64x16 tid %ld a[%ld] half %ld (m, k)", tid, r, h),
                      m + 64 * k, AL{}(tid, v), 64);
          check_coord(frag_a, tn + fmt(" TiledMMA A tid %ld a[%ld] half %ld (m, k)", tid, r, h),
                      m + 64 * k, tv_a(tid, v), 64);
        }
      }
    }
  }
}

}  // namespace

int main() {
  Family moe_a{"desc.moe.A"}, moe_b{"desc.moe.B"}, moe_layout{"layout.moe"};
  Family q{"ldsm.attn.Q"}, k{"desc.attn.K"}, v{"desc.attn.V"}, attn_layout{"layout.attn"};
  Family frag_c{"frag.C"}, frag_a{"frag.A"};

  check_moe<cutlass::bfloat16_t>(moe_a, moe_b, moe_layout);
  check_moe<cutlass::half_t>(moe_a, moe_b, moe_layout);
  check_attention<cutlass::bfloat16_t>(q, k, v, attn_layout);
  check_attention<cutlass::half_t>(q, k, v, attn_layout);
  check_fragments<cutlass::bfloat16_t>(frag_c, frag_a);
  check_fragments<cutlass::half_t>(frag_c, frag_a);

  long total = 0, compared = 0;
  for (const Family* f :
       {&moe_a, &moe_b, &moe_layout, &q, &k, &v, &attn_layout, &frag_c, &frag_a}) {
    std::printf("%-12s compared %7ld  mismatches %ld%s%s\n", f->name, f->compared, f->mismatched,
                f->sample.empty() ? "" : "  e.g. ", f->sample.c_str());
    total += f->mismatched;
    compared += f->compared;
    if (f->compared == 0) {  // a family that compared nothing proves nothing
      std::printf("  ERROR %s compared nothing\n", f->name);
      ++total;
    }
  }
  std::printf("compared: %ld\nmismatches: %ld\n", compared, total);
  return total == 0 ? 0 : 1;
}
