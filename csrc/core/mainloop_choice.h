// Host side: which mainloop a tensor-core op runs. Hopper's wgmma where the
// device is sm_90 and the build has sm_90a code (QWEN3X_HAS_SM90A, defined by
// CMake), mma.sync (sm_80+) elsewhere. An environment variable per op family
// (QWEN3X_MOE_MAINLOOP, QWEN3X_ATTENTION_MAINLOOP) = auto (default) | mma_sync
// | wgmma overrides the choice, for comparisons and tests; asking for wgmma
// where it cannot run is an error.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

#include "core/launch.h"
#include "core/message.h"

namespace qwen3x {

// `eligible`: the call is one the wgmma mainloop serves (a shape regime); the
// setting is checked either way, availability only when eligible.
inline bool use_wgmma(const char* op, const char* env_name, bool eligible, int device) {
#if defined(QWEN3X_HAS_SM90A)
  constexpr bool kBuilt = true;
#else
  constexpr bool kBuilt = false;
#endif
  constexpr int kHopper = 90;
  const char* env = std::getenv(env_name);
  const std::string_view choice = env == nullptr || *env == '\0' ? "auto" : env;
  QWEN3X_CHECK(choice == "auto" || choice == "mma_sync" || choice == "wgmma", "qwen3x.", op, ": ",
               env_name, " must be auto, mma_sync or wgmma, got '", choice, "'");
  if (!eligible || choice == "mma_sync") return false;
  const bool available = kBuilt && compute_capability(device) == kHopper;
  QWEN3X_CHECK(choice != "wgmma" || available, "qwen3x.", op, ": ", env_name,
               "=wgmma needs an sm_90 GPU and a build that includes sm_90a",
               kBuilt ? "" : " (this build does not)");
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
