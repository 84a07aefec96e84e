// Stand-in for PyTorch's header of this name when tests/emulator builds csrc/'s glue for the CPU:
// there is one (emulated) device, so a device guard has nothing to do.
#pragma once
#include <c10/core/Device.h>

#include "emu/emu.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
