// Torch glue for the two attention entry points, `attention` (padded batch
// [B, H, S, 128], optional mask) and `attention_varlen` (packed sequences
// [T, H, 128] with cu_seqlens): argument checks, device guard, current
// stream, dtype dispatch, output and split-KV workspace allocation. One
// kernel serves both: attention_fwd.cuh (and the files it includes).
//
// The kernel reads q/k/v through element strides (batch, head, sequence)
// with a contiguous head dimension; base pointers and those strides must be
// whole 16-byte chunks (cp.async). Other layouts get a contiguous copy here.
// The mask is read byte by byte through three strides (0 for a broadcast
// dimension) with contiguous keys (else a contiguous copy). Output sizes
// follow from the argument shapes and the varlen lengths are read on the
// device only, so no host synchronization: graph-capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "attention/attention_fwd.cuh"
#include "core/checks.h"
#include "core/cluster.cuh"
#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mainloop_choice.h"
#include "core/pdl.cuh"
#include "core/qwen3.h"
#include "ops.h"

namespace qwen3x {
namespace {

constexpr const char* kOp = "attention";
constexpr const char* kVarlenOp = "attention_varlen";
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
constexpr int64_t kChunkElems = attn::kChunkElems;  // elements per 16-byte cp.async chunk
constexpr double kLog2e = 1.4426950408889634;

// True when the kernel can address t [B, H, S, 128] or [T, H, 128] in place:
// contiguous head dim, 16-byte aligned base, and whole-chunk strides in every
// other dim of size > 1.
bool addressable(const at::Tensor& t) {
  if (t.stride(-1) != 1 || !is_aligned(t.const_data_ptr(), kVecBytes)) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % kChunkElems != 0) return false;
  }
  return true;
}

at::Tensor addressable_copy(const at::Tensor& t) {
  return addressable(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// A dimension of size 1 is read at index 0 only: stride 0 (broadcast).
int64_t mask_stride(const at::Tensor& mask, int64_t dim) {
  return mask.size(dim) == 1 ? 0 : mask.stride(dim);
}

// q, k, v: CUDA, one device and dtype (bf16/fp16), `dims` dims with head_dim 128 last, k and v
// of one shape, Hq divisible by Hkv (heads: dim 1 of [B, H, S, D] and of [T, H, D]).
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t dims, const char* layout) {
  check::cuda(op, "q", q);
  check::cuda(op, "k", k);
  check::cuda(op, "v", v);
  check::same_device(op, "k", k, "q", q);
  check::same_device(op, "v", v, "q", q);
  const auto dt = q.scalar_type();
  QWEN3X_CHECK(dt == at::ScalarType::BFloat16 || dt == at::ScalarType::Half, "qwen3x.", op,
               ": the CUDA kernel serves torch.bfloat16 and torch.float16 only, got q of dtype ",
               check::dtype_name(dt), " (run qwen3x.reference.", op, " for other dtypes)");
  check::same_dtype(op, "k", k, "q", q);
  check::same_dtype(op, "v", v, "q", q);
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] : {Named{"q", q}, Named{"k", k}, Named{"v", v}}) {
    QWEN3X_CHECK(t.dim() == dims, "qwen3x.", op, ": expected ", name, " of shape ", layout,
                 ", got ", t.sizes());
    QWEN3X_CHECK(t.size(-1) == kHeadDim, "qwen3x.", op, ": expected ", name, " to have head_dim ",
                 kHeadDim, " (the only head_dim the CUDA kernel is built for), got ", t.size(-1));
  }
  QWEN3X_CHECK(k.sizes() == v.sizes(), "qwen3x.", op, ": expected k and v of one shape, got ",
               k.sizes(), " and ", v.sizes());
  const int64_t hq = q.size(1), hkv = k.size(1);
  QWEN3X_CHECK(hkv > 0 && hq % hkv == 0, "qwen3x.", op, ": expected query heads (", hq,
               ") divisible by key-value heads (", hkv, ")");
}

// The kernel folds the scale into its exponent (softmax.cuh), which keeps the max of the scaled
// scores and the -inf of a masked one only for a positive finite scale: as the kernel holds it,
// scale * log2(e) in fp32 (a double scale below ~1e-45 or above ~2e38 is 0 or inf there).
void check_scale(const char* op, double scale) {
  const float scale_log2 = static_cast<float>(scale * kLog2e);
  QWEN3X_CHECK(std::isfinite(scale_log2) && scale_log2 > 0.0f, "qwen3x.", op,
               ": expected a positive finite softmax scale (scale * log2(e) in float32), got ", scale);
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& mask,
                const std::optional<at::Tensor>& key_lengths) {
  check_qkv(kOp, q, k, v, 4, "[batch, heads, seqlen, head_dim]");
  QWEN3X_CHECK(k.size(0) == q.size(0), "qwen3x.", kOp, ": expected k of shape [", q.size(0),
               ", Hkv, Skv, ", kHeadDim, "], got ", k.sizes());
  const int64_t hq = q.size(1), hkv = k.size(1);
  if (mask) {
    const at::Tensor& m = *mask;
    check::cuda(kOp, "mask", m);
    check::same_device(kOp, "mask", m, "q", q);
    check::dtype(kOp, "mask", m, at::ScalarType::Bool);
    const bool ok = m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)) &&
                    (m.size(1) == 1 || m.size(1) == hq) && m.size(2) == q.size(2) &&
                    m.size(3) == k.size(2);
    QWEN3X_CHECK(ok, "qwen3x.", kOp, ": expected mask of shape [", q.size(0), " or 1, 1 or ", hq,
                 ", ", q.size(2), ", ", k.size(2), "], got ", m.sizes());
  }
  if (key_lengths) {
    const at::Tensor& n = *key_lengths;
    check::cuda(kOp, "key_lengths", n);
    check::same_device(kOp, "key_lengths", n, "q", q);
    check::index_dtype(kOp, "key_lengths", n);
    QWEN3X_CHECK(n.numel() == 1 || (n.dim() == 1 && n.size(0) == q.size(0)), "qwen3x.", kOp,
                 ": expected key_lengths of shape [", q.size(0), "] or one value, got ", n.sizes());
  }
  // Index ranges of the kernel (int32 tokens, rows and keys, gridDim.y = B * Hkv).
  // (rows get a tile of headroom: row0 + kBlockM must not wrap)
  QWEN3X_CHECK(q.size(0) * q.size(2) * (hq / hkv) <= kMaxInt32 - attn::kBlockM &&
                   k.size(2) <= kMaxInt32 - attn::kBlockN,
               "qwen3x.", kOp, ": sizes exceed the kernel's int32 range (B = ", q.size(0),
               ", Sq = ", q.size(2), ", Skv = ", k.size(2), ")");
  QWEN3X_CHECK(q.size(0) * hkv <= kMaxGridY, "qwen3x.", kOp, ": batch x kv heads = ",
               q.size(0) * hkv, " exceeds ", kMaxGridY);
}

void check_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k) {
  check_qkv(kVarlenOp, q, k, v, 3, "[tokens, heads, head_dim]");
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] :
       {Named{"cu_seqlens_q", cu_seqlens_q}, Named{"cu_seqlens_k", cu_seqlens_k}}) {
    check::cuda(kVarlenOp, name, t);
    check::same_device(kVarlenOp, name, t, "q", q);
    check::dtype(kVarlenOp, name, t, at::ScalarType::Int);
    QWEN3X_CHECK(t.dim() == 1 && t.size(0) >= 1, "qwen3x.", kVarlenOp, ": expected ", name,
                 " of shape [batch + 1], got ", t.sizes());
  }
  QWEN3X_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), "qwen3x.", kVarlenOp,
               ": expected cu_seqlens_q and cu_seqlens_k of one shape [batch + 1], got ",
               cu_seqlens_q.sizes(), " and ", cu_seqlens_k.sizes());
  const int64_t group = q.size(1) / k.size(1);
  QWEN3X_CHECK(q.size(0) * group <= kMaxInt32 - attn::kBlockM &&
                   k.size(0) <= kMaxInt32 - attn::kBlockN,
               "qwen3x.", kVarlenOp, ": sizes exceed the kernel's int32 range (Tq = ", q.size(0),
               ", Tk = ", k.size(0), ")");
  QWEN3X_CHECK((cu_seqlens_q.size(0) - 1) * k.size(1) <= kMaxGridY, "qwen3x.", kVarlenOp,
               ": batch x kv heads = ", (cu_seqlens_q.size(0) - 1) * k.size(1), " exceeds ",
               kMaxGridY);
}

// The parameters both layouts fill alike: pointers, element strides (dims of q/k/v's batch,
// head and sequence; batch_dim -1 for the varlen layout, which has none), head counts, scale.
attn::Params common_params(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
                           at::Tensor& out, at::Tensor& lse, int64_t batch, int batch_dim,
                           int head_dim, int seq_dim, double scale, bool causal) {
  attn::Params p{};
  p.q = qa.const_data_ptr();
  p.k = ka.const_data_ptr();
  p.v = va.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  p.q_batch_stride = batch_dim < 0 ? 0 : qa.stride(batch_dim);
  p.q_head_stride = qa.stride(head_dim);
  p.q_seq_stride = qa.stride(seq_dim);
  p.k_batch_stride = batch_dim < 0 ? 0 : ka.stride(batch_dim);
  p.k_head_stride = ka.stride(head_dim);
  p.k_seq_stride = ka.stride(seq_dim);
  p.v_batch_stride = batch_dim < 0 ? 0 : va.stride(batch_dim);
  p.v_head_stride = va.stride(head_dim);
  p.v_seq_stride = va.stride(seq_dim);
  p.batch = static_cast<int>(batch);
  p.num_q_heads = static_cast<int>(qa.size(head_dim));
  p.num_kv_heads = static_cast<int>(ka.size(head_dim));
  p.group = p.num_q_heads / p.num_kv_heads;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.causal = causal;
  return p;
}

// This launch's split-KV arrival mark (combine.cuh): splitmix64 (a bijection of 64-bit words)
// of a process-wide launch count, so no two launches share a mark (a CUDA graph's replays of
// one launch do, and find the marks reset), and a workspace whose memory held other data
// matches it by chance only (2^-64 per slot). 0 is the reset value, never a mark.
unsigned long long next_split_tag() {
  static std::atomic<uint64_t> launches{0};
  uint64_t z = launches.fetch_add(1, std::memory_order_relaxed) + 0x9E3779B97F4A7C15ULL;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z != 0 ? z : 1;
}

// Where the splits of a split-KV call merge (QWEN3X_ATTENTION_COMBINE): "auto" (default) inside
// a thread block cluster for decode tiles (seqlen_q * group <= kSplitKeysMaxRows) where clusters
// can run and the cluster plan's clusters are all resident at once (heuristics.cuh,
// cluster_combine_pays; measured on decode only, so split prefill tiles keep L2), else through
// L2; "l2" always through the workspace in global memory, by the split that arrives last
// (combine.cuh); "cluster" always inside a thread block cluster of the tile's splits, through
// distributed shared memory: an sm_90 device with this build's sm_90a code, and at most
// kMaxClusterSize splits (the plan then asks for no more). Asking for "cluster" where Hopper code
// cannot run is an error, never a silent fallback (so a test or a benchmark row that asked for it
// ran it).
enum class Combine { kAuto, kL2, kCluster };
Combine combine_setting(const char* op, int device) {
  const char* env = std::getenv("QWEN3X_ATTENTION_COMBINE");
  const std::string_view choice = env == nullptr || *env == '\0' ? "auto" : env;
  QWEN3X_CHECK(choice == "auto" || choice == "l2" || choice == "cluster", "qwen3x.", op,
               ": QWEN3X_ATTENTION_COMBINE must be auto, l2 or cluster, got '", choice, "'");
  if (choice == "auto") return Combine::kAuto;
  if (choice == "l2") return Combine::kL2;
  check_hopper_setting(hopper_code_runs(device), op, "QWEN3X_ATTENTION_COMBINE=cluster");
  return Combine::kCluster;
}
// Which Hopper loop a wgmma call runs (QWEN3X_ATTENTION_OVERLAP): "1" (default) the one that runs
// each tile's softmax beside the previous tile's P V (attention_fwd.cuh, kOverlap; 1.01-1.08x the
// other's speed at 4k-16k tokens on an H200, benchmarks/NOTES.md); "0" the loop that waits for each
// tile's P V before the next tile's Q K^T, kept as the A/B for one more GPU run. Calls on the
// mma.sync mainloop (decode tiles, other GPUs) run neither.
bool overlap_wanted(const char* op) {
  const char* env = std::getenv("QWEN3X_ATTENTION_OVERLAP");
  const std::string_view choice = env == nullptr || *env == '\0' ? "1" : env;
  QWEN3X_CHECK(choice == "0" || choice == "1", "qwen3x.", op,
               ": QWEN3X_ATTENTION_OVERLAP must be 0 or 1, got '", choice, "'");
  return choice == "1";
}

// Calls f.template operator()<T, kWgmma, kOverlap>() for the kernel a call runs.
template <typename F>
decltype(auto) with_kernel(bool bf16, bool wgmma, bool overlap, F&& f) {
  const auto loops = [&]<typename T>() {
    return attn::with_loop(wgmma, overlap,
                           [&]<bool kW, bool kO>() { return f.template operator()<T, kW, kO>(); });
  };
  return bf16 ? loops.template operator()<__nv_bfloat16>() : loops.template operator()<__half>();
}

// CTAs of the forward kernel resident per SM (the split plan's wave size).
template <typename T, bool kWgmma, bool kOverlap>
int fwd_ctas_per_sm() {
  return resident_ctas_per_sm<attn::attention_fwd_kernel<T, kWgmma, kOverlap>>(
      attn::kThreads, attn::smem_bytes<kWgmma, kOverlap>(), attn::kMinCtasPerSm);
}

// Plans split-KV for p (its sizes set), allocates the workspace when splitting and launches.
// The workspace stays alive until the kernels have run: the caching allocator orders its reuse
// on this stream. The Hopper mainloop (core/mainloop_choice.h) serves calls whose row tiles are
// full (seqlen_q * group >= kBlockM: prefill); a decode tile keeps the mma.sync mainloop, whose
// idle warps skip the math.
void plan_and_launch(const char* op, attn::Params& p, const at::Tensor& q, int64_t seqlen_k_hint) {
  const int num_sms = sm_count(q.get_device());
  const bool full_tiles = static_cast<int64_t>(p.seqlen_q) * p.group >= attn::kBlockM;
  const bool wgmma = use_wgmma(op, "QWEN3X_ATTENTION_MAINLOOP", full_tiles, q.get_device());
  p.proxy_fence = wgmma_proxy_fence();
  p.pdl = pdl_enabled(q.get_device());
  const bool bf16 = q.scalar_type() == at::ScalarType::BFloat16;
  // CTAs with work: the grid's, and at least enough to hold every packed row (this bounds the
  // workspace when a varlen max_seqlen_q is small).
  const int64_t ctas = std::max<int64_t>(
      static_cast<int64_t>(attn::row_tiles(p)) * p.batch * p.num_kv_heads,
      ceil_div<int64_t>(static_cast<int64_t>(p.total_q) * p.num_q_heads, attn::kBlockM));
  const bool overlap = overlap_wanted(op) && wgmma;
  const int ctas_per_sm = with_kernel(bf16, wgmma, overlap, [&]<typename T, bool kW, bool kO>() {
    return fwd_ctas_per_sm<T, kW, kO>();
  });
  const Combine combine = combine_setting(op, q.get_device());
  const int64_t rows_per_cta = static_cast<int64_t>(p.seqlen_q) * p.group;
  const auto resident_clusters = [&](int splits) {
    return with_kernel(bf16, wgmma, overlap, [&]<typename T, bool kW, bool kO>() {
      return attn::attention_resident_clusters<T, kW, kO>(splits);
    });
  };
  attn::SplitPlan plan{1, 1};
  bool cluster = false;
  const bool decode_tiles = rows_per_cta <= attn::kSplitKeysMaxRows;
  if (combine == Combine::kCluster ||
      (combine == Combine::kAuto && decode_tiles && hopper_code_runs(q.get_device()))) {
    plan = attn::plan_splits(ctas, seqlen_k_hint, rows_per_cta, num_sms, ctas_per_sm, kMaxClusterSize);
    cluster = combine == Combine::kCluster ||
              (plan.num_splits > 1 &&
               attn::cluster_combine_pays(ctas, plan.num_splits, resident_clusters(plan.num_splits)));
  }
  if (!cluster) {
    plan = attn::plan_splits(ctas, seqlen_k_hint, rows_per_cta, num_sms, ctas_per_sm, attn::kMaxSplits);
  }
  p.num_splits = plan.num_splits;
  p.tiles_per_split = plan.tiles_per_split;
  p.cluster_combine = cluster && plan.num_splits > 1;
  if (p.cluster_combine && combine == Combine::kCluster) {
    QWEN3X_CHECK(resident_clusters(plan.num_splits) > 0, "qwen3x.", op,
                 ": QWEN3X_ATTENTION_COMBINE=cluster: a cluster of ", plan.num_splits,
                 " CTAs of the attention kernel cannot be resident on this device (occupancy API)");
  }
  at::Tensor partial_o, partial_lse, split_flags;  // split-KV workspace (the L2 combine's)
  if (plan.num_splits > 1 && !p.cluster_combine) {
    const int64_t partial_rows =
        static_cast<int64_t>(plan.num_splits) * p.num_kv_heads * p.total_q * p.group;
    partial_o = at::empty({partial_rows, kHeadDim}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({partial_rows}, q.options().dtype(at::kFloat));
    p.partial_o = static_cast<float*>(partial_o.mutable_data_ptr());
    p.partial_lse = static_cast<float*>(partial_lse.mutable_data_ptr());
    // arrival marks (combine.cuh): left as the allocator hands them over, never this tag
    split_flags = at::empty({static_cast<int64_t>(attn::row_tiles(p)) * p.batch * p.num_kv_heads *
                             plan.num_splits}, q.options().dtype(at::kLong));
    p.split_flags = reinterpret_cast<unsigned long long*>(split_flags.mutable_data_ptr());
    p.split_tag = next_split_tag();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  const cudaError_t err = with_kernel(bf16, wgmma, overlap, [&]<typename T, bool kW, bool kO>() {
    return attn::launch_attention<T, kW, kO>(p, stream);
  });
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double scale,
                                             bool causal,
                                             const std::optional<at::Tensor>& key_lengths) {
  check_args(q, k, v, mask, key_lengths);
  check_scale(kOp, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2);
  const int64_t skv = k.size(2);
  at::Tensor out = at::empty({batch, sq, hq, kHeadDim}, q.options());
  at::Tensor lse = at::empty({batch, hq, sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor qa = addressable_copy(q);
  const at::Tensor ka = addressable_copy(k);
  const at::Tensor va = addressable_copy(v);

  attn::Params p = common_params(qa, ka, va, out, lse, batch, /*batch_dim=*/0, /*head_dim=*/1,
                                 /*seq_dim=*/2, scale, causal);
  at::Tensor mask_keys;  // the mask with contiguous keys (a copy only in the rare other case)
  if (mask) {
    mask_keys = mask->size(3) <= 1 || mask->stride(3) == 1 ? *mask : mask->contiguous();
    p.mask = static_cast<const uint8_t*>(mask_keys.const_data_ptr());
    p.mask_batch_stride = mask_stride(mask_keys, 0);
    p.mask_head_stride = mask_stride(mask_keys, 1);
    p.mask_q_stride = mask_stride(mask_keys, 2);
  }
  if (key_lengths) {  // read on the device (no sync); one value for all: stride 0
    p.key_lengths = key_lengths->const_data_ptr();
    p.key_lengths_int64 = key_lengths->scalar_type() == at::ScalarType::Long;
    p.key_lengths_stride = key_lengths->numel() == 1 ? 0 : key_lengths->stride(0);
  }
  p.seqlen_q = static_cast<int>(sq);
  p.seqlen_k = static_cast<int>(skv);
  p.total_q = static_cast<int>(batch * sq);
  plan_and_launch(kOp, p, q, skv);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& cu_seqlens_q,
                                                    const at::Tensor& cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                    double scale, bool causal) {
  check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k);
  check_scale(kVarlenOp, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t total_q = q.size(0), hq = q.size(1);
  const int64_t total_k = k.size(0);
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  at::Tensor out = at::empty({total_q, hq, kHeadDim}, q.options());
  at::Tensor lse = at::empty({hq, total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (batch == 0) {  // no sequence: every token is outside one
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const at::Tensor qa = addressable_copy(q);
  const at::Tensor ka = addressable_copy(k);
  const at::Tensor va = addressable_copy(v);
  const at::Tensor cu_q = cu_seqlens_q.contiguous();
  const at::Tensor cu_k = cu_seqlens_k.contiguous();

  attn::Params p = common_params(qa, ka, va, out, lse, batch, /*batch_dim=*/-1, /*head_dim=*/1,
                                 /*seq_dim=*/0, scale, causal);
  p.cu_seqlens_q = cu_q.const_data_ptr<int>();
  p.cu_seqlens_k = cu_k.const_data_ptr<int>();
  // The kernels read the real lengths; these size the grid and plan the splits (clamped to the
  // tensors: no sequence is longer).
  p.seqlen_q = static_cast<int>(std::clamp<int64_t>(max_seqlen_q, 0, total_q));
  p.seqlen_k = static_cast<int>(std::clamp<int64_t>(max_seqlen_k, 0, total_k));
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);
  plan_and_launch(kVarlenOp, p, q, p.seqlen_k);
  return {out, lse};
}

}  // namespace qwen3x
