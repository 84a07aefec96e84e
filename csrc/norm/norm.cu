// Torch glue for rms_norm and add_rms_norm: argument checks, device guard,
// current stream, dtype dispatch and output allocation. Kernels: rms_norm.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "core/checks.h"
#include "core/dispatch.h"
#include "norm/rms_norm.cuh"
#include "ops.h"

namespace qwen3x {
namespace {

// A [..., hidden] tensor seen as [num_rows, hidden] with one row stride. When
// the leading dims cannot be addressed with a single stride, `tensor` is a
// contiguous copy (correct, just slower; the common cases never copy).
struct Rows {
  at::Tensor tensor;
  int64_t num_rows;
  int64_t stride;
};

Rows as_rows(const char* op, const char* name, const at::Tensor& t) {
  check::last_dim_contiguous(op, name, t);
  const int64_t hidden = t.size(-1);
  const int64_t lead = t.dim() - 1;
  if (auto stride = check::collapsed_stride(t, lead, hidden)) {
    return {t, check::leading_numel(t, lead), *stride};
  }
  return {t.contiguous(), check::leading_numel(t, lead), hidden};
}

void check_common(const char* op, const at::Tensor& input, const at::Tensor& weight) {
  check::cuda(op, "input", input);
  check::cuda(op, "weight", weight);
  check::same_device(op, "weight", weight, "input", input);
  check::float_dtype(op, "input", input);
  check::same_dtype(op, "weight", weight, "input", input);
  check::min_dim(op, "input", input, 1);
  check::vector_of(op, "weight", weight, input.size(-1));
  QWEN3X_CHECK(input.size(-1) <= std::numeric_limits<int>::max(), "qwen3x.", op,
               ": hidden size ", input.size(-1), " is too large");
}

void check_num_rows(const char* op, int64_t num_rows) {
  QWEN3X_CHECK(num_rows <= kMaxGridX, "qwen3x.", op, ": at most ", kMaxGridX,
               " rows are supported, got ", num_rows);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  constexpr const char* kOp = "rms_norm";
  check_common(kOp, input, weight);
  const Rows x = as_rows(kOp, "input", input);
  check_num_rows(kOp, x.num_rows);

  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (out.numel() == 0) return out;
  const int hidden = static_cast<int>(input.size(-1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device()).stream();

  QWEN3X_DISPATCH_FLOAT_TYPES(input.scalar_type(), kOp, [&] {
    norm::launch_rms_norm<scalar_t>(
        static_cast<scalar_t*>(out.mutable_data_ptr()), /*residual_out=*/nullptr,
        static_cast<const scalar_t*>(x.tensor.const_data_ptr()), /*residual=*/nullptr,
        static_cast<const scalar_t*>(weight.const_data_ptr()), x.num_rows, hidden,
        /*out_stride=*/hidden, /*residual_out_stride=*/0, x.stride, /*residual_stride=*/0,
        static_cast<float>(eps), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input,
                                                const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  constexpr const char* kOp = "add_rms_norm";
  check_common(kOp, input, weight);
  check::cuda(kOp, "residual", residual);
  check::same_device(kOp, "residual", residual, "input", input);
  check::same_dtype(kOp, "residual", residual, "input", input);
  QWEN3X_CHECK(residual.sizes() == input.sizes(), "qwen3x.", kOp,
               ": expected residual to have the same shape as input (", input.sizes(), "), got ",
               residual.sizes());
  const Rows x = as_rows(kOp, "input", input);
  const Rows r = as_rows(kOp, "residual", residual);
  check_num_rows(kOp, x.num_rows);

  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor residual_out = at::empty(input.sizes(), input.options());
  if (out.numel() == 0) return {out, residual_out};
  const int hidden = static_cast<int>(input.size(-1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device()).stream();

  QWEN3X_DISPATCH_FLOAT_TYPES(input.scalar_type(), kOp, [&] {
    norm::launch_rms_norm<scalar_t>(
        static_cast<scalar_t*>(out.mutable_data_ptr()),
        static_cast<scalar_t*>(residual_out.mutable_data_ptr()),
        static_cast<const scalar_t*>(x.tensor.const_data_ptr()),
        static_cast<const scalar_t*>(r.tensor.const_data_ptr()),
        static_cast<const scalar_t*>(weight.const_data_ptr()), x.num_rows, hidden,
        /*out_stride=*/hidden, /*residual_out_stride=*/hidden, x.stride, r.stride,
        static_cast<float>(eps), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, residual_out};
}

}  // namespace qwen3x
