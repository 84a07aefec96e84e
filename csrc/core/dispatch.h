// dtype dispatch for the torch glue: maps the runtime at::ScalarType of the
// activations onto the CUDA element type the kernels are templated on.
//
//   QWEN3X_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm", [&] {
//     launch_rms_norm<scalar_t>(...);
//   });
//
// Only bf16 (what Qwen3 ships), fp16 and fp32 (the reference dtype) exist, so
// each kernel has exactly three instances. Include from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "core/checks.h"

#define QWEN3X_DISPATCH_CASE_(ENUM, TYPE, ...) \
  case at::ScalarType::ENUM: {                 \
    using scalar_t = TYPE;                     \
    __VA_ARGS__();                             \
    break;                                     \
  }

#define QWEN3X_DISPATCH_FLOAT_TYPES(DTYPE, OP, ...)                                         \
  do {                                                                                     \
    const at::ScalarType qwen3x_dispatch_dtype_ = (DTYPE);                                 \
    switch (qwen3x_dispatch_dtype_) {                                                      \
      QWEN3X_DISPATCH_CASE_(BFloat16, __nv_bfloat16, __VA_ARGS__)                          \
      QWEN3X_DISPATCH_CASE_(Half, __half, __VA_ARGS__)                                     \
      QWEN3X_DISPATCH_CASE_(Float, float, __VA_ARGS__)                                     \
      default:                                                                             \
        QWEN3X_CHECK(false, "qwen3x.", OP, ": unsupported dtype ",                         \
                     ::qwen3x::check::dtype_name(qwen3x_dispatch_dtype_),                  \
                     " (expected torch.bfloat16, torch.float16 or torch.float32)");        \
    }                                                                                      \
  } while (0)
