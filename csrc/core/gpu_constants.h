// Facts about NVIDIA GPUs that kernels and host launchers share. Host-safe
// (no CUDA headers), so the torch glue can use them for alignment checks.
#pragma once

#include <cstdint>

namespace qwen3x {

// Threads per warp on every NVIDIA architecture we target.
constexpr int kWarpSize = 32;
// Widest single global load/store a thread can issue (LDG.E.128 / STG.E.128).
constexpr int kVecBytes = 16;
// Most threads a block may have.
constexpr int kMaxThreadsPerBlock = 1024;
// Hopper wgmma's 128-byte-swizzle atom: 8 rows x 128 bytes of shared memory. wgmma operand tiles
// start on multiples of it (the swizzle is applied to absolute shared-memory addresses).
constexpr int kWgmmaAtomBytes = 1024;
// Shared memory of an sm_90 (H100/H200) SM, and what the hardware reserves of it per resident CTA:
// the occupancy arithmetic of the Hopper tiles (N CTAs fit when N * (bytes + reserved) <= per SM).
constexpr int kHopperSmemPerSm = 228 * 1024;
constexpr int kSmemReservedPerCta = 1024;
// Most blocks along gridDim.y (and z); gridDim.x allows 2^31 - 1.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
constexpr T round_up(T a, T b) {
  return ceil_div(a, b) * b;
}

}  // namespace qwen3x
