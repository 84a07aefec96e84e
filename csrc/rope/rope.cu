// Torch glue for qk_norm_rope (functional), qk_norm_rope_ (in place) and
// qk_norm_rope_cache_ (in place on q, k and v into a static KV cache):
// argument checks, device guard, current stream, dtype dispatch, output
// allocation. Kernel: qk_norm_rope.cuh.
//
// Layouts the kernel cannot address directly (leading dims that do not
// collapse into one token stride, or pointers/strides that are not whole
// 16-byte vectors) are handled here with a contiguous copy, never with a
// second kernel: the fast path covers views of a fused qkv projection.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <iterator>
#include <limits>
#include <utility>
#include <optional>

#include "core/checks.h"
#include "core/dispatch.h"
#include "core/pdl.cuh"
#include "core/qwen3.h"
#include "rope/qk_norm_rope.cuh"
#include "ops.h"

namespace qwen3x {
namespace {

// Small operands in the form the kernel reads them.
struct Prepared {
  int64_t num_tokens;
  at::Tensor positions;  // [num_tokens], contiguous
  at::Tensor q_weight;   // [128], 16-byte aligned
  at::Tensor k_weight;   // [128], 16-byte aligned
  at::Tensor inv_freq;   // [64], 16-byte aligned
};

// The kernel reads weights as 16-byte vectors and inv_freq as 8-byte pairs; a misaligned view
// (storage offset) gets a fresh copy, which is tiny.
at::Tensor vector_aligned(const at::Tensor& t) {
  return is_aligned(t.const_data_ptr(), kVecBytes) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// num_tokens tokens of num_heads heads (q and k, and v with a cache) fit one launch.
void check_one_launch(const char* op, int64_t num_tokens, int64_t num_heads) {
  const bool heads_fit = num_heads <= std::numeric_limits<int>::max();
  const int64_t max_tokens =
      heads_fit && num_heads > 0 ? rope::max_qk_norm_rope_tokens(static_cast<int>(num_heads)) : 0;
  QWEN3X_CHECK(heads_fit && (num_heads == 0 || num_tokens <= max_tokens), "qwen3x.", op,
               ": too many tokens x heads for one launch (", num_tokens, " x ", num_heads, ")");
}

// Checks shared by both variants; returns the flattened positions.
Prepared check_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                    const at::Tensor& positions, const at::Tensor& inv_freq) {
  check::cuda(op, "q", q);
  check::cuda(op, "k", k);
  check::same_device(op, "k", k, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q_weight", q_weight},
                                {"k_weight", k_weight},
                                {"positions", positions},
                                {"inv_freq", inv_freq}}) {
    check::cuda(op, name, t);
    check::same_device(op, name, t, "q", q);
  }

  check::float_dtype(op, "q", q);
  check::same_dtype(op, "k", k, "q", q);
  check::same_dtype(op, "q_weight", q_weight, "q", q);
  check::same_dtype(op, "k_weight", k_weight, "q", q);
  check::dtype(op, "inv_freq", inv_freq, at::ScalarType::Float);
  check::index_dtype(op, "positions", positions);

  check::min_dim(op, "q", q, 2);
  check::min_dim(op, "k", k, 2);
  QWEN3X_CHECK(q.size(-1) == kHeadDim, "qwen3x.", op, ": expected q to have head_dim ", kHeadDim,
               " (size of the last dimension), got ", q.size(-1));
  QWEN3X_CHECK(k.size(-1) == kHeadDim, "qwen3x.", op, ": expected k to have head_dim ", kHeadDim,
               " (size of the last dimension), got ", k.size(-1));
  const auto q_lead = q.sizes().slice(0, q.dim() - 2);
  const auto k_lead = k.sizes().slice(0, k.dim() - 2);
  QWEN3X_CHECK(q_lead == k_lead, "qwen3x.", op,
               ": expected q and k to have the same leading (token) dimensions, got q ", q.sizes(),
               " and k ", k.sizes());
  check::last_dim_contiguous(op, "q", q);
  check::last_dim_contiguous(op, "k", k);
  check::vector_of(op, "q_weight", q_weight, kHeadDim);
  check::vector_of(op, "k_weight", k_weight, kHeadDim);
  check::vector_of(op, "inv_freq", inv_freq, kRotaryHalf);

  const int64_t num_tokens = check::leading_numel(q, q.dim() - 2);
  QWEN3X_CHECK(positions.numel() == num_tokens, "qwen3x.", op, ": expected positions to have ",
               num_tokens, " elements (q.shape[:-2] = ", q_lead, "), got shape ",
               positions.sizes());
  check_one_launch(op, num_tokens, q.size(-2) + k.size(-2));
  return {num_tokens, positions.reshape({-1}).contiguous(), vector_aligned(q_weight),
          vector_aligned(k_weight), vector_aligned(inv_freq)};
}

// Token/head strides of a [..., H, 128] tensor, or nullopt when the kernel
// cannot address it (non-collapsible leading dims, or not whole vectors).
std::optional<rope::HeadStrides> head_strides(const at::Tensor& t, int64_t vec_elems) {
  // A single head's stride is never used; do not let an odd value force a copy.
  const int64_t head_stride = t.size(-2) == 1 ? kHeadDim : t.stride(-2);
  const auto token_stride = check::collapsed_stride(t, t.dim() - 2, t.size(-2) * head_stride);
  if (!token_stride) return std::nullopt;
  const rope::HeadStrides s{*token_stride, head_stride};
  if (!is_aligned(t.const_data_ptr(), kVecBytes) || s.token % vec_elems != 0 ||
      s.head % vec_elems != 0) {
    return std::nullopt;
  }
  return s;
}

int64_t vec_elems(const at::Tensor& t) { return kVecBytes / static_cast<int64_t>(t.element_size()); }

// A copy the kernel can always address (fresh allocation: aligned, contiguous).
at::Tensor addressable_copy(const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); }

// An input as the kernel reads it: t itself when addressable, else a contiguous copy; and strides.
struct Addressed {
  at::Tensor tensor;
  rope::HeadStrides strides;
};

Addressed addressed(const at::Tensor& t, int64_t vec) {
  if (const auto s = head_strides(t, vec)) return {t, *s};
  at::Tensor copy = addressable_copy(t);
  const rope::HeadStrides s = *head_strides(copy, vec);
  return {copy, s};
}

// Where k and v go in qk_norm_rope_cache_ (cache == nullptr: k goes to k_out, no v).
struct CacheArgs {
  const at::Tensor* k_cache;
  const at::Tensor* v_cache;
  const at::Tensor* v;
  rope::HeadStrides v_strides;
  const at::Tensor* slots;
  int64_t seqlen;
};

rope::CacheStrides cache_strides(const at::Tensor& c) { return {c.stride(0), c.stride(1), c.stride(2)}; }

void launch(const char* op, const at::Tensor& q_out, const at::Tensor& k_out,
            rope::HeadStrides q_out_s, rope::HeadStrides k_out_s, const at::Tensor& q_in,
            const at::Tensor& k_in, rope::HeadStrides q_in_s, rope::HeadStrides k_in_s,
            const Prepared& prep, double attention_scaling, double eps,
            const CacheArgs* cache = nullptr) {
  if (prep.num_tokens == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_in.get_device()).stream();
  QWEN3X_DISPATCH_FLOAT_TYPES(q_in.scalar_type(), op, [&] {
    rope::CacheWrite<scalar_t> cw{};
    if (cache != nullptr) {
      cw.k_cache = static_cast<scalar_t*>(cache->k_cache->mutable_data_ptr());
      cw.v_cache = static_cast<scalar_t*>(cache->v_cache->mutable_data_ptr());
      cw.v = static_cast<const scalar_t*>(cache->v->const_data_ptr());
      cw.k_strides = cache_strides(*cache->k_cache);
      cw.v_strides = cache_strides(*cache->v_cache);
      cw.v_in = cache->v_strides;
      cw.slots = cache->slots->const_data_ptr();
      cw.slots_int64 = cache->slots->scalar_type() == at::ScalarType::Long;
      cw.seqlen = cache->seqlen;
      cw.max_slots = cache->k_cache->size(2);
    }
    rope::launch_qk_norm_rope<scalar_t>(
        static_cast<scalar_t*>(q_out.mutable_data_ptr()),
        static_cast<scalar_t*>(k_out.mutable_data_ptr()),
        static_cast<const scalar_t*>(q_in.const_data_ptr()),
        static_cast<const scalar_t*>(k_in.const_data_ptr()),
        static_cast<const scalar_t*>(prep.q_weight.const_data_ptr()),
        static_cast<const scalar_t*>(prep.k_weight.const_data_ptr()),
        prep.positions.const_data_ptr(), prep.positions.scalar_type() == at::ScalarType::Long,
        static_cast<const float*>(prep.inv_freq.const_data_ptr()), prep.num_tokens,
        static_cast<int>(q_in.size(-2)), static_cast<int>(k_in.size(-2)), q_out_s, k_out_s,
        q_in_s, k_in_s, static_cast<float>(attention_scaling), static_cast<float>(eps), cw,
        stream, pdl_enabled(q_in.get_device()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> functional(const char* op, const at::Tensor& q,
                                              const at::Tensor& k, const Prepared& prep,
                                              double attention_scaling, double eps) {
  const int64_t vec = vec_elems(q);
  const Addressed q_in = addressed(q, vec);
  const Addressed k_in = addressed(k, vec);

  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const rope::HeadStrides q_out_s{q.size(-2) * kHeadDim, kHeadDim};
  const rope::HeadStrides k_out_s{k.size(-2) * kHeadDim, kHeadDim};
  launch(op, q_out, k_out, q_out_s, k_out_s, q_in.tensor, k_in.tensor, q_in.strides, k_in.strides,
         prep, attention_scaling, eps);
  return {q_out, k_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& q_weight,
                                                const at::Tensor& k_weight,
                                                const at::Tensor& positions,
                                                const at::Tensor& inv_freq,
                                                double attention_scaling, double eps) {
  constexpr const char* kOp = "qk_norm_rope";
  const Prepared prep = check_args(kOp, q, k, q_weight, k_weight, positions, inv_freq);
  const c10::cuda::CUDAGuard device_guard(q.device());
  return functional(kOp, q, k, prep, attention_scaling, eps);
}

void qk_norm_rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& q_weight,
                   const at::Tensor& k_weight, const at::Tensor& positions,
                   const at::Tensor& inv_freq, double attention_scaling, double eps) {
  constexpr const char* kOp = "qk_norm_rope_";
  const Prepared prep = check_args(kOp, q, k, q_weight, k_weight, positions, inv_freq);
  // In place, every element must have its own memory: no broadcast (stride-0) views, no q/k overlap.
  check::writable(kOp, "q", q);
  check::writable(kOp, "k", k);
  check::disjoint(kOp, "q", q, "k", k);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t vec = vec_elems(q);
  const auto q_s = head_strides(q, vec);
  const auto k_s = head_strides(k, vec);
  if (q_s && k_s) {
    launch(kOp, q, k, *q_s, *k_s, q, k, *q_s, *k_s, prep, attention_scaling, eps);
    return;
  }
  // Rare layouts: compute out of place on addressable copies, then write back.
  auto [q_new, k_new] = functional(kOp, q, k, prep, attention_scaling, eps);
  q.copy_(q_new);
  k.copy_(k_new);
}

namespace {

// Caches [B, Hkv, S_max, 128] the kernel writes in place: q's dtype and device, 16-byte
// aligned, contiguous head_dim, whole-vector strides (HF's StaticCache tensors are contiguous).
void check_cache(const char* op, const char* name, const at::Tensor& c, const at::Tensor& q,
                 int64_t batch, int64_t kv_heads) {
  check::cuda(op, name, c);
  check::same_device(op, name, c, "q", q);
  check::same_dtype(op, name, c, "q", q);
  QWEN3X_CHECK(c.dim() == 4 && c.size(0) == batch && c.size(1) == kv_heads && c.size(3) == kHeadDim,
               "qwen3x.", op, ": expected ", name, " of shape [", batch, ", ", kv_heads,
               ", max_cache_len, ", kHeadDim, "], got ", c.sizes());
  const int64_t vec = vec_elems(c);
  QWEN3X_CHECK(c.stride(3) == 1 && is_aligned(c.const_data_ptr(), kVecBytes) &&
                   c.stride(0) % vec == 0 && c.stride(1) % vec == 0 && c.stride(2) % vec == 0,
               "qwen3x.", op, ": expected ", name,
               " with a contiguous, 16-byte aligned head_dim and 16-byte multiple strides, got strides ",
               c.strides());
}

}  // namespace

void qk_norm_rope_cache_(at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& cache_position, const at::Tensor& q_weight,
                         const at::Tensor& k_weight, const at::Tensor& positions,
                         const at::Tensor& inv_freq, double attention_scaling, double eps) {
  constexpr const char* kOp = "qk_norm_rope_cache_";
  const Prepared prep = check_args(kOp, q, k, q_weight, k_weight, positions, inv_freq);
  QWEN3X_CHECK(q.dim() == 4, "qwen3x.", kOp, ": expected q of shape [batch, seqlen, Hq, ",
               kHeadDim, "], got ", q.sizes());
  const int64_t batch = q.size(0), seqlen = q.size(1), kv_heads = k.size(2);
  check::cuda(kOp, "v", v);
  check::same_device(kOp, "v", v, "q", q);
  check::same_dtype(kOp, "v", v, "q", q);
  QWEN3X_CHECK(v.sizes() == k.sizes(), "qwen3x.", kOp, ": expected v of the shape of k (",
               k.sizes(), "), got ", v.sizes());
  check::last_dim_contiguous(kOp, "v", v);
  check_cache(kOp, "k_cache", k_cache, q, batch, kv_heads);
  check_cache(kOp, "v_cache", v_cache, q, batch, kv_heads);
  QWEN3X_CHECK(v_cache.sizes() == k_cache.sizes(), "qwen3x.", kOp,
               ": expected k_cache and v_cache of one shape, got ", k_cache.sizes(), " and ",
               v_cache.sizes());
  check::cuda(kOp, "cache_position", cache_position);
  check::same_device(kOp, "cache_position", cache_position, "q", q);
  check::index_dtype(kOp, "cache_position", cache_position);
  QWEN3X_CHECK(cache_position.dim() == 1 && cache_position.size(0) == seqlen, "qwen3x.", kOp,
               ": expected cache_position of shape [", seqlen, "] (q.shape[1]), got ",
               cache_position.sizes());
  // q is written while k, v are read and the caches written, by other warps of the launch.
  check::writable(kOp, "q", q);
  check::writable(kOp, "k_cache", k_cache);
  check::writable(kOp, "v_cache", v_cache);
  const std::pair<const char*, const at::Tensor*> read[] = {{"k", &k}, {"v", &v}};
  const std::pair<const char*, const at::Tensor*> written[] = {
      {"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (size_t i = 0; i < std::size(written); ++i) {
    for (const auto& [name, t] : read) check::disjoint(kOp, written[i].first, *written[i].second, name, *t);
    for (size_t j = i + 1; j < std::size(written); ++j) {
      check::disjoint(kOp, written[i].first, *written[i].second, written[j].first, *written[j].second);
    }
  }
  check_one_launch(kOp, prep.num_tokens, q.size(2) + 2 * kv_heads);  // q, k and v heads

  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t vec = vec_elems(q);
  const Addressed k_in = addressed(k, vec);
  const Addressed v_in = addressed(v, vec);
  const at::Tensor slots = cache_position.contiguous();
  const CacheArgs cache{&k_cache, &v_cache, &v_in.tensor, v_in.strides, &slots, seqlen};

  const auto q_s = head_strides(q, vec);
  if (q_s) {
    launch(kOp, q, q, *q_s, *q_s, q, k_in.tensor, *q_s, k_in.strides, prep, attention_scaling, eps,
           &cache);
    return;
  }
  // A q the kernel cannot address in place: a contiguous copy, written back.
  const Addressed q_tmp = addressed(addressable_copy(q), vec);
  launch(kOp, q_tmp.tensor, q_tmp.tensor, q_tmp.strides, q_tmp.strides, q_tmp.tensor, k_in.tensor,
         q_tmp.strides, k_in.strides, prep, attention_scaling, eps, &cache);
  q.copy_(q_tmp.tensor);
}

}  // namespace qwen3x
