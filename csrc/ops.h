// Torch-glue entry points of the CUDA kernels, registered under
// torch.ops.qwen3x.* in torch_bindings.cpp (the schemas live there).
// Each one checks its arguments, sets the device and stream, dispatches on
// dtype and calls a torch-free launcher from csrc/<family>/*.cuh.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
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
// qk_norm_rope_ on q; k normed and rotated, and v as it is, stored into a static KV cache at
// k_cache[b, :, cache_position[s]] (slots outside [0, max_cache_len) are not written); k and v
// are not modified.
void qk_norm_rope_cache_(at::Tensor& q,                      // [B, S, Hq, 128], updated in place
                         const at::Tensor& k,                // [B, S, Hkv, 128]
                         const at::Tensor& v,                // [B, S, Hkv, 128]
                         at::Tensor& k_cache,                // [B, Hkv, max_cache_len, 128]
                         at::Tensor& v_cache,                // [B, Hkv, max_cache_len, 128]
                         const at::Tensor& cache_position,   // [S] int32/int64
                         const at::Tensor& q_weight,         // [128]
                         const at::Tensor& k_weight,         // [128]
                         const at::Tensor& positions,        // [B, S] int32/int64 (RoPE)
                         const at::Tensor& inv_freq,         // [64] fp32
                         double attention_scaling, double eps);

// csrc/activation/activation.cu
at::Tensor silu_and_mul(const at::Tensor& input);  // [..., 2 * I] -> [..., I]

// csrc/attention/attention.cu
// -> out [B, Sq, Hq, 128] contiguous (q's dtype), lse [B, Hq, Sq] fp32 (natural log)
std::tuple<at::Tensor, at::Tensor> attention(
    const at::Tensor& q,                     // [B, Hq, Sq, 128] bf16/fp16, any strides, last dim 1
    const at::Tensor& k,                     // [B, Hkv, Skv, 128], Hq % Hkv == 0
    const at::Tensor& v,                     // [B, Hkv, Skv, 128]
    const std::optional<at::Tensor>& mask,   // [B|1, 1|Hq, Sq, Skv] bool (true = attend)
    double scale, bool causal,               // causal: bottom-right (j <= i + Skv_b - Sq)
    const std::optional<at::Tensor>& key_lengths);  // [B] or one int32/int64: Skv_b = min(Skv, it)
// csrc/attention/qk_norm_attention.cpp
// q and k straight from the projections: qk_norm_rope, then attention.
// -> out [B, S, Hq, 128] (q's dtype), lse [B, Hq, S] fp32
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_attention(
    const at::Tensor& q,                    // [B, S, Hq, 128] bf16/fp16, not normalized / rotated
    const at::Tensor& k,                    // [B, S, Hkv, 128]
    const at::Tensor& v,                    // [B, S, Hkv, 128]
    const at::Tensor& q_weight,             // [128]
    const at::Tensor& k_weight,             // [128]
    const at::Tensor& positions,            // [B, S] int32/int64
    const at::Tensor& inv_freq,             // [64] fp32
    double attention_scaling, double eps,
    const std::optional<at::Tensor>& mask,  // [B|1, 1|Hq, S, S] bool (true = attend)
    double scale, bool causal);
// Packed variable-length sequences: sequence b is tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1
// of q and cu_seqlens_k[b] .. cu_seqlens_k[b+1]-1 of k/v; causal is bottom-right per sequence.
// max_seqlen_q sizes the grid (rows of a longer sequence come back NaN); max_seqlen_k only plans
// split-KV (any value is correct).
// -> out [Tq, Hq, 128] contiguous (q's dtype), lse [Hq, Tq] fp32; tokens outside every
//    sequence get 0 and -inf.
std::tuple<at::Tensor, at::Tensor> attention_varlen(
    const at::Tensor& q,             // [Tq, Hq, 128] bf16/fp16, any strides, last dim 1
    const at::Tensor& k,             // [Tk, Hkv, 128], Hq % Hkv == 0
    const at::Tensor& v,             // [Tk, Hkv, 128]
    const at::Tensor& cu_seqlens_q,  // [B + 1] int32: 0, ..., Tq (non-decreasing)
    const at::Tensor& cu_seqlens_k,  // [B + 1] int32: 0, ..., Tk (non-decreasing)
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal);

// csrc/moe/moe.cu
// [T, H] x [E, H] -> router logits [T, E] (hidden_states @ weight.T): gate.cuh's kernel at decode
// sizes in bf16 / fp16, at::linear otherwise
at::Tensor moe_gate(const at::Tensor& hidden_states, const at::Tensor& weight);
// -> weights [T, k] (logits' dtype), expert_ids [T, k] int32, tokens_per_expert [E] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(
    const at::Tensor& router_logits,  // [T, E] bf16/fp16/fp32, last dim contiguous
    int64_t top_k, bool norm_topk_prob);
// -> sorted_rows [T*k + E*(row_align-1)] int32, expert_offsets [E+1] int32, inverse [T*k] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& expert_ids,  // [T, k] int32/int64
    int64_t num_experts, int64_t row_align);
// moe_router then moe_permute (of its ids, E = router_logits.shape[1]), in one launch up to 16
// tokens -> weights, expert_ids, tokens_per_expert, sorted_rows, expert_offsets, inverse
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    const at::Tensor& router_logits,  // [T, E] bf16/fp16/fp32, last dim contiguous
    int64_t top_k, bool norm_topk_prob, int64_t row_align);
// -> out [T, H] (hidden's dtype): SwiGLU experts, weighted, summed over the k picks
at::Tensor moe_experts(const at::Tensor& hidden_states,   // [T, H] bf16/fp16, H % 128 == 0
                       const at::Tensor& expert_ids,      // [T, k] int32/int64
                       const at::Tensor& expert_weights,  // [T, k] float
                       const at::Tensor& gate_up_proj,    // [E, 2I, H] ([gate; up]), I % 64 == 0
                       const at::Tensor& down_proj);      // [E, H, I]
// op "moe" (qwen3x::moe is the kernels' namespace) -> out [T, H]: moe_router then moe_experts
at::Tensor moe_block(const at::Tensor& hidden_states,  // [T, H] bf16/fp16
                     const at::Tensor& router_logits,  // [T, E] bf16/fp16/fp32
                     const at::Tensor& gate_up_proj,   // [E, 2I, H]
                     const at::Tensor& down_proj,      // [E, H, I]
                     int64_t top_k, bool norm_topk_prob);

}  // namespace qwen3x
