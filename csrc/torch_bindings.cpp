// The single registration point of qwen3x's native code.
//
// 1. TORCH_LIBRARY(qwen3x): the schema of every torch.ops.qwen3x.* op. The
//    Python package mirrors these strings character for character (a test
//    compares them), and registers CPU reference kernels, fake (meta) kernels,
//    autograd and the CUDA fallback of the ops that have no kernel here.
// 2. TORCH_LIBRARY_IMPL(qwen3x, CUDA): the ops with hand-written CUDA kernels.
// 3. PyInit__C: the `qwen3x._C` Python module (plain C API, no pybind11), whose
//    only function build_info() describes what was compiled.
#define PY_SSIZE_T_CLEAN
#include <Python.h>  // first, as the Python C API requires

#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>

#include <string>
#include <string_view>

#include "core/arch.h"
#include "ops.h"

#ifndef QWEN3X_VERSION
#error "QWEN3X_VERSION must be defined by the build (CMakeLists.txt)"
#endif
#ifndef QWEN3X_CUDA_ARCHS
#error "QWEN3X_CUDA_ARCHS must be defined by the build (comma-separated, e.g. \"sm_90a\")"
#endif
#ifndef QWEN3X_TORCH_VERSION
#error "QWEN3X_TORCH_VERSION must be defined by the build (CMakeLists.txt)"
#endif

namespace qwen3x {

const char* build_archs() { return QWEN3X_CUDA_ARCHS; }

bool build_runs_on(int cc) { return arch_list_runs_on(QWEN3X_CUDA_ARCHS, cc); }

}  // namespace qwen3x

TORCH_LIBRARY(qwen3x, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor positions, "
      "Tensor inv_freq, float attention_scaling, float eps) -> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, "
      "Tensor positions, Tensor inv_freq, float attention_scaling, float eps) -> ()");
  m.def(
      "qk_norm_rope_cache_(Tensor(a!) q, Tensor k, Tensor v, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor cache_position, Tensor q_weight, Tensor k_weight, Tensor positions, Tensor inv_freq, "
      "float attention_scaling, float eps) -> ()");
  m.def("silu_and_mul(Tensor input) -> Tensor");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, "
      "Tensor? key_lengths=None) -> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope_attention(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, "
      "Tensor positions, Tensor inv_freq, float attention_scaling, float eps, Tensor? mask, float scale, "
      "bool causal) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal) -> (Tensor, Tensor)");
  m.def("moe_gate(Tensor hidden_states, Tensor weight) -> Tensor");
  m.def("moe_router(Tensor router_logits, int top_k, bool norm_topk_prob) -> (Tensor, Tensor, Tensor)");
  m.def("moe_permute(Tensor expert_ids, int num_experts, int row_align) -> (Tensor, Tensor, Tensor)");
  m.def(
      "moe_route(Tensor router_logits, int top_k, bool norm_topk_prob, int row_align) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "moe_experts(Tensor hidden_states, Tensor expert_ids, Tensor expert_weights, "
      "Tensor gate_up_proj, Tensor down_proj) -> Tensor");
  m.def(
      "moe(Tensor hidden_states, Tensor router_logits, Tensor gate_up_proj, Tensor down_proj, "
      "int top_k, bool norm_topk_prob) -> Tensor");
}

// The ops with a CUDA kernel in this library; build_info() lists the same.
#define QWEN3X_CUDA_KERNELS(X) \
  X(rms_norm)                  \
  X(add_rms_norm)              \
  X(qk_norm_rope)              \
  X(qk_norm_rope_)             \
  X(qk_norm_rope_cache_)       \
  X(silu_and_mul)              \
  X(attention)                 \
  X(attention_varlen)          \
  X(qk_norm_rope_attention)    \
  X(moe_gate)                  \
  X(moe_router)                \
  X(moe_permute)               \
  X(moe_route)                 \
  X(moe_experts)

// Ops whose entry point is not qwen3x::<op> because that name is taken
// (qwen3x::moe is the MoE kernels' namespace): X(op, function).
#define QWEN3X_CUDA_KERNELS_RENAMED(X) \
  X(moe, moe_block)

TORCH_LIBRARY_IMPL(qwen3x, CUDA, m) {
#define QWEN3X_IMPL_(name) m.impl(#name, &qwen3x::name);
  QWEN3X_CUDA_KERNELS(QWEN3X_IMPL_)
#undef QWEN3X_IMPL_
#define QWEN3X_IMPL_RENAMED_(name, function) m.impl(#name, &qwen3x::function);
  QWEN3X_CUDA_KERNELS_RENAMED(QWEN3X_IMPL_RENAMED_)
#undef QWEN3X_IMPL_RENAMED_
}

namespace {

// CUDART_VERSION is major * 1000 + minor * 10, e.g. 13000 -> "13.0".
constexpr int kCudartMajorScale = 1000;
constexpr int kCudartMinorScale = 10;

// Steals `value`; returns false (with a Python error set) on failure.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

// New reference to a list of str, or nullptr with a Python error set.
PyObject* str_list(std::string_view comma_separated) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  while (!comma_separated.empty()) {
    const size_t cut = comma_separated.find(',');
    const std::string_view item = comma_separated.substr(0, cut);
    if (!item.empty()) {
      PyObject* s = PyUnicode_FromStringAndSize(item.data(), static_cast<Py_ssize_t>(item.size()));
      if (s == nullptr || PyList_Append(list, s) != 0) {
        Py_XDECREF(s);
        Py_DECREF(list);
        return nullptr;
      }
      Py_DECREF(s);
    }
    if (cut == std::string_view::npos) break;
    comma_separated.remove_prefix(cut + 1);
  }
  return list;
}

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  const std::string cuda_version = std::to_string(CUDART_VERSION / kCudartMajorScale) + "." +
                                   std::to_string(CUDART_VERSION % kCudartMajorScale /
                                                  kCudartMinorScale);
#define QWEN3X_NAME_(name) #name ","
#define QWEN3X_NAME_RENAMED_(name, function) #name ","
  constexpr std::string_view kKernels =
      QWEN3X_CUDA_KERNELS(QWEN3X_NAME_) QWEN3X_CUDA_KERNELS_RENAMED(QWEN3X_NAME_RENAMED_);
#undef QWEN3X_NAME_RENAMED_
#undef QWEN3X_NAME_
  const bool ok = set_item(info, "version", PyUnicode_FromString(QWEN3X_VERSION)) &&
                  set_item(info, "cuda_version", PyUnicode_FromString(cuda_version.c_str())) &&
                  set_item(info, "archs", str_list(QWEN3X_CUDA_ARCHS)) &&
                  set_item(info, "torch_version", PyUnicode_FromString(QWEN3X_TORCH_VERSION)) &&
                  set_item(info, "kernels", str_list(kKernels));
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyObject* runs_on(PyObject* /*self*/, PyObject* cc) {
  const long value = PyLong_AsLong(cc);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(qwen3x::build_runs_on(static_cast<int>(value)));
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: version, cuda_version, archs, torch_version and the ops with CUDA "
     "kernels in this build of qwen3x._C."},
    {"runs_on", runs_on, METH_O,
     "runs_on(cc: int) -> bool: whether this build's machine code runs on a GPU of compute "
     "capability cc (major * 10 + minor), as every op checks before it launches."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "qwen3x._C",
    "Native CUDA kernels of qwen3x. Importing it registers torch.ops.qwen3x.* schemas and CUDA "
    "kernels.",
    -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
