// emu_runner JOB_DIR: runs one qwen3x kernel launcher from csrc/ on the CPU emulator
// (include/emu/emu.h) and writes its outputs. tests/emulator/README.md describes the job format:
//   JOB_DIR/params.txt   "key value" lines; `op` names the launcher
//   JOB_DIR/NAME.bin     input arrays (raw bytes), one allocation each
//   JOB_DIR/NAME.out     output arrays written by the runner (allocated here, poisoned first)
// Launches go through the kernels' own host launchers (launch_attention, launch_moe_permute,
// launch_moe_experts, ...); the parameter structs are filled the way the .cu glue fills them.
// Exit status 0 on success; 2 with the error on stderr when the emulator or a launch fails.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>

// EMU_ONLY_ATTENTION / EMU_ONLY_EXPERTS / EMU_ONLY_OTHERS (build.py's `only`): a runner with those
// kernels alone (the planted-bug builds, each of which compiles its own copy of the sources); any
// other op is then refused by name. Without one, every op.
#if !defined(EMU_ONLY_ATTENTION) && !defined(EMU_ONLY_EXPERTS) && !defined(EMU_ONLY_OTHERS)
#define EMU_WITH_ATTENTION 1
#define EMU_WITH_EXPERTS 1
#define EMU_WITH_OTHERS 1
#elif defined(EMU_ONLY_ATTENTION)
#define EMU_WITH_ATTENTION 1
#elif defined(EMU_ONLY_EXPERTS)
#define EMU_WITH_EXPERTS 1
#else
#define EMU_WITH_OTHERS 1
#endif

#include "core/launch.h"
#if defined(EMU_WITH_ATTENTION)
#include "attention/attention_fwd.cuh"
#endif
#if defined(EMU_WITH_EXPERTS)
#include "moe/experts.cuh"
#include "moe/permute.cuh"
#include "moe/router.cuh"
#endif
#if defined(EMU_WITH_OTHERS)
#include "activation/silu_and_mul.cuh"
#include "moe/gate.cuh"
#include "moe/router.cuh"
#include "norm/rms_norm.cuh"
#include "rope/qk_norm_rope.cuh"
#endif

namespace {

constexpr double kLog2e = 1.4426950408889634;  // attention.cu's

// One host allocation per tensor, exactly its size (AddressSanitizer guards both ends), 256-byte
// aligned like PyTorch's CUDA allocator.
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) {
    if (posix_memalign(&ptr, 256, n == 0 ? 1 : n) != 0) throw std::bad_alloc();
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as() {
    return static_cast<T*>(ptr);
  }
};

class Job {
 public:
  explicit Job(std::string dir) : dir_(std::move(dir)) {
    std::ifstream f(dir_ + "/params.txt");
    if (!f) throw emu::Error("no params.txt in " + dir_);
    std::string key, value;
    while (f >> key >> value) params_[key] = value;
  }
  bool has(const std::string& k) const { return params_.count(k) != 0; }
  std::string str(const std::string& k) const {
    auto it = params_.find(k);
    if (it == params_.end()) throw emu::Error("params.txt: missing " + k);
    return it->second;
  }
  int64_t i64(const std::string& k) const { return std::stoll(str(k)); }
  int64_t i64(const std::string& k, int64_t dflt) const { return has(k) ? i64(k) : dflt; }
  double f64(const std::string& k) const { return std::stod(str(k)); }

  // An input array, read into its own allocation.
  Buffer& input(const std::string& name) {
    std::ifstream f(dir_ + "/" + name + ".bin", std::ios::binary | std::ios::ate);
    if (!f) throw emu::Error("missing input " + name + ".bin");
    const size_t n = static_cast<size_t>(f.tellg());
    f.seekg(0);
    auto b = std::make_unique<Buffer>(n);
    f.read(static_cast<char*>(b->ptr), static_cast<std::streamsize>(n));
    return *(buffers_[name] = std::move(b));
  }
  // An output (or workspace) array of n bytes, filled with 0xFF (NaN in every float format).
  Buffer& output(const std::string& name, size_t n) {
    auto b = std::make_unique<Buffer>(n);
    std::memset(b->ptr, 0xFF, n);
    outputs_.push_back(name);
    return *(buffers_["out:" + name] = std::move(b));  // an input may have the same name
  }
  Buffer& workspace(const std::string& name, size_t n) {
    auto b = std::make_unique<Buffer>(n);
    std::memset(b->ptr, 0xFF, n);
    return *(buffers_["ws:" + name] = std::move(b));
  }
  void write_outputs() const {
    for (const std::string& name : outputs_) {
      const Buffer& b = *buffers_.at("out:" + name);
      std::ofstream f(dir_ + "/" + name + ".out", std::ios::binary);
      f.write(static_cast<const char*>(b.ptr), static_cast<std::streamsize>(b.bytes));
    }
  }

 private:
  std::string dir_;
  std::map<std::string, std::string> params_;
  std::map<std::string, std::unique_ptr<Buffer>> buffers_;
  std::vector<std::string> outputs_;
};

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) throw emu::Error(std::string(what) + ": " + cudaGetErrorString(err));
}

// f(T{}) for the job's dtype: bf16, fp16 (and fp32 where `fp32_too`).
template <bool fp32_too = false, typename F>
void with_dtype(const Job& job, F f) {
  const std::string dt = job.str("dtype");
  if (dt == "bf16") {
    f(__nv_bfloat16{});
  } else if (dt == "fp16") {
    f(__half{});
  } else if (dt == "fp32" && fp32_too) {
    if constexpr (fp32_too) f(float{});
  } else {
    throw emu::Error("unsupported dtype " + dt);
  }
}

// ---- the memory-bound kernels (norm.cu, activation.cu, rope.cu, moe.cu's router) ---------------
#if defined(EMU_WITH_OTHERS)
void run_rms_norm(Job& job) {
  const int64_t rows = job.i64("rows"), hidden = job.i64("hidden");
  const bool residual = job.has("residual_stride");
  with_dtype<true>(job, [&](auto tag) {
    using T = decltype(tag);
    T* out = job.output("out", rows * hidden * sizeof(T)).template as<T>();
    T* res_out = residual ? job.output("residual_out", rows * hidden * sizeof(T)).template as<T>() : nullptr;
    qwen3x::norm::launch_rms_norm<T>(
        out, res_out, job.input("input").template as<T>(),
        residual ? job.input("residual").template as<T>() : nullptr, job.input("weight").template as<T>(),
        rows, static_cast<int>(hidden), hidden, hidden, job.i64("input_stride"),
        job.i64("residual_stride", 0), static_cast<float>(job.f64("eps")), nullptr);
    check(cudaSuccess, "launch_rms_norm");
  });
}
#endif

#if defined(EMU_WITH_OTHERS)
void run_silu_and_mul(Job& job) {
  const int64_t rows = job.i64("rows"), inter = job.i64("inter");
  with_dtype<true>(job, [&](auto tag) {
    using T = decltype(tag);
    T* out = job.output("out", rows * inter * sizeof(T)).template as<T>();
    qwen3x::activation::launch_silu_and_mul<T>(out, job.input("input").template as<T>(), rows, inter,
                                               inter, job.i64("input_stride"), nullptr);
    check(cudaSuccess, "launch_silu_and_mul");
  });
}
#endif

#if defined(EMU_WITH_OTHERS)
void run_router(Job& job) {
  const int64_t T = job.i64("tokens"), E = job.i64("experts"), k = job.i64("top_k");
  with_dtype<true>(job, [&](auto tag) {
    using Tt = decltype(tag);
    check(qwen3x::moe::launch_moe_router<Tt>(
              job.output("weights", T * k * sizeof(Tt)).template as<Tt>(),
              job.output("expert_ids", T * k * 4).template as<int>(),
              job.output("counts", E * 4).template as<int>(), job.input("logits").template as<Tt>(), T,
              job.i64("logits_stride"), static_cast<int>(E), static_cast<int>(k),
              job.i64("norm_topk_prob") != 0, qwen3x::sm_count(0), nullptr),
          "launch_moe_router");
  });
}
#endif

#if defined(EMU_WITH_OTHERS)
void run_gate(Job& job) {
  const int64_t T = job.i64("tokens"), E = job.i64("experts"), H = job.i64("hidden");
  with_dtype<false>(job, [&](auto tag) {
    using Tt = decltype(tag);
    check(qwen3x::moe::launch_moe_gate<Tt>(job.output("logits", T * E * sizeof(Tt)).template as<Tt>(),
                                           job.input("hidden").template as<Tt>(),
                                           job.input("weight").template as<Tt>(), T, H, E,
                                           job.i64("hidden_stride"), job.i64("weight_stride"), nullptr),
          "launch_moe_gate");
  });
}
#endif

// Out of place, or with `cache` in place on q plus k and v into a static cache (rope.cu).
#if defined(EMU_WITH_OTHERS)
void run_qk_norm_rope(Job& job) {
  using namespace qwen3x::rope;
  const int64_t tokens = job.i64("tokens");
  const int hq = static_cast<int>(job.i64("hq")), hkv = static_cast<int>(job.i64("hkv"));
  const bool with_cache = job.has("max_slots");
  with_dtype<true>(job, [&](auto tag) {
    using T = decltype(tag);
    const HeadStrides q_in{job.i64("q_token_stride"), job.i64("q_head_stride")};
    const HeadStrides k_in{job.i64("k_token_stride"), job.i64("k_head_stride")};
    const HeadStrides q_out{static_cast<int64_t>(hq) * 128, 128};
    const HeadStrides k_out{static_cast<int64_t>(hkv) * 128, 128};
    T* qo = job.output("q_out", tokens * hq * 128 * sizeof(T)).template as<T>();
    T* ko = with_cache ? nullptr : job.output("k_out", tokens * hkv * 128 * sizeof(T)).template as<T>();
    CacheWrite<T> cw{};
    if (with_cache) {  // caches [B, Hkv, S_max, 128] as inputs (their old contents) and outputs
      const int64_t b = job.i64("batch"), smax = job.i64("max_slots");
      const size_t bytes = b * hkv * smax * 128 * sizeof(T);
      cw.k_cache = job.output("k_cache", bytes).template as<T>();
      cw.v_cache = job.output("v_cache", bytes).template as<T>();
      std::memcpy(cw.k_cache, job.input("k_cache").ptr, bytes);
      std::memcpy(cw.v_cache, job.input("v_cache").ptr, bytes);
      const CacheStrides cs{hkv * smax * 128, smax * 128, 128};
      cw.k_strides = cs;
      cw.v_strides = cs;
      cw.v = job.input("v").template as<T>();
      cw.v_in = {job.i64("v_token_stride"), job.i64("v_head_stride")};
      cw.slots = job.input("slots").ptr;
      cw.slots_int64 = job.i64("slots_int64") != 0;
      cw.seqlen = job.i64("seqlen");
      cw.max_slots = smax;
    }
    const T* qi = job.input("q").template as<T>();
    const T* ki = job.input("k").template as<T>();
    HeadStrides q_in_s = q_in, k_in_s = k_in;
    if (job.has("in_place") && job.i64("in_place") != 0) {  // qk_norm_rope_: q and k read and written
      if (with_cache) throw std::runtime_error("in_place: q and k outputs, no cache");
      for (int64_t t = 0; t < tokens; ++t) {  // the inputs, dense, into the outputs
        for (int h = 0; h < hq; ++h) {
          std::memcpy(qo + (t * hq + h) * 128, qi + t * q_in.token + h * q_in.head, 128 * sizeof(T));
        }
        for (int h = 0; h < hkv; ++h) {
          std::memcpy(ko + (t * hkv + h) * 128, ki + t * k_in.token + h * k_in.head, 128 * sizeof(T));
        }
      }
      qi = qo;
      ki = ko;
      q_in_s = q_out;
      k_in_s = k_out;
    }
    launch_qk_norm_rope<T>(qo, ko, qi, ki, job.input("q_weight").template as<T>(),
                           job.input("k_weight").template as<T>(), job.input("positions").ptr,
                           job.i64("positions_int64") != 0, job.input("inv_freq").template as<float>(),
                           tokens, hq, hkv, q_out, k_out, q_in_s, k_in_s,
                           static_cast<float>(job.f64("attention_scaling")),
                           static_cast<float>(job.f64("eps")), cw, nullptr);
    check(cudaSuccess, "launch_qk_norm_rope");
  });
}
#endif

// ---- attention (attention.cu: common_params, attention, attention_varlen, plan_and_launch) ----
#if defined(EMU_WITH_ATTENTION)
void run_attention(Job& job) {
  using namespace qwen3x;
  attn::Params p{};
  const bool varlen = job.has("varlen") && job.i64("varlen") != 0;
  p.q = job.input("q").ptr;
  p.k = job.input("k").ptr;
  p.v = job.input("v").ptr;
  p.q_batch_stride = job.i64("q_batch_stride", 0);
  p.q_head_stride = job.i64("q_head_stride");
  p.q_seq_stride = job.i64("q_seq_stride");
  p.k_batch_stride = job.i64("k_batch_stride", 0);
  p.k_head_stride = job.i64("k_head_stride");
  p.k_seq_stride = job.i64("k_seq_stride");
  p.v_batch_stride = job.i64("v_batch_stride", 0);
  p.v_head_stride = job.i64("v_head_stride");
  p.v_seq_stride = job.i64("v_seq_stride");
  p.batch = static_cast<int>(job.i64("batch"));
  p.num_q_heads = static_cast<int>(job.i64("hq"));
  p.num_kv_heads = static_cast<int>(job.i64("hkv"));
  p.group = p.num_q_heads / p.num_kv_heads;
  p.scale_log2 = static_cast<float>(job.f64("scale") * kLog2e);
  p.causal = job.i64("causal") != 0;
  p.seqlen_q = static_cast<int>(job.i64("seqlen_q"));
  p.seqlen_k = static_cast<int>(job.i64("seqlen_k"));
  p.total_q = static_cast<int>(job.i64("total_q"));
  p.total_k = static_cast<int>(job.i64("total_k", 0));
  if (varlen) {
    p.cu_seqlens_q = job.input("cu_seqlens_q").as<int>();
    p.cu_seqlens_k = job.input("cu_seqlens_k").as<int>();
  }
  if (job.has("mask_q_stride")) {
    p.mask = job.input("mask").as<uint8_t>();
    p.mask_batch_stride = job.i64("mask_batch_stride");
    p.mask_head_stride = job.i64("mask_head_stride");
    p.mask_q_stride = job.i64("mask_q_stride");
  }
  if (job.has("key_lengths_stride")) {
    p.key_lengths = job.input("key_lengths").ptr;
    p.key_lengths_int64 = job.i64("key_lengths_int64") != 0;
    p.key_lengths_stride = job.i64("key_lengths_stride");
  }
  const size_t out_elems = static_cast<size_t>(p.total_q) * p.num_q_heads * kHeadDim;
  p.lse = job.output("lse", static_cast<size_t>(p.total_q) * p.num_q_heads * 4).as<float>();
  const bool wgmma = job.str("mainloop") == "wgmma";
  const bool overlap = job.i64("overlap", 0) != 0;  // attention.cu's QWEN3X_ATTENTION_OVERLAP=1
  p.proxy_fence = job.i64("proxy_fence", 1) != 0;
  if (wgmma && static_cast<int64_t>(p.seqlen_q) * p.group < attn::kBlockM) {
    throw emu::Error("the glue serves only full row tiles with the wgmma mainloop");
  }
  if (overlap && !wgmma) throw emu::Error("the overlapped loop is a wgmma loop");
  const auto with_loop = [&](auto&& f) { return attn::with_loop(wgmma, overlap, f); };
  with_dtype(job, [&](auto tag) {
    using T = decltype(tag);
    p.out = job.output("out", out_elems * sizeof(T)).ptr;
    const int num_sms = sm_count(0);
    const int64_t ctas = std::max<int64_t>(
        static_cast<int64_t>(attn::row_tiles(p)) * p.batch * p.num_kv_heads,
        ceil_div<int64_t>(static_cast<int64_t>(p.total_q) * p.num_q_heads, attn::kBlockM));
    const int ctas_per_sm = with_loop([&]<bool kW, bool kO>() {
      return resident_ctas_per_sm<attn::attention_fwd_kernel<T, kW, kO>>(
          attn::kThreads, attn::smem_bytes<kW, kO>(), attn::kMinCtasPerSm);
    });
    // cluster_combine: attention.cu's QWEN3X_ATTENTION_COMBINE=cluster (this emulated device is sm_90)
    const bool cluster = job.i64("cluster_combine", 0) != 0;
    attn::SplitPlan plan = attn::plan_splits(ctas, p.seqlen_k, static_cast<int64_t>(p.seqlen_q) * p.group,
                                             num_sms, ctas_per_sm, cluster ? kMaxClusterSize : attn::kMaxSplits);
    if (job.has("force_splits")) {  // a plan the SM count would give, without that many CTAs
      const int tiles = static_cast<int>(ceil_div<int64_t>(p.seqlen_k, attn::kBlockN));
      const int want = static_cast<int>(job.i64("force_splits"));
      plan.tiles_per_split = std::max(1, static_cast<int>(ceil_div<int64_t>(tiles, want)));
      plan.num_splits = std::max(1, static_cast<int>(ceil_div<int64_t>(tiles, plan.tiles_per_split)));
    }
    p.num_splits = plan.num_splits;
    p.tiles_per_split = plan.tiles_per_split;
    p.cluster_combine = cluster && plan.num_splits > 1;  // (forced past 16: launch_attention refuses)
    if (p.cluster_combine && plan.num_splits <= kMaxClusterSize &&
        !with_loop([&]<bool kW, bool kO>() { return attn::attention_resident_clusters<T, kW, kO>(plan.num_splits) > 0; })) {
      throw emu::Error("a cluster of " + std::to_string(plan.num_splits) + " CTAs does not fit");
    }
    const bool workspace = plan.num_splits > 1 && !p.cluster_combine;
    if (workspace) {
      const size_t rows =
          static_cast<size_t>(plan.num_splits) * p.num_kv_heads * p.total_q * p.group;
      p.partial_o = job.workspace("partial_o", rows * kHeadDim * 4).as<float>();
      p.partial_lse = job.workspace("partial_lse", rows * 4).as<float>();
      // arrival marks: 0xFF..., as a fresh allocation may hold, never the tag
      p.split_flags = job.workspace("split_flags", static_cast<size_t>(attn::row_tiles(p)) * p.batch *
                                                       p.num_kv_heads * plan.num_splits * 8)
                          .as<unsigned long long>();
      p.split_tag = static_cast<unsigned long long>(job.i64("split_tag", 0x5eed));
    }
    std::cout << "splits " << plan.num_splits << " tiles_per_split " << plan.tiles_per_split
              << "\ncluster_combine " << p.cluster_combine
              << "\nplanned for sms " << num_sms << " ctas_per_sm " << ctas_per_sm << "\n";
    // replays > 1: the same launch again (a CUDA graph's replays: same workspace, same tag), out,
    // lse and the partials poisoned in between (the marks kept), so what is checked is the last
    // launch's own answer, and a combine that ran on an earlier launch's marks reads NaN
    const int64_t replays = job.i64("replays", 1);
    for (int64_t i = 0; i < replays; ++i) {
      if (i > 0) {
        std::memset(p.out, 0xFF, out_elems * sizeof(T));
        std::memset(p.lse, 0xFF, static_cast<size_t>(p.total_q) * p.num_q_heads * 4);
        if (workspace) {
          const size_t rows = static_cast<size_t>(plan.num_splits) * p.num_kv_heads * p.total_q * p.group;
          std::memset(p.partial_o, 0xFF, rows * kHeadDim * 4);
          std::memset(p.partial_lse, 0xFF, rows * 4);
        }
      }
      check(with_loop([&]<bool kW, bool kO>() { return attn::launch_attention<T, kW, kO>(p, nullptr); }),
            "launch_attention");
      if (workspace) {  // the combiners' reset: what a replay's correctness rests on
        const size_t slots = static_cast<size_t>(attn::row_tiles(p)) * p.batch * p.num_kv_heads * plan.num_splits;
        size_t left = 0;
        for (size_t j = 0; j < slots; ++j) left += p.split_flags[j] != 0;
        std::cout << "split marks left set " << left << "\n";
      }
    }
  });
}
#endif

// ---- MoE experts (moe.cu: moe_permute, run_experts) ----------------------------------------------
#if defined(EMU_WITH_EXPERTS)
void run_experts(Job& job) {
  using namespace qwen3x;
  const int64_t T = job.i64("tokens"), H = job.i64("hidden"), E = job.i64("experts");
  const int64_t I = job.i64("inter"), k = job.i64("top_k");
  const int64_t num_picks = T * k;
  const moe::GemmRegime regime = moe::select_gemm_regime(num_picks, E);
  const bool wgmma = job.str("mainloop") == "wgmma";
  if (wgmma && regime != moe::GemmRegime::kPrefill) {
    throw emu::Error("the glue serves only the prefill regime with the wgmma mainloop");
  }
  const int64_t block_m = moe::regime_block_m(regime);
  std::cout << "regime " << static_cast<int>(regime) << " block_m " << block_m << "\n";
  const int* ids = job.input("expert_ids").as<int>();
  // moe_permute (moe.cu): slots, offsets, inverse, and the count workspace of a tiled permute
  const int64_t num_slots = num_picks + E * (block_m - 1);
  int* sorted_rows = job.output("sorted_rows", num_slots * 4).as<int>();
  int* offsets = job.output("expert_offsets", (E + 1) * 4).as<int>();
  int* inverse = job.output("inverse", num_picks * 4).as<int>();
  const moe::PermuteTiling tiling = moe::permute_tiling(num_picks);
  int* tile_counts =
      tiling.num_tiles > 1 ? job.workspace("tile_counts", tiling.num_tiles * E * 4).as<int>() : nullptr;
  // GEMM2's combine: "glue" (moe.cu run_experts: at decode sizes prepared by the permutation's
  // launch, else the combine kernel), "kernel" (always the combine kernel) or "router" (counters
  // zeroed, as the moe op's router launch zeroes them: every pick routed)
  const std::string combine = job.has("combine") ? job.str("combine") : "glue";
  const int64_t col_tiles = H / moe::regime_block_n(regime);
  const bool prepared = combine == "glue" && moe::route_one_launch(T, k);
  int* counters = combine == "router" || prepared
                      ? job.workspace("combine_counters", T * col_tiles * 4).as<int>() : nullptr;
  if (combine == "router") std::memset(counters, 0, T * col_tiles * 4);
  const size_t elem = job.str("dtype") == "fp16" ? sizeof(__half) : sizeof(__nv_bfloat16);
  Buffer& out = job.output("out", T * H * elem);
  moe::CombinePrep prep{};
  if (prepared) prep = {counters, static_cast<int>(col_tiles), static_cast<int>(k), out.ptr, H * static_cast<int64_t>(elem)};
  check(moe::launch_moe_permute<int>(sorted_rows, offsets, inverse, tile_counts, ids, num_picks,
                                     static_cast<int>(E), static_cast<int>(block_m), num_slots,
                                     nullptr, /*pdl=*/false, prep),
        "launch_moe_permute");
  const int64_t row_tiles = moe::max_row_tiles(num_picks, E, block_m);
  with_dtype(job, [&](auto tag) {
    using Tt = decltype(tag);
    moe::ExpertsArgs<Tt> a{};
    a.out = out.as<Tt>();
    a.act = job.workspace("act", row_tiles * block_m * I * sizeof(Tt)).as<Tt>();
    a.y = job.workspace("y", num_picks * H * sizeof(Tt)).as<Tt>();
    a.hidden = job.input("hidden").as<Tt>();
    a.hidden_stride = job.i64("hidden_stride");
    a.gate_up = job.input("gate_up").as<Tt>();
    a.gate_up_expert_stride = 2 * I * H;
    a.gate_up_row_stride = H;
    a.down = job.input("down").as<Tt>();
    a.down_expert_stride = H * I;
    a.down_row_stride = I;
    a.route_weights = job.input("route").as<Tt>();
    a.sorted_rows = sorted_rows;
    a.expert_offsets = offsets;
    a.inverse = inverse;
    a.num_tokens = T;
    a.top_k = static_cast<int>(k);
    a.num_experts = static_cast<int>(E);
    a.hidden_size = static_cast<int>(H);
    a.inter_size = static_cast<int>(I);
    a.row_tiles = row_tiles;
    a.proxy_fence = true;
    a.combine_counters = counters;
    std::cout << "combine " << (counters != nullptr ? "gemm2" : "kernel") << "\n";
    check(moe::launch_moe_experts<Tt>(a, regime, wgmma, nullptr), "launch_moe_experts");
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: emu_runner JOB_DIR\n";
    return 2;
  }
  emu::Device& dev = emu::device();
  if (const char* a = std::getenv("EMU_ASYNC")) {
    const std::string mode(a);
    if (mode != "early" && mode != "late" && mode != "both") {
      std::cerr << "emu_runner: EMU_ASYNC must be early, late or both\n";
      return 2;
    }
    dev.early = mode != "late";
    dev.late = mode != "early";
  }
  if (const char* o = std::getenv("EMU_ORDER")) dev.reverse = std::string(o) == "reverse";
  if (const char* c = std::getenv("EMU_COSCHEDULE")) dev.coschedule = std::atoi(c);
  if (const char* s = std::getenv("EMU_SMS")) dev.sms = std::atoi(s);
  if (const char* s = std::getenv("EMU_CC")) dev.cc = std::atoi(s);
  if (const char* s = std::getenv("EMU_SMEM_OPTIN")) dev.max_smem_optin = std::atoi(s);
  if (const char* s = std::getenv("EMU_SMEM_PER_SM")) dev.smem_per_sm = std::atoi(s);
  if (const char* s = std::getenv("EMU_THREADS_PER_SM")) dev.threads_per_sm = std::atoi(s);
  if (const char* s = std::getenv("EMU_CTAS_PER_SM")) dev.ctas_per_sm = std::atoi(s);
  if (const char* s = std::getenv("EMU_DYN_SMEM_OFFSET")) dev.dyn_smem_offset = std::atoi(s);
  try {
    Job job(argv[1]);
    const std::string op = job.str("op");
    bool ran = false;
#if defined(EMU_WITH_ATTENTION)
    if (op == "attention") { run_attention(job); ran = true; }
#endif
#if defined(EMU_WITH_EXPERTS)
    if (op == "experts") { run_experts(job); ran = true; }
#endif
#if defined(EMU_WITH_OTHERS)
    if (op == "rms_norm") { run_rms_norm(job); ran = true; }
    if (op == "silu_and_mul") { run_silu_and_mul(job); ran = true; }
    if (op == "router") { run_router(job); ran = true; }
    if (op == "gate") { run_gate(job); ran = true; }
    if (op == "qk_norm_rope") { run_qk_norm_rope(job); ran = true; }
#endif
    if (!ran) throw emu::Error("op " + op + " is unknown or not built into this runner");
    job.write_outputs();
    std::cout << "launches " << dev.launches << "\n";
    for (const auto& [what, n] : dev.executed) std::cout << "executed " << what << " " << n << "\n";
    for (const auto& [what, b] : dev.banks) {
      std::cout << "banks " << what << " " << b.requests << " " << b.wavefronts << " " << b.ideal
                << " " << b.unpaired << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "emu_runner: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
