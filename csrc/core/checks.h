// Argument checks for the torch glue, with messages that name the op and what
// was expected, e.g.
//   qwen3x.rms_norm: expected input to be a CUDA tensor, got cpu
//
// All checks raise through QWEN3X_CHECK (core/message.h: TORCH_CHECK_VALUE with a message built
// without iostreams), i.e. ValueError in Python, as the Python side's checks do.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "core/launch.h"
#include "core/message.h"

namespace qwen3x {

// What this build's machine code is for (torch_bindings.cpp, from QWEN3X_CUDA_ARCHS): the list,
// comma-separated ("sm_90a", "sm_80,compute_90"), and whether it runs on a GPU of compute
// capability `cc` (major * 10 + minor).
const char* build_archs();
bool build_runs_on(int cc);

}  // namespace qwen3x

namespace qwen3x::check {

// "torch.bfloat16" rather than c10's "BFloat16": what a Python user types.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Float: return "torch.float32";
    case at::ScalarType::Half: return "torch.float16";
    case at::ScalarType::BFloat16: return "torch.bfloat16";
    case at::ScalarType::Double: return "torch.float64";
    case at::ScalarType::Int: return "torch.int32";
    case at::ScalarType::Long: return "torch.int64";
    case at::ScalarType::Short: return "torch.int16";
    case at::ScalarType::Char: return "torch.int8";
    case at::ScalarType::Byte: return "torch.uint8";
    case at::ScalarType::Bool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The build has machine code for `device` (else every launch fails with CUDA's "no kernel image
// is available for execution on the device", which names neither the op nor the fix). Asked once
// per device; a failed capability query lets the launch report instead.
inline void built_for(const char* op, const char* name, int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};  // 1: runs here, 2: does not
  const int verdict = cached_per_device(cache, device, [](int d) {
    const int cc = compute_capability(d);
    return cc == 0 ? 0 : (build_runs_on(cc) ? 1 : 2);
  });
  if (verdict != 2) return;
  const int cc = compute_capability(device);
  constexpr int kMinCapability = 80;  // mma.sync (bf16), ldmatrix, cp.async
  QWEN3X_CHECK(cc >= kMinCapability, "qwen3x.", op, ": the CUDA kernels need sm_80 or newer; the device of ",
               name, ", cuda:", device, ", is sm_", cc, " (use the PyTorch references, qwen3x.reference)");
  QWEN3X_CHECK(false, "qwen3x.", op, ": this build's CUDA kernels (", build_archs(),
               ") cannot run on the device of ", name, ", cuda:", device, " (sm_", cc,
               "); rebuild qwen3x for it (QWEN3X_CUDA_ARCHS=", cc / 10, ".", cc % 10,
               cc == 90 ? "a" : "", " pip install --no-build-isolation -e .) or use the PyTorch "
               "references (qwen3x.reference)");
}

// The kernels' device. Under QWEN3X_EMULATOR (tests/emulator: this glue and the kernels'
// source compiled for the CPU and run on a model of CUDA) the CPU plays it.
inline void cuda(const char* op, const char* name, const at::Tensor& t) {
#if defined(QWEN3X_EMULATOR)
  const bool on_device = t.is_cpu();
#else
  const bool on_device = t.is_cuda();
#endif
  QWEN3X_CHECK(on_device, "qwen3x.", op, ": expected ", name, " to be a CUDA tensor, got ",
               c10::DeviceTypeName(t.device().type(), /*lower_case=*/true));
#if !defined(QWEN3X_EMULATOR)
  built_for(op, name, t.get_device());
#endif
}

inline void same_device(const char* op, const char* name, const at::Tensor& t,
                        const char* ref_name, const at::Tensor& ref) {
  QWEN3X_CHECK(t.device() == ref.device(), "qwen3x.", op, ": expected ", name,
               " to be on the same device as ", ref_name, " (", ref.device(), "), got ",
               t.device());
}

// The float types every kernel is instantiated for.
inline void float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  QWEN3X_CHECK(d == at::ScalarType::BFloat16 || d == at::ScalarType::Half ||
                   d == at::ScalarType::Float,
               "qwen3x.", op, ": expected ", name,
               " to have dtype torch.bfloat16, torch.float16 or torch.float32, got ",
               dtype_name(d));
}

inline void same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  QWEN3X_CHECK(t.scalar_type() == ref.scalar_type(), "qwen3x.", op, ": expected ", name,
               " to have the same dtype as ", ref_name, " (", dtype_name(ref.scalar_type()),
               "), got ", dtype_name(t.scalar_type()));
}

inline void dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  QWEN3X_CHECK(t.scalar_type() == want, "qwen3x.", op, ": expected ", name, " to have dtype ",
               dtype_name(want), ", got ", dtype_name(t.scalar_type()));
}

// Index tensors (positions, slots, expert ids, lengths): the kernels read int32 or int64.
inline void index_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  QWEN3X_CHECK(d == at::ScalarType::Int || d == at::ScalarType::Long, "qwen3x.", op, ": expected ",
               name, " to have dtype torch.int32 or torch.int64, got ", dtype_name(d));
}

inline void min_dim(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  QWEN3X_CHECK(t.dim() >= dims, "qwen3x.", op, ": expected ", name, " to have at least ", dims,
               " dimension(s), got shape ", t.sizes());
}

// t.shape == [n] (a 1-D vector of n elements), contiguous.
inline void vector_of(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  QWEN3X_CHECK(t.dim() == 1 && t.size(0) == n, "qwen3x.", op, ": expected ", name,
               " to have shape [", n, "], got ", t.sizes());
  QWEN3X_CHECK(t.stride(0) == 1 || n <= 1, "qwen3x.", op, ": expected ", name,
               " to be contiguous, got stride ", t.strides());
}

inline void last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  QWEN3X_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, "qwen3x.", op, ": expected ", name,
               " to have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// The stride between consecutive "rows" when every dimension before `end_dim`
// of `t` is flattened into one, or nullopt when those dimensions cannot be
// addressed with a single stride (then the caller makes a contiguous copy).
// Size-1 dimensions never break collapsibility. With no leading dimension of
// size > 1, any stride works and `fallback` is returned.
inline std::optional<int64_t> collapsed_stride(const at::Tensor& t, int64_t end_dim,
                                               int64_t fallback) {
  std::optional<int64_t> inner_stride;
  int64_t inner_extent = 0;  // inner_stride * size of the dims collapsed so far
  for (int64_t d = end_dim - 1; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (!inner_stride) {
      inner_stride = t.stride(d);
      inner_extent = t.stride(d) * t.size(d);
    } else {
      if (t.stride(d) != inner_extent) return std::nullopt;
      inner_extent *= t.size(d);
    }
  }
  return inner_stride ? *inner_stride : fallback;
}

// Number of elements in the dimensions before `end_dim` (1 when there are none).
inline int64_t leading_numel(const at::Tensor& t, int64_t end_dim) {
  int64_t n = 1;
  for (int64_t d = 0; d < end_dim; ++d) n *= t.size(d);
  return n;
}

namespace detail {

// A view as rows (in elements): the trailing dimensions that form one dense block per row
// (block elements, row-major, no gaps; size-1 dimensions skipped), and the leading ones
// collapsed into a single stride between rows. nullopt when the leading ones do not collapse.
// The q / k / v views qwen3x's ops take (slices of a fused projection, [..., heads, 128]) are
// rows of one block each.
struct Rows {
  int64_t stride;
  int64_t block;
};
inline std::optional<Rows> as_rows(const at::Tensor& t) {
  int64_t block = 1;
  int64_t d = t.dim();
  for (; d > 0; --d) {
    if (t.size(d - 1) == 1) continue;
    if (t.stride(d - 1) != block) break;
    block *= t.size(d - 1);
  }
  const std::optional<int64_t> stride = collapsed_stride(t, d, block);
  if (!stride) return std::nullopt;
  return Rows{*stride, block};
}

// Whether views a and b that ATen's get_overlap_status calls too hard (it says so of any
// non-dense view, before looking at storages) may share an element's memory, by the addresses
// they cover. Two row views with one row stride R occupy the same byte span in every row, so
// they can meet only if their spans meet modulo R: views that interleave without meeting (q, k
// and v of a fused projection) pass. Any other pair whose byte ranges meet is taken to overlap
// (at worst a clear error for views that do not, never a silent race).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto address = [](const at::Tensor& t) {
    return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.const_data_ptr()));
  };
  auto bytes = [&](const at::Tensor& t) {  // [lo, hi) of the addresses the view covers
    int64_t lo = 0, hi = 0;                // elements from data_ptr
    for (int64_t d = 0; d < t.dim(); ++d) {
      (t.stride(d) >= 0 ? hi : lo) += (t.size(d) - 1) * t.stride(d);
    }
    return std::pair<int64_t, int64_t>{address(t) + lo * t.element_size(),
                                       address(t) + (hi + 1) * t.element_size()};
  };
  const auto [a_lo, a_hi] = bytes(a);
  const auto [b_lo, b_hi] = bytes(b);
  if (a_hi <= b_lo || b_hi <= a_lo) return false;
  const std::optional<Rows> ra = as_rows(a);
  const std::optional<Rows> rb = as_rows(b);
  if (ra && rb && ra->stride * a.element_size() == rb->stride * b.element_size()) {
    const int64_t row = ra->stride * a.element_size();
    const int64_t a_span = ra->block * a.element_size();
    const int64_t b_span = rb->block * b.element_size();
    if (row > 0 && a_span <= row && b_span <= row) {
      const int64_t delta = ((address(b) - address(a)) % row + row) % row;
      return delta < a_span || delta + b_span > row;
    }
  }
  return true;
}

}  // namespace detail

// A tensor written in place: no two elements at one address (an expanded / broadcast view, or
// rows closer together than a row is long).
inline void writable(const char* op, const char* name, const at::Tensor& t) {
  const at::MemOverlap overlap = at::has_internal_overlap(t);
  bool shared = overlap == at::MemOverlap::Yes;
  if (overlap == at::MemOverlap::TooHard && t.numel() > 1) {
    const std::optional<detail::Rows> rows = detail::as_rows(t);
    shared = rows && t.numel() > rows->block && rows->stride < rows->block;
  }
  QWEN3X_CHECK(!shared, "qwen3x.", op, ": expected ", name,
               " to give every element its own memory (it is written in place; an expanded view is "
               "not), got strides ", t.strides());
}

// Two tensors of which at least one is written: no shared memory.
inline void disjoint(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                     const at::Tensor& b) {
  const at::MemOverlapStatus s = at::get_overlap_status(a, b);
  const bool shared = s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial ||
                      (s == at::MemOverlapStatus::TooHard && detail::may_overlap(a, b));
  QWEN3X_CHECK(!shared, "qwen3x.", op, ": expected ", a_name, " and ", b_name,
               " not to overlap in memory (the op writes one of them)");
}

}  // namespace qwen3x::check
