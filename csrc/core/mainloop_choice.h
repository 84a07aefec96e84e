// Host side: which mainloop a tensor-core op runs. Hopper's wgmma where the
// device is sm_90 and the build has sm_90a code (QWEN3X_HAS_SM90A, defined by
// CMake), mma.sync (sm_80+) elsewhere. An environment variable per op family
// (QWEN3X_MOE_MAINLOOP, QWEN3X_ATTENTION_MAINLOOP) = auto (default) | mma_sync
// | wgmma overrides the choice, for comparisons and tests; asking for wgmma
// where it cannot run is an error.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <string_view>

#include "core/launch.h"
#include "core/message.h"

namespace qwen3x {

#if defined(QWEN3X_HAS_SM90A)
constexpr bool kBuiltSm90a = true;
#else
constexpr bool kBuiltSm90a = false;
#endif

// Whether Hopper-only code (wgmma, thread block clusters) can run on `device`: an sm_90 GPU and a
// build with sm_90a code.
inline bool hopper_code_runs(int device) {
  constexpr int kHopper = 90;
  return kBuiltSm90a && compute_capability(device) == kHopper;
}

// The error for a setting that asks for Hopper-only code where it cannot run (never a silent
// fallback: a test or a benchmark row that asked for it ran it).
inline void check_hopper_setting(bool runs, const char* op, std::string_view setting) {
  QWEN3X_CHECK(runs, "qwen3x.", op, ": ", setting,
               " needs an sm_90 GPU and a build that includes sm_90a",
               kBuiltSm90a ? "" : " (this build does not)");
}

// `eligible`: the call is one the wgmma mainloop serves (a shape regime); the
// setting is checked either way, availability only when eligible.
inline bool use_wgmma(const char* op, const char* env_name, bool eligible, int device) {
  const char* env = std::getenv(env_name);
  const std::string_view choice = env == nullptr || *env == '\0' ? "auto" : env;
  QWEN3X_CHECK(choice == "auto" || choice == "mma_sync" || choice == "wgmma", "qwen3x.", op, ": ",
               env_name, " must be auto, mma_sync or wgmma, got '", choice, "'");
  if (!eligible || choice == "mma_sync") return false;
  const bool available = hopper_code_runs(device);
  if (choice == "wgmma") check_hopper_setting(available, op, std::string(env_name) + "=wgmma");
  return available;
}

// Whether the wgmma mainloops fence each stage's cp.async data into the async proxy before
// wgmma reads it (the PTX memory model's rule; CUTLASS's cp.async + GMMA mainloops do without).
// QWEN3X_WGMMA_PROXY_FENCE=0 drops it: an A/B switch for measuring what the fence costs
// (benchmarks/NOTES.md), not a setting for production.
inline bool wgmma_proxy_fence() {
  const char* env = std::getenv("QWEN3X_WGMMA_PROXY_FENCE");
  return env == nullptr || std::string_view(env) != "0";
}

}  // namespace qwen3x
