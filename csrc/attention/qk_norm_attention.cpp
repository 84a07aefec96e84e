// Torch glue for qk_norm_rope_attention: the attention entry point that takes q and k straight
// from the projections (not normalized, not rotated) with the two norm weights and the rope
// parameters, as Qwen3 attention does.
//
// How it is fused: one qk_norm_rope pass normalizes and rotates q and k (each read and written
// once, one launch), then the attention kernel runs on them. The alternatives the issue names,
// normalizing K inside every tile that reads it (cost grows with the sequence: each K tile is read
// by every query tile) or Q in the attention prologue (saves one read and write of q, a small
// share of prefill attention at long context), are left for a measurement: the benchmark suite
// times this op next to qk_norm_rope and attention alone at the same shapes, which bounds what a
// prologue fusion could save. For decode against a static cache, qk_norm_rope_cache_ is the same
// idea with the cache write folded in.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "core/checks.h"
#include "core/qwen3.h"
#include "ops.h"

namespace qwen3x {

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const at::Tensor& positions, const at::Tensor& inv_freq,
    double attention_scaling, double eps, const std::optional<at::Tensor>& mask, double scale,
    bool causal) {
  constexpr const char* kOp = "qk_norm_rope_attention";
  // The checks that name this op; the two kernels' own checks cover the rest.
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    check::cuda(kOp, name, t);
    QWEN3X_CHECK(t.dim() == 4 && t.size(3) == kHeadDim, "qwen3x.", kOp, ": expected ", name,
                 " of shape [batch, seqlen, heads, ", kHeadDim, "], got ", t.sizes());
  }
  const auto dt = q.scalar_type();
  QWEN3X_CHECK(dt == at::ScalarType::BFloat16 || dt == at::ScalarType::Half, "qwen3x.", kOp,
               ": the CUDA kernels serve torch.bfloat16 and torch.float16 only, got q of dtype ",
               check::dtype_name(dt));
  QWEN3X_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1),
               "qwen3x.", kOp, ": expected k and v of shape [", q.size(0), ", ", q.size(1),
               ", Hkv, ", kHeadDim, "], got ", k.sizes(), " and ", v.sizes());
  auto [q_rot, k_rot] = qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq,
                                     attention_scaling, eps);  // [B, S, H, 128] each
  return attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), mask, scale,
                   causal, std::nullopt);
}

}  // namespace qwen3x
