"""The one op registry: ``torch.ops.qwen3x.<op>``.

The schemas are declared in csrc/torch_bindings.cpp, which also registers the CUDA kernels. This
module completes the registration from Python, once, at import:

- when ``qwen3x._C`` is not built (or fails to load), it defines the same schemas (SCHEMAS below
  mirrors the C++ file; tests/test_registry.py checks they are identical when _C is built);
- CPU implementation = the pure-PyTorch reference (qwen3x.reference), after input validation;
- CUDA implementation for ops without a kernel = the same reference, with a one-time warning
  naming the op;
- a fake (meta) implementation for torch.compile, and an autograd formula for every functional
  op (the backward is reference math, recomputed under autograd, until CUDA backward kernels exist; the
  gradient of an attention op's ``out`` alone goes through SDPA instead, and the experts' through
  grouped GEMMs: _backward.py).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch

from . import _backward, _checks, reference

NAMESPACE = "qwen3x"

# Mirror of TORCH_LIBRARY(qwen3x, m) in csrc/torch_bindings.cpp. Mutated tensors come first.
SCHEMAS: dict[str, str] = {
    "rms_norm": "rms_norm(Tensor input, Tensor weight, float eps) -> Tensor",
    "add_rms_norm": "add_rms_norm(Tensor input, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    "qk_norm_rope": (
        "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor positions, "
        "Tensor inv_freq, float attention_scaling, float eps) -> (Tensor, Tensor)"
    ),
    "qk_norm_rope_": (
        "qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, Tensor positions, "
        "Tensor inv_freq, float attention_scaling, float eps) -> ()"
    ),
    "qk_norm_rope_cache_": (
        "qk_norm_rope_cache_(Tensor(a!) q, Tensor k, Tensor v, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor cache_position, Tensor q_weight, Tensor k_weight, Tensor positions, Tensor inv_freq, "
        "float attention_scaling, float eps) -> ()"
    ),
    "silu_and_mul": "silu_and_mul(Tensor input) -> Tensor",
    "attention": (
        "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, "
        "Tensor? key_lengths=None) -> (Tensor, Tensor)"
    ),
    "qk_norm_rope_attention": (
        "qk_norm_rope_attention(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, Tensor positions, "
        "Tensor inv_freq, float attention_scaling, float eps, Tensor? mask, float scale, bool causal) -> (Tensor, Tensor)"
    ),
    "attention_varlen": (
        "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float scale, bool causal) -> (Tensor, Tensor)"
    ),
    "moe_gate": "moe_gate(Tensor hidden_states, Tensor weight) -> Tensor",
    "moe_router": "moe_router(Tensor router_logits, int top_k, bool norm_topk_prob) -> (Tensor, Tensor, Tensor)",
    "moe_permute": "moe_permute(Tensor expert_ids, int num_experts, int row_align) -> (Tensor, Tensor, Tensor)",
    "moe_route": (
        "moe_route(Tensor router_logits, int top_k, bool norm_topk_prob, int row_align) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "moe_experts": (
        "moe_experts(Tensor hidden_states, Tensor expert_ids, Tensor expert_weights, Tensor gate_up_proj, "
        "Tensor down_proj) -> Tensor"
    ),
    "moe": (
        "moe(Tensor hidden_states, Tensor router_logits, Tensor gate_up_proj, Tensor down_proj, int top_k, "
        "bool norm_topk_prob) -> Tensor"
    ),
}


# --------------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------------
# Written by setup.py beside the built module: the torch it was compiled against. PyTorch's C++ ABI
# is not stable from one release to the next, and an extension built for another torch may still
# load (its symbols resolve) and then misread a tensor; so a build for another torch release is
# not loaded at all.
TORCH_VERSION_FILE = "_C_torch_version.txt"


def torch_release_mismatch(built: str, running: str) -> str | None:
    """Why an extension built against torch ``built`` must not be loaded into torch ``running``
    (their major.minor releases differ), or None."""

    def release(version: str) -> tuple[str, ...]:
        return tuple(version.split("+")[0].split(".")[:2])

    if release(built) == release(running):
        return None
    return (f"built against torch {built}, this is torch {running}; PyTorch's C++ ABI changes between "
            "releases, so rebuild it for this torch (pip install --no-build-isolation -e .)")


def _load_extension():
    # Not built (a pure-Python install) is normal; a built module that fails to load is not.
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None:
        return None, "not built"
    stamp = os.path.join(os.path.dirname(spec.origin), TORCH_VERSION_FILE)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            mismatch = torch_release_mismatch(f.read().strip(), torch.__version__)
        if mismatch:
            warnings.warn(f"qwen3x: the CUDA extension is not loaded: {mismatch}; using the PyTorch references")
            return None, mismatch
    try:
        from . import _C  # registers the schemas and the CUDA kernels
    except (ImportError, OSError) as exc:
        warnings.warn(f"qwen3x: the CUDA extension failed to load ({exc}); using the PyTorch references")
        return None, str(exc)
    return _C, None


_C, C_LOAD_ERROR = _load_extension()

# Kept alive for the life of the process: dropping a Library object deregisters what it holds.
_DEF_LIB = None
if _C is None:
    _DEF_LIB = torch.library.Library(NAMESPACE, "DEF")
    for _schema in SCHEMAS.values():
        _DEF_LIB.define(_schema)
_IMPL_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

# A _C built from older sources (an in-place build not redone after a pull) may lack new ops:
# those run on their references, and the user is told to rebuild.
def _has_schema(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{op}", "")
    except RuntimeError:
        return False
    return True


def _schema_differs(op: str) -> bool:
    return str(getattr(torch.ops.qwen3x, op).default._schema) != f"{NAMESPACE}::{SCHEMAS[op]}"


_STALE_OPS = [op for op in SCHEMAS if _C is not None and not _has_schema(op)]
_CHANGED_OPS = [op for op in SCHEMAS if _C is not None and op not in _STALE_OPS and _schema_differs(op)]
if _CHANGED_OPS:
    warnings.warn(
        f"qwen3x: the built extension predates the current schemas of {', '.join(_CHANGED_OPS)}; calls that use "
        "their new arguments fail until you rebuild it (pip install --no-build-isolation -e .)"
    )
if _STALE_OPS:
    warnings.warn(
        f"qwen3x: the built extension predates these ops: {', '.join(_STALE_OPS)} (they run on the references); "
        "rebuild it (pip install --no-build-isolation -e .)"
    )
    for _op in _STALE_OPS:
        _IMPL_LIB.define(SCHEMAS[_op])


def qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def has_cuda_kernel(op: str) -> bool:
    """True when the C++ extension registered a CUDA kernel for ``op`` (not the reference)."""
    return op in _CUDA_KERNELS


def runs_on(built: list[str], gpu_arch: str) -> bool:
    """Whether code built for ``built`` (e.g. ['sm_90a'], ['sm_80', 'compute_90']) runs on
    ``gpu_arch`` ('sm_86'), by CUDA's compatibility rules: an sm_XY image on X.Y and later minor
    versions of X (sm_80 on sm_86, sm_89; not on sm_90); an arch-specific XYa target (sm_90a)
    only on X.Y; a family-specific XYf target on X.Y and later minor versions of X; PTX
    (compute_XY) on X.Y and everything newer (compiled by the driver). As csrc/core/arch.h,
    which every op asks (qwen3x._C.runs_on)."""
    cap = int(gpu_arch[3:])
    for arch in built:
        kind, _, code = arch.partition("_")
        number = int("".join(ch for ch in code if ch.isdigit()))
        suffix = code[-1] if not code[-1].isdigit() else ""
        same_major_newer = number // 10 == cap // 10 and number <= cap
        if suffix == "a":
            ok = number == cap
        elif suffix == "f" or kind == "sm":
            ok = same_major_newer
        else:  # PTX
            ok = number <= cap
        if ok:
            return True
    return False


_RUNS_ON_DEVICE: dict[int, bool] = {}


def kernels_run_on(device: torch.device) -> bool:
    """Whether this build's CUDA kernels have machine code for ``device`` (a CUDA device); a GPU
    the build does not cover gets an error from every op, and the patched layers use the
    references there (qwen3x.layers.dispatch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _RUNS_ON_DEVICE:
        major, minor = torch.cuda.get_device_capability(index)
        if hasattr(_C, "runs_on"):  # the rule every op asks
            _RUNS_ON_DEVICE[index] = bool(_C.runs_on(major * 10 + minor))
        else:
            archs = _C.build_info()["archs"] if _C is not None else []
            _RUNS_ON_DEVICE[index] = runs_on(archs, f"sm_{major}{minor}")
    return _RUNS_ON_DEVICE[index]


MIN_CAPABILITY = (8, 0)  # the kernels' mma.sync (bf16), ldmatrix and cp.async; as setup.py


def rebuild_hint(major: int, minor: int) -> str:
    """What to do about a GPU the build has no machine code for."""
    if (major, minor) < MIN_CAPABILITY:
        return (f"the kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer (mma.sync bf16, cp.async), "
                "so this GPU runs the PyTorch references (qwen3x.reference)")
    arch = f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")  # 9.0a: the Hopper mainloops
    return f"rebuild qwen3x for it (QWEN3X_CUDA_ARCHS={arch} pip install --no-build-isolation -e .)"


_CUDA_KERNELS = frozenset(
    op for op in SCHEMAS if _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), "CUDA")
)


def wgmma_available() -> bool:
    """Whether this machine runs the Hopper (wgmma) mainloops of the tensor-core ops: an sm_90 GPU
    and a build that includes sm_90a (csrc/core/mainloop_choice.h); they are then the default."""
    info = _C.build_info() if _C is not None else {}
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and "sm_90a" in info.get("archs", []))


def pdl_available() -> bool:
    """Whether the kernels of decode's launch chains (router, expert GEMMs, qk_norm_rope,
    attention) are launched with programmatic dependent launch here: where the
    wgmma mainloops run (csrc/core/pdl.cuh), unless QWEN3X_PDL=0."""
    return wgmma_available() and os.environ.get("QWEN3X_PDL") != "0"


# --------------------------------------------------------------------------------------------
# Reference implementations with validation, one per op, matching the schemas
# --------------------------------------------------------------------------------------------
def _rms_norm(input, weight, eps):
    _checks.rms_norm("rms_norm", input, weight)
    return reference.rms_norm(input, weight, eps)


def _add_rms_norm(input, residual, weight, eps):
    _checks.add_rms_norm("add_rms_norm", input, residual, weight)
    return reference.add_rms_norm(input, residual, weight, eps)


def _qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    _checks.qk_norm_rope("qk_norm_rope", q, k, q_weight, k_weight, positions, inv_freq)
    return reference.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)


def _qk_norm_rope_(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    _checks.qk_norm_rope("qk_norm_rope_", q, k, q_weight, k_weight, positions, inv_freq)
    _checks.written_in_place("qk_norm_rope_", {"q": q, "k": k})
    q_out, k_out = reference.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)
    q.copy_(q_out)
    k.copy_(k_out)


def _qk_norm_rope_cache_(q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq,
                         attention_scaling, eps):
    op = "qk_norm_rope_cache_"
    _checks.qk_norm_rope_cache(op, q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq)
    _checks.cache_position_values(op, cache_position, k_cache.shape[2])
    _checks.written_in_place(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, {"k": k, "v": v})
    q_out, k_out = reference.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)
    q.copy_(q_out)
    k_cache.index_copy_(2, cache_position.long(), k_out.transpose(1, 2))
    v_cache.index_copy_(2, cache_position.long(), v.transpose(1, 2))


def _silu_and_mul(input):
    _checks.silu_and_mul("silu_and_mul", input)
    return reference.silu_and_mul(input)


def _attention(q, k, v, mask, scale, causal, key_lengths=None):
    _checks.attention("attention", q, k, v, mask, key_lengths)
    _checks.softmax_scale("attention", scale)
    return reference.attention(q, k, v, mask, scale, causal, key_lengths)


def _qk_norm_rope_attention(q, k, v, q_weight, k_weight, positions, inv_freq, attention_scaling, eps, mask, scale,
                            causal):
    _checks.qk_norm_rope_attention("qk_norm_rope_attention", q, k, v, q_weight, k_weight, positions, inv_freq, mask)
    _checks.softmax_scale("qk_norm_rope_attention", scale)
    return reference.qk_norm_rope_attention(
        q, k, v, q_weight, k_weight, positions, inv_freq, attention_scaling, eps, mask, scale, causal
    )


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    op = "attention_varlen"
    _checks.attention_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k)
    _checks.softmax_scale(op, scale)
    _checks.cu_seqlens_values(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _checks.cu_seqlens_values(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0])
    _checks.max_seqlen(op, cu_seqlens_q, max_seqlen_q)
    return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)


def _moe_gate(hidden_states, weight):
    _checks.moe_gate("moe_gate", hidden_states, weight)
    return reference.moe_gate(hidden_states, weight)


def _moe_router(router_logits, top_k, norm_topk_prob):
    _checks.moe_router("moe_router", router_logits, top_k)
    return reference.moe_router(router_logits, top_k, norm_topk_prob)


def _moe_permute(expert_ids, num_experts, row_align):
    _checks.moe_permute("moe_permute", expert_ids, num_experts, row_align)
    return reference.moe_permute(expert_ids, num_experts, row_align)


def _moe_route(router_logits, top_k, norm_topk_prob, row_align):
    _checks.moe_route("moe_route", router_logits, top_k, row_align)
    return reference.moe_route(router_logits, top_k, norm_topk_prob, row_align)


def _moe_experts(hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj):
    _checks.moe_experts("moe_experts", hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj)
    return reference.moe_experts(hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj)


def _moe(hidden_states, router_logits, gate_up_proj, down_proj, top_k, norm_topk_prob):
    _checks.moe("moe", hidden_states, router_logits, gate_up_proj, down_proj, top_k)
    return reference.moe(hidden_states, router_logits, gate_up_proj, down_proj, top_k, norm_topk_prob)


REFERENCE_IMPLS: dict[str, Callable] = {
    "rms_norm": _rms_norm,
    "add_rms_norm": _add_rms_norm,
    "qk_norm_rope": _qk_norm_rope,
    "qk_norm_rope_": _qk_norm_rope_,
    "qk_norm_rope_cache_": _qk_norm_rope_cache_,
    "silu_and_mul": _silu_and_mul,
    "attention": _attention,
    "attention_varlen": _attention_varlen,
    "qk_norm_rope_attention": _qk_norm_rope_attention,
    "moe_gate": _moe_gate,
    "moe_router": _moe_router,
    "moe_permute": _moe_permute,
    "moe_route": _moe_route,
    "moe_experts": _moe_experts,
    "moe": _moe,
}


# --------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile
# --------------------------------------------------------------------------------------------
def _promote(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def _fake_rms_norm(input, weight, eps):
    _checks.rms_norm("rms_norm", input, weight)
    return input.new_empty(input.shape, dtype=_promote(input, weight))


def _fake_add_rms_norm(input, residual, weight, eps):
    _checks.add_rms_norm("add_rms_norm", input, residual, weight)
    return input.new_empty(input.shape, dtype=_promote(input, weight)), input.new_empty(input.shape)


def _fake_qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    _checks.qk_norm_rope("qk_norm_rope", q, k, q_weight, k_weight, positions, inv_freq)
    return q.new_empty(q.shape, dtype=_promote(q, q_weight)), k.new_empty(k.shape, dtype=_promote(k, k_weight))


def _fake_qk_norm_rope_(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    _checks.qk_norm_rope("qk_norm_rope_", q, k, q_weight, k_weight, positions, inv_freq)


def _fake_qk_norm_rope_cache_(q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq,
                              attention_scaling, eps):
    _checks.qk_norm_rope_cache("qk_norm_rope_cache_", q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight,
                               positions, inv_freq)


def _fake_silu_and_mul(input):
    _checks.silu_and_mul("silu_and_mul", input)
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))


def _fake_attention(q, k, v, mask, scale, causal, key_lengths=None):
    _checks.attention("attention", q, k, v, mask, key_lengths)
    _checks.softmax_scale("attention", scale)
    B, Hq, Sq, D = q.shape
    return q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


def _fake_qk_norm_rope_attention(q, k, v, q_weight, k_weight, positions, inv_freq, attention_scaling, eps, mask,
                                 scale, causal):
    _checks.qk_norm_rope_attention("qk_norm_rope_attention", q, k, v, q_weight, k_weight, positions, inv_freq, mask)
    _checks.softmax_scale("qk_norm_rope_attention", scale)
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((B, Hq, S), dtype=torch.float32)


def _fake_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    _checks.attention_varlen("attention_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k)
    _checks.softmax_scale("attention_varlen", scale)
    Tq, Hq, D = q.shape
    return q.new_empty((Tq, Hq, D)), q.new_empty((Hq, Tq), dtype=torch.float32)


def _fake_moe_gate(hidden_states, weight):
    _checks.moe_gate("moe_gate", hidden_states, weight)
    return hidden_states.new_empty((hidden_states.shape[0], weight.shape[0]))


def _fake_moe_router(router_logits, top_k, norm_topk_prob):
    _checks.moe_router("moe_router", router_logits, top_k)
    T, E = router_logits.shape
    return (
        router_logits.new_empty((T, top_k)),
        router_logits.new_empty((T, top_k), dtype=torch.int32),
        router_logits.new_empty((E,), dtype=torch.int32),
    )


def _fake_moe_permute(expert_ids, num_experts, row_align):
    n = expert_ids.numel()
    return (
        expert_ids.new_empty((n + num_experts * (row_align - 1),), dtype=torch.int32),
        expert_ids.new_empty((num_experts + 1,), dtype=torch.int32),
        expert_ids.new_empty((n,), dtype=torch.int32),
    )


def _fake_moe_route(router_logits, top_k, norm_topk_prob, row_align):
    _checks.moe_route("moe_route", router_logits, top_k, row_align)
    ids = router_logits.new_empty((router_logits.shape[0], top_k), dtype=torch.int32)
    return _fake_moe_router(router_logits, top_k, norm_topk_prob) + _fake_moe_permute(
        ids, router_logits.shape[1], row_align)


def _fake_moe_experts(hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj):
    return hidden_states.new_empty(hidden_states.shape)


def _fake_moe(hidden_states, router_logits, gate_up_proj, down_proj, top_k, norm_topk_prob):
    return hidden_states.new_empty(hidden_states.shape)


FAKE_IMPLS: dict[str, Callable] = {
    "rms_norm": _fake_rms_norm,
    "add_rms_norm": _fake_add_rms_norm,
    "qk_norm_rope": _fake_qk_norm_rope,
    "qk_norm_rope_": _fake_qk_norm_rope_,
    "qk_norm_rope_cache_": _fake_qk_norm_rope_cache_,
    "silu_and_mul": _fake_silu_and_mul,
    "attention": _fake_attention,
    "attention_varlen": _fake_attention_varlen,
    "qk_norm_rope_attention": _fake_qk_norm_rope_attention,
    "moe_gate": _fake_moe_gate,
    "moe_router": _fake_moe_router,
    "moe_permute": _fake_moe_permute,
    "moe_route": _fake_moe_route,
    "moe_experts": _fake_moe_experts,
    "moe": _fake_moe,
}


# --------------------------------------------------------------------------------------------
# Autograd: the backward of every functional op is the vjp of its reference (for the attention
# ops, when only ``out`` needs a gradient, of a restatement through SDPA; for the experts, of one
# through grouped GEMMs: _backward.py)
# --------------------------------------------------------------------------------------------
# Ops without gradients: integer outputs only, or mutating (autograd cannot be registered for them).
NO_AUTOGRAD = frozenset({"moe_permute", "qk_norm_rope_", "qk_norm_rope_cache_"})


def _vjp(fn: Callable, args: list, wanted: list[int], grads: tuple) -> tuple:
    """Gradients of fn's floating outputs, weighted by ``grads`` (None = zero), w.r.t. args[i] for
    i in ``wanted`` (None for every other argument): fn run again under autograd, then
    torch.autograd.grad. (Not torch.func.vjp: it refuses to run while saved-tensor hooks are
    active, and a backward runs inside them under activation offloading such as
    torch.autograd.graph.save_on_cpu or TRL's activation_offloading, which wrap the whole training
    step.) In a backward that autograd records (a double backward), through fresh views of the
    saved inputs, so the gradients are differentiable in turn; a view for each argument, so that an
    input given twice, or computed from another input (add_rms_norm's input from its residual in a
    decoder layer), gets only the paths through its own slot."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        primals = [args[i].view_as(args[i]) if create_graph else args[i].detach().requires_grad_() for i in wanted]
        call = list(args)
        for i, p in zip(wanted, primals):
            call[i] = p
        out = fn(*call)
        out = out if isinstance(out, tuple) else (out,)
        floats = [o for o in out if o.is_floating_point()]
        weighted = [(o, g) for o, g in zip(floats, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in weighted], primals, [g for _, g in weighted],
                                    allow_unused=True, create_graph=create_graph) if weighted else [None] * len(primals)
    result = [None] * len(args)
    for i, p, g in zip(wanted, primals, found):
        result[i] = torch.zeros_like(p) if g is None else g
    return tuple(result)


def _make_autograd(op: str):
    ref = getattr(reference, op)
    has_out_only = op in _backward.OUT_ONLY

    def setup_context(ctx, inputs, output):
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.arg_is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.scalars = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.float_outputs = [o.is_floating_point() for o in outputs]
        if has_out_only:
            ctx.set_materialize_grads(False)  # an unused lse then comes back as None, not zeros

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if is_t else s for is_t, s in zip(ctx.arg_is_tensor, ctx.scalars)]
        wanted = [
            i
            for i, a in enumerate(args)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and ctx.needs_input_grad[i]
        ]
        if not wanted:
            return tuple(None for _ in args)
        float_grads = tuple(g for g, is_float in zip(grads, ctx.float_outputs) if is_float)
        # (SDPA's backward has no derivative of its own: a backward that autograd records, for a
        # double backward, differentiates the reference's vjp)
        if has_out_only and not torch.is_grad_enabled() and all(g is None for g in float_grads[1:]):
            if float_grads[0] is None:
                return tuple(None for _ in args)
            return _vjp(_backward.OUT_ONLY[op], args, wanted, float_grads[:1])
        return _vjp(_backward.SAME_FUNCTION.get(op, ref), args, wanted, float_grads)

    return setup_context, backward


_REFERENCES_WITH_GRADIENT: dict[str, Callable] = {}


def reference_with_gradient(op: str) -> Callable:
    """``qwen3x.reference.<op>`` as an autograd function with the op's own gradient formula (above):
    what the patched layers run where no kernel serves a call on a GPU (fp32 attention, other
    head_dims). Autograd through the attention reference itself would keep the fp32 score matrix and
    its softmax for the backward, quadratic in the sequence length (fp32 fine-tuning of Qwen3-0.6B
    at 8 x 2048 tokens: 2 GB each, per layer); the formula keeps the inputs and differentiates
    through SDPA, as HF's default attention trains."""
    if op not in _REFERENCES_WITH_GRADIENT:
        setup_context, backward = _make_autograd(op)
        function = type(f"{op}_reference", (torch.autograd.Function,), {
            "forward": staticmethod(getattr(reference, op)),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })
        _REFERENCES_WITH_GRADIENT[op] = function.apply
    return _REFERENCES_WITH_GRADIENT[op]


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Warn the first time ``key`` comes up in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel)


def _cuda_fallback(op: str, impl: Callable) -> Callable:
    def fallback(*args):
        warn_once(op, f"qwen3x.{op}: no CUDA kernel in this build; running the PyTorch reference on the GPU")
        return impl(*args)

    return fallback


def _contiguous_outputs(impl: Callable) -> Callable:
    """Outputs come back contiguous, as the fake implementations and the CUDA kernels give them."""

    def run(*args):
        out = impl(*args)
        if isinstance(out, tuple):
            return tuple(o.contiguous() for o in out)
        return out.contiguous() if isinstance(out, torch.Tensor) else out

    return run


def _register() -> None:
    for op, reference_impl in REFERENCE_IMPLS.items():
        name = qualname(op)
        impl = _contiguous_outputs(reference_impl)
        _IMPL_LIB.impl(op, impl, "CPU")
        if op not in _CUDA_KERNELS:
            _IMPL_LIB.impl(op, _cuda_fallback(op, impl), "CUDA")
        torch.library.register_fake(name, FAKE_IMPLS[op], lib=_IMPL_LIB)
        if op not in NO_AUTOGRAD:
            setup_context, backward = _make_autograd(op)
            torch.library.register_autograd(name, backward, setup_context=setup_context, lib=_IMPL_LIB)


_register()
