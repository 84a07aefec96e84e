// Torch glue for moe_gate, moe_router, moe_permute, moe_route, moe_experts and moe:
// argument checks, device guard, current stream, dtype dispatch, output (and
// workspace) allocation. Kernels: gate.cuh, router.cuh, permute.cuh, experts.cuh
// (grouped GEMMs + combine).
//
// Every output and workspace size follows from the argument shapes (T, k, E,
// H, I, row_align), so no op synchronizes with the host and all can be
// captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <limits>

#include "core/checks.h"
#include "core/dispatch.h"
#include "core/gpu_constants.h"
#include "core/launch.h"
#include "core/mainloop_choice.h"
#include "core/pdl.cuh"
#include "moe/experts.cuh"
#include "moe/gate.cuh"
#include "moe/gemm_config.h"
#include "moe/limits.h"
#include "moe/permute.cuh"
#include "moe/router.cuh"
#include "ops.h"

namespace qwen3x {
namespace {

// int32 outputs (ids, counts, slots) index at most this many elements.
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
// Largest H or I the expert GEMMs take: keeps the column grid (H / 64 tiles
// at most) under gridDim.y's limit with room to spare.
constexpr int64_t kMaxExpertsWidth = int64_t{1} << 20;

// t itself when its rows (all dims but the last) can be read with 16-byte
// copies: last dim contiguous, every row stride a multiple of 16 bytes, data
// 16-byte aligned; else a contiguous copy (fresh, hence aligned).
at::Tensor rows_16b_readable(const at::Tensor& t) {
  const int64_t vec_elems = kVecBytes / t.element_size();
  bool ok = (t.stride(-1) == 1 || t.size(-1) <= 1) && is_aligned(t.const_data_ptr(), kVecBytes);
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    ok = ok && (t.size(d) <= 1 || t.stride(d) % vec_elems == 0);
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Checks shared by moe_experts and moe: hidden_states [T, H] and the
// transformers 5.x expert weights gate_up_proj [E, 2I, H], down_proj [E, H, I].
void check_experts_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& gate_up,
                          const at::Tensor& down) {
  check::cuda(op, "hidden_states", hidden);
  check::cuda(op, "gate_up_proj", gate_up);
  check::cuda(op, "down_proj", down);
  check::same_device(op, "gate_up_proj", gate_up, "hidden_states", hidden);
  check::same_device(op, "down_proj", down, "hidden_states", hidden);
  QWEN3X_CHECK(hidden.dim() == 2, "qwen3x.", op,
               ": expected hidden_states [tokens, hidden], got shape ", hidden.sizes());
  const int64_t H = hidden.size(1);
  QWEN3X_CHECK(gate_up.dim() == 3 && gate_up.size(2) == H && gate_up.size(1) % 2 == 0,
               "qwen3x.", op, ": expected gate_up_proj [experts, 2 * intermediate, ", H,
               "] (transformers 5.x layout, [gate; up] rows), got shape ", gate_up.sizes());
  const int64_t E = gate_up.size(0);
  const int64_t I = gate_up.size(1) / 2;
  QWEN3X_CHECK(down.dim() == 3 && down.size(0) == E && down.size(1) == H && down.size(2) == I,
               "qwen3x.", op, ": expected down_proj [", E, ", ", H, ", ", I,
               "] (transformers 5.x layout, [experts, hidden, intermediate]), got shape ",
               down.sizes());
  check::same_dtype(op, "gate_up_proj", gate_up, "hidden_states", hidden);
  check::same_dtype(op, "down_proj", down, "hidden_states", hidden);
  const auto dtype = hidden.scalar_type();
  QWEN3X_CHECK(dtype == at::ScalarType::BFloat16 || dtype == at::ScalarType::Half, "qwen3x.", op,
               ": the CUDA kernel takes torch.bfloat16 or torch.float16 (tensor cores), got ",
               check::dtype_name(dtype), "; run qwen3x.reference.", op, " for other dtypes");
  QWEN3X_CHECK(E >= 1 && E <= moe::kMaxExperts, "qwen3x.", op, ": expected 1 to ", moe::kMaxExperts,
               " experts (gate_up_proj.shape[0]), got ", E);
  QWEN3X_CHECK(H > 0 && H % moe::kExpertsHMultiple == 0 && H <= kMaxExpertsWidth, "qwen3x.", op,
               ": hidden size H = ", H, " must be a positive multiple of ", moe::kExpertsHMultiple,
               " (the kernel's tiles; Qwen3-MoE has 2048 or 4096)");
  QWEN3X_CHECK(I > 0 && I % moe::kExpertsIMultiple == 0 && I <= kMaxExpertsWidth, "qwen3x.", op,
               ": intermediate size I = ", I, " must be a positive multiple of ",
               moe::kExpertsIMultiple, " (the kernel's tiles; Qwen3-MoE has 768 or 1536)");
}

// moe_permute's outputs (and, from the router's decode launch, GEMM2's combine counters).
struct Permutation {
  at::Tensor sorted_rows;       // [num_slots] int32
  at::Tensor expert_offsets;    // [E + 1] int32
  at::Tensor inverse;           // [T * k] int32
  at::Tensor combine_counters;  // [T * H / BLOCK_N] int32, zeroed; undefined: the combine kernel
};

// The permutation's slots (the picks and each expert's padding to a multiple of row_align),
// checked against the int32 range of its outputs.
int64_t permutation_slots(const char* op, int64_t num_picks, int64_t num_experts,
                          int64_t row_align) {
  const int64_t num_slots = num_picks + num_experts * (row_align - 1);
  QWEN3X_CHECK(num_slots <= kMaxInt32, "qwen3x.", op, ": ", num_picks, " picks + ", num_experts,
               " experts x (row_align - 1 = ", row_align - 1,
               ") padding slots exceed the int32 range of the outputs");
  return num_slots;
}

// The row tile of the expert GEMMs for T * k picks over E experts: moe_permute's row_align.
int64_t experts_block_m(int64_t num_picks, int64_t num_experts) {
  return moe::regime_block_m(moe::select_gemm_regime(num_picks, num_experts));
}

// GEMM2's column tiles for T * k picks over E experts and hidden size H.
int64_t experts_col_tiles(int64_t num_picks, int64_t num_experts, int64_t hidden) {
  return hidden / moe::regime_block_n(moe::select_gemm_regime(num_picks, num_experts));
}

// moe_permute's launch(es) for expert_ids [T, k] (checked by the caller: a CUDA index tensor).
// With prep.counters (the picks take one block), the launch also prepares GEMM2's fused combine
// (permute.cuh CombinePrep).
Permutation permute_picks(const char* op, const at::Tensor& expert_ids, int64_t num_experts,
                          int64_t row_align, const moe::CombinePrep& prep = {}) {
  const int64_t num_picks = expert_ids.numel();
  const int64_t num_slots = permutation_slots(op, num_picks, num_experts, row_align);
  const c10::cuda::CUDAGuard device_guard(expert_ids.device());
  // The kernels read the picks in flat order n = t * k + j.
  const at::Tensor ids = expert_ids.contiguous();
  const auto int_options = expert_ids.options().dtype(at::kInt);
  Permutation out;
  out.sorted_rows = at::empty({num_slots}, int_options);
  out.expert_offsets = at::empty({num_experts + 1}, int_options);
  out.inverse = at::empty({num_picks}, int_options);
  const moe::PermuteTiling tiling = moe::permute_tiling(num_picks);
  at::Tensor tile_counts;  // workspace of the two-launch path
  if (tiling.num_tiles > 1) tile_counts = at::empty({tiling.num_tiles, num_experts}, int_options);
  int* tile_counts_ptr =
      tiling.num_tiles > 1 ? static_cast<int*>(tile_counts.mutable_data_ptr()) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(expert_ids.get_device()).stream();
  const bool pdl = pdl_enabled(expert_ids.get_device());

  auto launch = [&](auto id_tag) {
    using IdT = decltype(id_tag);
    C10_CUDA_CHECK(moe::launch_moe_permute<IdT>(
        static_cast<int*>(out.sorted_rows.mutable_data_ptr()),
        static_cast<int*>(out.expert_offsets.mutable_data_ptr()),
        static_cast<int*>(out.inverse.mutable_data_ptr()), tile_counts_ptr,
        static_cast<const IdT*>(ids.const_data_ptr()), num_picks, static_cast<int>(num_experts),
        static_cast<int>(row_align), num_slots, stream, pdl, prep));
  };
  if (expert_ids.scalar_type() == at::ScalarType::Long) {
    launch(int64_t{});
  } else {
    launch(int32_t{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The experts pipeline: permute (row_align = the regime's BLOCK_M; `permuted` when the router
// did it already), GEMM1 with fused SwiGLU, GEMM2 with the routing weight, combine. At decode
// sizes (route_one_launch: where the moe op's router launch permutes) the combine is GEMM2's epilogue,
// its counters prepared by the launch that permuted (the router's, or here the permutation's:
// then no combine launch follows the GEMMs); above, the combine kernel. Inputs checked.
at::Tensor run_experts(const char* op, const at::Tensor& hidden, const at::Tensor& expert_ids,
                       const at::Tensor& expert_weights, const at::Tensor& gate_up,
                       const at::Tensor& down, const Permutation* permuted = nullptr) {
  const int64_t T = hidden.size(0);
  const int64_t H = hidden.size(1);
  const int64_t E = gate_up.size(0);
  const int64_t I = gate_up.size(1) / 2;
  const int64_t k = expert_ids.size(1);
  const int64_t num_picks = T * k;

  const c10::cuda::CUDAGuard device_guard(hidden.device());
  at::Tensor out = at::empty({T, H}, hidden.options());
  if (num_picks == 0) return out;

  const moe::GemmRegime regime = moe::select_gemm_regime(num_picks, E);
  // The prefill regime's mainloop (core/mainloop_choice.h).
  const bool wgmma = use_wgmma(op, "QWEN3X_MOE_MAINLOOP", regime == moe::GemmRegime::kPrefill,
                               hidden.get_device());
  const int64_t block_m = moe::regime_block_m(regime);
  permutation_slots(op, num_picks, E, block_m);
  Permutation own;
  if (permuted == nullptr) {
    moe::CombinePrep prep{};
    at::Tensor counters;
    if (moe::route_one_launch(T, k)) {  // the moe op's decode sizes: one block of picks
      const int64_t col_tiles = H / moe::regime_block_n(regime);
      counters = at::empty({T * col_tiles}, hidden.options().dtype(at::kInt));
      prep = {static_cast<int*>(counters.mutable_data_ptr()), static_cast<int>(col_tiles),
              static_cast<int>(k), out.mutable_data_ptr(), H * out.element_size()};
    }
    own = permute_picks(op, expert_ids, E, block_m, prep);
    own.combine_counters = counters;
    permuted = &own;
  }
  const at::Tensor& sorted_rows = permuted->sorted_rows;
  const at::Tensor& expert_offsets = permuted->expert_offsets;
  const at::Tensor& inverse = permuted->inverse;
  const int64_t row_tiles = moe::max_row_tiles(num_picks, E, block_m);
  at::Tensor act = at::empty({row_tiles * block_m, I}, hidden.options());
  at::Tensor y = at::empty({num_picks, H}, hidden.options());
  // The reference multiplies by the weight rounded to the activation dtype.
  const at::Tensor route = expert_weights.to(hidden.scalar_type()).contiguous();
  const at::Tensor x = rows_16b_readable(hidden);
  const at::Tensor w1 = rows_16b_readable(gate_up);
  const at::Tensor w2 = rows_16b_readable(down);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();

  auto launch = [&](auto type_tag) {
    using T_ = decltype(type_tag);
    moe::ExpertsArgs<T_> a{};
    a.out = static_cast<T_*>(out.mutable_data_ptr());
    a.act = static_cast<T_*>(act.mutable_data_ptr());
    a.y = static_cast<T_*>(y.mutable_data_ptr());
    a.hidden = static_cast<const T_*>(x.const_data_ptr());
    a.hidden_stride = T <= 1 ? H : x.stride(0);
    a.gate_up = static_cast<const T_*>(w1.const_data_ptr());
    a.gate_up_expert_stride = w1.stride(0);
    a.gate_up_row_stride = w1.stride(1);
    a.down = static_cast<const T_*>(w2.const_data_ptr());
    a.down_expert_stride = w2.stride(0);
    a.down_row_stride = w2.stride(1);
    a.route_weights = static_cast<const T_*>(route.const_data_ptr());
    a.sorted_rows = static_cast<const int*>(sorted_rows.const_data_ptr());
    a.expert_offsets = static_cast<const int*>(expert_offsets.const_data_ptr());
    a.inverse = static_cast<const int*>(inverse.const_data_ptr());
    a.num_tokens = T;
    a.top_k = static_cast<int>(k);
    a.num_experts = static_cast<int>(E);
    a.hidden_size = static_cast<int>(H);
    a.inter_size = static_cast<int>(I);
    a.row_tiles = row_tiles;
    a.proxy_fence = wgmma_proxy_fence();
    a.pdl = pdl_enabled(hidden.get_device());
    a.combine_counters = permuted->combine_counters.defined()
                             ? static_cast<int*>(permuted->combine_counters.mutable_data_ptr())
                             : nullptr;
    C10_CUDA_CHECK(moe::launch_moe_experts<T_>(a, regime, wgmma, stream));
  };
  if (hidden.scalar_type() == at::ScalarType::BFloat16) {
    launch(__nv_bfloat16{});
  } else {
    launch(__half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// moe_router's work; with `permuted` and one router block (decode), the same launch also
// permutes the picks (moe_permute's outputs for `row_align`) into *permuted, which is otherwise
// left empty, and zeroes num_counters combine counters there (none when 0). row_align is
// checked by the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const char* op,
                                                     const at::Tensor& router_logits,
                                                     int64_t top_k, bool norm_topk_prob,
                                                     int64_t row_align, Permutation* permuted,
                                                     int64_t num_counters = 0) {
  check::cuda(op, "router_logits", router_logits);
  check::float_dtype(op, "router_logits", router_logits);
  QWEN3X_CHECK(router_logits.dim() == 2, "qwen3x.", op,
               ": expected router_logits [tokens, experts], got shape ", router_logits.sizes());
  const int64_t num_tokens = router_logits.size(0);
  const int64_t num_experts = router_logits.size(1);
  QWEN3X_CHECK(num_experts >= 1 && num_experts <= moe::kMaxExperts, "qwen3x.", op,
               ": expected 1 to ", moe::kMaxExperts, " experts (router_logits.shape[1]), got ",
               num_experts);
  QWEN3X_CHECK(top_k >= 1 && top_k <= num_experts && top_k <= moe::kMaxTopK, "qwen3x.", op,
               ": expected 1 <= top_k <= min(experts, ", moe::kMaxTopK, ") = ",
               std::min<int64_t>(num_experts, moe::kMaxTopK), ", got ", top_k);
  check::last_dim_contiguous(op, "router_logits", router_logits);
  QWEN3X_CHECK(num_tokens * top_k <= kMaxInt32, "qwen3x.", op, ": tokens x top_k = ",
               num_tokens, " x ", top_k, " exceeds the int32 range of the outputs");
  // A single row's stride is never used.
  const int64_t logits_stride = num_tokens <= 1 ? num_experts : router_logits.stride(0);

  const c10::cuda::CUDAGuard device_guard(router_logits.device());
  at::Tensor weights = at::empty({num_tokens, top_k}, router_logits.options());
  at::Tensor expert_ids = at::empty({num_tokens, top_k}, router_logits.options().dtype(at::kInt));
  at::Tensor tokens_per_expert = at::empty({num_experts}, router_logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(router_logits.get_device()).stream();
  const int num_sms = sm_count(router_logits.get_device());
  QWEN3X_CHECK(num_sms > 0, "qwen3x.", op, ": could not query the GPU's multiprocessor count");

  // Decode: the permutation in the router's launch (router.cuh kPermute).
  moe::RoutePermutation perm{};
  const bool fuse = permuted != nullptr && moe::route_one_launch(num_tokens, top_k);
  if (fuse) {
    const int64_t num_picks = num_tokens * top_k;
    const int64_t num_slots = permutation_slots(op, num_picks, num_experts, row_align);
    const auto int_options = router_logits.options().dtype(at::kInt);
    permuted->sorted_rows = at::empty({num_slots}, int_options);
    permuted->expert_offsets = at::empty({num_experts + 1}, int_options);
    permuted->inverse = at::empty({num_picks}, int_options);
    perm = {static_cast<int*>(permuted->sorted_rows.mutable_data_ptr()),
            static_cast<int*>(permuted->expert_offsets.mutable_data_ptr()),
            static_cast<int*>(permuted->inverse.mutable_data_ptr()),
            static_cast<int>(row_align),
            static_cast<int>(num_slots),
            nullptr,
            0};
    if (num_counters > 0) {  // <= 64 tokens x H / 64 <= 2^14 column tiles: an int
      permuted->combine_counters = at::empty({num_counters}, int_options);
      perm.zero_counters = static_cast<int*>(permuted->combine_counters.mutable_data_ptr());
      perm.num_counters = static_cast<int>(num_counters);
    }
  }

  QWEN3X_DISPATCH_FLOAT_TYPES(router_logits.scalar_type(), op, [&] {
    C10_CUDA_CHECK(moe::launch_moe_router<scalar_t>(
        static_cast<scalar_t*>(weights.mutable_data_ptr()),
        static_cast<int*>(expert_ids.mutable_data_ptr()),
        static_cast<int*>(tokens_per_expert.mutable_data_ptr()),
        static_cast<const scalar_t*>(router_logits.const_data_ptr()), num_tokens, logits_stride,
        static_cast<int>(num_experts), static_cast<int>(top_k), norm_topk_prob, num_sms, stream,
        fuse ? &perm : nullptr, pdl_enabled(router_logits.get_device())));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, expert_ids, tokens_per_expert};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router(const at::Tensor& router_logits,
                                                          int64_t top_k, bool norm_topk_prob) {
  return route("moe_router", router_logits, top_k, norm_topk_prob, /*row_align=*/1,
               /*permuted=*/nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(
    const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob, int64_t row_align) {
  constexpr const char* kOp = "moe_route";
  QWEN3X_CHECK(row_align >= 1 && row_align <= kMaxInt32, "qwen3x.", kOp,
               ": expected 1 <= row_align <= ", kMaxInt32, ", got ", row_align);
  Permutation p;
  auto [weights, expert_ids, tokens_per_expert] =
      route(kOp, router_logits, top_k, norm_topk_prob, row_align, &p);
  if (!p.sorted_rows.defined()) {  // more than one router block: the permutation's own launches
    const int64_t num_experts = router_logits.size(1);
    permutation_slots(kOp, expert_ids.numel(), num_experts, row_align);  // named as moe_route
    std::tie(p.sorted_rows, p.expert_offsets, p.inverse) =
        moe_permute(expert_ids, num_experts, row_align);
  }
  return {weights, expert_ids, tokens_per_expert, p.sorted_rows, p.expert_offsets, p.inverse};
}

// The router's GEMM. Decode sizes in bf16 / fp16 (moe::gate_kernel_serves: up to 16 tokens) run
// gate.cuh's kernel, with programmatic dependent launch where the device allows; other sizes and
// fp32 / fp64 run at::linear (cuBLAS: a GEMM at prefill sizes), which is also what the reference runs.
at::Tensor moe_gate(const at::Tensor& hidden_states, const at::Tensor& weight) {
  constexpr const char* kOp = "moe_gate";
  check::cuda(kOp, "hidden_states", hidden_states);
  check::cuda(kOp, "weight", weight);
  check::same_device(kOp, "weight", weight, "hidden_states", hidden_states);
  const auto dtype = hidden_states.scalar_type();
  QWEN3X_CHECK(at::isFloatingType(dtype), "qwen3x.", kOp,
               ": expected hidden_states to be a floating tensor, got ", check::dtype_name(dtype));
  check::same_dtype(kOp, "weight", weight, "hidden_states", hidden_states);
  QWEN3X_CHECK(hidden_states.dim() == 2, "qwen3x.", kOp,
               ": expected hidden_states [tokens, hidden], got shape ", hidden_states.sizes());
  const int64_t T = hidden_states.size(0);
  const int64_t H = hidden_states.size(1);
  QWEN3X_CHECK(weight.dim() == 2 && weight.size(1) == H, "qwen3x.", kOp, ": expected weight [experts, ", H,
               "] (the router's linear weight), got shape ", weight.sizes());
  const int64_t E = weight.size(0);
  const c10::cuda::CUDAGuard device_guard(hidden_states.device());
  const bool half = dtype == at::ScalarType::BFloat16 || dtype == at::ScalarType::Half;
  if (!half || !moe::gate_kernel_serves(T, H) || E < 1 || E > kMaxInt32) {
    // torch's linear in the inputs' dtype, as the kernel computes: not cast by an autocast region
    // around the op (the op has no autocast rule, so the call below would otherwise meet it)
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return at::linear(hidden_states, weight);
  }

  const at::Tensor hidden = rows_16b_readable(hidden_states);
  const at::Tensor w = rows_16b_readable(weight);
  at::Tensor logits = at::empty({T, E}, hidden_states.options());
  const int64_t hidden_stride = T <= 1 ? H : hidden.stride(0);  // a single row's stride is never used
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden_states.get_device()).stream();
  const bool pdl = pdl_enabled(hidden_states.get_device());
  const auto launch = [&](auto tag) {
    using T16 = decltype(tag);
    C10_CUDA_CHECK(moe::launch_moe_gate<T16>(static_cast<T16*>(logits.mutable_data_ptr()),
                                             static_cast<const T16*>(hidden.const_data_ptr()),
                                             static_cast<const T16*>(w.const_data_ptr()), T, H, E,
                                             hidden_stride, w.stride(0), stream, pdl));
  };
  if (dtype == at::ScalarType::BFloat16) {
    launch(__nv_bfloat16{});
  } else {
    launch(__half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& expert_ids,
                                                           int64_t num_experts,
                                                           int64_t row_align) {
  constexpr const char* kOp = "moe_permute";
  check::cuda(kOp, "expert_ids", expert_ids);
  check::index_dtype(kOp, "expert_ids", expert_ids);
  QWEN3X_CHECK(expert_ids.dim() == 2, "qwen3x.", kOp,
               ": expected expert_ids [tokens, top_k], got shape ", expert_ids.sizes());
  QWEN3X_CHECK(num_experts >= 1 && num_experts <= moe::kMaxExperts, "qwen3x.", kOp,
               ": expected 1 <= num_experts <= ", moe::kMaxExperts, ", got ", num_experts);
  QWEN3X_CHECK(row_align >= 1 && row_align <= kMaxInt32, "qwen3x.", kOp,
               ": expected 1 <= row_align <= ", kMaxInt32, ", got ", row_align);
  const Permutation p = permute_picks(kOp, expert_ids, num_experts, row_align);
  return {p.sorted_rows, p.expert_offsets, p.inverse};
}

at::Tensor moe_experts(const at::Tensor& hidden_states, const at::Tensor& expert_ids,
                       const at::Tensor& expert_weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj) {
  constexpr const char* kOp = "moe_experts";
  check_experts_inputs(kOp, hidden_states, gate_up_proj, down_proj);
  check::cuda(kOp, "expert_ids", expert_ids);
  check::cuda(kOp, "expert_weights", expert_weights);
  check::same_device(kOp, "expert_ids", expert_ids, "hidden_states", hidden_states);
  check::same_device(kOp, "expert_weights", expert_weights, "hidden_states", hidden_states);
  check::index_dtype(kOp, "expert_ids", expert_ids);
  const int64_t T = hidden_states.size(0);
  QWEN3X_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == T && expert_ids.size(1) >= 1,
               "qwen3x.", kOp, ": expected expert_ids [", T, ", top_k] with top_k >= 1, got shape ",
               expert_ids.sizes());
  QWEN3X_CHECK(expert_weights.sizes() == expert_ids.sizes(), "qwen3x.", kOp,
               ": expected expert_weights of the shape of expert_ids ", expert_ids.sizes(),
               ", got ", expert_weights.sizes());
  check::float_dtype(kOp, "expert_weights", expert_weights);
  return run_experts(kOp, hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj);
}

// The op "moe" (the name qwen3x::moe is the kernels' namespace).
at::Tensor moe_block(const at::Tensor& hidden_states, const at::Tensor& router_logits,
                     const at::Tensor& gate_up_proj, const at::Tensor& down_proj, int64_t top_k,
                     bool norm_topk_prob) {
  constexpr const char* kOp = "moe";
  check_experts_inputs(kOp, hidden_states, gate_up_proj, down_proj);
  check::cuda(kOp, "router_logits", router_logits);
  check::same_device(kOp, "router_logits", router_logits, "hidden_states", hidden_states);
  const int64_t T = hidden_states.size(0);
  const int64_t E = gate_up_proj.size(0);
  QWEN3X_CHECK(router_logits.dim() == 2 && router_logits.size(0) == T && router_logits.size(1) == E,
               "qwen3x.", kOp, ": expected router_logits [", T, ", ", E, "], got shape ",
               router_logits.sizes());
  QWEN3X_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, moe::kMaxTopK), "qwen3x.", kOp,
               ": expected 1 <= top_k <= min(experts, ", moe::kMaxTopK, ") = ",
               std::min<int64_t>(E, moe::kMaxTopK), ", got ", top_k);
  // Filled at decode sizes, where the router's launch permutes too and zeroes the counters of
  // the combine in GEMM2 (every pick is routed: the router's ids are always in range).
  Permutation permuted;
  const auto [weights, expert_ids, tokens_per_expert] =
      route("moe_router", router_logits, top_k, norm_topk_prob, experts_block_m(T * top_k, E),
            &permuted, T * experts_col_tiles(T * top_k, E, hidden_states.size(1)));
  return run_experts(kOp, hidden_states, expert_ids, weights, gate_up_proj, down_proj,
                     permuted.sorted_rows.defined() ? &permuted : nullptr);
}

}  // namespace qwen3x
