"""CUDA kernels against the fp64 reference (the tolerance rule in tolerance.py). GPU only.

Outputs are poisoned: the caching allocator hands the kernel's output the memory of a NaN-filled
block just freed, so an element the kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_config
from qwen3x.testing import assert_close_to_truth, assert_identical, poison_allocator

from qwen3x import _library, ops
from qwen3x import reference as R
from qwen3x.rope import rope_parameters

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOKENS = [1, 7, 83, 4097, 65536]
HEADS = [(16, 8), (32, 8), (32, 4), (64, 4), (40, 8)]  # 40/8: Qwen3-14B
D = 128


def _needs_kernel(op):
    if not _library.has_cuda_kernel(op):
        pytest.skip(f"no CUDA kernel for {op} in this build")


def _judge(out, args, ref_fn, index=None):
    """Compare out with the same-dtype reference and the fp64 truth of ref_fn(*args)."""
    same = ref_fn(*args)
    truth = ref_fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    if index is not None:
        same, truth = same[index], truth[index]
    assert_close_to_truth(out, same, truth)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [128, 1024, 2560, 4096, 5120, 8192])  # 5120: Qwen3-14B, 32B
def test_rms_norm(dtype, tokens, hidden):
    _needs_kernel("rms_norm")
    if tokens * hidden > 2**28:
        pytest.skip("large")
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype) * 4
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    poison_allocator(x.numel() * x.element_size())
    out = ops.rms_norm(x, w, 1e-6)
    _judge(out, (x, w, 1e-6), R.rms_norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows(dtype):
    _needs_kernel("rms_norm")
    big = torch.randn(97, 3 * 1024, device="cuda", dtype=dtype)
    x = big[:, 1024:2048]  # row stride 3072
    w = torch.randn(1024, device="cuda", dtype=dtype)
    _judge(ops.rms_norm(x, w, 1e-6), (x, w, 1e-6), R.rms_norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 83, 4097])
def test_add_rms_norm(dtype, tokens):
    _needs_kernel("add_rms_norm")
    x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    res = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    w = torch.randn(2048, device="cuda", dtype=dtype)
    poison_allocator(2 * x.numel() * x.element_size())
    out, summed = ops.add_rms_norm(x, res, w, 1e-6)
    assert_identical(summed, res + x)  # the sum rounds once to the input dtype, like HF
    _judge(out, (x, res, w, 1e-6), lambda *a: R.add_rms_norm(*a)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 83, 4097])
def test_silu_and_mul(dtype, tokens):
    _needs_kernel("silu_and_mul")
    for inter in (768, 3072, 9728, 100):
        x = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype) * 3
        poison_allocator(x.numel() * x.element_size())
        _judge(ops.silu_and_mul(x), (x,), R.silu_and_mul)


def _rope_inputs(tokens, hq, hkv, dtype, yarn=True, max_position=131071, pos_dtype=torch.int64):
    config = tiny_config(
        rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} if yarn else None,
        head_dim=D, max_position_embeddings=131072,
    )
    params = rope_parameters(config)
    q = torch.randn(tokens, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(tokens, hkv, D, device="cuda", dtype=dtype)
    wq = 1 + 0.1 * torch.randn(D, device="cuda", dtype=dtype)
    wk = 1 + 0.1 * torch.randn(D, device="cuda", dtype=dtype)
    pos = torch.randint(0, max_position + 1, (tokens,), device="cuda", dtype=pos_dtype)
    pos[-1] = max_position
    return q, k, wq, wk, pos, params.inv_freq.cuda(), params.attention_scaling, 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_qk_norm_rope(dtype, tokens, hq, hkv):
    _needs_kernel("qk_norm_rope")
    if tokens * hq > 2**21:
        pytest.skip("large")
    args = _rope_inputs(tokens, hq, hkv, dtype)
    poison_allocator(args[0].numel() * args[0].element_size())
    q_out, k_out = ops.qk_norm_rope(*args)
    _judge(q_out, args, R.qk_norm_rope, index=0)
    _judge(k_out, args, R.qk_norm_rope, index=1)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_qk_norm_rope_in_place_on_slices_of_a_fused_projection(pos_dtype):
    _needs_kernel("qk_norm_rope_")
    T, hq, hkv, dtype = 83, 32, 4, torch.bfloat16
    _, _, wq, wk, pos, inv, scale, eps = _rope_inputs(T, hq, hkv, dtype, pos_dtype=pos_dtype)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device="cuda", dtype=dtype)
    before = qkv.clone()
    q = qkv[:, : hq * D].view(T, hq, D)
    k = qkv[:, hq * D : (hq + hkv) * D].view(T, hkv, D)
    args = (q.clone(), k.clone(), wq, wk, pos, inv, scale, eps)
    ops.qk_norm_rope_(q, k, wq, wk, pos, inv, scale, eps)
    _judge(q, args, R.qk_norm_rope, index=0)
    _judge(k, args, R.qk_norm_rope, index=1)
    assert_identical(qkv[:, (hq + hkv) * D :], before[:, (hq + hkv) * D :])  # v untouched


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ops.qk_norm_rope(torch.randn(4, 4, 64, device="cuda", dtype=torch.bfloat16),
                                  torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16),
                                  torch.ones(64, device="cuda", dtype=torch.bfloat16),
                                  torch.ones(64, device="cuda", dtype=torch.bfloat16),
                                  torch.arange(4, device="cuda"), torch.rand(32, device="cuda")), "128"),
        (lambda: ops.rms_norm(torch.randn(4, 64, device="cuda"), torch.randn(64)), "weight to be a CUDA tensor, got cpu"),
        (lambda: ops.rms_norm(torch.randn(4, 64, device="cuda"), torch.randn(64, device="cuda").half()), "dtype"),
    ],
    ids=["head_dim_64", "weight_on_cpu", "weight_dtype"],
)
def test_bad_cuda_inputs_are_clear_errors(call, message):
    with pytest.raises((RuntimeError, ValueError), match=f"qwen3x\\.\\w+.*{message}"):
        call()
    torch.cuda.synchronize()  # and no asynchronous fault left behind


def test_patched_model_on_gpu_matches_hf_within_the_tolerance_rule():
    import copy

    from models import tiny_model

    import qwen3x

    base = tiny_model(head_dim=128, num_attention_heads=8, num_key_value_heads=2).cuda()
    truth_model = copy.deepcopy(base).double()
    hf = base.to(torch.bfloat16)
    patched = qwen3x.patch(copy.deepcopy(hf))
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    with torch.no_grad():
        truth = truth_model(ids).logits
        assert_close_to_truth(patched(ids).logits.float(), hf(ids).logits.float(), truth.float(), extra_floor=1e-2)


def test_cuda_fallback_warns_once_naming_the_op():
    if _library.has_cuda_kernel("attention"):
        pytest.skip("attention has a CUDA kernel in this build")
    _library._warned.discard("attention")
    q, k = torch.randn(1, 4, 3, D, device="cuda"), torch.randn(1, 2, 3, D, device="cuda")
    with pytest.warns(UserWarning, match="qwen3x.attention: no CUDA kernel"):
        ops.attention(q, k, k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.attention(q, k, k)  # only once


def test_in_place_rope_refuses_overlapping_memory():
    _needs_kernel("qk_norm_rope_")
    q, k, wq, wk, pos, inv, scale, eps = _rope_inputs(4, 4, 2, torch.bfloat16)
    broadcast = q[:1].expand(4, 4, D)  # every token the same memory
    with pytest.raises(ValueError, match="qwen3x.qk_norm_rope_: expected q to give every element its own memory"):
        ops.qk_norm_rope_(broadcast, k, wq, wk, pos, inv, scale, eps)
    with pytest.raises(ValueError, match="qwen3x.qk_norm_rope_: expected q and k not to overlap"):
        ops.qk_norm_rope_(q[:, :2], q[:, :2], wq, wk, pos, inv, scale, eps)


# ---- qk_norm_rope_cache_: q in place, k and v into a static KV cache ---------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seqlen", [(1, 1), (4, 1), (3, 4), (2, 37)])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_qk_norm_rope_cache(dtype, batch, seqlen, hq, hkv, slot_dtype):
    """q, k, v as views of a fused [B, S, (Hq + 2 Hkv) D] projection; the caches a slice of a longer
    buffer; the new tokens at slots 5 .. 5 + S - 1 (RoPE positions elsewhere, as under left padding)."""
    _needs_kernel("qk_norm_rope_cache_")
    s_max = 64
    _, _, wq, wk, _, inv, scale, eps = _rope_inputs(1, hq, hkv, dtype)
    qkv = torch.randn(batch, seqlen, (hq + 2 * hkv) * D, device="cuda", dtype=dtype)
    q = qkv[..., : hq * D].view(batch, seqlen, hq, D)
    k = qkv[..., hq * D : (hq + hkv) * D].view(batch, seqlen, hkv, D)
    v = qkv[..., (hq + hkv) * D :].view(batch, seqlen, hkv, D)
    caches = torch.randn(2, batch, hkv, s_max + 8, D, device="cuda", dtype=dtype)[..., :s_max, :]
    k_cache, v_cache = caches[0], caches[1]
    before_qkv, before_caches = qkv.clone(), caches.clone()
    slots = torch.arange(5, 5 + seqlen, device="cuda", dtype=slot_dtype)
    pos = torch.randint(0, 131072, (batch, seqlen), device="cuda")
    args = (q.clone(), k.clone(), wq, wk, pos, inv, scale, eps)
    ops.qk_norm_rope_cache_(q, k, v, k_cache, v_cache, slots, wq, wk, pos, inv, scale, eps)
    _judge(q, args, R.qk_norm_rope, index=0)
    written = slots.long()
    _judge(k_cache[:, :, written].transpose(1, 2), args, R.qk_norm_rope, index=1)
    assert_identical(v_cache[:, :, written].transpose(1, 2), v)  # v stored as it is
    assert_identical(qkv[..., hq * D :], before_qkv[..., hq * D :])  # k and v inputs untouched
    others = [i for i in range(s_max) if i not in written.tolist()]
    assert_identical(caches[:, :, :, others], before_caches[:, :, :, others])


def test_qk_norm_rope_cache_skips_slots_out_of_range():
    """The CUDA kernel cannot raise on values: a slot outside [0, max_cache_len) is not written."""
    _needs_kernel("qk_norm_rope_cache_")
    B, S, hq, hkv, s_max, dtype = 2, 3, 16, 8, 16, torch.bfloat16
    _, _, wq, wk, _, inv, scale, eps = _rope_inputs(1, hq, hkv, dtype)
    q = torch.randn(B, S, hq, D, device="cuda", dtype=dtype)
    k, v = torch.randn(2, B, S, hkv, D, device="cuda", dtype=dtype)
    caches = torch.randn(2, B, hkv, s_max, D, device="cuda", dtype=dtype)
    before = caches.clone()
    slots = torch.tensor([-1, 3, s_max], device="cuda")
    pos = torch.arange(B * S, device="cuda").view(B, S)
    ops.qk_norm_rope_cache_(q, k, v, caches[0], caches[1], slots, wq, wk, pos, inv, scale, eps)
    torch.cuda.synchronize()
    assert_identical(caches[1][:, :, 3], v[:, 1])
    others = [i for i in range(s_max) if i != 3]
    assert_identical(caches[:, :, :, others], before[:, :, :, others])


def test_qk_norm_rope_cache_bad_inputs():
    _needs_kernel("qk_norm_rope_cache_")
    B, S, hq, hkv, dtype = 2, 3, 16, 8, torch.bfloat16
    _, _, wq, wk, _, inv, scale, eps = _rope_inputs(1, hq, hkv, dtype)
    q = torch.randn(B, S, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, S, hkv, D, device="cuda", dtype=dtype)
    kc = torch.randn(B, hkv, 32, D, device="cuda", dtype=dtype)
    slots, pos = torch.arange(S, device="cuda"), torch.arange(B * S, device="cuda").view(B, S)

    def bad(*args, match):
        with pytest.raises((RuntimeError, ValueError), match=f"qwen3x.qk_norm_rope_cache_.*{match}"):
            ops.qk_norm_rope_cache_(*args, wq, wk, pos, inv, scale, eps)
        torch.cuda.synchronize()

    bad(q, k, k, kc.half(), kc, slots, match="dtype")
    bad(q, k, k, kc[:1], kc[:1], slots, match="k_cache")
    bad(q, k, k, kc, kc.clone(), slots[:2], match="cache_position")
    bad(q, k, k[:, :, :4], kc, kc.clone(), slots, match="v")
    bad(q, k, k, kc, kc, slots, match="k_cache and v_cache not to overlap")  # one buffer for both caches
    bad(q, k, k, kc, kc[:, :, :16].clone(), slots, match="k_cache and v_cache of one shape")  # a shorter v cache
