// QWEN3X_CHECK(cond, parts...): TORCH_CHECK_VALUE (ValueError in Python, as the Python side's
// checks raise for the same inputs, python/qwen3x/_checks.py: one exception type for a bad input
// on every device) with the message built here, as one std::string, from text, integers, shapes
// ([2, 3]) and devices, without iostreams.
//
//   QWEN3X_CHECK(k <= kMaxTopK, "qwen3x.", op, ": expected top_k <= ", kMaxTopK, ", got ", k);
//
// Why not TORCH_CHECK's own formatting (c10::str, a std::ostringstream): on the first H100 run
// (2026-11-26, torch 2.11, the extension built on that machine) every check of ours whose message
// streamed a number into that ostringstream killed the process (SIGSEGV) instead of raising,
// while messages of text alone raised. Not reproduced anywhere else (tests/error_path_probe.py
// looks on the next GPU); building the message with std::to_string / snprintf keeps the failure
// path off the stream's locale facets, the one thing those two cases did differently. As with
// TORCH_CHECK, the message is built only when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <concepts>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace qwen3x::check::detail {

inline void append(std::string& s, std::string_view v) { s.append(v); }
inline void append(std::string& s, const char* v) { s.append(v ? v : "(null)"); }
inline void append(std::string& s, const std::string& v) { s.append(v); }
inline void append(std::string& s, char v) { s.push_back(v); }
inline void append(std::string& s, bool v) { s.append(v ? "true" : "false"); }

template <typename I>
  requires(std::integral<I> && !std::same_as<I, bool> && !std::same_as<I, char>)
inline void append(std::string& s, I v) {
  s.append(std::to_string(v));
}

// Floating-point values as printf's %g prints them (inf, nan, 0.0883883).
template <typename F>
  requires std::floating_point<F>
inline void append(std::string& s, F v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s.append(buf);
}

// Shapes and strides as torch prints them: [2, 3], [] for a 0-dim tensor.
inline void append(std::string& s, c10::IntArrayRef v) {
  s.push_back('[');
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s.append(", ");
    s.append(std::to_string(v[i]));
  }
  s.push_back(']');
}

inline void append(std::string& s, const c10::Device& v) { s.append(v.str()); }

}  // namespace qwen3x::check::detail

namespace qwen3x::check {

template <typename... Parts>
[[nodiscard]] inline std::string message(const Parts&... parts) {
  std::string s;
  (detail::append(s, parts), ...);
  return s;
}

}  // namespace qwen3x::check

// One std::string argument: TORCH_CHECK_VALUE passes it through untouched (no ostringstream).
#define QWEN3X_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::qwen3x::check::message(__VA_ARGS__))
