// Stand-in for PyTorch's header of this name when tests/emulator builds csrc/'s glue for the CPU:
// emulated launches run to completion in order, so every stream is the null stream.
#pragma once
#include "emu/emu.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
