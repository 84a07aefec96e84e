"""The attention CUDA kernel (csrc/attention) against the fp64 reference. GPU only.

Tolerance (qwen3x.testing): the kernel's max abs error against the fp64 truth may be at most 2x the
error of a same-dtype baseline, plus the truth's rounding to the output dtype, plus a floor. Two
same-dtype baselines exist and the larger error is used:
  - reference.attention on the bf16/fp16 inputs (it computes in fp32 internally: P is never
    rounded), and
  - a FlashAttention-style baseline: scores and softmax statistics in fp32, the unnormalized
    probabilities exp(s - max) rounded to the input dtype before P @ V (fp32 accumulation), then
    divided by the fp32 row sum. This is the rounding the kernel does by design (tensor-core P V).
lse is fp32 in both; the kernel sums exp2 (ex2.approx, ~2^-22 relative) in another order, so lse
gets an extra floor of LSE_REL_FLOOR x max(1, max |lse|). Rows that see no key must give out = 0
and lse = -inf exactly (compared separately, as -inf - -inf is NaN).

On an sm_90 GPU with an sm_90a build, calls whose row tiles are full (seqlen_q * group >= 64:
prefill) run the Hopper (wgmma) mainloop by default and decode the mma.sync one; the tests without
a QWEN3X_ATTENTION_MAINLOOP setting run the defaults, test_prefill_mainloops runs both.

References are computed in chunks (per kv head, and per block of queries for long sequences, with
the keys cut so that bottom-right causality is unchanged) to bound their memory.

Outputs are poisoned: freed NaN blocks are left in the caching allocator first
(qwen3x.testing.poison_allocator), so an element the kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from qwen3x.testing import (assert_close_to_truth, assert_identical, max_abs_error, poison_allocator, smoke_failed,
                            wgmma_available)

from qwen3x import _library, ops
from qwen3x import reference as R

pytestmark = pytest.mark.gpu
D = 128
HEADS = [(16, 8), (32, 8), (32, 4), (64, 4), (40, 8), (8, 8)]  # (Hq, Hkv); 40/8: Qwen3-14B, a group of 5; 8/8: Hq == Hkv
LSE_REL_FLOOR = 2e-5
REF_CHUNK_ELEMS = 2**26  # score elements per reference chunk


@pytest.fixture(autouse=True)
def _needs_kernel():
    if not _library.has_cuda_kernel("attention"):
        pytest.skip("no CUDA kernel for attention in this build")


def _allowed(Sq, Skv, mask, causal, device, B, Hq):
    allowed = torch.ones(Sq, Skv, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Skv, device=device)[None, :]
        allowed = j <= i + (Skv - Sq)
    allowed = allowed.expand(B, Hq, Sq, Skv)
    if mask is not None:
        allowed = allowed & mask
    return allowed


def _flash_baseline(q, k, v, mask, scale, causal):
    """FlashAttention's rounding: P = exp(s - max) rounded to q.dtype before P @ V, fp32 otherwise."""
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~_allowed(Sq, Skv, mask, causal, q.device, B, Hq), float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if Skv else torch.full((B, Hq, Sq, 1), float("-inf"), device=q.device)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    lsum = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p.to(q.dtype).float(), vf) / torch.where(lsum == 0, torch.ones_like(lsum), lsum)
    lse = torch.where(lsum[..., 0] == 0, torch.full_like(lsum[..., 0], float("-inf")), m[..., 0] + torch.log(lsum[..., 0]))
    return o.transpose(1, 2).contiguous().to(q.dtype), lse


def _truth_fn(q, k, v, mask, scale, causal):
    return R.attention(q.double(), k.double(), v.double(), mask, scale, causal)


def _chunked(fn, q, k, v, mask, scale, causal):
    """fn(q, k, v, mask, scale, causal) -> (out [B, Sq, Hq, D], lse [B, Hq, Sq]), per kv head and
    per block of queries. A causal query block [i0, i1) gets keys [0, i1 + Skv - Sq): the same
    bottom-right diagonal, and the cut keys are invisible to it anyway."""
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    block = max(1, REF_CHUNK_ELEMS // max(1, B * g * Skv))
    outs, lses = [], []
    for h in range(Hkv):
        heads = slice(h * g, (h + 1) * g)
        o_parts, l_parts = [], []
        for i0 in range(0, Sq, block):
            i1 = min(Sq, i0 + block)
            kend = max(0, min(Skv, i1 + Skv - Sq)) if causal and Sq > block else Skv
            mc = None
            if mask is not None:
                mh = mask[:, heads] if mask.shape[1] > 1 else mask
                mc = mh[:, :, i0:i1, :kend]
            o, lse = fn(q[:, heads, i0:i1], k[:, h : h + 1, :kend], v[:, h : h + 1, :kend], mc, scale, causal)
            o_parts.append(o)
            l_parts.append(lse.float())
        outs.append(torch.cat(o_parts, dim=1))
        lses.append(torch.cat(l_parts, dim=2))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


# The Hopper A/B settings and the value of each that make gpu's smoke step tries on its own
# (csrc/attention/attention.cu, tests/wgmma_smoke.py AB_CASES).
AB_CANDIDATES = {"QWEN3X_ATTENTION_COMBINE": "cluster", "QWEN3X_ATTENTION_OVERLAP": "1"}


def _set_ab(monkeypatch, name, value):
    """Sets an A/B setting for this test; skips a candidate value that make gpu's smoke step found
    failing or hanging (qwen3x.testing.smoke_failed: its log has the failure)."""
    if value == AB_CANDIDATES[name] and (why := smoke_failed(name)):
        pytest.skip(why)
    monkeypatch.setenv(name, value)


def _judge(out, lse, q, k, v, mask, scale, causal):
    truth_o, truth_l = _chunked(_truth_fn, q, k, v, mask, scale, causal)
    ref_o, ref_l = _chunked(R.attention, q, k, v, mask, scale, causal)
    fa_o, _ = _chunked(_flash_baseline, q, k, v, mask, scale, causal)
    baseline = max((ref_o, fa_o), key=lambda b: max_abs_error(b, truth_o))
    assert out.shape == truth_o.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "NaN in out (unwritten or 0/0)"
    assert_close_to_truth(out, baseline, truth_o.to(torch.float64))
    # lse: the same set of -inf rows, finite rows within the rule
    assert lse.shape == truth_l.shape and lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "NaN in lse"
    seen = torch.isfinite(truth_l)
    assert_identical(torch.isfinite(lse), seen, "rows that see no key")
    assert (lse[~seen] == float("-inf")).all()
    assert (out.transpose(1, 2)[~seen] == 0).all(), "rows that see no key must be 0"
    if seen.any():
        floor = LSE_REL_FLOOR * max(1.0, truth_l[seen].abs().max().item())
        assert_close_to_truth(lse[seen], ref_l[seen], truth_l[seen].double(), extra_floor=floor)


def _inputs(B, Hq, Hkv, Sq, Skv, dtype, q_layout="bhsd"):
    if q_layout == "bshd":  # a transposed view of a [B, S, H, D] projection output, as HF passes q
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Skv, D, device="cuda", dtype=dtype)
    return q * 1.5, k, v  # somewhat peaked softmax


def _run(q, k, v, mask, causal, scale=D**-0.5):
    B, Hq, Sq, _ = q.shape
    rows = B * Hq * Sq
    nbytes = rows * (D * q.element_size() + 4)  # out, lse
    if rows <= 2**16:  # split-KV partials (up to 128 splits of fp32 rows and lse)
        nbytes += 128 * rows * (D + 1) * 4
    poison_allocator(min(nbytes, 1 << 30))
    out, lse = ops.attention(q, k, v, mask, scale, causal)
    return out, lse


def _padding_mask(B, Sq, Skv, heads=1):
    """HF-style left padding: batch element b masks its first 3 b keys (and the query rows of
    those positions in a prefill); plus one query row that sees nothing at all."""
    mask = torch.ones(B, heads, Sq, Skv, dtype=torch.bool, device="cuda")
    for b in range(B):
        pad = min(3 * b, Skv)
        mask[b, :, :, :pad] = False
    mask[0, 0, Sq - 1, :] = False
    return mask


# ---- prefill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seqlen", [1, 17, 128, 1000, 4096])
def test_prefill(seqlen, hq, hkv, batch, causal):
    if seqlen == 4096 and (batch > 1 or (hq, hkv) not in {(16, 8), (32, 4)}):
        pytest.skip("large; covered by the other 4096 layouts")
    q, k, v = _inputs(batch, hq, hkv, seqlen, seqlen, torch.bfloat16, q_layout="bshd")
    out, lse = _run(q, k, v, None, causal)
    _judge(out, lse, q, k, v, None, D**-0.5, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen", [17, 1000])
def test_prefill_fp16(seqlen, causal):
    q, k, v = _inputs(3, 32, 4, seqlen, seqlen, torch.float16)
    out, lse = _run(q, k, v, None, causal)
    _judge(out, lse, q, k, v, None, D**-0.5, causal)


@pytest.mark.parametrize("seqlen,causal", [(16384, True), (16384, False), (32768, True)])
def test_prefill_long(seqlen, causal):
    q, k, v = _inputs(1, 16, 8, seqlen, seqlen, torch.bfloat16, q_layout="bshd")
    out, lse = _run(q, k, v, None, causal)
    _judge(out, lse, q, k, v, None, D**-0.5, causal)


MAINLOOP_CASES = [  # (batch, hq, hkv, sq, skv, causal, dtype, mask)
    (1, 32, 8, 1000, 1000, True, torch.bfloat16, False),
    (2, 16, 8, 4096, 4096, True, torch.bfloat16, False),
    (3, 32, 4, 17, 300, False, torch.float16, False),      # 68 packed rows: a full tile and a ragged one
    (3, 32, 8, 200, 200, True, torch.bfloat16, True),      # padding mask
    (1, 64, 4, 2000, 2000, False, torch.float16, False),
]


# mainloop varies slowest, so that --gpu-sample 3 keeps cases of both mainloops
@pytest.mark.parametrize("case", MAINLOOP_CASES, ids=[str(i) for i in range(len(MAINLOOP_CASES))])
@pytest.mark.parametrize("mainloop", ["mma_sync", "wgmma"])
def test_prefill_mainloops(monkeypatch, mainloop, case):
    """Both prefill mainloops (QWEN3X_ATTENTION_MAINLOOP) against the truth, each deterministic."""
    if mainloop == "wgmma" and not wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a")
    if mainloop == "wgmma" and os.environ.get("QWEN3X_ATTENTION_MAINLOOP") == "mma_sync":
        pytest.skip("QWEN3X_ATTENTION_MAINLOOP=mma_sync (make gpu sets it when the wgmma smoke run failed)")
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", mainloop)
    B, hq, hkv, sq, skv, causal, dtype, with_mask = case
    q, k, v = _inputs(B, hq, hkv, sq, skv, dtype, q_layout="bshd")
    mask = _padding_mask(B, sq, skv) if with_mask else None
    out, lse = _run(q, k, v, mask, causal)
    _judge(out, lse, q, k, v, mask, D**-0.5, causal)
    out2, lse2 = _run(q, k, v, mask, causal)
    assert_identical(out, out2)
    assert_identical(lse, lse2)


# the softmax's base moves only when a row's max rises more than 8 (log2 units) above it
# (softmax.cuh kRescaleLog2): keys whose scores grow along the sequence move it again and again,
# mid-row, in every loop (split keys too: 1 query x 8 heads against 3000 keys)
@pytest.mark.parametrize("mainloop,overlap,sq", [("mma_sync", "0", 200), ("wgmma", "0", 200), ("wgmma", "1", 200),
                                                 ("mma_sync", "0", 1)], ids=["mma_sync", "wgmma", "overlap", "decode"])
def test_softmax_base_moves(monkeypatch, mainloop, overlap, sq):
    """Scores that rise by about 40 (log2 units) across the keys, and a first row that sees only
    low ones: the base moves in later tiles, and rows whose max stays within 8 of their base keep
    it (p up to 2^8 before the cast): judged against the truth."""
    if mainloop == "wgmma" and not wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a")
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", mainloop)
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_OVERLAP", overlap)
    skv = 3000 if sq == 1 else 300
    q, k, v = _inputs(1, 8, 2, sq, skv, torch.bfloat16, q_layout="bshd")
    q = torch.ones_like(q) * 0.25 + 0.05 * q  # every query alike: scores follow the keys' growth
    growth = torch.linspace(0.0, 10.0, skv, device="cuda").view(1, 1, skv, 1)
    k = (torch.ones_like(k) + 0.1 * k) * growth.to(k.dtype)
    out, lse = _run(q, k, v, None, True)
    _judge(out, lse, q, k, v, None, D**-0.5, True)


def test_mainloop_setting_is_checked(monkeypatch):
    q, k, v = _inputs(1, 32, 8, 100, 100, torch.bfloat16)
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", "fast")
    with pytest.raises(ValueError, match="qwen3x.attention: QWEN3X_ATTENTION_MAINLOOP must be auto"):
        ops.attention(q, k, v, None, D**-0.5, True)
    if not wgmma_available():
        monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", "wgmma")
        with pytest.raises(ValueError, match="QWEN3X_ATTENTION_MAINLOOP=wgmma needs an sm_90 GPU"):
            ops.attention(q, k, v, None, D**-0.5, True)


# ---- decode (split-KV) -----------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("skv", [1, 127, 1024, 8193])
@pytest.mark.parametrize("sq", [1, 2, 4])
def test_decode(sq, skv, hq, hkv, batch, causal):
    if sq > skv:
        pytest.skip("more queries than keys")
    q, k, v = _inputs(batch, hq, hkv, sq, skv, torch.bfloat16, q_layout="bshd")
    out, lse = _run(q, k, v, None, causal)
    _judge(out, lse, q, k, v, None, D**-0.5, causal)


# Decode's split keys: a CTA whose packed rows fit one warp (<= 16: Sq x group) has each of its four
# warps on the same rows and a quarter of every 64-key tile (keys 16 w .. 16 w + 15), the warps'
# softmax states merged after the last tile. Key ends in each warp's quarter of tile 3
# (key_lengths 195, 217, 239, 253: last keys 194, 216, 238, 252), NaN past them; 3 queries x
# group 5 (Qwen3-14B's 40 / 8) give causal ends that differ per row inside one quarter.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,hq,hkv", [(1, 32, 8), (3, 40, 8), (1, 64, 4)])
def test_decode_split_keys_key_ends(sq, hq, hkv, causal):
    B, s_max = 4, 260
    q, k, v = _inputs(B, hq, hkv, sq, s_max, torch.bfloat16, q_layout="bshd")
    lengths = torch.tensor([195, 217, 239, 253], device="cuda")
    n = lengths.tolist()
    for b in range(B):
        k[b, :, n[b]:] = float("nan")
        v[b, :, n[b]:] = float("nan")
    poison_allocator(B * hq * sq * (D * 2 + 4) + 128 * B * hq * sq * (D + 1) * 4)
    out, lse = ops.attention(q, k, v, None, D**-0.5, causal, lengths)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for b in range(B):
        _judge(out[b : b + 1], lse[b : b + 1], q[b : b + 1], k[b : b + 1, :, : n[b]], v[b : b + 1, :, : n[b]], None,
               D**-0.5, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_131072_keys(dtype):
    q, k, v = _inputs(1, 32, 4, 1, 131072, dtype, q_layout="bshd")
    out, lse = _run(q, k, v, None, True)
    _judge(out, lse, q, k, v, None, D**-0.5, True)


def test_kv_cache_views():
    """k/v as transposed views of [B, S, Hkv, D] and a slice of a longer static cache."""
    B, Hq, Hkv, Sq, S_max, Skv = 2, 32, 8, 3, 2048, 1500
    q, _, _ = _inputs(B, Hq, Hkv, Sq, 1, torch.bfloat16, q_layout="bshd")
    k = torch.randn(B, S_max, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)[:, :, :Skv]
    v = torch.randn(B, Hkv, S_max, D, device="cuda", dtype=torch.bfloat16)[:, :, :Skv]
    out, lse = _run(q, k, v, None, True)
    _judge(out, lse, q, k, v, None, D**-0.5, True)


def test_misaligned_views_are_copied():
    """Base pointers that are not 16-byte aligned take the glue's contiguous-copy path."""
    B, Hq, Hkv, S = 1, 16, 8, 100
    big = torch.randn(B, Hq, S, D + 8, device="cuda", dtype=torch.bfloat16)
    q = big[..., 1 : D + 1]  # last dim contiguous, base offset by one element
    k = torch.randn(B, Hkv, S, D + 8, device="cuda", dtype=torch.bfloat16)[..., 3 : D + 3]
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    out, lse = _run(q, k, v, None, True)
    _judge(out, lse, q, k, v, None, D**-0.5, True)


# ---- masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,skv", [(1, 127), (1, 8193), (4, 1024), (17, 17), (1000, 1000)])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (16, 16)])
def test_padding_mask(sq, skv, hq, hkv, causal):
    B = 3
    q, k, v = _inputs(B, hq, hkv, sq, skv, torch.bfloat16, q_layout="bshd")
    mask = _padding_mask(B, sq, skv)
    out, lse = _run(q, k, v, mask, causal)
    assert torch.isinf(lse[0, :, sq - 1]).all() if sq > 0 else True
    _judge(out, lse, q, k, v, mask, D**-0.5, causal)


def test_mask_per_head_and_broadcast_batch():
    """mask [1, Hq, Sq, Skv] (batch broadcast, per-head), random pattern, as an expanded view."""
    B, Hq, Hkv, Sq, Skv = 2, 16, 4, 33, 300
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, torch.bfloat16)
    mask = torch.rand(1, Hq, Sq, Skv, device="cuda") > 0.3
    mask[0, 3, 5, :] = False
    out, lse = _run(q, k, v, mask, False)
    _judge(out, lse, q, k, v, mask, D**-0.5, False)
    expanded = (torch.rand(1, 1, Sq, Skv, device="cuda") > 0.5).expand(B, Hq, Sq, Skv)  # stride-0 dims
    out, lse = _run(q, k, v, expanded, True)
    _judge(out, lse, q, k, v, expanded, D**-0.5, True)


def test_more_queries_than_keys_causal():
    """Bottom-right causality with Sq > Skv: the first Sq - Skv queries see nothing."""
    q, k, v = _inputs(1, 8, 2, 70, 20, torch.bfloat16)
    out, lse = _run(q, k, v, None, True)
    assert torch.isinf(lse[:, :, :50]).all() and torch.isfinite(lse[:, :, 50:]).all()
    _judge(out, lse, q, k, v, None, D**-0.5, True)


# ---- properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("sq,skv,causal", [(1, 8193, True), (4, 131072, True), (1000, 1000, True), (300, 300, False)])
def test_deterministic(sq, skv, causal):
    q, k, v = _inputs(1, 32, 8, sq, skv, torch.bfloat16, q_layout="bshd")
    mask = _padding_mask(1, sq, skv) if skv <= 1000 else None
    out1, lse1 = _run(q, k, v, mask, causal)
    out2, lse2 = _run(q, k, v, mask, causal)
    assert_identical(out1, out2)
    assert_identical(lse1, lse2)


@pytest.mark.parametrize("combine", ["cluster", "l2"])  # QWEN3X_ATTENTION_COMBINE (the newer first)
def test_cuda_graph_decode(monkeypatch, combine):
    if combine == "cluster" and not wgmma_available():
        pytest.skip("thread block clusters: an sm_90 GPU and a build with sm_90a")
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", combine)
    B, Hq, Hkv, Skv = 2, 32, 8, 8193  # split-KV: workspace (l2) allocated inside the capture
    q, k, v = _inputs(B, Hq, Hkv, 1, Skv, torch.bfloat16, q_layout="bshd")
    mask = _padding_mask(B, 1, Skv)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            ops.attention(q, k, v, mask, D**-0.5, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.attention(q, k, v, mask, D**-0.5, True)
    # replays reuse the launch's workspace and arrival mark (combine.cuh), or its cluster launch:
    # new inputs each time
    for _ in range(3):
        q2, k2, v2 = _inputs(B, Hq, Hkv, 1, Skv, torch.bfloat16, q_layout="bshd")
        q.copy_(q2)
        k.copy_(k2)
        v.copy_(v2)
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = ops.attention(q, k, v, mask, D**-0.5, True)
        assert_identical(out, want_out)
        assert_identical(lse, want_lse)
        _judge(out, lse, q, k, v, mask, D**-0.5, True)


@pytest.mark.parametrize("combine", ["cluster", "l2"])
def test_cuda_graph_decode_many_splits_back_to_back(monkeypatch, combine):
    """Batch 1, 4 kv heads, 8192 keys: 4 CTAs, so on an H100 the plan takes 64 splits of 2 tiles (16
    in a cluster); 24 replays queued back to back, new inputs copied in between on the same stream
    and no host sync until the end. Every replay's arrival marks must start clean (the combiners
    reset them, combine.cuh), whichever CTAs of the 64 found themselves last."""
    if combine == "cluster" and not wgmma_available():
        pytest.skip("thread block clusters: an sm_90 GPU and a build with sm_90a")
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", combine)
    B, Hq, Hkv, Skv, replays = 1, 32, 4, 8192, 24
    q, k, v = _inputs(B, Hq, Hkv, 1, Skv, torch.bfloat16, q_layout="bshd")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.attention(q, k, v, None, D**-0.5, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.attention(q, k, v, None, D**-0.5, True)
    inputs = [_inputs(B, Hq, Hkv, 1, Skv, torch.bfloat16, q_layout="bshd") for _ in range(replays)]
    got = []
    for q2, k2, v2 in inputs:
        q.copy_(q2)
        k.copy_(k2)
        v.copy_(v2)
        graph.replay()
        got.append((out.clone(), lse.clone()))
    torch.cuda.synchronize()
    for (q2, k2, v2), (out_i, lse_i) in zip(inputs, got):
        want_out, want_lse = ops.attention(q2, k2, v2, None, D**-0.5, True)
        assert_identical(out_i, want_out)
        assert_identical(lse_i, want_lse)
    _judge(got[-1][0], got[-1][1], *inputs[-1], None, D**-0.5, True)


@pytest.mark.skipif(not _library.pdl_available(), reason="programmatic dependent launch runs on sm_90 + sm_90a only")
@pytest.mark.parametrize("skv", [1024, 8193])  # split-KV: the combine inside the forward kernel
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch, skv):
    """qk_norm_rope, then attention (its split-KV combine inside), each launched to start while the previous
    kernel finishes (csrc/core/pdl.cuh), against plain launches (QWEN3X_PDL=0)."""
    q, k, v = _inputs(1, 32, 8, 1, skv, torch.bfloat16, q_layout="bshd")
    wq, wk = torch.rand(D, device="cuda").bfloat16() + 0.5, torch.rand(D, device="cuda").bfloat16() + 0.5
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    pos = torch.full((1, 1), skv - 1, device="cuda")

    def chain():
        qr, kr = ops.qk_norm_rope(q.transpose(1, 2), k[:, :, -1:].transpose(1, 2), wq, wk, pos, inv_freq)
        k[:, :, -1:] = kr.transpose(1, 2)
        return ops.attention(qr.transpose(1, 2), k, v, None, D**-0.5, True)

    k_before = k.clone()
    with_pdl = chain()
    k.copy_(k_before)
    monkeypatch.setenv("QWEN3X_PDL", "0")
    plain = chain()
    for a, b in zip(with_pdl, plain):
        assert_identical(a, b)


# (B, Hq, Hkv, Sq, Skv, causal): split-KV plans of at most 16 splits (the same count on both
# paths: the same bits), and one the cluster path caps (8193 keys: 65 splits through L2, 15 here)
# (first: the case a one-parametrization GPU pass keeps, the non-portable cluster of 16)
CLUSTER_COMBINE_CASES = [
    (1, 32, 8, 1, 1024, True),   # Qwen3-4B decode, batch 1, 1k keys: 16 splits of one tile
    (1, 8, 2, 1, 300, True),     # 5 splits of one tile
    (2, 40, 8, 3, 1000, False),  # 15 rows a CTA, split keys
    (1, 16, 8, 64, 4096, True),  # full row tiles (the Hopper mainloop), 16 CTAs
    (1, 32, 8, 1, 8193, True),   # capped: 15 splits of 8 or 9 tiles
]


@pytest.mark.parametrize("case", CLUSTER_COMBINE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cluster_combine(monkeypatch, case):
    """QWEN3X_ATTENTION_COMBINE=cluster (csrc/attention/combine.cuh, combine_in_cluster): a tile's
    splits run as one thread block cluster and merge through distributed shared memory (where it
    cannot, the setting is an error, so this ran it). Where both paths plan the same split count the
    arithmetic and its order are the same: identical bits; every case is judged against the
    truth."""
    if not wgmma_available():
        pytest.skip("thread block clusters: an sm_90 GPU and a build with sm_90a")
    B, Hq, Hkv, Sq, Skv, causal = case
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, torch.bfloat16, q_layout="bshd")
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", "l2")
    l2_out, l2_lse = _run(q, k, v, None, causal)
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", "cluster")
    out, lse = _run(q, k, v, None, causal)
    if Skv <= 4096:
        assert_identical(out, l2_out)
        assert_identical(lse, l2_lse)
    _judge(out, lse, q, k, v, None, D**-0.5, causal)


# (B, Hq, Hkv, Sq, Skv): the default's choice on an sm_90 GPU with sm_90a code, and the other one
COMBINE_DEFAULT_CASES = [
    ((1, 32, 8, 1, 8193), "cluster", "l2"),   # 8 CTAs x 15 splits (one wave); through L2: 65 splits
    ((4, 32, 8, 1, 32768), "l2", "cluster"),  # 32 CTAs x 16 splits: 512 (two waves of 264); L2: 32 splits
]


@pytest.mark.parametrize("case", COMBINE_DEFAULT_CASES, ids=["batch1-8193", "batch4-32768"])
def test_combine_default(monkeypatch, case):
    """QWEN3X_ATTENTION_COMBINE=auto (the default; attention.cu, heuristics.cuh cluster_combine_pays):
    on an sm_90 GPU with sm_90a code (132 SMs, 2 CTAs each) a split decode merges in a thread block
    cluster where the cluster plan's clusters are all resident at once (8 clusters of 15 here; the
    occupancy API's count) and through L2 where they are not (32 of 16); off
    sm_90 always through L2. The cases plan different split counts either way, so the forced
    settings' answers differ in bits and the default's is bitwise one of them."""
    (B, Hq, Hkv, Sq, Skv), hopper_choice, other = case
    if wgmma_available() and (why := smoke_failed("QWEN3X_ATTENTION_COMBINE")):
        pytest.skip(why)  # (before the default's call, which may run the failed candidate)
    sms = (torch.cuda.get_device_properties(0).multi_processor_count
           if hasattr(torch.cuda, "get_device_properties") else 132)  # (the emulated device: an H100's)
    if wgmma_available() and sms != 132:
        pytest.skip("the cases are sized for a 132-SM part (H100 / H200 SXM)")
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, torch.bfloat16, q_layout="bshd")
    monkeypatch.delenv("QWEN3X_ATTENTION_COMBINE", raising=False)
    out, lse = _run(q, k, v, None, True)
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", hopper_choice if wgmma_available() else "l2")
    want_out, want_lse = _run(q, k, v, None, True)
    assert_identical(out, want_out)
    assert_identical(lse, want_lse)
    if wgmma_available():
        _set_ab(monkeypatch, "QWEN3X_ATTENTION_COMBINE", other)
        _, other_lse = _run(q, k, v, None, True)
        assert not torch.equal(other_lse, lse), "the two settings planned alike: the case tells nothing"
    _judge(out, lse, q, k, v, None, D**-0.5, True)


# (B, Hq, Hkv, Sq, Skv, causal, mask): calls the Hopper loop serves (full row tiles)
# (first: the case a one-parametrization GPU pass keeps: causal, many tiles, a ragged last tile)
OVERLAP_CASES = [
    (1, 32, 8, 1000, 1000, True, False),  # Qwen3-4B layout, 16 key tiles, the last one partial
    (2, 16, 8, 130, 300, False, True),    # a padding mask, keys past a tile edge
    (1, 16, 8, 64, 64, True, False),      # one key tile: the first tile's Q K^T, the last P V
    (1, 16, 8, 64, 4096, True, False),    # 16 CTAs: the keys split, merged by the L2 combine
]


@pytest.mark.parametrize("case", OVERLAP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_overlap_loop(monkeypatch, case):
    """QWEN3X_ATTENTION_OVERLAP=1 (the default; attention_fwd.cuh, kOverlap): tile t's softmax runs
    beside tile t - 1's P V. The same operations on o in the same order as the serial Hopper loop
    (QWEN3X_ATTENTION_OVERLAP=0): identical bits; judged against the truth too."""
    if not wgmma_available():
        pytest.skip("the overlapped loop is a Hopper loop: an sm_90 GPU and a build with sm_90a")
    B, Hq, Hkv, Sq, Skv, causal, with_mask = case
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", "wgmma")
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, torch.bfloat16, q_layout="bshd")
    mask = _padding_mask(B, Sq, Skv) if with_mask else None
    monkeypatch.setenv("QWEN3X_ATTENTION_OVERLAP", "0")
    serial_out, serial_lse = _run(q, k, v, mask, causal)
    _set_ab(monkeypatch, "QWEN3X_ATTENTION_OVERLAP", "1")
    out, lse = _run(q, k, v, mask, causal)
    assert_identical(out, serial_out)
    assert_identical(lse, serial_lse)
    _judge(out, lse, q, k, v, mask, D**-0.5, causal)


# (setting, its values as the error lists them, its Hopper-only value (None: none), a call it
# applies to: (B, Hq, Hkv, Sq, Skv))
AB_SETTINGS = [("QWEN3X_ATTENTION_COMBINE", "auto, l2 or cluster", "cluster", (1, 8, 8, 1, 64)),  # a split decode
               ("QWEN3X_ATTENTION_OVERLAP", "0 or 1", None, (1, 16, 8, 64, 64))]  # a Hopper prefill tile


@pytest.mark.parametrize("setting", AB_SETTINGS, ids=[s[0] for s in AB_SETTINGS])
def test_ab_setting_is_checked(monkeypatch, setting):
    """The Hopper A/B settings take their listed values only, and a Hopper-only one runs or is
    refused (off an sm_90 GPU with sm_90a code): no silent fallback, so a row or test that asked
    for it ran it. (QWEN3X_ATTENTION_OVERLAP applies to the calls the Hopper mainloop serves, and
    either of its values runs anywhere.)"""
    name, values, hopper_only, shape = setting
    q, k, v = _inputs(*shape, torch.bfloat16)
    monkeypatch.setenv(name, "other")
    with pytest.raises(ValueError, match=f"qwen3x.attention: {name} must be {values}, got 'other'"):
        ops.attention(q, k, v, None, D**-0.5, True)
    if hopper_only is None:
        return
    if wgmma_available():
        _set_ab(monkeypatch, name, hopper_only)
        ops.attention(q, k, v, None, D**-0.5, True)
    else:
        monkeypatch.setenv(name, hopper_only)
        with pytest.raises(ValueError, match=f"{name}={hopper_only} needs an sm_90 GPU"):
            ops.attention(q, k, v, None, D**-0.5, True)


def test_empty_and_zero_keys():
    q, k, v = _inputs(2, 8, 4, 0, 5, torch.bfloat16)
    out, lse = ops.attention(q, k, v, None, D**-0.5, False)
    assert out.shape == (2, 0, 8, D) and lse.shape == (2, 8, 0)
    q, k, v = _inputs(2, 8, 4, 3, 0, torch.bfloat16)
    out, lse = _run(q, k, v, None, False)
    assert (out == 0).all() and (lse == float("-inf")).all()


# ---- bad inputs ------------------------------------------------------------------------------
def _bad(*args, match):
    with pytest.raises((RuntimeError, ValueError), match=match) as info:
        ops.attention(*args)
    assert "qwen3x.attention" in str(info.value)
    torch.cuda.synchronize()


def test_bad_inputs():
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(1, 8, 4, D, device=dev, dtype=bf)
    k = torch.randn(1, 4, 6, D, device=dev, dtype=bf)
    v = torch.randn(1, 4, 6, D, device=dev, dtype=bf)
    s = D**-0.5
    _bad(q[..., :64].contiguous(), k[..., :64].contiguous(), v[..., :64].contiguous(), None, s, True, match="head_dim")
    _bad(q.float(), k.float(), v.float(), None, s, True, match="bfloat16")
    _bad(q[:, :6], k, v, None, s, True, match="divisible")
    _bad(q, k, v, torch.ones(1, 1, 4, 6, device=dev), s, True, match="mask")  # float mask
    _bad(q, k, v, torch.ones(1, 1, 4, 7, device=dev, dtype=torch.bool), s, True, match="mask")
    _bad(q, k, v, torch.ones(2, 1, 4, 6, device=dev, dtype=torch.bool), s, True, match="mask")
    _bad(q, k, v, torch.ones(1, 1, 4, 6, dtype=torch.bool), s, True, match="mask")  # CPU mask
    _bad(q, k.half(), v.half(), None, s, True, match="dtype")
    _bad(q, k, v[:, :, :5], None, s, True, match="shape")


def test_scale_is_checked():
    """The kernel folds the softmax scale into its exponent (softmax.cuh): a scale that is not
    positive and finite as the kernel holds it (scale * log2(e) in float32: 1e-46 is 0 there) is
    refused, by both entry points, naming the op."""
    q, k, v = _inputs(1, 8, 4, 4, 6, torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [tokens, heads, D]
    for scale in (0.0, -D**-0.5, float("inf"), float("nan"), 1e-46):
        _bad(q, k, v, None, scale, True, match="positive finite softmax scale")
        with pytest.raises(ValueError, match="qwen3x.attention_varlen: expected a positive finite softmax scale"):
            ops.attention_varlen(qp, kp, vp, cu, torch.tensor([0, 6], dtype=torch.int32, device="cuda"), 4, 6,
                                 scale, True)


def test_lse_is_natural_log():
    """lse == log(sum(exp(scaled scores))) directly, on a tiny case."""
    q, k, v = _inputs(1, 2, 1, 1, 5, torch.bfloat16)
    _, lse = ops.attention(q, k, v, None, 0.1, False)
    s = (q.double()[0, :, 0] @ k.double()[0, 0].T) * 0.1
    assert torch.allclose(lse[0, :, 0].double(), torch.logsumexp(s, -1), atol=1e-5, rtol=0)
    assert math.isfinite(lse.sum().item())


# ---- varlen (packed sequences, cu_seqlens) -----------------------------------------------------
def _cu(lengths, start=0):
    return torch.tensor([start, *(start + torch.tensor(lengths).cumsum(0)).tolist()], dtype=torch.int32, device="cuda")


def _varlen_inputs(lq, lk, Hq, Hkv, dtype=torch.bfloat16, q_start=0, q_tail=0):
    """Packed q [Tq, Hq, D] as a view of a fused qkv projection output (token stride (Hq + 2 Hkv) D),
    k/v [Tk, Hkv, D]; q tokens [0, q_start) and the last q_tail are in no sequence."""
    Tq, Tk = q_start + sum(lq) + q_tail, sum(lk)
    qkv = torch.randn(Tq, (Hq + 2 * Hkv) * D, device="cuda", dtype=dtype) * 1.5
    q = qkv[:, : Hq * D].view(Tq, Hq, D)
    k = torch.randn(Tk, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(Tk, Hkv, D, device="cuda", dtype=dtype)
    return q, k, v, _cu(lq, q_start), _cu(lk)


def _run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=D**-0.5):
    Tq, Hq = q.shape[0], q.shape[1]
    rows = Tq * Hq
    poison_allocator(min(rows * (D * q.element_size() + 4) + 128 * rows * (D + 1) * 4, 1 << 30))
    return ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)


def _judge_varlen(out, lse, q, k, v, cu_q, cu_k, causal, scale=D**-0.5):
    Tq, Hq, _ = q.shape
    assert out.shape == (Tq, Hq, D) and out.is_contiguous() and lse.shape == (Hq, Tq)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:  # no queries: nothing of out or lse belongs to it
            continue
        seq = lambda t, lo, hi: t[lo:hi].transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, S, D]
        _judge(out[q0:q1].unsqueeze(0), lse[:, q0:q1].unsqueeze(0), seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1),
               None, scale, causal)
    outside = [t for t in range(Tq) if not cq[0] <= t < cq[-1]]
    if outside:
        assert (out[outside] == 0).all(), "tokens outside every sequence must be 0"
        assert (lse[:, outside] == float("-inf")).all()


VARLEN_BATCHES = [
    ([17, 1, 128, 63, 65, 1000], None),  # self-attention prefill, lengths around the 64-row tile
    ([4096, 5, 300], None),
    ([1, 1, 2, 1], [8193, 100, 3000, 1]),  # decode-like: split-KV over packed caches
    ([3, 0, 7], [3, 9, 0]),  # an empty sequence, and queries that see no key
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("lq,lk", VARLEN_BATCHES)
def test_varlen(lq, lk, hq, hkv, causal):
    lk = lk or lq
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, hq, hkv)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal)
    _judge_varlen(out, lse, q, k, v, cu_q, cu_k, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk", [([5, 200, 1], [5, 200, 1]), ([1, 2], [4000, 70])])
def test_varlen_tokens_outside_every_sequence(lq, lk, dtype):
    """cu_seqlens_q[0] > 0 and cu_seqlens_q[-1] < Tq (e.g. a token count padded for a CUDA graph)."""
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, 32, 8, dtype, q_start=3, q_tail=5)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), True)
    _judge_varlen(out, lse, q, k, v, cu_q, cu_k, True)


@pytest.mark.parametrize("max_k", [1, 0, 1000, 4999, 100000])  # 1000: 16 splits of 1 tile, the last takes 64
def test_varlen_key_hint_never_changes_correctness(max_k):
    """max_seqlen_k only plans split-KV: below (or above) the truth, the last split takes the rest."""
    lq, lk = [1, 3, 1], [1000, 5000, 130]
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, 16, 8)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, max(lq), max_k, True)
    _judge_varlen(out, lse, q, k, v, cu_q, cu_k, True)


@pytest.mark.parametrize("lk", [None, [4000, 4000, 4000]])  # self-attention; decode-like (split-KV)
def test_varlen_query_hint_too_small_gives_nan_rows(lk):
    """Rows beyond max_seqlen_q (which sizes the grid) come back NaN, never stale memory; the rows
    the grid covers are right."""
    lq = [100, 3, 30]
    lk = lk or lq
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, 16, 8)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, 20, max(lk), True)  # grid: ceil(20 * 2 / 64) = 1 row tile
    covered = 64 // 2  # a row tile holds 64 packed rows = 32 tokens of group 2
    nan_tokens = list(range(covered, lq[0]))
    assert torch.isnan(out[nan_tokens]).all() and torch.isnan(lse[:, nan_tokens]).all()
    # Sequence 0's first `covered` queries: bottom-right causal, they see keys < covered + lk - lq.
    keys = covered + lk[0] - lq[0]
    _judge(out[:covered].unsqueeze(0), lse[:, :covered].unsqueeze(0), q[:covered].transpose(0, 1)[None],
           k[:keys].transpose(0, 1)[None], v[:keys].transpose(0, 1)[None], None, D**-0.5, True)
    rest = slice(lq[0], None)  # sequences 1 and 2, shifted to start at token 0
    _judge_varlen(out[rest], lse[:, rest], q[rest], k[lk[0]:], v[lk[0]:], cu_q[1:] - lq[0], cu_k[1:] - lk[0], True)


@pytest.mark.parametrize("lq,lk", [(777, 777), (1, 20000)])  # one row tile per CTA; split-KV decode
def test_varlen_matches_padded_kernel(lq, lk):
    """One sequence through both entry points: the same kernel path and split plan, the same bits."""
    q, k, v, cu_q, cu_k = _varlen_inputs([lq], [lk], 32, 4)
    out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, lq, lk, D**-0.5, True)
    pout, plse = ops.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                               D**-0.5, True)
    assert_identical(out, pout[0])
    assert_identical(lse, plse[0])


def test_varlen_deterministic_and_graph_capturable():
    lq, lk = [1, 1, 1], [8193, 20000, 64]
    q, k, v, cu_q, cu_k = _varlen_inputs(lq, lk, 32, 8)
    args = (cu_q, cu_k, max(lq), max(lk), D**-0.5, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            ops.attention_varlen(q, k, v, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.attention_varlen(q, k, v, *args)
    q2, k2, v2, _, _ = _varlen_inputs(lq, lk, 32, 8)
    q.copy_(q2)
    k.copy_(k2)
    v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = ops.attention_varlen(q, k, v, *args)
    assert_identical(out, want_out)
    assert_identical(lse, want_lse)
    _judge_varlen(out, lse, q, k, v, cu_q, cu_k, True)


def test_varlen_bad_inputs():
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(6, 8, D, device=dev, dtype=bf)
    k = torch.randn(6, 4, D, device=dev, dtype=bf)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=dev)

    def bad(*args, match):
        with pytest.raises((RuntimeError, ValueError), match=match) as info:
            ops.attention_varlen(*args, max_seqlen_q=4, max_seqlen_k=4)
        assert "qwen3x.attention_varlen" in str(info.value)
        torch.cuda.synchronize()

    bad(q, k, k, cu.long(), cu, match="int32")
    bad(q, k, k, cu.cpu(), cu, match="cu_seqlens_q")
    bad(q, k, k, cu, cu[:2], match="one shape")
    bad(q[:, :6], k, k, cu, cu, match="divisible")
    bad(q[None], k, k, cu, cu, match="tokens, heads, head_dim")
    bad(q[..., :64].contiguous(), k[..., :64].contiguous(), k[..., :64].contiguous(), cu, cu, match="head_dim")
    bad(q.float(), k.float(), k.float(), cu, cu, match="bfloat16")


@pytest.mark.parametrize("sq,skv", [(1, 8193), (300, 300), (1, 260)])  # split-KV decode; one pass; split keys
def test_nan_input_shows_as_nan(sq, skv):
    """A NaN in one query row gives NaN in that row's out and lse (never 0 / -inf), and nowhere else."""
    q, k, v = _inputs(2, 16, 8, sq, skv, torch.bfloat16)
    q[1, 5, sq - 1, 7] = float("nan")
    out, lse = _run(q, k, v, None, True)
    assert torch.isnan(out[1, sq - 1, 5]).all() and torch.isnan(lse[1, 5, sq - 1])
    bad = torch.zeros_like(lse, dtype=torch.bool)
    bad[1, 5, sq - 1] = True
    assert not torch.isnan(lse[~bad]).any() and not torch.isnan(out.transpose(1, 2)[~bad]).any()


# ---- qk_norm_rope_attention: q and k straight from the projections ------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seqlen,hq,hkv", [(1, 1, 16, 8), (2, 77, 32, 4), (1, 1000, 32, 8)])
@pytest.mark.parametrize("padding", [False, True])
def test_qk_norm_rope_attention(dtype, batch, seqlen, hq, hkv, padding):
    from qwen3x.rope import rope_parameters

    from models import tiny_config

    if not _library.has_cuda_kernel("qk_norm_rope_attention"):
        pytest.skip("no CUDA kernel for qk_norm_rope_attention in this build")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    rope = rope_parameters(tiny_config(rope=yarn, head_dim=D, max_position_embeddings=131072))
    qkv = torch.randn(batch, seqlen, (hq + 2 * hkv) * D, device="cuda", dtype=dtype)  # a fused projection
    q = qkv[..., : hq * D].view(batch, seqlen, hq, D)
    k = qkv[..., hq * D : (hq + hkv) * D].view(batch, seqlen, hkv, D)
    v = qkv[..., (hq + hkv) * D :].view(batch, seqlen, hkv, D)
    wq = 1 + 0.1 * torch.randn(D, device="cuda", dtype=dtype)
    wk = 1 + 0.1 * torch.randn(D, device="cuda", dtype=dtype)
    pos = torch.arange(seqlen, device="cuda").expand(batch, seqlen) + 100000  # long-context positions
    mask = _padding_mask(batch, seqlen, seqlen) & torch.ones(seqlen, seqlen, device="cuda").tril().bool() if padding else None
    args = (wq, wk, pos, rope.inv_freq.cuda(), rope.attention_scaling, 1e-6, mask, D**-0.5, mask is None)
    before = qkv.clone()
    poison_allocator(batch * seqlen * hq * (D * 2 + 4))
    out, lse = ops.qk_norm_rope_attention(q, k, v, *args)
    assert_identical(qkv, before)  # inputs untouched
    truth_o, truth_l = R.qk_norm_rope_attention(q.double(), k.double(), v.double(), wq.double(), wk.double(), *args[2:])
    ref_o, ref_l = R.qk_norm_rope_attention(q, k, v, *args)
    qn, kn = R.qk_norm_rope(q, k, wq, wk, pos, rope.inv_freq.cuda(), rope.attention_scaling, 1e-6)
    fa_o, _ = _flash_baseline(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2), mask, D**-0.5, mask is None)
    baseline = max((ref_o, fa_o), key=lambda b: max_abs_error(b, truth_o))
    assert out.shape == (batch, seqlen, hq, D) and not torch.isnan(out).any()
    assert_close_to_truth(out, baseline, truth_o)
    seen = torch.isfinite(truth_l)
    assert_identical(torch.isfinite(lse), seen)
    if seen.any():  # (a one-token padded batch sees nothing)
        floor = LSE_REL_FLOOR * max(1.0, truth_l[seen].abs().max().item())
        assert_close_to_truth(lse[seen], ref_l[seen], truth_l[seen], extra_floor=floor)


# ---- key_lengths: the filled part of a static cache ---------------------------------------------
@pytest.mark.parametrize("sq,s_max,causal,per_batch", [(1, 8192, False, True), (1, 4096, True, False),
                                                       (3, 2048, False, True), (200, 300, True, True)])
def test_key_lengths_skip_the_unfilled_tail(sq, s_max, causal, per_batch):
    """Keys past key_lengths[b] are never read (NaN there would poison P @ V) and the result equals
    attention over the first key_lengths[b] keys (bottom-right causal against that length)."""
    B, hq, hkv = 3, 32, 8
    q, k, v = _inputs(B, hq, hkv, sq, s_max, torch.bfloat16, q_layout="bshd")
    lengths = torch.tensor([sq + 5, s_max // 2 + 3, s_max], device="cuda") if per_batch else torch.tensor(s_max // 3, device="cuda")
    n = lengths.expand(B).tolist()
    for b in range(B):
        k[b, :, n[b]:] = float("nan")
        v[b, :, n[b]:] = float("nan")
    mask = _padding_mask(B, sq, s_max) if not causal else None
    poison_allocator(B * hq * sq * (D * 2 + 4) + 128 * B * hq * sq * (D + 1) * 4)
    out, lse = ops.attention(q, k, v, mask, D**-0.5, causal, lengths)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for b in range(B):
        m = mask[b : b + 1, :, :, : n[b]] if mask is not None else None
        _judge(out[b : b + 1], lse[b : b + 1], q[b : b + 1], k[b : b + 1, :, : n[b]], v[b : b + 1, :, : n[b]], m,
               D**-0.5, causal)


# ---- training: gradients of out (through SDPA: qwen3x._backward) --------------------------------
def _hf_training_out(q, k, v, mask, scale, causal):
    """HF's training path (transformers' sdpa_attention_forward): without a mask, SDPA with
    is_causal and enable_gqa (flash); with one, k and v repeated per head and the boolean mask
    (memory-efficient). Rows that see no key give 0 here (HF's give NaN or garbage there)."""
    B, Hq, Sq, _ = q.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None and causal and Sq == k.shape[2]:
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    g = Hq // k.shape[1]
    allowed = R.visible_keys(B, Sq, k.shape[2], causal, mask, None, q.device)
    seen = allowed.any(dim=-1, keepdim=True)
    out = sdpa(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=allowed | ~seen, scale=scale)
    return out.masked_fill(~seen, 0.0).transpose(1, 2)


def _out_grads(fn, q, k, v, dtype, weight):
    """Gradients w.r.t. q, k, v (as dtype leaves) of sum(out * weight)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    (fn(*leaves).to(weight.dtype) * weight).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("hq,hkv,S,masked", [(32, 8, 1000, False), (16, 8, 77, True)])
def test_backward_of_out_is_as_accurate_as_hf_training(hq, hkv, S, masked):
    """The kernel's forward with the SDPA backward: q, k, v gradients against the fp64 reference's,
    by the tolerance rule with HF's own bf16 training path as the baseline."""
    B, scale = 2, D**-0.5
    q, k, v = _inputs(B, hq, hkv, S, S, torch.bfloat16, q_layout="bshd")
    mask = _padding_mask(B, S, S) if masked else None
    weight = torch.randn(B, S, hq, D, device="cuda", dtype=torch.float64)
    got = _out_grads(lambda *t: ops.attention(*t, mask, scale, True)[0], q, k, v, torch.bfloat16, weight)
    truth = _out_grads(lambda *t: R.attention(*t, mask, scale, True)[0], q, k, v, torch.float64, weight)
    hf = _out_grads(lambda *t: _hf_training_out(*t, mask, scale, True), q, k, v, torch.bfloat16, weight)
    for name, g, t, b in zip("qkv", got, truth, hf):
        assert g.shape == t.shape and g.dtype == torch.bfloat16, name
        assert_close_to_truth(g, b, t)


def test_backward_memory_is_linear_in_length():
    """A 16k-token causal training step of Qwen3-4B's attention (32 / 8 heads): the backward of out
    must not hold the [Hq, S, S] scores, which take 34 GB in fp32 alone (the reference's vjp)."""
    S, hq, hkv = 16384, 32, 8
    q, k, v = (t.detach().requires_grad_() for t in _inputs(1, hq, hkv, S, S, torch.bfloat16, q_layout="bshd"))
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))  # 192 MiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, _ = ops.attention(q, k, v, None, D**-0.5, True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 32 * io_bytes, f"backward peaked at {peak / 2**30:.2f} GiB above its inputs"
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
