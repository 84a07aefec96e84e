"""The op registry: schemas, opcheck, fake shapes, autograd, and clear errors for bad inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import qwen3x
from qwen3x import _library, ops
from qwen3x import reference as R

D = 32


def _inputs(op: str):
    """Random, awkwardly sized arguments for each op (schema order)."""
    T = 7
    if op == "rms_norm":
        return (torch.randn(T, 48), torch.randn(48), 1e-6)
    if op == "add_rms_norm":
        return (torch.randn(T, 48), torch.randn(T, 48), torch.randn(48), 1e-6)
    if op in ("qk_norm_rope", "qk_norm_rope_"):
        return (torch.randn(T, 4, D), torch.randn(T, 2, D), torch.randn(D), torch.randn(D),
                torch.arange(T) * 5, torch.rand(D // 2), 1.1, 1e-6)
    if op == "qk_norm_rope_cache_":  # batch 2, 3 new tokens at slots 4, 5, 6 of a 9-slot cache
        B, S, S_max = 2, 3, 9
        return (torch.randn(B, S, 4, D), torch.randn(B, S, 2, D), torch.randn(B, S, 2, D), torch.randn(B, 2, S_max, D),
                torch.randn(B, 2, S_max, D), torch.arange(4, 4 + S), torch.randn(D), torch.randn(D),
                torch.arange(B * S).view(B, S) + 1, torch.rand(D // 2), 1.1, 1e-6)
    if op == "silu_and_mul":
        return (torch.randn(T, 2 * 24),)
    if op == "attention":
        mask = torch.rand(2, 1, 5, 9) > 0.3
        return (torch.randn(2, 4, 5, D), torch.randn(2, 2, 9, D), torch.randn(2, 2, 9, D), mask, D**-0.5, False)
    if op == "qk_norm_rope_attention":
        mask = torch.rand(2, 1, 5, 5) > 0.3
        return (torch.randn(2, 5, 4, D), torch.randn(2, 5, 2, D), torch.randn(2, 5, 2, D), torch.randn(D),
                torch.randn(D), torch.arange(10).view(2, 5) * 3, torch.rand(D // 2), 1.1, 1e-6, mask, D**-0.5, True)
    if op == "attention_varlen":  # sequences of 3, 0 and 5 queries against 4, 2 and 9 keys; token 8 is in none
        cu_q, cu_k = torch.tensor([0, 3, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 6, 15], dtype=torch.int32)
        return (torch.randn(9, 4, D), torch.randn(15, 2, D), torch.randn(15, 2, D), cu_q, cu_k, 5, 9, D**-0.5, True)
    if op == "moe_gate":
        return (torch.randn(T, 48), torch.randn(8, 48))
    if op == "moe_router":
        return (torch.randn(T, 8), 2, True)
    if op == "moe_permute":
        return (torch.stack([torch.randperm(8)[:2] for _ in range(T)]).int(), 8, 4)
    if op == "moe_route":
        return (torch.randn(T, 8), 2, True, 4)
    E, H, I = 4, 16, 8
    if op == "moe_experts":
        w, ids, _ = R.moe_router(torch.randn(T, E), 2, True)
        return (torch.randn(T, H), ids, w, torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    if op == "moe":
        return (torch.randn(T, H), torch.randn(T, E), torch.randn(E, 2 * I, H), torch.randn(E, H, I), 2, True)
    raise KeyError(op)


ALL_OPS = list(_library.SCHEMAS)


def test_every_schema_is_registered_as_declared():
    for op, schema in _library.SCHEMAS.items():
        registered = str(getattr(torch.ops.qwen3x, op).default._schema)
        assert registered == f"qwen3x::{schema}", f"{op}: {registered} != {schema}"


@pytest.mark.skipif(_library._C is None, reason="qwen3x._C not built")
def test_cpp_schemas_match_python_mirror():
    # with _C loaded the schemas above came from csrc/torch_bindings.cpp; the mirror must agree
    assert _library._DEF_LIB is None
    test_every_schema_is_registered_as_declared()
    info = _library._C.build_info()
    assert set(info["kernels"]) == set(_library._CUDA_KERNELS)


@pytest.mark.parametrize("op", ALL_OPS)
def test_opcheck(op):
    args = _inputs(op)
    if op in ("qk_norm_rope_", "qk_norm_rope_cache_"):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    tests = ["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"]
    if op in _library.NO_AUTOGRAD:
        tests = ["test_schema", "test_faketensor"]
    if op in ("moe_experts", "moe", "attention_varlen", "moe_route"):
        tests = ["test_schema", "test_faketensor"]  # data-dependent loops or sizes in the reference: no AOT trace
    torch.library.opcheck(getattr(torch.ops.qwen3x, op).default, args, test_utils=tests)


@pytest.mark.parametrize("op", ALL_OPS)
def test_op_equals_reference_and_fake_shapes_match(op):
    args = _inputs(op)
    fn = getattr(torch.ops.qwen3x, op)
    if op == "qk_norm_rope_":
        q, k = args[0].clone(), args[1].clone()
        fn(q, k, *args[2:])
        eq, ek = R.qk_norm_rope(*args)
        assert torch.equal(q, eq) and torch.equal(k, ek)
        return
    if op == "qk_norm_rope_cache_":
        q, k, v, kc, vc, slots = (a.clone() for a in args[:6])
        kc0, vc0 = kc.clone(), vc.clone()
        fn(q, k, v, kc, vc, slots, *args[6:])
        eq, ek = R.qk_norm_rope(args[0], args[1], *args[6:])
        assert torch.equal(q, eq) and torch.equal(k, args[1]) and torch.equal(v, args[2])  # k, v untouched
        assert torch.equal(kc[:, :, 4:7], ek.transpose(1, 2)) and torch.equal(vc[:, :, 4:7], v.transpose(1, 2))
        others = [i for i in range(kc.shape[2]) if i not in (4, 5, 6)]
        assert torch.equal(kc[:, :, others], kc0[:, :, others]) and torch.equal(vc[:, :, others], vc0[:, :, others])
        return
    out = fn(*args)
    expected = getattr(R, op)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fakes = fn(*fake_args)
    fakes = fakes if isinstance(fakes, tuple) else (fakes,)
    for o, e, f in zip(outs, exps, fakes):
        assert torch.equal(o, e)
        assert o.shape == f.shape and o.dtype == f.dtype


GRAD_OPS = ["rms_norm", "add_rms_norm", "qk_norm_rope", "silu_and_mul", "attention", "attention_varlen",
            "qk_norm_rope_attention", "moe_gate", "moe_router", "moe_route", "moe_experts", "moe"]


@pytest.mark.parametrize("op", GRAD_OPS)
def test_autograd_matches_reference_autograd(op):
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in _inputs(op)]

    def run(fn):
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        out = fn(*leaves)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]
        loss = sum((o.masked_fill(torch.isinf(o), 0) * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum()
                   for o in outs)
        loss.backward()
        return [leaf.grad for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]

    got, expected = run(getattr(torch.ops.qwen3x, op)), run(getattr(R, op))
    assert len(got) == len(expected) and len(got) > 0
    for g, e in zip(got, expected):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# The attention ops' backward when only ``out`` needs a gradient (as in a transformer): through
# SDPA (qwen3x._backward), which must give the reference's gradients. Cases: (B, Hq, Hkv, Sq, Skv,
# causal, mask, key_lengths); the masks leave some rows with no visible key.
def _mask(B, Sq, Skv, p=0.5, heads=1):
    mask = torch.rand(B, heads, Sq, Skv) > p
    mask[0, 0, 1] = False  # a row that sees nothing
    return mask


OUT_ONLY_ATTENTION_CASES = {
    "prefill-causal": (2, 4, 2, 37, 37, True, None, None),
    "cross-noncausal": (2, 4, 1, 5, 37, False, None, None),
    "decode-bottom-right": (2, 4, 2, 3, 37, True, None, None),
    "padding-mask-causal": (2, 4, 2, 11, 11, True, "mask", None),
    "mask-noncausal": (2, 6, 2, 5, 9, False, "mask", None),
    "key-lengths": (2, 4, 2, 2, 20, True, None, torch.tensor([7, 0])),
    "one-key-length": (2, 4, 2, 3, 20, False, None, torch.tensor(5)),
    "mask-broadcast-batch": (3, 4, 2, 5, 9, False, (1, 1), None),
    "mask-per-head": (2, 4, 2, 5, 9, True, (1, 4), None),
    "more-queries-than-keys": (2, 4, 2, 5, 3, True, None, None),
    "no-keys": (1, 4, 2, 3, 0, False, None, None),
}


def _attention_mask(spec, B, Sq, Skv):
    """None, "mask" ([B, 1, Sq, Skv]) or (batch, heads) of a broadcast mask."""
    if spec is None:
        return None
    batch, heads = (B, 1) if spec == "mask" else spec
    return _mask(batch, Sq, Skv, heads=heads)


def _grads(fn, args, weight_out=True, weight_lse=False):
    """Gradients of a fixed linear function of fn's out (and lse) w.r.t. its floating inputs."""
    leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    out, lse = fn(*leaves)
    loss = 0.0
    if weight_out:
        loss = loss + (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
    if weight_lse:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * torch.linspace(1, 2, lse.numel(), dtype=lse.dtype)
                       .view(lse.shape)).sum()
    floats = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    return torch.autograd.grad(loss, floats, allow_unused=True)


def _count_out_only_calls(monkeypatch, op):
    from qwen3x import _backward

    calls = []
    inner = _backward.OUT_ONLY[op]
    monkeypatch.setitem(_backward.OUT_ONLY, op, lambda *a: calls.append(1) or inner(*a))
    return calls


def _assert_same_grads(got, want):
    assert len(got) == len(want) and len(got) > 0
    for g, w in zip(got, want):
        w = torch.zeros_like(g) if w is None else w
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(OUT_ONLY_ATTENTION_CASES))
def test_attention_backward_of_out_goes_through_sdpa_with_the_reference_gradients(monkeypatch, case):
    B, Hq, Hkv, Sq, Skv, causal, mask, key_lengths = OUT_ONLY_ATTENTION_CASES[case]
    args = (torch.randn(B, Hq, Sq, D, dtype=torch.float64), torch.randn(B, Hkv, Skv, D, dtype=torch.float64),
            torch.randn(B, Hkv, Skv, D, dtype=torch.float64), _attention_mask(mask, B, Sq, Skv), 0.3, causal,
            key_lengths)
    calls = _count_out_only_calls(monkeypatch, "attention")
    got = _grads(torch.ops.qwen3x.attention, args)
    assert calls, "the backward of out alone should not hold the score matrix (qwen3x._backward)"
    _assert_same_grads(got, _grads(R.attention, args))


@pytest.mark.parametrize("op", ["qk_norm_rope_attention", "attention_varlen"])
def test_fused_and_varlen_attention_backward_of_out_goes_through_sdpa(monkeypatch, op):
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in _inputs(op)]
    if op == "qk_norm_rope_attention":
        args[9] = _mask(2, 5, 5)
    calls = _count_out_only_calls(monkeypatch, op)
    got = _grads(getattr(torch.ops.qwen3x, op), args)
    assert calls
    _assert_same_grads(got, _grads(getattr(R, op), args))


def test_fused_attention_backward_with_wider_norm_weights(monkeypatch):
    """fp32 q, k, v with fp64 norm weights: qk_norm_rope promotes q and k, not v (the reference
    computes in the promoted dtype; SDPA takes one dtype)."""
    args = list(_inputs("qk_norm_rope_attention"))
    args[3], args[4] = args[3].double(), args[4].double()
    calls = _count_out_only_calls(monkeypatch, "qk_norm_rope_attention")
    got = _grads(torch.ops.qwen3x.qk_norm_rope_attention, args)
    assert calls
    _assert_same_grads(got, _grads(R.qk_norm_rope_attention, args))


@pytest.mark.parametrize("weights", ["lse", "out+lse"])
def test_attention_backward_with_an_lse_gradient_is_the_reference_vjp(monkeypatch, weights):
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in _inputs("attention")]
    calls = _count_out_only_calls(monkeypatch, "attention")
    kw = {"weight_out": weights == "out+lse", "weight_lse": True}
    got = _grads(torch.ops.qwen3x.attention, args, **kw)
    assert not calls
    _assert_same_grads(got, _grads(R.attention, args, **kw))


@pytest.mark.parametrize("fn", ["op", "reference_with_gradient"])
def test_attention_double_backward_is_the_reference_s(fn):
    # A gradient of the gradient (gradient penalties, Hessian-vector products): SDPA's backward has
    # no derivative, so a backward that autograd records differentiates the reference's vjp instead
    from qwen3x._library import reference_with_gradient

    attention = torch.ops.qwen3x.attention if fn == "op" else reference_with_gradient("attention")
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in _inputs("attention")]

    def second_order(f):
        q = args[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(f(q, *args[1:])[0].pow(2).sum(), q, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), q)
        return g, gg

    got, expected = second_order(attention), second_order(R.attention)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inputs", ["same", "derived"])
def test_recorded_backward_of_inputs_that_share_a_graph(inputs):
    # A recorded backward (create_graph) differentiates each argument through its own slot: an
    # input given twice, or computed from another (a decoder's add_rms_norm(attention_out,
    # hidden)), was credited with every path (twice the gradient for add_rms_norm(x, x))
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.rand(16, dtype=torch.float64) + 0.5

    def grads(add_rms_norm):
        first = x if inputs == "same" else 2 * x
        out, summed = add_rms_norm(first, x, w, 1e-6)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum() + summed.pow(2).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        return g, gg

    for got, want in zip(grads(torch.ops.qwen3x.add_rms_norm), grads(R.add_rms_norm)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# The experts' backward: the vjp of a grouped-GEMM restatement (qwen3x._backward.moe_experts), not
# of the reference's loop over experts. fp32 on the CPU (grouped_mm serves it; fp64 keeps the loop).
def _moe_case(layout):
    T, E, k, H, I = 13, 8, 2, 16, 8
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    if layout == "two-experts":  # six experts get no pick
        ids = torch.stack([torch.tensor([3, 5]) if t % 2 else torch.tensor([5, 3]) for t in range(T)])
    w = torch.rand(T, k)
    return T, E, k, H, I, ids.int(), w


@pytest.mark.parametrize("layout", ["random", "two-experts"])
@pytest.mark.parametrize("op", ["moe_experts", "moe"])
def test_experts_backward_goes_through_grouped_gemms(monkeypatch, op, layout):
    T, E, k, H, I, ids, w = _moe_case(layout)
    x, gate_up, down = torch.randn(T, H), torch.randn(E, 2 * I, H) * 0.3, torch.randn(E, H, I) * 0.3
    if op == "moe_experts":
        args = [x, ids, w, gate_up, down]
    else:
        args = [x, torch.randn(T, E), gate_up, down, k, True]
    calls = []
    grouped = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))

    def grads(fn, dtype):
        leaves = [a.to(dtype).clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
        return [leaf.grad for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]

    got = grads(getattr(torch.ops.qwen3x, op), torch.float32)
    assert calls, "the experts' backward should run grouped GEMMs (qwen3x._backward.moe_experts)"
    truth = grads(getattr(R, op), torch.float64)
    for g, t in zip(got, truth):
        assert g is not None and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-5)


def test_compile_through_an_op():
    fn = torch.compile(lambda x, w: ops.rms_norm(x, w) * 2, fullgraph=True, backend="eager")
    x, w = torch.randn(3, 64), torch.randn(64)
    assert torch.equal(fn(x, w), R.rms_norm(x, w, 1e-6) * 2)


# --- bad input -------------------------------------------------------------------------------
BAD = [
    ("rms_norm", lambda: ops.rms_norm(torch.randn(4, 64), torch.randn(32)), "expected weight of shape \\[64\\]"),
    ("rms_norm", lambda: ops.rms_norm(torch.arange(8).view(2, 4), torch.randn(4)), "floating tensor"),
    ("add_rms_norm", lambda: ops.add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.randn(8)),
     "expected residual like input"),
    ("qk_norm_rope", lambda: ops.qk_norm_rope(torch.randn(5, 4, D), torch.randn(5, 2, D), torch.randn(D),
                                              torch.randn(D), torch.arange(4), torch.rand(D // 2)),
     "expected positions of shape \\[5\\]"),
    ("qk_norm_rope", lambda: ops.qk_norm_rope(torch.randn(2, 5, 4, D), torch.randn(2, 4, 2, D), torch.randn(D),
                                              torch.randn(D), torch.zeros(2, 5, dtype=torch.long), torch.rand(D // 2)),
     f"expected q and k to have the same leading \\(token\\) dimensions, got q \\[2, 5, 4, {D}\\] and k "
     f"\\[2, 4, 2, {D}\\]"),
    ("qk_norm_rope", lambda: ops.qk_norm_rope(torch.randn(5, 4, D), torch.randn(5, 2, D), torch.randn(D),
                                              torch.randn(D), torch.arange(5).float(), torch.rand(D // 2)),
     "positions to be int32 or int64"),
    ("qk_norm_rope", lambda: ops.qk_norm_rope(torch.randn(5, 4, D), torch.randn(5, 2, 16), torch.randn(D),
                                              torch.randn(D), torch.arange(5), torch.rand(D // 2)),
     "one even head_dim"),
    ("qk_norm_rope", lambda: ops.qk_norm_rope(torch.randn(5, 4, D), torch.randn(5, 2, D), torch.randn(D),
                                              torch.randn(D), torch.arange(5), torch.rand(D)),
     "expected inv_freq of shape \\[16\\]"),
    ("qk_norm_rope_cache_", lambda: ops.qk_norm_rope_cache_(*_inputs("qk_norm_rope_cache_")[:5], torch.tensor([4, 5, 9]),
                                                            *_inputs("qk_norm_rope_cache_")[6:]),
     "cache_position in \\[0, 9\\)"),
    ("qk_norm_rope_cache_", lambda: ops.qk_norm_rope_cache_(*_inputs("qk_norm_rope_cache_")[:3],
                                                            torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16),
                                                            *_inputs("qk_norm_rope_cache_")[5:]),
     "expected k_cache of shape \\[2, 2, max_cache_len, 32\\]"),
    # in place: the same checks as the CUDA glue's (csrc/core/checks.h), so the CPU refuses them too
    ("qk_norm_rope_", lambda: ops.qk_norm_rope_(*(lambda x: (x, x))(torch.randn(5, 2, D)), torch.randn(D),
                                                torch.randn(D), torch.arange(5), torch.rand(D // 2)),
     "expected q and k not to overlap in memory"),
    ("qk_norm_rope_", lambda: ops.qk_norm_rope_(torch.randn(1, 4, D).expand(5, 4, D), torch.randn(5, 2, D),
                                                torch.randn(D), torch.randn(D), torch.arange(5), torch.rand(D // 2)),
     "expected q to give every element its own memory"),
    ("qk_norm_rope_cache_", lambda: ops.qk_norm_rope_cache_(*_inputs("qk_norm_rope_cache_")[:3],
                                                            *(lambda c: (c, c))(_inputs("qk_norm_rope_cache_")[3]),
                                                            *_inputs("qk_norm_rope_cache_")[5:]),
     "expected k_cache and v_cache not to overlap in memory"),
    ("silu_and_mul", lambda: ops.silu_and_mul(torch.randn(3, 7)), "even last dim"),
    ("attention", lambda: ops.attention(torch.randn(1, 3, 4, D), torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D)),
     "divisible by key-value heads"),
    ("attention", lambda: ops.attention(torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D), torch.randn(1, 2, 5, D)),
     "k and v of one shape"),
    ("attention", lambda: ops.attention(torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D),
                                        torch.ones(1, 1, 4, 4)), "bool mask"),
    *(("attention", lambda scale=scale: ops.attention(torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D),
                                                       torch.randn(1, 2, 4, D), None, scale),
       "positive finite softmax scale") for scale in (0.0, -0.1, float("inf"), float("nan"), 1e-46, 1e300)),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 4], dtype=torch.int32),
                                                      torch.tensor([0, 4], dtype=torch.int32), scale=-1.0),
     "positive finite softmax scale"),
    ("qk_norm_rope_attention", lambda: ops.qk_norm_rope_attention(*_inputs("qk_norm_rope_attention")[:10], 0.0),
     "positive finite softmax scale"),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 4]), torch.tensor([0, 4])), "torch.int32"),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 4], dtype=torch.int32),
                                                      torch.tensor([0, 2, 4], dtype=torch.int32)), "of one shape"),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 3, 2], dtype=torch.int32),
                                                      torch.tensor([0, 2, 4], dtype=torch.int32)), "non-decreasing"),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 4], dtype=torch.int32),
                                                      torch.tensor([0, 5], dtype=torch.int32)), "within \\[0, 4\\]"),
    ("attention_varlen", lambda: ops.attention_varlen(torch.randn(1, 4, 2, D), torch.randn(4, 2, D), torch.randn(4, 2, D),
                                                      torch.tensor([0, 4], dtype=torch.int32),
                                                      torch.tensor([0, 4], dtype=torch.int32)), "\\[tokens, heads, head_dim\\]"),
    ("qk_norm_rope_attention", lambda: ops.qk_norm_rope_attention(*_inputs("qk_norm_rope_attention")[:5],
                                                                  torch.arange(5), *_inputs("qk_norm_rope_attention")[6:]),
     "expected positions of shape \\[2, 5\\]"),
    ("qk_norm_rope_attention", lambda: ops.qk_norm_rope_attention(*_inputs("qk_norm_rope_attention")[:2],
                                                                  torch.randn(2, 5, 3, D),
                                                                  *_inputs("qk_norm_rope_attention")[3:]),
     "k and v of one shape"),
    ("moe_gate", lambda: ops.moe_gate(torch.randn(4, 48), torch.randn(8, 40)), "weight \\[experts, 48\\]"),
    ("moe_gate", lambda: ops.moe_gate(torch.randn(4, 48), torch.randn(8, 48).double()), "dtype torch.float32"),
    ("moe_gate", lambda: ops.moe_gate(torch.randn(48), torch.randn(8, 48)), "hidden_states \\[tokens, hidden\\]"),
    ("moe_router", lambda: ops.moe_router(torch.randn(4, 8), 9), "1 <= top_k <= 8"),
    ("moe_permute", lambda: ops.moe_permute(torch.tensor([[0, 9]]), 8), "expert ids in \\[0, 8\\)"),
    ("moe_route", lambda: ops.moe_route(torch.randn(4, 8), 2, True, 0), "row_align >= 1"),
    ("moe_route", lambda: ops.moe_route(torch.randn(4, 8), 9), "1 <= top_k <= 8"),
    ("moe_route", lambda: ops.moe_route(torch.randn(4, 8), 2, True, 2**30), "int32 range"),
    ("moe_permute", lambda: ops.moe_permute(torch.zeros(4, 2, dtype=torch.int32), 8, 2**30), "int32 range"),
    ("moe_experts", lambda: ops.moe_experts(torch.randn(2, 16), torch.tensor([[0], [1]]), torch.rand(2, 1),
                                            torch.randn(4, 16, 16), torch.randn(4, 16, 8).transpose(1, 2)),
     "expected down_proj \\[4, 16, 8\\]"),
    ("moe_experts", lambda: ops.moe_experts(torch.randn(2, 16), torch.tensor([[0], [4]]), torch.rand(2, 1),
                                            torch.randn(4, 16, 16), torch.randn(4, 16, 8)),
     "expert ids in \\[0, 4\\)"),
    ("moe", lambda: ops.moe(torch.randn(2, 16).half(), torch.randn(2, 4), torch.randn(4, 16, 16),
                            torch.randn(4, 16, 8), 1), "one dtype"),
]


@pytest.mark.parametrize("op,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_error_naming_the_op(op, call, message):
    with pytest.raises(ValueError, match=f"qwen3x.{op}: .*{message}"):
        call()


def test_kernel_status_lists_every_op():
    status = ops.kernel_status()
    assert set(status) == set(_library.SCHEMAS)
    assert set(status.values()) <= {"cuda kernel", "reference"}
    built = set(_library._C.build_info()["kernels"]) if _library._C is not None else set()
    assert {op for op, s in status.items() if s == "cuda kernel"} == built
    assert all(qwen3x.has_cuda_kernel(op) == (op in built) for op in status)


def test_arch_compatibility_rule():
    from qwen3x.info import runs_on

    assert runs_on(["sm_90a"], "sm_90") and runs_on(["sm_80", "sm_90a"], "sm_80")
    assert not runs_on(["sm_90a"], "sm_80") and not runs_on(["sm_90a"], "sm_100")
    assert runs_on(["compute_80"], "sm_90") and not runs_on(["compute_90a"], "sm_100")
    # an sm_XY image runs on later minor versions of X, not on the next major
    assert runs_on(["sm_80"], "sm_86") and runs_on(["sm_80"], "sm_89") and not runs_on(["sm_80"], "sm_90")
    assert not runs_on(["sm_86"], "sm_80") and not runs_on(["sm_100"], "sm_120")
    # arch-specific (a): that version only; family-specific (f): later minor versions too
    assert runs_on(["sm_100f"], "sm_103") and not runs_on(["sm_100a"], "sm_103") and runs_on(["compute_90a"], "sm_90")


def test_a_gpu_the_build_does_not_cover(monkeypatch):
    """An A100 with an sm_90a build: no op may launch there (CUDA's "no kernel image" names neither
    the op nor the fix); the patched layers run the references instead, with one warning."""
    from types import SimpleNamespace

    from qwen3x.layers import dispatch

    fake_c = SimpleNamespace(build_info=lambda: {"archs": ["sm_90a"]})
    monkeypatch.setattr(_library, "_C", fake_c)
    monkeypatch.setattr(_library, "_RUNS_ON_DEVICE", {})
    capability = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    assert not _library.kernels_run_on(torch.device("cuda", 0))
    assert _library.kernels_run_on(torch.device("cuda", 1))
    capability[0] = (9, 0)  # asked once per device
    assert not _library.kernels_run_on(torch.device("cuda", 0))

    monkeypatch.setattr(dispatch, "has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(_library, "_warned", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 128), device=torch.device("cuda", 0))
    with pytest.warns(UserWarning, match=r"cannot run on cuda:0 \(sm_80\).*QWEN3X_CUDA_ARCHS=8\.0 "):
        assert dispatch.reference_instead("rms_norm", x)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert dispatch.reference_instead("attention", x)  # the same warning, once
    assert not again, [str(w.message) for w in again]
    assert "QWEN3X_CUDA_ARCHS=9.0a " in _library.rebuild_hint(9, 0)  # with the Hopper mainloops
    assert "need sm_80 or newer" in _library.rebuild_hint(7, 5)  # no build helps a T4


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_cpp_architecture_rule_is_pythons(tmp_path):
    """csrc/core/arch.h (what every op asks before it launches) against _library.runs_on, over
    target lists of every kind and the GPUs from Turing to Blackwell."""
    root = Path(__file__).resolve().parents[1]
    driver = tmp_path / "arch.cpp"
    driver.write_text('#include "core/arch.h"\n#include <cstdio>\n#include <cstdlib>\n'
                      "int main(int argc, char** argv) {\n"
                      '  for (int i = 2; i < argc; ++i) std::printf("%d", qwen3x::arch_list_runs_on(argv[1], std::atoi(argv[i])));\n'
                      "}\n")
    exe = tmp_path / "arch"
    subprocess.run(["g++", "-std=c++17", f"-I{root / 'csrc'}", str(driver), "-o", str(exe)], check=True)
    ccs = [75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121]
    for archs in (["sm_80"], ["sm_86"], ["sm_90a"], ["sm_80", "sm_90a"], ["compute_80"], ["compute_90"],
                  ["compute_90a"], ["sm_90a", "compute_90"], ["sm_100"], ["sm_100a"], ["sm_100f"], ["compute_100f"],
                  ["sm_120"], ["sm_80", "sm_100f", "compute_120"]):
        got = subprocess.run([str(exe), ",".join(archs), *map(str, ccs)], capture_output=True, text=True,
                             check=True).stdout
        want = "".join(str(int(_library.runs_on(archs, f"sm_{cc}"))) for cc in ccs)
        assert got == want, (archs, ccs, got, want)


@pytest.mark.skipif(_library._C is None, reason="needs the built extension")
def test_the_ops_check_and_python_agree_on_architectures():
    """qwen3x._C.runs_on is what every op asks (csrc/core/checks.h built_for) before it launches."""
    archs = _library._C.build_info()["archs"]
    for cc in (50, 70, 75, 80, 86, 89, 90, 100, 103, 120):
        assert _library._C.runs_on(cc) == _library.runs_on(archs, f"sm_{cc}"), (cc, archs)


def test_info_runs_and_names_every_op(capsys):
    from qwen3x import info

    info.main()
    text = capsys.readouterr().out
    assert "torch" in text and all(op in text for op in _library.SCHEMAS)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "silu_and_mul"])
def test_strided_inputs_give_contiguous_outputs_like_the_fake(op):
    args = list(_inputs(op))
    args[0] = args[0].t().contiguous().t()  # same values, column-major
    if op == "add_rms_norm":
        args[1] = args[1].t().contiguous().t()
    torch.library.opcheck(getattr(torch.ops.qwen3x, op).default, tuple(args), test_utils=["test_faketensor"])
    outs = getattr(torch.ops.qwen3x, op)(*args)
    for o in outs if isinstance(outs, tuple) else (outs,):
        assert o.is_contiguous()


def test_layers_send_what_no_kernel_serves_to_the_reference(monkeypatch):
    from types import SimpleNamespace

    from qwen3x.layers import dispatch

    monkeypatch.setattr(dispatch, "has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(dispatch, "kernels_run_on", lambda device: True)
    monkeypatch.setattr(_library, "_warned", set())

    def cuda(dtype, head_dim=128):
        return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, 3, head_dim), device=torch.device("cuda", 0))

    assert not dispatch.reference_instead("attention", cuda(torch.bfloat16))
    with pytest.warns(UserWarning, match="qwen3x.attention: no CUDA kernel for torch.float32"):
        assert dispatch.reference_instead("attention", cuda(torch.float32))
    with pytest.warns(UserWarning, match="qwen3x.qk_norm_rope: no CUDA kernel for torch.bfloat16, head_dim 64"):
        assert dispatch.reference_instead("qk_norm_rope", cuda(torch.bfloat16, head_dim=64))
    assert not dispatch.reference_instead("rms_norm", cuda(torch.float32, head_dim=64))  # any hidden size
    with pytest.warns(UserWarning, match="qwen3x.rms_norm: no CUDA kernel for torch.float64"):
        assert dispatch.reference_instead("rms_norm", cuda(torch.float64))
    assert not dispatch.reference_instead("rms_norm", SimpleNamespace(is_cuda=False, dtype=torch.float64, shape=(3,)))
    assert dispatch.moe_shapes_served(2048, 768) and dispatch.moe_shapes_served(4096, 1536)
    assert not dispatch.moe_shapes_served(64, 32)
    with pytest.warns(UserWarning, match="qwen3x.moe_experts: no CUDA kernel for torch.bfloat16, hidden 64"):
        assert dispatch.reference_instead("moe_experts", cuda(torch.bfloat16), False, "hidden 64, intermediate 32")


def test_in_place_rope_takes_views_of_a_fused_projection():
    """q and k as slices of one fused projection output interleave without sharing an element:
    the CPU's overlap check (as the CUDA glue's) lets them through, and the op updates both."""
    fused = torch.randn(5, 8 * D)
    q, k = fused[:, :4 * D].view(5, 4, D), fused[:, 4 * D:6 * D].view(5, 2, D)
    args = (torch.ones(D), torch.ones(D), torch.arange(5))
    inv_freq = torch.linspace(1.0, 1e-3, D // 2)
    want_q, want_k = ops.qk_norm_rope(q.clone(), k.clone(), *args, inv_freq)
    ops.qk_norm_rope_(q, k, *args, inv_freq)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_torch_release_mismatch_rule():
    assert _library.torch_release_mismatch("2.14.1+cu130", "2.14.0") is None  # same release, other patch
    assert _library.torch_release_mismatch("2.11.0+cu130", "2.11.0+cu130") is None
    why = _library.torch_release_mismatch("2.14.1+cu130", "2.15.0+cu132")
    assert why and "2.14.1+cu130" in why and "2.15.0+cu132" in why and "rebuild" in why
    assert _library.torch_release_mismatch("2.14.1", "3.14.1")


@pytest.mark.skipif(_library._C is None, reason="needs the built extension")
def test_the_build_stamps_the_torch_it_was_built_against():
    stamp = Path(_library.__file__).with_name(_library.TORCH_VERSION_FILE)
    assert stamp.is_file(), f"{stamp} missing: setup.py writes it beside _C (rebuild)"
    assert stamp.read_text().strip() == _library._C.build_info()["torch_version"]


@pytest.mark.skipif(_library._C is None, reason="needs the built extension")
def test_an_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """Loaded into another torch release, a built module may resolve its symbols and still misread
    tensors; qwen3x leaves it unloaded, says why, and runs the references."""
    package = tmp_path / "qwen3x"
    shutil.copytree(Path(qwen3x.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / _library.TORCH_VERSION_FILE).write_text("1.13.1+cu117\n")
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import qwen3x, qwen3x._library as L\n"
        "assert L._C is None and 'qwen3x._C' not in __import__('sys').modules, 'loaded'\n"
        "assert any('built against torch 1.13.1+cu117' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "x, g = torch.randn(3, 8), torch.randn(8)\n"
        "torch.testing.assert_close(qwen3x.ops.rms_norm(x, g, 1e-6), qwen3x.reference.rms_norm(x, g, 1e-6))\n"
        "print('reason:', L.C_LOAD_ERROR)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reason: built against torch 1.13.1+cu117" in out.stdout
