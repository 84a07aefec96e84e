"""CUDA kernels of moe_experts and moe (grouped GEMMs + combine) against the reference. GPU only.

Float outputs follow the tolerance rule of qwen3x.testing: the error against the fp64 reference
(reference.moe_experts on fp64 copies of the inputs) may be at most 2x the error of the same-dtype
reference on the same inputs. Outputs are poisoned (the caching allocator hands them the memory of
a NaN-filled block just freed), so an element the kernels forget to write shows up as NaN.

The shapes cover the three tile regimes of csrc/moe/gemm_config.h (mean rows per expert T * k / E:
decode <= 16, mid <= 64, prefill above), Qwen3-30B-A3B (H 2048, I 768, E 128, k 8) and
Qwen3-235B-A22B (H 4096, I 1536) widths, experts with no tokens and one expert taking every token.
The prefill regime has two mainloops (mma.sync; wgmma on sm_90 with an sm_90a build, the default
there): the tests without a QWEN3X_MOE_MAINLOOP setting run the default one, test_prefill_mainloops
runs both.
"""

from __future__ import annotations

import os

import pytest
import torch

from qwen3x import _library
from qwen3x import reference as R
from qwen3x.testing import assert_close_to_truth, assert_identical, poison_allocator, wgmma_available

pytestmark = pytest.mark.gpu


def _needs_kernel(op="moe_experts"):
    if not _library.has_cuda_kernel(op):
        pytest.skip(f"no CUDA kernel for {op} in this build")


def _weights(E, H, I, dtype):
    """Expert weights scaled so every stage's outputs stay O(1)."""
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, device="cuda") * I**-0.5).to(dtype)
    return gate_up, down


def _routing(T, E, k, dtype, id_dtype=torch.int32):
    """k distinct experts per token (as a top-k router picks them) and normalized weights."""
    ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=-1)[:, :k].to(id_dtype)
    w = torch.rand(T, k, device="cuda") + 0.1
    return ids, (w / w.sum(-1, keepdim=True)).to(dtype)


def _run(x, ids, w, gate_up, down):
    poison_allocator(x.shape[0] * x.shape[1] * x.element_size() * (ids.shape[1] + 1))
    return torch.ops.qwen3x.moe_experts(x, ids, w, gate_up, down)


def _judge(out, x, ids, w, gate_up, down):
    same = R.moe_experts(x, ids, w, gate_up, down)
    truth = R.moe_experts(x.double(), ids, w.double(), gate_up.double(), down.double())
    assert_close_to_truth(out, same, truth)


# (tokens, experts, top_k, hidden, intermediate): regime in the comment (mean rows per expert)
SHAPES = [
    (1, 8, 1, 2048, 768),        # decode, 1 pick
    (3, 8, 2, 2048, 768),        # decode, most experts empty
    (1, 128, 8, 2048, 768),      # decode, Qwen3-30B-A3B batch 1
    (3, 128, 8, 4096, 1536),     # decode, Qwen3-235B-A22B widths
    (64, 64, 8, 2048, 768),      # decode, 8 rows per expert
    (64, 8, 8, 2048, 1536),      # mid, 64 rows per expert
    (511, 128, 8, 2048, 768),    # mid, 32 rows per expert, ragged tiles
    (511, 8, 2, 4096, 768),      # prefill, 128 rows per expert
    (4096, 128, 8, 2048, 768),   # prefill, Qwen3-30B-A3B 4k tokens
    (4096, 64, 2, 2048, 1536),   # prefill
]


@pytest.mark.parametrize("T,E,k,H,I", SHAPES, ids=[f"T{s[0]}-E{s[1]}-k{s[2]}-H{s[3]}-I{s[4]}" for s in SHAPES])
def test_moe_experts_bf16(T, E, k, H, I):
    _needs_kernel()
    dtype = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    out = _run(x, ids, w, gate_up, down)
    _judge(out, x, ids, w, gate_up, down)


@pytest.mark.parametrize("T,E,k", [(3, 8, 2), (200, 8, 2), (1000, 16, 4)])
def test_moe_experts_fp16_int64_ids_fp32_weights(T, E, k):
    _needs_kernel()
    dtype = torch.float16
    x = torch.randn(T, 2048, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, 2048, 768, dtype)
    ids, w = _routing(T, E, k, torch.float32, id_dtype=torch.int64)  # weights rounded to fp16 inside
    out = _run(x, ids, w, gate_up, down)
    _judge(out, x, ids, w, gate_up, down)


def test_moe_experts_16k_tokens():
    _needs_kernel()
    T, E, k, H, I = 16384, 128, 8, 2048, 768
    dtype = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    out = _run(x, ids, w, gate_up, down)
    _judge(out, x, ids, w, gate_up, down)


@pytest.mark.parametrize("T", [5, 300])
def test_all_tokens_to_one_expert(T):
    _needs_kernel()
    dtype = torch.bfloat16
    E, H, I = 8, 2048, 768
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids = torch.full((T, 1), 5, device="cuda", dtype=torch.int32)
    w = torch.ones(T, 1, device="cuda", dtype=dtype)
    _judge(_run(x, ids, w, gate_up, down), x, ids, w, gate_up, down)
    # k = 2: two experts take everything, the other six are empty
    ids2 = torch.tensor([[6, 1]], device="cuda", dtype=torch.int32).expand(T, 2).contiguous()
    _, w2 = _routing(T, E, 2, dtype)
    _judge(_run(x, ids2, w2, gate_up, down), x, ids2, w2, gate_up, down)


# (tokens, experts, top_k, hidden, intermediate, dtype): all in the prefill regime (> 64 rows per expert)
PREFILL_CASES = [
    (511, 8, 2, 4096, 768, torch.bfloat16),     # 128 rows per expert, ragged last tiles
    (600, 4, 1, 2048, 768, torch.bfloat16),     # k 1, ~150 rows per expert
    (4096, 128, 8, 2048, 768, torch.bfloat16),  # Qwen3-30B-A3B, 4k tokens
    (1024, 16, 8, 4096, 1536, torch.float16),   # Qwen3-235B-A22B widths, fp16 (16 experts: a small fp64 truth)
]


# mainloop varies slowest, so that --gpu-sample 3 keeps the first case of both mainloops
@pytest.mark.parametrize("T,E,k,H,I,dtype", PREFILL_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-H{c[3]}-I{c[4]}-{str(c[5])[6:]}" for c in PREFILL_CASES])
@pytest.mark.parametrize("mainloop", ["mma_sync", "wgmma"])
def test_prefill_mainloops(monkeypatch, mainloop, T, E, k, H, I, dtype):
    """Both prefill mainloops (QWEN3X_MOE_MAINLOOP) against the reference, and each bitwise
    reproducible."""
    _needs_kernel()
    if mainloop == "wgmma" and not wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a")
    if mainloop == "wgmma" and os.environ.get("QWEN3X_MOE_MAINLOOP") == "mma_sync":
        pytest.skip("QWEN3X_MOE_MAINLOOP=mma_sync (make gpu sets it when the wgmma smoke run failed)")
    monkeypatch.setenv("QWEN3X_MOE_MAINLOOP", mainloop)
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    out = _run(x, ids, w, gate_up, down)
    _judge(out, x, ids, w, gate_up, down)
    assert_identical(out, _run(x, ids, w, gate_up, down))


def test_mainloop_setting_is_checked(monkeypatch):
    _needs_kernel()
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    gate_up, down = _weights(8, 2048, 768, torch.bfloat16)
    ids, w = _routing(300, 8, 2, torch.bfloat16)
    monkeypatch.setenv("QWEN3X_MOE_MAINLOOP", "fast")
    with pytest.raises(ValueError, match="qwen3x.moe_experts: QWEN3X_MOE_MAINLOOP must be auto, mma_sync or wgmma"):
        torch.ops.qwen3x.moe_experts(x, ids, w, gate_up, down)
    if not wgmma_available():
        monkeypatch.setenv("QWEN3X_MOE_MAINLOOP", "wgmma")
        with pytest.raises(ValueError, match="qwen3x.moe_experts: QWEN3X_MOE_MAINLOOP=wgmma needs an sm_90 GPU"):
            torch.ops.qwen3x.moe_experts(x, ids, w, gate_up, down)


def test_strided_hidden_and_weights():
    _needs_kernel()
    dtype = torch.bfloat16
    T, E, k, H, I = 70, 8, 2, 2048, 768
    big = torch.randn(T, 2 * H, device="cuda", dtype=dtype)
    x = big[:, H:]  # row stride 2H
    gate_up, down = _weights(E, H, I, dtype)
    gate_up_t = gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # last dim not contiguous
    ids, w = _routing(T, E, k, dtype)
    out = _run(x, ids, w, gate_up_t, down)
    _judge(out, x, ids, w, gate_up, down)


@pytest.mark.parametrize("T", [40, 5])  # the combine kernel; at decode sizes, GEMM2's combine
def test_out_of_range_ids_are_dropped(T):
    """Ids outside [0, E) get no slot; their picks contribute nothing (never an illegal access).
    At decode sizes (up to 64 tokens x 8 picks) the combine is GEMM2's epilogue: a token's counters start at its
    dropped picks, and the row of a token with none left is zeroed by the permutation's launch."""
    _needs_kernel()
    dtype = torch.bfloat16
    E, k, H, I = 8, 2, 2048, 768
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    bad = ids.clone()
    bad[::3, 1] = -1
    bad[1::3, 0] = E
    bad[2] = E + 100  # a token with no valid pick: out row 0
    poison_allocator(T * H * x.element_size() * (k + 2))
    out = _run(x, bad, w, gate_up, down)
    torch.cuda.synchronize()
    dropped = (bad < 0) | (bad >= E)
    ids_ok = torch.where(dropped, torch.zeros_like(ids), bad)
    w_ok = torch.where(dropped, torch.zeros_like(w), w)  # weight 0: the pick adds exactly 0
    _judge(out, x, ids_ok, w_ok, gate_up, down)
    assert_identical(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("drop", [False, True])
def test_combine_in_gemm2_is_the_combine_kernel(drop):
    """64 tokens x 8 picks combine in GEMM2's epilogue, 65 in the combine kernel (router.cuh
    route_one_launch); both sum a token's rows in pick order, and a row of an expert GEMM depends
    only on its own inputs (same decode tiles at both sizes): the first 64 rows agree bitwise,
    dropped picks included."""
    _needs_kernel()
    dtype, E, k, H, I = torch.bfloat16, 128, 8, 2048, 768
    x = torch.randn(65, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(65, E, k, dtype)
    if drop:
        ids[::4, 3] = -1
        ids[5] = E  # every pick dropped: a zero row
    assert 65 * k <= 16 * E  # both sizes in the decode regime (csrc/moe/gemm_config.h)
    poison_allocator(65 * H * x.element_size() * (k + 2))
    decode = _run(x[:64], ids[:64], w[:64], gate_up, down)
    kernel = _run(x, ids, w, gate_up, down)
    assert_identical(decode, kernel[:64], "GEMM2's combine vs the combine kernel")


@pytest.mark.parametrize("T,E,k", [(3, 128, 8), (300, 8, 2), (2048, 64, 8)])
def test_bitwise_reproducible(T, E, k):
    _needs_kernel()
    dtype = torch.bfloat16
    x = torch.randn(T, 2048, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, 2048, 768, dtype)
    ids, w = _routing(T, E, k, dtype)
    first = _run(x, ids, w, gate_up, down)
    for _ in range(3):
        assert_identical(_run(x, ids, w, gate_up, down), first)


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (300, 8, 2)])
def test_cuda_graph_capture_and_replay(T, E, k):
    _needs_kernel()
    dtype = torch.bfloat16
    H, I = 2048, 768
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    op = torch.ops.qwen3x.moe_experts
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(x, ids, w, gate_up, down)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, ids, w, gate_up, down)
    for _ in range(2):  # new routing and activations, same buffers
        x.copy_(torch.randn_like(x))
        new_ids, new_w = _routing(T, E, k, dtype)
        ids.copy_(new_ids)
        w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        assert_identical(out, op(x, ids, w, gate_up, down))
        _judge(out, x, ids, w, gate_up, down)


def _distinct_logits(T, E, dtype):
    """Logits distinct within each row and exact in dtype: no top-k ties."""
    perm = torch.argsort(torch.rand(T, E, device="cuda"), dim=-1)
    return ((perm - E // 2).float() / 32).to(dtype)


# up to 64 tokens with tokens x k <= 512 the router's launch also permutes (router.cuh
# route_one_launch); 64 x 8 does, 33 x 16 and 77 x 8 do not
@pytest.mark.parametrize("T,E,k,norm,H,I", [(1, 128, 8, True, 2048, 768), (3, 8, 2, False, 2048, 768),
                                            (16, 128, 8, True, 2048, 768), (16, 512, 16, True, 256, 128),
                                            (5, 8, 2, False, 256, 64), (64, 128, 8, True, 2048, 768),
                                            (33, 512, 16, True, 256, 128),
                                            (17, 64, 4, True, 2048, 768), (77, 128, 8, True, 2048, 768),
                                            (600, 8, 2, False, 2048, 768)])
def test_moe_op_matches_reference(T, E, k, norm, H, I):
    _needs_kernel("moe")
    dtype = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    logits = _distinct_logits(T, E, dtype)
    poison_allocator(x.numel() * x.element_size() * (k + 1))
    out = torch.ops.qwen3x.moe(x, logits, gate_up, down, k, norm)
    same = R.moe(x, logits, gate_up, down, k, norm)
    truth = R.moe(x.double(), logits.double(), gate_up.double(), down.double(), k, norm)
    assert_close_to_truth(out, same, truth)
    # At decode sizes the op combines in GEMM2's epilogue (the last CTA of a token's columns),
    # as moe_experts does there too; above, both use the combine kernel: the same bits.
    weights, ids, _ = torch.ops.qwen3x.moe_router(logits, k, norm)
    assert_identical(out, torch.ops.qwen3x.moe_experts(x, ids, weights, gate_up, down), "moe vs router + experts")


@pytest.mark.parametrize("T", [1, 16, 64])
def test_moe_op_cuda_graph_at_decode(T):
    """The decode path (routing and permutation in one launch) captured and replayed with new
    logits and activations."""
    _needs_kernel("moe")
    dtype, E, k, H, I = torch.bfloat16, 128, 8, 2048, 768
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    logits = _distinct_logits(T, E, dtype)
    gate_up, down = _weights(E, H, I, dtype)
    op = torch.ops.qwen3x.moe
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(x, logits, gate_up, down, k, True)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, logits, gate_up, down, k, True)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        logits.copy_(_distinct_logits(T, E, dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert_identical(out, op(x, logits, gate_up, down, k, True))
        same = R.moe(x, logits, gate_up, down, k, True)
        truth = R.moe(x.double(), logits.double(), gate_up.double(), down.double(), k, True)
        assert_close_to_truth(out, same, truth)


@pytest.mark.skipif(not _library.pdl_available(), reason="programmatic dependent launch runs on sm_90 + sm_90a only")
@pytest.mark.parametrize("T", [1, 16, 300])  # the decode chain (route, GEMM1, GEMM2 + combine); the separate ops
def test_moe_op_programmatic_dependent_launch_changes_no_bit(monkeypatch, T):
    """The op's kernels, each launched to start while the previous one finishes (csrc/core/pdl.cuh),
    against plain launches (QWEN3X_PDL=0)."""
    _needs_kernel("moe")
    dtype, E, k, H, I = torch.bfloat16, 128, 8, 2048, 768
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    logits = _distinct_logits(T, E, dtype)
    gate_up, down = _weights(E, H, I, dtype)
    with_pdl = torch.ops.qwen3x.moe(x, logits, gate_up, down, k, True)
    monkeypatch.setenv("QWEN3X_PDL", "0")
    assert_identical(with_pdl, torch.ops.qwen3x.moe(x, logits, gate_up, down, k, True))


def _bad_calls():
    dev, bf = "cuda", torch.bfloat16
    T, E, H, I = 4, 8, 256, 64
    x = torch.randn(T, H, device=dev, dtype=bf)
    gu = torch.randn(E, 2 * I, H, device=dev, dtype=bf)
    dn = torch.randn(E, H, I, device=dev, dtype=bf)
    ids, w = _routing(T, E, 2, bf)
    op = torch.ops.qwen3x.moe_experts
    return [
        ("moe_experts", lambda: op(x.float(), ids, w, gu.float(), dn.float()), "bfloat16 or torch.float16"),
        ("moe_experts", lambda: op(x, ids, w, gu.half(), dn), "same dtype as hidden_states"),
        ("moe_experts", lambda: op(x, ids, w, gu.transpose(1, 2), dn), "transformers 5.x layout"),
        ("moe_experts", lambda: op(x, ids, w, gu, dn.transpose(1, 2)), "transformers 5.x layout"),
        ("moe_experts", lambda: op(x[:, :192], ids, w, gu[:, :, :192], dn[:, :192]), "multiple of 128"),
        ("moe_experts", lambda: op(x, ids, w, gu[:, :100], dn[:, :, :50]), "multiple of 64"),
        ("moe_experts", lambda: op(x, ids.cpu(), w, gu, dn), "expert_ids to be a CUDA tensor"),
        ("moe_experts", lambda: op(x, ids.float(), w, gu, dn), "torch.int32 or torch.int64"),
        ("moe_experts", lambda: op(x, ids, w[:, :1], gu, dn), "expert_weights of the shape"),
        ("moe", lambda: torch.ops.qwen3x.moe(x, torch.randn(T, E + 1, device=dev), gu, dn, 2, True),
         "router_logits"),
        ("moe", lambda: torch.ops.qwen3x.moe(x.float(), torch.randn(T, E, device=dev), gu.float(), dn.float(), 2,
                                             True), "bfloat16 or torch.float16"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_inputs_raise_naming_the_op(index):
    _needs_kernel()
    op, call, message = _bad_calls()[index]
    with pytest.raises(ValueError, match=f"qwen3x.{op}: .*{message}"):
        call()


# ---- training: the experts' backward (grouped GEMMs: qwen3x._backward.moe_experts) ---------------
@pytest.mark.parametrize("T,E,k", [(300, 16, 2), (64, 128, 8)])
def test_backward_through_grouped_gemms(monkeypatch, T, E, k):
    """Gradients w.r.t. hidden states, routing weights and both expert weights (bf16) against the
    fp64 reference's, by the tolerance rule with the reference's own bf16 autograd (HF eager's
    rounding) as the baseline; and the grouped GEMMs must be what ran."""
    _needs_kernel()
    H, I, dtype = 256, 128, torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    gate_up, down = _weights(E, H, I, dtype)
    ids, w = _routing(T, E, k, dtype)
    weight = torch.randn(T, H, device="cuda", dtype=torch.float64)

    def grads(fn, to):
        leaves = [t.detach().to(to).requires_grad_() for t in (x, w, gate_up, down)]
        (fn(leaves[0], ids, leaves[1], leaves[2], leaves[3]).to(weight.dtype) * weight).sum().backward()
        return [leaf.grad for leaf in leaves]

    calls = []
    grouped = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))
    got = grads(torch.ops.qwen3x.moe_experts, dtype)
    monkeypatch.undo()
    assert calls, "the experts' backward should run grouped GEMMs"
    truth = grads(R.moe_experts, torch.float64)
    baseline = grads(R.moe_experts, dtype)
    for g, t, b in zip(got, truth, baseline):
        assert_close_to_truth(g, b, t)
