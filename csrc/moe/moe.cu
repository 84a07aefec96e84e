// Torch glue for moe_router and moe_permute: argument checks, device guard,
// current stream, dtype dispatch, output (and workspace) allocation. Kernels:
// router.cuh, permute.cuh.
//
// Every output size follows from the argument shapes (T, k, E, row_align), so
// neither op synchronizes with the host and both can be captured in a CUDA
// graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "core/checks.h"
#include "core/dispatch.h"
#include "moe/limits.h"
#include "moe/permute.cuh"
#include "moe/router.cuh"
#include "ops.h"

namespace qwen3x {
namespace {

// int32 outputs (ids, counts, slots) index at most this many elements.
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(const at::Tensor& router_logits,
                                                          int64_t top_k, bool norm_topk_prob) {
  constexpr const char* kOp = "moe_router";
  check::cuda(kOp, "router_logits", router_logits);
  check::float_dtype(kOp, "router_logits", router_logits);
  TORCH_CHECK(router_logits.dim() == 2, "qwen3x.", kOp,
              ": expected router_logits [tokens, experts], got shape ", router_logits.sizes());
  const int64_t num_tokens = router_logits.size(0);
  const int64_t num_experts = router_logits.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= moe::kMaxExperts, "qwen3x.", kOp,
              ": expected 1 to ", moe::kMaxExperts, " experts (router_logits.shape[1]), got ",
              num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts && top_k <= moe::kMaxTopK, "qwen3x.", kOp,
              ": expected 1 <= top_k <= min(experts, ", moe::kMaxTopK, ") = ",
              std::min<int64_t>(num_experts, moe::kMaxTopK), ", got ", top_k);
  check::last_dim_contiguous(kOp, "router_logits", router_logits);
  TORCH_CHECK(num_tokens * top_k <= kMaxInt32, "qwen3x.", kOp, ": tokens x top_k = ",
              num_tokens, " x ", top_k, " exceeds the int32 range of the outputs");
  // A single row's stride is never used.
  const int64_t logits_stride = num_tokens <= 1 ? num_experts : router_logits.stride(0);

  const c10::cuda::CUDAGuard device_guard(router_logits.device());
  at::Tensor weights = at::empty({num_tokens, top_k}, router_logits.options());
  at::Tensor expert_ids = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kInt));
  at::Tensor tokens_per_expert = at::empty({num_experts}, router_logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(router_logits.get_device()).stream();
  int num_sms = 0;  // a cheap attribute query, no synchronization
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, router_logits.get_device()));

  QWEN3X_DISPATCH_FLOAT_TYPES(router_logits.scalar_type(), kOp, [&] {
    C10_CUDA_CHECK(moe::launch_moe_router<scalar_t>(
        static_cast<scalar_t*>(weights.mutable_data_ptr()),
        static_cast<int*>(expert_ids.mutable_data_ptr()),
        static_cast<int*>(tokens_per_expert.mutable_data_ptr()),
        static_cast<const scalar_t*>(router_logits.const_data_ptr()), num_tokens, logits_stride,
        static_cast<int>(num_experts), static_cast<int>(top_k), norm_topk_prob, num_sms, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, expert_ids, tokens_per_expert};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& expert_ids,
                                                           int64_t num_experts,
                                                           int64_t row_align) {
  constexpr const char* kOp = "moe_permute";
  check::cuda(kOp, "expert_ids", expert_ids);
  const auto id_dtype = expert_ids.scalar_type();
  TORCH_CHECK(id_dtype == at::ScalarType::Int || id_dtype == at::ScalarType::Long, "qwen3x.",
              kOp, ": expected expert_ids to have dtype torch.int32 or torch.int64, got ",
              check::dtype_name(id_dtype));
  TORCH_CHECK(expert_ids.dim() == 2, "qwen3x.", kOp,
              ": expected expert_ids [tokens, top_k], got shape ", expert_ids.sizes());
  TORCH_CHECK(num_experts >= 1 && num_experts <= moe::kMaxExperts, "qwen3x.", kOp,
              ": expected 1 <= num_experts <= ", moe::kMaxExperts, ", got ", num_experts);
  TORCH_CHECK(row_align >= 1 && row_align <= kMaxInt32, "qwen3x.", kOp,
              ": expected 1 <= row_align <= ", kMaxInt32, ", got ", row_align);
  const int64_t num_picks = expert_ids.numel();
  const int64_t num_slots = num_picks + num_experts * (row_align - 1);
  TORCH_CHECK(num_slots <= kMaxInt32, "qwen3x.", kOp, ": ", num_picks, " picks + ", num_experts,
              " experts x (row_align - 1 = ", row_align - 1,
              ") padding slots exceed the int32 range of the outputs");

  const c10::cuda::CUDAGuard device_guard(expert_ids.device());
  // The kernels read the picks in flat order n = t * k + j.
  const at::Tensor ids = expert_ids.contiguous();
  const auto int_options = expert_ids.options().dtype(at::kInt);
  at::Tensor sorted_rows = at::empty({num_slots}, int_options);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, int_options);
  at::Tensor inverse = at::empty({num_picks}, int_options);
  const moe::PermuteTiling tiling = moe::permute_tiling(num_picks);
  at::Tensor tile_counts;  // workspace of the two-launch path
  if (tiling.num_tiles > 1) tile_counts = at::empty({tiling.num_tiles, num_experts}, int_options);
  int* tile_counts_ptr =
      tiling.num_tiles > 1 ? static_cast<int*>(tile_counts.mutable_data_ptr()) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(expert_ids.get_device()).stream();

  auto launch = [&](auto id_tag) {
    using IdT = decltype(id_tag);
    moe::launch_moe_permute<IdT>(
        static_cast<int*>(sorted_rows.mutable_data_ptr()),
        static_cast<int*>(expert_offsets.mutable_data_ptr()),
        static_cast<int*>(inverse.mutable_data_ptr()), tile_counts_ptr,
        static_cast<const IdT*>(ids.const_data_ptr()), num_picks, static_cast<int>(num_experts),
        static_cast<int>(row_align), num_slots, stream);
  };
  if (id_dtype == at::ScalarType::Long) {
    launch(int64_t{});
  } else {
    launch(int32_t{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_rows, expert_offsets, inverse};
}

}  // namespace qwen3x
