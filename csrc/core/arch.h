// Which GPUs a list of CUDA targets runs on. Header-only and torch-free: torch_bindings.cpp asks
// it about the build's own list (QWEN3X_CUDA_ARCHS), tests/test_registry.py compiles it alone.
#pragma once

#include <string_view>

namespace qwen3x {

// CUDA's compatibility rules: an sm_XY image runs on X.Y and later minor versions of X (sm_80 on
// sm_86 and sm_89, not on sm_90); an arch-specific XYa target (sm_90a) only on X.Y; a
// family-specific XYf target on X.Y and later minor versions of X; PTX (compute_XY) on X.Y and
// everything newer, compiled by the driver. As qwen3x's _library.runs_on.
inline bool arch_list_runs_on(std::string_view archs,  // "sm_80,sm_90a,compute_90"
                              int cc) {               // major * 10 + minor
  while (!archs.empty()) {
    const size_t cut = archs.find(',');
    std::string_view arch = archs.substr(0, cut);
    const bool sass = arch.substr(0, 3) == "sm_";
    const bool ptx = arch.substr(0, 8) == "compute_";
    arch.remove_prefix(sass ? 3 : (ptx ? 8 : 0));
    int number = 0;
    size_t digits = 0;
    for (; digits < arch.size() && arch[digits] >= '0' && arch[digits] <= '9'; ++digits) {
      number = number * 10 + (arch[digits] - '0');
    }
    const char suffix = digits < arch.size() ? arch[digits] : '\0';
    const bool same_major_newer = number / 10 == cc / 10 && number <= cc;
    bool runs = false;
    if (suffix == 'a') {
      runs = number == cc;
    } else if (suffix == 'f' || sass) {
      runs = same_major_newer;
    } else if (ptx) {
      runs = number <= cc;
    }
    if (runs) return true;
    if (cut == std::string_view::npos) break;
    archs.remove_prefix(cut + 1);
  }
  return false;
}

}  // namespace qwen3x
