// Torch glue for silu_and_mul: argument checks, device guard, current stream,
// dtype dispatch, output allocation. Kernels: silu_and_mul.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "activation/silu_and_mul.cuh"
#include "core/checks.h"
#include "core/dispatch.h"
#include "ops.h"

namespace qwen3x {

at::Tensor silu_and_mul(const at::Tensor& input) {
  constexpr const char* kOp = "silu_and_mul";
  check::cuda(kOp, "input", input);
  check::float_dtype(kOp, "input", input);
  check::min_dim(kOp, "input", input, 1);
  QWEN3X_CHECK(input.size(-1) % 2 == 0, "qwen3x.", kOp,
               ": expected the last dimension of input to be even ([..., 2 * I]), got ",
               input.sizes());
  check::last_dim_contiguous(kOp, "input", input);

  const int64_t inter = input.size(-1) / 2;
  const int64_t lead = input.dim() - 1;
  const auto collapsed = check::collapsed_stride(input, lead, input.size(-1));
  const at::Tensor x = collapsed ? input : input.contiguous();
  const int64_t input_stride = collapsed ? *collapsed : input.size(-1);
  const int64_t num_rows = check::leading_numel(input, lead);
  QWEN3X_CHECK(num_rows <= kMaxGridX, "qwen3x.", kOp, ": at most ", kMaxGridX,
               " rows are supported, got ", num_rows);

  const c10::cuda::CUDAGuard device_guard(input.device());
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = inter;
  at::Tensor out = at::empty(out_shape, input.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device()).stream();

  QWEN3X_DISPATCH_FLOAT_TYPES(input.scalar_type(), kOp, [&] {
    auto* out_ptr = static_cast<scalar_t*>(out.mutable_data_ptr());
    const auto* in_ptr = static_cast<const scalar_t*>(x.const_data_ptr());
    int threads = 0;
    const int64_t col_blocks = activation::silu_and_mul_column_blocks<scalar_t>(
        inter,
        activation::silu_and_mul_vectorizable(out_ptr, in_ptr, inter, inter, input_stride),
        &threads);
    QWEN3X_CHECK(col_blocks <= kMaxGridY, "qwen3x.", kOp, ": I = ", inter, " is too large");
    activation::launch_silu_and_mul<scalar_t>(out_ptr, in_ptr, num_rows, inter,
                                              /*out_stride=*/inter, input_stride, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qwen3x
