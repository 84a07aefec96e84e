"""CUDA kernels of moe_gate, moe_router, moe_permute and moe_route against the reference on the same
CUDA inputs. GPU only.

Router logits (moe_gate): against the fp64 truth by the tolerance rule (qwen3x.testing), with torch's
own F.linear in the same dtype as the baseline; every element written (poisoned outputs); bitwise the
same run to run.

Integer outputs (expert ids, counts, sorted rows, offsets, inverse) must match exactly. Router weights:
within 1e-6 relative in fp32 (only the order of the k-term renormalizing sum may differ), and equal
or one ulp apart in bf16/fp16 (the fp32 value is rounded once; a one-ulp fp32 difference can cross
a rounding boundary). Most logits are distinct per row; exact ties (common with bf16 logits) go to
the lower expert index in both the reference and the kernel, tested separately.

Outputs are poisoned: the caching allocator hands them the memory of a NaN-filled block just freed,
so an element a kernel forgets to write shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

from qwen3x.testing import assert_close_to_truth, assert_identical, poison_allocator

from qwen3x import _library, ops
from qwen3x import reference as R

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _needs_kernel(op):
    if not _library.has_cuda_kernel(op):
        pytest.skip(f"no CUDA kernel for {op} in this build")


def _distinct_logits(tokens: int, experts: int, dtype, width: int | None = None) -> torch.Tensor:
    """[tokens, experts] logits, all distinct within a row and exact in every dtype: a random
    permutation of (n - E/2) / 32, n < E (at most 9 significant bits for E <= 512). With `width`,
    a [:, E:2E] slice of a [tokens, width] tensor (row stride width)."""
    perm = torch.argsort(torch.rand(tokens, experts, device="cuda"), dim=-1)
    values = ((perm - experts // 2).float() / 32).to(dtype)
    if width is None:
        return values
    wide = torch.randn(tokens, width, device="cuda").to(dtype)
    wide[:, experts : 2 * experts] = values
    return wide[:, experts : 2 * experts]


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|bits(a) - bits(b)| for 16-bit floats of one sign (routing weights are >= 0)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _assert_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{name}: {got.shape} {got.dtype} != {want.shape} {want.dtype}")
    bad = (got != want).nonzero()
    assert bad.numel() == 0, (
        f"{name}: {bad.shape[0]} mismatches, first at {bad[:5].tolist()}: "
        f"got {got[tuple(bad[:5].T)].tolist()}, want {want[tuple(bad[:5].T)].tolist()}")


def _assert_weights(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        err = (got - want).abs() / want.abs().clamp_min(torch.finfo(torch.float32).tiny)
        worst = err.flatten().topk(min(5, err.numel()))
        assert err.max().item() <= 1e-6, (
            f"weights: relative error {worst.values.tolist()} at flat {worst.indices.tolist()}: "
            f"got {got.flatten()[worst.indices].tolist()}, want {want.flatten()[worst.indices].tolist()}")
    else:
        dist = _ulp_distance(got, want)
        worst = dist.flatten().topk(min(5, dist.numel()))
        assert dist.max().item() <= 1, (
            f"weights: {worst.values.tolist()} ulp at flat {worst.indices.tolist()}: "
            f"got {got.flatten()[worst.indices].tolist()}, want {want.flatten()[worst.indices].tolist()}")


# ---- moe_gate -----------------------------------------------------------------------------------
def _check_gate(hidden, weight):
    """moe_gate on CUDA: the fp64 truth within the tolerance rule of torch's F.linear in the same
    dtype, every logit written (the output's memory NaN-poisoned first), the same bits twice."""
    T, E = hidden.shape[0], weight.shape[0]
    poison_allocator(T * E * hidden.element_size())
    got = ops.moe_gate(hidden, weight)
    assert got.shape == (T, E) and got.dtype == hidden.dtype and got.is_contiguous()
    truth = R.moe_gate(hidden.double(), weight.double())
    assert_close_to_truth(got, R.moe_gate(hidden, weight), truth)
    assert_identical(ops.moe_gate(hidden, weight), got, "a second call")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 12, 16, 17, 64])
@pytest.mark.parametrize("experts,hidden", [(128, 2048), (128, 4096), (8, 256), (5, 272), (60, 1040), (512, 4096)])
def test_gate_matches_truth(dtype, tokens, experts, hidden):
    """Decode sizes run the kernel (bf16/fp16, up to 16 tokens and 96 KB of hidden rows: 12 at
    H 4096), the others torch's linear: both by the same rule. H 1040: 65 chunks a row, slices that
    are not whole passes of 32 lanes (H 272: 17 of a lane's 32); E 60 and 5: a last CTA with one
    expert. (The emulator's CI run takes the sizes up to 300.)"""
    _needs_kernel("moe_gate")
    torch.manual_seed(tokens * hidden + experts)
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    w = (torch.randn(experts, hidden, device="cuda") * hidden**-0.5).to(dtype)
    _check_gate(x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_strided_and_unaligned_inputs(dtype):
    """Rows of a wider tensor (row strides other than H), a transposed weight and a hidden view
    off the 16-byte boundary: read in place where the rows are 16-byte aligned, copied where not."""
    _needs_kernel("moe_gate")
    wide = torch.randn(5, 2048 + 64, device="cuda").to(dtype)
    w_t = (torch.randn(2048, 128, device="cuda") / 45).to(dtype).t()  # [128, 2048], column-major
    _check_gate(wide[:, 64:], w_t)
    flat = torch.randn(3 * 2048 + 1, device="cuda").to(dtype)
    _check_gate(flat[1:].view(3, 2048), (torch.randn(128, 2048, device="cuda") / 45).to(dtype))


def test_gate_no_tokens_no_experts_and_other_dtypes():
    """Sizes and dtypes the kernel does not take run torch's linear, as the reference: no tokens,
    no experts, fp64 (an fp64 model's router), and under autocast the inputs' dtype is kept."""
    _needs_kernel("moe_gate")
    w = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    assert ops.moe_gate(torch.empty(0, 2048, device="cuda", dtype=torch.bfloat16), w).shape == (0, 8)
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    assert ops.moe_gate(x, w[:0]).shape == (3, 0)
    x64, w64 = x.double(), w.double()
    assert_identical(ops.moe_gate(x64, w64), R.moe_gate(x64, w64), "fp64")
    x32, w32 = x.float(), w.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ops.moe_gate(x32, w32)
    assert got.dtype == torch.float32
    assert_identical(got, R.moe_gate(x32, w32), "fp32 under autocast")


BAD_GATE = {
    "weight_shape": (lambda: ops.moe_gate(_cuda(4, 2048, dtype=torch.bfloat16), _cuda(8, 1024, dtype=torch.bfloat16)),
                     "weight \\[experts, 2048\\]"),
    "weight_dtype": (lambda: ops.moe_gate(_cuda(4, 2048, dtype=torch.bfloat16), _cuda(8, 2048)), "same dtype"),
    "hidden_1d": (lambda: ops.moe_gate(_cuda(2048, dtype=torch.bfloat16), _cuda(8, 2048, dtype=torch.bfloat16)),
                  "\\[tokens, hidden\\]"),
    "int": (lambda: ops.moe_gate(_cuda(4, 2048, dtype=torch.int32), _cuda(8, 2048, dtype=torch.int32)),
            "floating tensor, got torch.int32"),
    "weight_on_cpu": (lambda: ops.moe_gate(_cuda(4, 2048, dtype=torch.bfloat16),
                                           torch.zeros(8, 2048, dtype=torch.bfloat16)), "weight to be a CUDA tensor, got cpu"),
}


@pytest.mark.parametrize("case", list(BAD_GATE))
def test_gate_bad_inputs_are_clear_errors(case):
    call, message = BAD_GATE[case]
    _clear_error("moe_gate", call, message)


def _check_router(logits, top_k, norm):
    T, E = logits.shape
    poison_allocator(T * top_k * 8 + E * 4)
    weights, ids, counts = ops.moe_router(logits, top_k, norm)
    ref_w, ref_ids, ref_counts = R.moe_router(logits, top_k, norm)
    _assert_equal("expert_ids", ids, ref_ids)
    _assert_equal("tokens_per_expert", counts, ref_counts)
    _assert_weights(weights, ref_w)
    return weights, ids, counts


# --------------------------------------------------------------------------------------------
# moe_router
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 64, 511, 4096, 16384])
@pytest.mark.parametrize("experts", [8, 64, 128, 512])
@pytest.mark.parametrize("top_k", [1, 2, 8, 16])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_reference(dtype, tokens, experts, top_k, norm):
    _needs_kernel("moe_router")
    if top_k > experts:
        pytest.skip("top_k > experts")
    _check_router(_distinct_logits(tokens, experts, dtype), top_k, norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", [(128, 8), (60, 4), (512, 16), (5, 5)])
def test_router_strided_logits(dtype, experts, top_k):
    _needs_kernel("moe_router")
    logits = _distinct_logits(83, experts, dtype, width=3 * experts + 1)
    assert not logits.is_contiguous()
    _check_router(logits, top_k, True)


def test_router_no_tokens():
    _needs_kernel("moe_router")
    poison_allocator(1 << 16)
    w, ids, counts = ops.moe_router(torch.empty(0, 128, device="cuda", dtype=torch.bfloat16), 8, True)
    assert w.shape == (0, 8) and ids.shape == (0, 8)
    _assert_equal("tokens_per_expert", counts, torch.zeros(128, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("experts", [8, 128, 512])
def test_router_exact_ties_go_to_the_lower_expert(experts):
    _needs_kernel("moe_router")
    T, k = 37, 8
    w, ids, counts = ops.moe_router(torch.zeros(T, experts, device="cuda"), k, False)
    _assert_equal("expert_ids", ids, torch.arange(k, dtype=torch.int32, device="cuda").expand(T, k))
    assert torch.all(w == 1.0 / experts)
    _, ids_norm, _ = ops.moe_router(torch.zeros(T, experts, device="cuda"), k, True)
    _assert_equal("expert_ids", ids_norm, ids)
    want = torch.zeros(experts, dtype=torch.int32, device="cuda")
    want[:k] = T
    _assert_equal("tokens_per_expert", counts, want)


@pytest.mark.parametrize("experts,top_k", [(128, 8), (512, 16)])
def test_router_bf16_logits_with_natural_ties(experts, top_k):
    """Plain bf16 logits (many exact ties among the top k): ids exactly as the reference's
    lower-index-first order."""
    _needs_kernel("moe_router")
    logits = torch.randn(4096, experts, device="cuda").to(torch.bfloat16)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    kth = probs.topk(top_k + 1, -1).values
    assert (kth[:, :-1] == kth[:, 1:]).any(), "the sample should hold ties"
    _check_router(logits, top_k, True)


def test_router_nan_and_inf_logits_still_give_distinct_in_range_experts():
    _needs_kernel("moe_router")
    T, E, k = 5, 128, 8
    logits = torch.randn(T, E, device="cuda")
    logits[0, 3] = float("nan")
    logits[1, :] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :] = float("-inf")
    _, ids, counts = ops.moe_router(logits, k, True)
    torch.cuda.synchronize()
    assert ids.min().item() >= 0 and ids.max().item() < E
    assert all(len(set(row)) == k for row in ids.tolist())
    assert counts.sum().item() == T * k
    _assert_equal("tokens_per_expert", counts, torch.bincount(ids.flatten().long(), minlength=E).int())


# --------------------------------------------------------------------------------------------
# moe_permute
# --------------------------------------------------------------------------------------------
def _ids(pattern: str, tokens: int, top_k: int, experts: int, dtype=torch.int32) -> torch.Tensor:
    if pattern == "random":  # any ids, repeats within a token included
        ids = torch.randint(0, experts, (tokens, top_k), device="cuda")
    elif pattern == "routed":  # distinct experts per token, as a router gives
        ids = torch.argsort(torch.rand(tokens, experts, device="cuda"), dim=-1)[:, :top_k]
    elif pattern == "one_expert":  # every pick on the last expert
        ids = torch.full((tokens, top_k), experts - 1, device="cuda")
    elif pattern == "empty_experts":  # only every third expert, the others get nothing
        ids = torch.randint(0, (experts + 2) // 3, (tokens, top_k), device="cuda") * 3
    else:
        raise KeyError(pattern)
    return ids.to(dtype)


def _check_permute(ids, experts, row_align):
    n = ids.numel()
    poison_allocator(4 * (2 * n + experts * row_align + experts + 1))
    got = ops.moe_permute(ids, experts, row_align)
    want = R.moe_permute(ids, experts, row_align)
    for name, g, w in zip(("sorted_rows", "expert_offsets", "inverse"), got, want):
        _assert_equal(name, g, w)
    return got


# 256 x 8 = 2048 picks is the largest single-launch size; 257 x 8 and up take the two-launch path.
@pytest.mark.parametrize("tokens", [1, 7, 64, 256, 257, 4097, 32768])
@pytest.mark.parametrize("top_k", [1, 8])
@pytest.mark.parametrize("experts", [8, 128, 512])
@pytest.mark.parametrize("row_align", [1, 16, 64])
@pytest.mark.parametrize("pattern", ["random", "routed", "one_expert", "empty_experts"])
def test_permute_matches_reference(tokens, top_k, experts, row_align, pattern):
    _needs_kernel("moe_permute")
    if pattern == "routed" and top_k > experts:
        pytest.skip("top_k > experts")
    _check_permute(_ids(pattern, tokens, top_k, experts), experts, row_align)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens", [3, 4097])
def test_permute_id_dtypes_and_strided_ids(dtype, tokens):
    _needs_kernel("moe_permute")
    ids = _ids("routed", tokens, 8, 128, dtype)
    _check_permute(ids, 128, 16)
    strided = torch.cat([ids, ids], dim=1)[:, 3:11]  # [T, 8] view with row stride 16
    _check_permute(strided, 128, 16)


@pytest.mark.parametrize("row_align", [1, 64])
def test_permute_no_tokens(row_align):
    _needs_kernel("moe_permute")
    _check_permute(torch.empty(0, 8, dtype=torch.int32, device="cuda"), 128, row_align)


@pytest.mark.parametrize("tokens", [5, 3000])
def test_permute_out_of_range_ids_are_ignored_without_faults(tokens):
    # Out-of-range ids are a checked precondition on the reference path only; the kernel must
    # stay in bounds: such a pick gets no slot (inverse -1) and is not counted.
    _needs_kernel("moe_permute")
    E, k, align = 16, 4, 8
    ids = torch.randint(-3, E + 3, (tokens, k), device="cuda", dtype=torch.int64)
    ids[0, 0] = 2**40
    sorted_rows, offsets, inverse = ops.moe_permute(ids, E, align)
    torch.cuda.synchronize()
    flat = ids.flatten()
    valid = (flat >= 0) & (flat < E)
    _assert_equal("inverse == -1", inverse == -1, ~valid)
    # The valid picks alone: exactly the reference on them, with flat indices mapped back.
    picks = valid.nonzero().squeeze(-1)
    ref_rows, ref_offsets, _ = R.moe_permute(flat[picks].view(-1, 1), E, align)
    mapped = torch.where(ref_rows >= 0, picks[ref_rows.clamp_min(0).long()].int(), ref_rows)
    _assert_equal("expert_offsets", offsets, ref_offsets)
    _assert_equal("sorted_rows", sorted_rows[: mapped.numel()], mapped)
    assert torch.all(sorted_rows[mapped.numel() :] == -1)


# --------------------------------------------------------------------------------------------
# Determinism, CUDA graphs, opcheck, errors
# --------------------------------------------------------------------------------------------
def test_repeated_runs_are_bitwise_identical():
    _needs_kernel("moe_router")
    _needs_kernel("moe_permute")
    logits = torch.randn(16384, 128, device="cuda", dtype=torch.bfloat16)
    first = ops.moe_router(logits, 8, True)
    first_perm = ops.moe_permute(first[1], 128, 16)
    skewed = _ids("empty_experts", 32768, 8, 128)
    first_skewed = ops.moe_permute(skewed, 128, 64)
    for _ in range(5):
        for a, b in zip(ops.moe_router(logits, 8, True), first):
            assert_identical(a, b)
        for a, b in zip(ops.moe_permute(first[1], 128, 16), first_perm):
            assert_identical(a, b)
        for a, b in zip(ops.moe_permute(skewed, 128, 64), first_skewed):
            assert_identical(a, b)


# --------------------------------------------------------------------------------------------
# moe_route: the router then the permutation of its ids; one launch up to 64 tokens when
# tokens x top_k <= 512 (router.cuh route_one_launch): 64 x 8 is, 33 x 16 is not
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 33, 64, 65, 300])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (128, 8), (512, 16), (5, 5)])
@pytest.mark.parametrize("row_align", [1, 16, 128])
def test_route_matches_router_then_permute(dtype, tokens, experts, top_k, row_align):
    _needs_kernel("moe_route")
    logits = _distinct_logits(tokens, experts, dtype)
    poison_allocator(tokens * top_k * 16 + experts * (row_align + 8) * 4)
    got = ops.moe_route(logits, top_k, True, row_align)
    want = R.moe_route(logits, top_k, True, row_align)
    _assert_weights(got[0], want[0])
    for name, g, w in zip(("expert_ids", "tokens_per_expert", "sorted_rows", "expert_offsets", "inverse"),
                          got[1:], want[1:]):
        _assert_equal(name, g, w)


@pytest.mark.parametrize("tokens", [1, 16, 64, 80])
def test_route_capture_in_a_cuda_graph(tokens):
    _needs_kernel("moe_route")
    E, k, align = 128, 8, 16
    static_logits = _distinct_logits(tokens, E, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.moe_route(static_logits, k, True, align)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.moe_route(static_logits, k, True, align)
    for _ in range(3):
        static_logits.copy_(_distinct_logits(tokens, E, torch.bfloat16))
        graph.replay()
        for a, b in zip(static_out, R.moe_route(static_logits, k, True, align)):
            if a.is_floating_point():
                _assert_weights(a, b)
            else:
                _assert_equal("route output", a, b)


@pytest.mark.parametrize("tokens", [4, 4096])
def test_router_and_permute_capture_in_a_cuda_graph(tokens):
    _needs_kernel("moe_router")
    _needs_kernel("moe_permute")
    E, k, align = 128, 8, 16
    static_logits = _distinct_logits(tokens, E, torch.bfloat16)

    def step():
        w, ids, counts = ops.moe_router(static_logits, k, True)
        return (w, ids, counts, *ops.moe_permute(ids, E, align))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for _ in range(3):
        static_logits.copy_(_distinct_logits(tokens, E, torch.bfloat16))
        graph.replay()
        eager = step()
        for a, b in zip(static_out, eager):
            assert_identical(a, b)
    ref = R.moe_router(static_logits, k, True)
    _assert_equal("expert_ids", static_out[1], ref[1])
    _assert_equal("tokens_per_expert", static_out[2], ref[2])


def test_opcheck_on_cuda():
    _needs_kernel("moe_router")
    _needs_kernel("moe_permute")
    logits = _distinct_logits(7, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.qwen3x.moe_router.default, (logits, 4, True),
                          test_utils=["test_schema", "test_faketensor"])
    ids = _ids("routed", 7, 4, 64)
    torch.library.opcheck(torch.ops.qwen3x.moe_permute.default, (ids, 64, 16),
                          test_utils=["test_schema", "test_faketensor"])
    if _library.has_cuda_kernel("moe_route"):
        for tokens in (7, 40):  # one launch, and router + permutation
            torch.library.opcheck(torch.ops.qwen3x.moe_route.default,
                                  (_distinct_logits(tokens, 64, torch.bfloat16), 4, True, 16),
                                  test_utils=["test_schema", "test_faketensor"])


def _cuda(*shape, dtype=torch.float32):
    return torch.zeros(*shape, device="cuda", dtype=dtype)


BAD_ROUTER = [
    (lambda: ops.moe_router(_cuda(4, 8, dtype=torch.int32), 2), "dtype"),
    (lambda: ops.moe_router(_cuda(4, 8, dtype=torch.float64), 2), "dtype"),
    (lambda: ops.moe_router(_cuda(8), 2), "\\[tokens, experts\\]"),
    (lambda: ops.moe_router(_cuda(4, 8), 0), "top_k"),
    (lambda: ops.moe_router(_cuda(4, 8), 9), "top_k"),
    (lambda: ops.moe_router(_cuda(4, 64), 17), "top_k"),
    (lambda: ops.moe_router(_cuda(4, 513), 2), "513"),
    (lambda: ops.moe_router(_cuda(8, 4).t(), 2), "contiguous"),
]
BAD_PERMUTE = [
    (lambda: ops.moe_permute(_cuda(4, 2), 8), "dtype"),
    (lambda: ops.moe_permute(_cuda(8, dtype=torch.int32), 8), "\\[tokens, top_k\\]"),
    (lambda: ops.moe_permute(_cuda(4, 2, dtype=torch.int32), 0), "num_experts"),
    (lambda: ops.moe_permute(_cuda(4, 2, dtype=torch.int32), 513), "num_experts"),
    (lambda: ops.moe_permute(_cuda(4, 2, dtype=torch.int32), 8, 0), "row_align"),
]


BAD_ROUTE = [
    (lambda: ops.moe_route(_cuda(4, 8), 2, True, 0), "row_align"),
    (lambda: ops.moe_route(_cuda(4, 8), 9, True, 16), "top_k"),
    (lambda: ops.moe_route(_cuda(4, 8, dtype=torch.int32), 2, True, 16), "dtype"),
    # padding slots past int32: in the one-launch path (4 tokens) and after a multi-block router (40)
    (lambda: ops.moe_route(_cuda(4, 8), 2, True, 2**30), "int32 range"),
    (lambda: ops.moe_route(_cuda(40, 8), 2, True, 2**30), "int32 range"),
]


def _clear_error(op, call, message):
    """call() raises a ValueError naming qwen3x.<op> and matching message; no fault left behind."""
    _needs_kernel(op)
    with pytest.raises(ValueError, match=f"qwen3x\\.{op}: .*{message}"):
        call()
    torch.cuda.synchronize()  # and no asynchronous fault left behind


@pytest.mark.parametrize("call,message", BAD_ROUTER, ids=[f"router-{i}" for i in range(len(BAD_ROUTER))])
def test_bad_router_inputs_are_clear_errors(call, message):
    _clear_error("moe_router", call, message)


@pytest.mark.parametrize("call,message", BAD_PERMUTE, ids=[f"permute-{i}" for i in range(len(BAD_PERMUTE))])
def test_bad_permute_inputs_are_clear_errors(call, message):
    _clear_error("moe_permute", call, message)


@pytest.mark.parametrize("call,message", BAD_ROUTE, ids=[f"route-{i}" for i in range(len(BAD_ROUTE))])
def test_bad_route_inputs_are_clear_errors(call, message):
    _clear_error("moe_route", call, message)
