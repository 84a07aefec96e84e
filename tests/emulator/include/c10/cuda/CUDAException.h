// Stand-in for PyTorch's header of this name when tests/emulator builds csrc/'s glue for the CPU:
// an emulated launch error becomes the same c10::Error the real macros raise.
#pragma once
#include <c10/util/Exception.h>

#include "emu/emu.h"

#define C10_CUDA_CHECK(expr)                                                         \
  do {                                                                               \
    const cudaError_t qwen3x_emu_err_ = (expr);                                      \
    TORCH_CHECK(qwen3x_emu_err_ == cudaSuccess, "CUDA error: ",                      \
                cudaGetErrorString(qwen3x_emu_err_));                                \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
