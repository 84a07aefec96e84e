// Torch-glue entry points of the CUDA kernels, registered under
// torch.ops.qwen3x.* in torch_bindings.cpp (the schemas live there).
// Each one checks its arguments, sets the device and stream, dispatches on
// dtype and calls a torch-free launcher from csrc/<family>/*.cuh.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace qwen3x {

// csrc/norm/norm.cu
at::Tensor rms_norm(const at::Tensor& input,   // [..., hidden]
                    const at::Tensor& weight,  // [hidden]
                    double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input,     // [..., hidden]
                                                const at::Tensor& residual,  // [..., hidden]
                                                const at::Tensor& weight,    // [hidden]
                                                double eps);

// csrc/rope/rope.cu
std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q,          // [..., Hq, 128]
                                                const at::Tensor& k,          // [..., Hkv, 128]
                                                const at::Tensor& q_weight,   // [128]
                                                const at::Tensor& k_weight,   // [128]
                                                const at::Tensor& positions,  // [...] int32/int64
                                                const at::Tensor& inv_freq,   // [64] fp32
                                                double attention_scaling, double eps);
void qk_norm_rope_(at::Tensor& q,                 // [..., Hq, 128], updated in place
                   at::Tensor& k,                 // [..., Hkv, 128], updated in place
                   const at::Tensor& q_weight,    // [128]
                   const at::Tensor& k_weight,    // [128]
                   const at::Tensor& positions,   // [...] int32/int64
                   const at::Tensor& inv_freq,    // [64] fp32
                   double attention_scaling, double eps);

// csrc/activation/activation.cu
at::Tensor silu_and_mul(const at::Tensor& input);  // [..., 2 * I] -> [..., I]

// csrc/moe/moe.cu
// -> weights [T, k] (logits' dtype), expert_ids [T, k] int32, tokens_per_expert [E] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(
    const at::Tensor& router_logits,  // [T, E] bf16/fp16/fp32, last dim contiguous
    int64_t top_k, bool norm_topk_prob);
// -> sorted_rows [T*k + E*(row_align-1)] int32, expert_offsets [E+1] int32, inverse [T*k] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& expert_ids,  // [T, k] int32/int64
    int64_t num_experts, int64_t row_align);

}  // namespace qwen3x
