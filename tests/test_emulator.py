"""The CUDA kernels' own source, run on the CPU (tests/emulator), judged like the GPU tests.

tests/emulator compiles csrc/'s kernel headers and host launchers with the host compiler
(AddressSanitizer on) against a small CUDA execution model: one fiber per CUDA thread, warp
collectives and wgmma executed from every lane's operands as the PTX ISA defines them. Unlike
tests/kernel_models (restatements of the kernels), nothing here is re-written: a bug in a kernel's
index arithmetic, pipeline or launcher is a bug here too. Each case runs twice:
  - async copies and wgmma at issue, threads scheduled in order, the dynamic shared memory at a
    1024-byte boundary;
  - async copies and wgmma at the wait the kernel relies on, threads scheduled in reverse, the
    dynamic shared memory off the 1024-byte boundary (the kernels align their wgmma tiles);
and the two must agree bitwise (a difference is a race or a missing wait), both must be free of
shared-memory bank conflicts (and of breaks of wgmma's fence rules: the emulator's errors), then
the first is judged by the GPU tests' own rule (test_attention_gpu._judge, test_moe_experts_gpu._judge).
Not covered: what the compiler and the hardware add (registers, timing, the real expf and
rsqrtf): that is the GPU tests' job.
"""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from kernel_models import attention as attention_model
from qwen3x.testing import assert_identical

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")

D = 128
RUNS = [dict(async_mode="early", order="forward", dyn_smem_offset=1024),
        dict(async_mode="late", order="reverse", dyn_smem_offset=1024 + 384)]


def _emu():
    from emulator import run as emu_run  # builds on first use (~20 s)
    return emu_run


def _run_all(op, params, inputs, outputs, **kw):
    """Runs the job under each of RUNS (kw: more of run()'s options); all must agree bitwise, and
    every run's shared-memory accesses must be free of bank conflicts; returns the first's outputs."""
    first, *others = (_emu().run(op, params, inputs, outputs, **r, **kw) for r in RUNS)
    for other in others:
        for name in outputs:
            assert_identical(other[name], first[name], f"{name}: early/in-order vs late/reversed runs")
    for r in (first, *others):
        _assert_conflict_free(op, r["banks"])
    return first


def _assert_conflict_free(op, banks):
    """Every ldmatrix and cp.async of the run in the fewest shared-memory wavefronts (emu.h
    count_banks: 8 lanes a phase, one wavefront when they hit 8 distinct 16-byte bank groups):
    the tiles' xor swizzles exist for this, and nothing else checks it without a profiler."""
    for what, b in banks.items():
        assert b["wavefronts"] == b["ideal"], (
            f"{op}: shared-memory bank conflicts in {what}: {b['wavefronts']} wavefronts for "
            f"{b['requests']} warp requests (conflict-free: {b['ideal']})")
        assert b["unpaired"] == 0, f"{op}: {b['unpaired']} {what} issues no full warp matched"


# ---- attention ---------------------------------------------------------------------------------
def _strides(prefix, t, dims):
    return {f"{prefix}_{name}_stride": t.stride(d) for name, d in dims.items()}


def _attention(q, k, v, *, causal, mainloop, mask=None, key_lengths=None, force_splits=None, replays=1,
               cluster_combine=False, overlap=False):
    """q [B, Hq, Sq, D] (any strides), k/v [B, Hkv, Skv, D]: (out [B, Sq, Hq, D], lse).
    cluster_combine: QWEN3X_ATTENTION_COMBINE=cluster (the splits merged inside a cluster);
    overlap: QWEN3X_ATTENTION_OVERLAP=1 (the wgmma loop with each softmax beside a P V)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    dtype = "bf16" if q.dtype == torch.bfloat16 else "fp16"
    params = dict(dtype=dtype, batch=B, hq=Hq, hkv=Hkv, seqlen_q=Sq, seqlen_k=Skv, total_q=B * Sq,
                  causal=causal, scale=D**-0.5, mainloop=mainloop)
    dims = {"batch": 0, "head": 1, "seq": 2}
    params |= _strides("q", q, dims) | _strides("k", k, dims) | _strides("v", v, dims)
    inputs = dict(q=q, k=k, v=v)
    if mask is not None:  # [B|1, 1|Hq, Sq, Skv] bool, broadcast dims stride 0 (attention.cu)
        m = mask.to(torch.uint8).contiguous()
        params |= {f"mask_{n}_stride": (m.stride(d) if m.shape[d] > 1 else 0)
                   for n, d in (("batch", 0), ("head", 1), ("q", 2))}
        inputs["mask"] = m
    if key_lengths is not None:
        params |= dict(key_lengths_stride=0 if key_lengths.numel() == 1 else 1,
                       key_lengths_int64=key_lengths.dtype == torch.int64)
        inputs["key_lengths"] = key_lengths
    if force_splits:
        params["force_splits"] = force_splits
    if replays > 1:
        params["replays"] = replays
    if cluster_combine:
        params["cluster_combine"] = 1
    if overlap:
        params["overlap"] = 1
    r = _run_all("attention", params, inputs,
                 {"out": (q.dtype, (B, Sq, Hq, D)), "lse": (torch.float32, (B, Hq, Sq))})
    return r["out"], r["lse"], r["stdout"]


def _qkv(B, Hq, Hkv, Sq, Skv, dtype=torch.bfloat16, q_layout="bhsd"):
    if q_layout == "bshd":  # a transposed view of a [B, S, H, D] projection output, as HF passes q
        q = torch.randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    return q, torch.randn(B, Hkv, Skv, D, dtype=dtype), torch.randn(B, Hkv, Skv, D, dtype=dtype)


def _gpu_judge():
    import test_attention_gpu
    return test_attention_gpu


# (B, Hq, Hkv, Sq, Skv, causal, dtype, mainloop, q_layout, splits): tiles of 64 packed rows
# (query x group) and 64 keys, so lengths around and between the tile edges
ATTENTION_CASES = [
    (1, 4, 2, 200, 200, True, torch.bfloat16, "mma_sync", "bhsd", None),
    (1, 4, 2, 200, 200, True, torch.bfloat16, "wgmma", "bhsd", None),
    (2, 2, 1, 70, 130, False, torch.float16, "wgmma", "bshd", None),
    (1, 2, 2, 90, 40, True, torch.bfloat16, "wgmma", "bhsd", None),  # more queries than keys
    (2, 8, 1, 1, 700, True, torch.bfloat16, "mma_sync", "bhsd", 3),  # decode: GQA rows, split-KV
    (1, 4, 1, 3, 129, True, torch.float16, "mma_sync", "bshd", 2),
    (1, 2, 1, 3, 0, False, torch.bfloat16, "mma_sync", "bhsd", None),  # no keys
    (1, 16, 8, 1, 3000, True, torch.bfloat16, "mma_sync", "bhsd", None),  # decode: the glue's split plan
    (1, 10, 2, 77, 150, True, torch.bfloat16, "wgmma", "bshd", None),  # a group of 5 (Qwen3-14B's 40/8)
    (2, 40, 8, 1, 300, True, torch.float16, "mma_sync", "bhsd", 3),  # Qwen3-14B decode, split-KV
    (1, 10, 2, 3, 200, True, torch.float16, "mma_sync", "bhsd", 2),  # 15 rows: split keys, causal per row
    (1, 8, 1, 1, 2988, True, torch.bfloat16, "mma_sync", "bhsd", 47),  # 47 splits: the combine's
    # weights from lanes' second lse slot, O loads in batches of 16 with a ragged last one
    (1, 8, 2, 1, 8150, False, torch.float16, "mma_sync", "bhsd", 128),  # kMaxSplits: every lse slot
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_attention(case):
    B, Hq, Hkv, Sq, Skv, causal, dtype, mainloop, layout, splits = case
    torch.manual_seed(Sq * 1000 + Skv)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, dtype, layout)
    out, lse, log = _attention(q, k, v, causal=causal, mainloop=mainloop, force_splits=splits)
    if splits:
        assert f"splits {splits} " in log, log
    else:  # the glue's plan (heuristics.cuh) is the kernel model's, for the emulated device
        group = Hq // Hkv
        ctas = max(max(-(-Sq * group // 64), 1) * B * Hkv, -(-B * Sq * Hq // 64))
        sms, ctas_per_sm = map(int, re.search(r"planned for sms (\d+) ctas_per_sm (\d+)", log).groups())
        want, per_split = attention_model.plan_splits(ctas, Skv, Sq * group, sms, ctas_per_sm)
        assert f"splits {want} tiles_per_split {per_split}" in log, log
    _gpu_judge()._judge(out, lse, q, k, v, None, D**-0.5, causal)


# (B, Hq, Hkv, Sq, Skv, causal, dtype, splits, cluster): full row tiles (the Hopper loops), key
# counts of 1 to 7 tiles with ragged ends, key splits merged through L2 and inside a cluster
OVERLAP_CASES = [
    (1, 4, 2, 200, 200, True, torch.bfloat16, None, False),  # 4 key tiles, causal diagonal
    (2, 2, 1, 70, 130, False, torch.float16, None, False),   # 3 tiles, the last with 2 keys
    (1, 2, 2, 64, 64, True, torch.bfloat16, None, False),    # one tile: no overlapped iteration
    (1, 2, 2, 90, 40, True, torch.bfloat16, None, False),    # more queries than keys
    (1, 2, 1, 64, 0, False, torch.bfloat16, None, False),    # no keys: no tile at all
    (1, 4, 2, 40, 450, True, torch.bfloat16, 3, False),      # split keys: 3 + 3 + 2 tiles (V stage
    (1, 4, 2, 40, 450, True, torch.bfloat16, 3, True),       # indices past a split's start), L2 / cluster
]


@pytest.mark.parametrize("case", OVERLAP_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_attention_overlap_loop(case):
    """The overlapped Hopper loop (QWEN3X_ATTENTION_OVERLAP=1, attention_fwd.cuh kOverlap): tile
    t's softmax beside tile t - 1's P V, whose wait comes an iteration later. Bitwise the serial
    wgmma loop's answer (the same operations on o in the same order), under every RUNS order
    (wgmma and copies at issue or at their waits: a P V whose registers or V stage were reused
    before its wait gives another answer), and judged."""
    B, Hq, Hkv, Sq, Skv, causal, dtype, splits, cluster = case
    torch.manual_seed(Sq * 1000 + Skv)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, dtype, "bshd")
    runs = [_attention(q, k, v, causal=causal, mainloop="wgmma", force_splits=splits,
                       cluster_combine=cluster, overlap=overlap) for overlap in (False, True)]
    (serial_out, serial_lse, _), (out, lse, log) = runs
    if splits:
        assert f"splits {splits} " in log, log
    assert_identical(out, serial_out)
    assert_identical(lse, serial_lse)
    _gpu_judge()._judge(out, lse, q, k, v, None, D**-0.5, causal)


def test_attention_overlap_loop_mask_and_key_lengths():
    """The overlapped loop with a padding mask and per-sequence key lengths (masked tiles on
    every iteration, a sequence whose first rows see no key): bitwise the serial loop."""
    B, Hq, Hkv, Sq, Skv = 2, 4, 1, 40, 300
    torch.manual_seed(9)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv)
    mask = torch.rand(B, Hq, Sq, Skv) > 0.3
    mask[1, :, :5] = False
    lengths = torch.tensor([300, 197], dtype=torch.int64)
    serial, overlapped = (_attention(q, k, v, causal=True, mainloop="wgmma", mask=mask, key_lengths=lengths,
                                     overlap=overlap) for overlap in (False, True))
    assert_identical(overlapped[0], serial[0])
    assert_identical(overlapped[1], serial[1])


def test_attention_more_splits_than_the_combine_holds_is_refused():
    """launch_attention refuses num_splits > kMaxSplits (128: the lse values a combining warp
    holds) rather than merge the first 128 and drop the rest: 130 forced splits."""
    from emulator.run import EmulatorError

    q, k, v = _qkv(1, 8, 1, 1, 130 * 64, torch.bfloat16, "bhsd")
    with pytest.raises(EmulatorError, match="launch_attention: invalid argument"):
        _attention(q, k, v, causal=True, mainloop="mma_sync", force_splits=130)


def test_attention_split_kv_replays():
    """Split-KV's combine is fused: the CTA that sees every split's arrival mark merges the tile
    (combine.cuh). A CUDA graph replays a launch with its workspace and mark: the combiner must
    leave the marks reset, else a replay's first CTA finds them complete and merges partials no
    split has written yet (the runner poisons them between launches). Under both CTA orders."""
    torch.manual_seed(7)
    q, k, v = _qkv(2, 8, 2, 1, 700)
    out, lse, log = _attention(q, k, v, causal=True, mainloop="mma_sync", force_splits=4, replays=3)
    assert "splits 4 " in log, log
    assert log.count("split marks left set 0\n") == 3, log  # every launch's combiners reset them
    _gpu_judge()._judge(out, lse, q, k, v, None, D**-0.5, True)


@pytest.mark.parametrize("mainloop", ["mma_sync", "wgmma"])
def test_attention_mask_and_key_lengths(mainloop):
    """A padding mask per batch and head, and per-sequence key lengths (a static cache's filled
    part); one sequence sees no key at all in its first rows."""
    B, Hq, Hkv, Sq, Skv = 2, 4, 1, 40, 150
    torch.manual_seed(7)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv)
    mask = torch.rand(B, Hq, Sq, Skv) > 0.3
    mask[1, :, :5] = False
    lengths = torch.tensor([150, 97], dtype=torch.int64)
    out, lse, _ = _attention(q, k, v, causal=True, mainloop=mainloop, mask=mask, key_lengths=lengths)
    seen = mask & (torch.arange(Skv) < lengths.view(B, 1, 1, 1))
    # the reference sees the same keys through the mask (bottom-right causality on Skv_b keys)
    full = torch.zeros(B, Hq, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        causal_b = torch.ones(Sq, n, dtype=torch.bool).tril(n - Sq)
        full[b, :, :, :n] = seen[b, :, :, :n] & causal_b
    _gpu_judge()._judge(out, lse, q, k, v, full, D**-0.5, False)


def test_attention_decode_split_keys():
    """Decode (rows <= 16: every warp on warp 0's rows, a quarter of each tile's keys, the states
    merged after the last tile) with splits of 4 tiles and key ends inside a warp's quarter:
    key_lengths 389 (tile 6, warp 0's keys 384-399) and 421 (warp 2's keys 416-431), so the
    last split of sequence 0 sees no key."""
    B, Hq, Hkv, Sq, Skv = 2, 8, 2, 1, 700
    torch.manual_seed(11)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv)
    lengths = torch.tensor([389, 421], dtype=torch.int32)
    out, lse, log = _attention(q, k, v, causal=True, mainloop="mma_sync", key_lengths=lengths, force_splits=3)
    assert "splits 3 tiles_per_split 4" in log, log
    full = torch.zeros(B, Hq, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        full[b, :, :, :int(lengths[b])] = True  # one query: causal = all of its keys
    _gpu_judge()._judge(out, lse, q, k, v, full, D**-0.5, False)


def test_attention_varlen():
    """Packed sequences (one empty, lengths across tile edges), q a view of a fused projection,
    tokens before and after every sequence; the Hopper mainloop (max_seqlen_q x group >= 64)."""
    lq, Hq, Hkv = [17, 1, 70, 0], 4, 2
    q_start, q_tail = 2, 3
    torch.manual_seed(11)
    Tq, Tk = q_start + sum(lq) + q_tail, sum(lq)
    qkv = torch.randn(Tq, (Hq + 2 * Hkv) * D, dtype=torch.bfloat16)
    q = qkv[:, : Hq * D].view(Tq, Hq, D)
    k = torch.randn(Tk, Hkv, D, dtype=torch.bfloat16)
    v = torch.randn(Tk, Hkv, D, dtype=torch.bfloat16)
    cu_q = torch.tensor([q_start, *(q_start + torch.tensor(lq).cumsum(0)).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    for mainloop in ("mma_sync", "wgmma"):
        params = dict(dtype="bf16", varlen=1, batch=len(lq), hq=Hq, hkv=Hkv, seqlen_q=max(lq),
                      seqlen_k=max(lq), total_q=Tq, total_k=Tk, causal=True, scale=D**-0.5,
                      mainloop=mainloop, q_head_stride=q.stride(1), q_seq_stride=q.stride(0),
                      k_head_stride=k.stride(1), k_seq_stride=k.stride(0),
                      v_head_stride=v.stride(1), v_seq_stride=v.stride(0))
        r = _run_all("attention", params, dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                     {"out": (torch.bfloat16, (Tq, Hq, D)), "lse": (torch.float32, (Hq, Tq))})
        _gpu_judge()._judge_varlen(r["out"], r["lse"], q, k, v, cu_q, cu_k, True)


@pytest.mark.parametrize("cluster", [False, True], ids=["l2", "cluster"])
def test_attention_varlen_decode_splits(cluster):
    """Decode-shaped varlen (a query or two per sequence against packed caches), split-KV, the
    splits merged through L2 or in a cluster (the same bits)."""
    lq, lk, Hq, Hkv = [1, 1, 2], [300, 5, 129], 8, 2
    torch.manual_seed(12)
    q = torch.randn(sum(lq), Hq, D, dtype=torch.float16)
    k = torch.randn(sum(lk), Hkv, D, dtype=torch.float16)
    v = torch.randn(sum(lk), Hkv, D, dtype=torch.float16)
    cu = lambda n: torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    params = dict(dtype="fp16", varlen=1, batch=3, hq=Hq, hkv=Hkv, seqlen_q=2, seqlen_k=300,
                  total_q=sum(lq), total_k=sum(lk), causal=True, scale=D**-0.5, mainloop="mma_sync",
                  force_splits=3, q_head_stride=q.stride(1), q_seq_stride=q.stride(0),
                  k_head_stride=k.stride(1), k_seq_stride=k.stride(0),
                  v_head_stride=v.stride(1), v_seq_stride=v.stride(0))
    run = lambda **more: _run_all("attention", params | more,  # noqa: E731
                                  dict(q=q, k=k, v=v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk)),
                                  {"out": (torch.float16, (sum(lq), Hq, D)), "lse": (torch.float32, (Hq, sum(lq)))})
    r = run(cluster_combine=int(cluster))
    assert "splits 3 " in r["stdout"] and f"cluster_combine {int(cluster)}" in r["stdout"], r["stdout"]
    _gpu_judge()._judge_varlen(r["out"], r["lse"], q, k, v, cu(lq), cu(lk), True)
    if cluster:
        l2 = run()
        assert_identical(r["out"], l2["out"], "out: cluster vs L2 combine")
        assert_identical(r["lse"], l2["lse"], "lse: cluster vs L2 combine")


# (B, Hq, Hkv, Sq, Skv, causal, dtype, mainloop, forced splits or None, key_lengths or None)
CLUSTER_CASES = [
    (1, 32, 8, 1, 1024, False, torch.bfloat16, "mma_sync", None, None),  # Qwen3-4B decode, 1k keys: the
    # plan's own 16 splits (a cluster of 16: the non-portable size)
    (2, 8, 2, 1, 700, True, torch.float16, "mma_sync", 4, [389, 421]),  # split keys; an empty last split
    (1, 4, 2, 200, 300, True, torch.bfloat16, "wgmma", 3, None),  # full row tiles: 64 rows a CTA
    (1, 10, 2, 3, 200, True, torch.bfloat16, "mma_sync", 2, None),  # 15 rows, causal per row
]


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=lambda c: "-".join(map(str, c[:9])).replace("torch.", ""))
def test_attention_cluster_combine(case):
    """QWEN3X_ATTENTION_COMBINE=cluster: a tile's splits are one thread block cluster and merge
    through each other's shared memory (combine_in_cluster) with the L2 combine's arithmetic in
    its order: bitwise the L2 path's answer, and judged like it. The emulator runs a cluster's CTAs
    side by side (barrier.cluster, mapa, ld.shared::cluster), in both thread orders."""
    B, Hq, Hkv, Sq, Skv, causal, dtype, mainloop, splits, lengths = case
    torch.manual_seed(Skv + Hq)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, dtype)
    key_lengths = torch.tensor(lengths, dtype=torch.int32) if lengths else None
    kw = dict(causal=causal, mainloop=mainloop, key_lengths=key_lengths)
    out, lse, log = _attention(q, k, v, cluster_combine=True, force_splits=splits, **kw)
    assert "cluster_combine 1" in log, log
    want = splits or 16
    assert f"splits {want} " in log, log
    ref_out, ref_lse, ref_log = _attention(q, k, v, force_splits=want, **kw)
    assert "cluster_combine 0" in ref_log, ref_log
    assert_identical(out, ref_out, "out: cluster vs L2 combine")
    assert_identical(lse, ref_lse, "lse: cluster vs L2 combine")
    full = None
    if lengths:
        full = torch.zeros(B, Hq, Sq, Skv, dtype=torch.bool)
        for b in range(B):
            full[b, :, :, :lengths[b]] = True
        causal = False
    _gpu_judge()._judge(out, lse, q, k, v, full, D**-0.5, causal)


def test_attention_cluster_combine_limits():
    """The cluster path plans at most 16 splits (kMaxClusterSize): 8k keys at batch 1 would take
    64 on the L2 path; and launch_attention refuses a cluster of 17 (a forced plan) rather than
    launch what the hardware would refuse."""
    from emulator.run import EmulatorError

    torch.manual_seed(3)
    q, k, v = _qkv(1, 8, 1, 1, 8192)
    out, lse, log = _attention(q, k, v, causal=False, mainloop="mma_sync", cluster_combine=True)
    assert "splits 16 tiles_per_split 8" in log and "cluster_combine 1" in log, log
    _gpu_judge()._judge(out, lse, q, k, v, None, D**-0.5, False)
    q, k, v = _qkv(1, 8, 1, 1, 17 * 64)
    with pytest.raises(EmulatorError, match="launch_attention: invalid argument"):
        _attention(q, k, v, causal=False, mainloop="mma_sync", cluster_combine=True, force_splits=17)


# ---- MoE experts ---------------------------------------------------------------------------------
def _experts(x, ids, w, gate_up, down, mainloop="mma_sync", combine="glue"):
    """combine: "glue" (moe.cu's choice: GEMM2's epilogue at decode sizes, prepared by the
    permutation's launch), "kernel" (the combine kernel), "router" (GEMM2's epilogue with counters
    zeroed, as the moe op's router launch leaves them)."""
    T, H = x.shape
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    k = ids.shape[1]
    dtype = "bf16" if x.dtype == torch.bfloat16 else "fp16"
    params = dict(dtype=dtype, tokens=T, hidden=H, experts=E, inter=I, top_k=k,
                  hidden_stride=x.stride(0), mainloop=mainloop, combine=combine)
    return _run_all("experts", params,
                    dict(hidden=x, expert_ids=ids.to(torch.int32).contiguous(), gate_up=gate_up, down=down,
                         route=w.to(x.dtype).contiguous()),
                    {"out": (x.dtype, (T, H)), "expert_offsets": (torch.int32, (E + 1,)),
                     "inverse": (torch.int32, (T * k,))})


def _moe_inputs(T, E, k, H, I, dtype, seed, experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    pool = torch.tensor(experts) if experts is not None else torch.arange(E)
    ids = pool[torch.argsort(torch.rand(T, len(pool), generator=g), dim=-1)[:, :k]].to(torch.int32)
    w = torch.rand(T, k, generator=g) + 0.1
    return x, ids, (w / w.sum(-1, keepdim=True)).to(dtype), gate_up, down


# (T, E, k, H, I, dtype, mainloop, experts used): regimes by mean rows per expert (T k / E):
# decode <= 16, mid <= 64, prefill above
EXPERT_CASES = [
    (3, 8, 2, 128, 64, torch.bfloat16, "mma_sync", None),        # decode
    (1, 128, 8, 256, 128, torch.bfloat16, "mma_sync", None),     # decode, batch 1, 30B-A3B routing
    (300, 128, 8, 128, 64, torch.bfloat16, "mma_sync", None),    # mid; 2400 picks: tiled permutation
    (64, 4, 2, 256, 128, torch.float16, "mma_sync", [0, 2, 3]),  # mid, an expert with no token
    (200, 2, 1, 256, 128, torch.bfloat16, "mma_sync", None),     # prefill
    (200, 2, 1, 256, 128, torch.bfloat16, "wgmma", None),
    (150, 4, 2, 128, 64, torch.float16, "wgmma", [1, 3]),        # two experts take everything
]
_WGMMA_EXPERTS = next(c for c in EXPERT_CASES if c[6] == "wgmma")  # the prefill regime, wgmma


@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "-".join(map(str, c[:7])).replace("torch.", ""))
def test_moe_experts(case):
    T, E, k, H, I, dtype, mainloop, used = case
    x, ids, w, gate_up, down = _moe_inputs(T, E, k, H, I, dtype, seed=T + E, experts=used)
    r = _experts(x, ids, w, gate_up, down, mainloop)
    # the permutation (exact): per-expert segments padded to the regime's row tile
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    offsets = r["expert_offsets"].long()
    assert offsets[0] == 0 and bool((offsets[1:] - offsets[:-1] >= counts).all()), offsets
    inverse = r["inverse"].long().view(T, k)
    for e in range(E):  # picks of e in token order, at the start of e's segment
        picks = (ids.long() == e).nonzero()
        slots = inverse[picks[:, 0], picks[:, 1]]
        assert_identical(slots, offsets[e] + torch.arange(len(picks)), f"slots of expert {e}")
    import test_moe_experts_gpu
    test_moe_experts_gpu._judge(r["out"], x, ids, w, gate_up, down)


# (T, E, k, H, I, dtype): the combine in GEMM2's epilogue (the moe op at decode), every pick routed
FUSED_COMBINE_CASES = [
    (1, 128, 8, 256, 128, torch.bfloat16),   # batch 1, 30B-A3B routing
    (5, 8, 2, 128, 64, torch.float16),       # tokens sharing experts: several rows per tile
    (16, 16, 16, 128, 64, torch.bfloat16),   # k = E: every token in every expert's tile
]


@pytest.mark.parametrize("case", FUSED_COMBINE_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_moe_experts_fused_combine_is_the_combine_kernel(case):
    """The last CTA to finish a token's column tile sums its k rows in pick order: the combine
    kernel's output bitwise, under both CTA orders of RUNS, with the counters as the moe op's
    router launch leaves them and as moe_experts' own permutation launch prepares them."""
    T, E, k, H, I, dtype = case
    x, ids, w, gate_up, down = _moe_inputs(T, E, k, H, I, dtype, seed=7 * T + k)
    kernel = _experts(x, ids, w, gate_up, down, combine="kernel")
    assert "combine kernel" in kernel["stdout"]
    for how in ("router", "glue"):
        fused = _experts(x, ids, w, gate_up, down, combine=how)
        assert "combine gemm2" in fused["stdout"], how
        assert_identical(fused["out"], kernel["out"], f"fused combine ({how})")


def test_moe_experts_decode_drops_picks_in_the_fused_combine():
    """moe_experts at decode with expert ids outside [0, E) (the CUDA path drops such picks): the
    permutation's launch starts each counter at its token's dropped picks and zeroes the row of
    a token with none left (the output is poisoned first); bitwise the combine kernel's answer."""
    T, E, k, H, I, dtype = 5, 8, 2, 128, 64, torch.float16
    x, ids, w, gate_up, down = _moe_inputs(T, E, k, H, I, dtype, seed=11)
    ids[0, 1] = -1
    ids[3, 0] = E
    ids[2] = E + 100  # no pick left
    glue = _experts(x, ids, w, gate_up, down)
    assert "combine gemm2" in glue["stdout"]
    assert_identical(glue["out"], _experts(x, ids, w, gate_up, down, combine="kernel")["out"], "dropped picks")
    assert_identical(glue["out"][2], torch.zeros(H, dtype=dtype), "the token with no pick")


def test_moe_experts_strided_hidden():
    """hidden_states as a row-strided view (every row 16-byte aligned), as the glue passes it."""
    T, E, k, H, I = 40, 4, 2, 128, 64
    x, ids, w, gate_up, down = _moe_inputs(T, E, k, H, I, torch.bfloat16, seed=5)
    wide = torch.zeros(T, H + 64, dtype=torch.bfloat16)
    wide[:, :H] = x
    r = _experts(wide[:, :H], ids, w, gate_up, down)
    import test_moe_experts_gpu
    test_moe_experts_gpu._judge(r["out"], x, ids, w, gate_up, down)




# ---- other GPUs ---------------------------------------------------------------------------------
# A build for the GPU it sees (setup.py) runs the mma.sync mainloops on Ampere and Ada: their
# launches must fit those devices' limits (an RTX 4090 opts in to 99 KB of shared memory per CTA,
# not 227 KB; 1536 threads per SM) and the split-KV plan follows their SM counts.
OTHER_GPU_CASES = {
    "attention prefill": lambda: test_attention(ATTENTION_CASES[0]),
    "attention decode, the glue's split plan": lambda: test_attention(ATTENTION_CASES[7]),
    "experts prefill": lambda: test_moe_experts(EXPERT_CASES[4]),
    "experts mid": lambda: test_moe_experts(EXPERT_CASES[3]),
    "experts decode": lambda: test_moe_experts(EXPERT_CASES[0]),
}


@pytest.mark.parametrize("device", ["a100", "rtx4090"])
@pytest.mark.parametrize("case", list(OTHER_GPU_CASES))
def test_other_gpus(case, device, monkeypatch):
    assert all(c[7] == "mma_sync" for c in ATTENTION_CASES[:1] + ATTENTION_CASES[7:8])
    monkeypatch.setattr(sys.modules[__name__], "RUNS", [dict(r, device=device) for r in RUNS])
    OTHER_GPU_CASES[case]()


def test_a_launch_past_the_device_limit_is_refused(monkeypatch):
    """The check above can fail: the expert GEMM's prefill tiles (96 KB of shared memory) on a
    device that allows 64 KB."""
    from emulator.run import DEVICES, EmulatorError

    monkeypatch.setitem(DEVICES, "small", dict(DEVICES["rtx4090"], EMU_SMEM_OPTIN=64 * 1024))
    monkeypatch.setattr(sys.modules[__name__], "RUNS", [dict(RUNS[0], device="small")])
    with pytest.raises(EmulatorError, match="launch_moe_experts"):
        test_moe_experts(EXPERT_CASES[4])


# ---- the memory-bound kernels and the router -----------------------------------------------------
def _dt(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _kernels_judge():
    import test_kernels_gpu
    return test_kernels_gpu._judge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,hidden,stride,residual", [
    (7, 1024, 1024, False), (3, 2560, 2560 + 8, True),  # vectorized kernel, strided rows
    (5, 200, 203, True),                                 # scalar kernel (H not a multiple of 8)
    (2, 8192, 8192, False),
])
def test_rms_norm(dtype, rows, hidden, stride, residual):
    torch.manual_seed(rows + hidden)
    x = torch.randn(rows, stride, dtype=dtype)[:, :hidden]
    w = 1 + 0.1 * torch.randn(hidden, dtype=dtype)
    params = dict(dtype=_dt(dtype), rows=rows, hidden=hidden, input_stride=stride, eps=1e-6)
    inputs = dict(input=x, weight=w)
    outputs = {"out": (dtype, (rows, hidden))}
    if residual:
        res = torch.randn(rows, hidden, dtype=dtype)
        params["residual_stride"] = hidden
        inputs["residual"] = res
        outputs["residual_out"] = (dtype, (rows, hidden))
    r = _run_all("rms_norm", params, inputs, outputs)
    if residual:
        from qwen3x import reference as R
        _kernels_judge()(r["out"], (x, res, w, 1e-6), lambda *a: R.add_rms_norm(*a)[0])
        _kernels_judge()(r["residual_out"], (x, res, w, 1e-6), lambda *a: R.add_rms_norm(*a)[1])
    else:
        from qwen3x import reference as R
        _kernels_judge()(r["out"], (x, w, 1e-6), R.rms_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,inter,stride", [(3, 768, 1536), (2, 100, 204)])  # vec; scalar
def test_silu_and_mul(dtype, rows, inter, stride):
    from qwen3x import reference as R
    torch.manual_seed(inter)
    x = (torch.randn(rows, stride, dtype=dtype) * 3)[:, : 2 * inter]
    r = _run_all("silu_and_mul", dict(dtype=_dt(dtype), rows=rows, inter=inter, input_stride=stride),
                 dict(input=x), {"out": (dtype, (rows, inter))})
    _kernels_judge()(r["out"], (x,), R.silu_and_mul)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,experts,top_k,norm,sms", [
    (5, 128, 8, True, None), (3, 512, 16, False, None), (9, 5, 5, True, None),
    (40, 128, 8, False, None),  # one block: warps 0-7 route 3 tokens side by side, 8-15 two
    # one SM: a grid of 2 blocks (32 warps) past the one-block limit, so a warp routes 4 tokens
    # side by side and then a pass whose later tokens are dummies; the large footprint 1 by 1
    (150, 128, 8, True, 1), (70, 512, 16, False, 1)])
def test_moe_router(dtype, tokens, experts, top_k, norm, sms):
    """Distinct logits, exact in every dtype (as test_moe_gpu's): ids and counts exact."""
    from qwen3x import reference as R
    import test_moe_gpu
    g = torch.Generator().manual_seed(tokens * experts)
    perm = torch.argsort(torch.rand(tokens, experts, generator=g), dim=-1)
    wide = torch.randn(tokens, 2 * experts + 3, generator=g).to(dtype)
    wide[:, experts : 2 * experts] = ((perm - experts // 2).float() / 32).to(dtype)
    logits = wide[:, experts : 2 * experts]
    r = _run_all("router", dict(dtype=_dt(dtype), tokens=tokens, experts=experts, top_k=top_k,
                                norm_topk_prob=norm, logits_stride=logits.stride(0)),
                 dict(logits=logits), {"weights": (dtype, (tokens, top_k)),
                                       "expert_ids": (torch.int32, (tokens, top_k)),
                                       "counts": (torch.int32, (experts,))}, sms=sms)
    ref_w, ref_ids, ref_counts = R.moe_router(logits, top_k, norm)
    test_moe_gpu._assert_equal("expert_ids", r["expert_ids"], ref_ids)
    test_moe_gpu._assert_equal("tokens_per_expert", r["counts"], ref_counts)
    test_moe_gpu._assert_weights(r["weights"], ref_w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts,hidden,stride", [
    (1, 8, 256, 256),        # one token, four CTAs
    (5, 5, 272, 280),        # a last CTA with one expert; 17 chunks a slice; strided rows
    (12, 4, 4096, 4096),     # every weight register (8 chunks a lane), 96 KB of hidden rows
    (16, 3, 3072, 3072),     # every token accumulator, 96 KB of hidden rows
])
def test_moe_gate(dtype, tokens, experts, hidden, stride):
    """The router GEMM at decode sizes against the fp64 truth (F.linear in the same dtype the
    baseline), under both CTA orders and copy timings, without bank conflicts."""
    from qwen3x import reference as R
    from qwen3x.testing import assert_close_to_truth
    g = torch.Generator().manual_seed(tokens * hidden + experts)
    wide = torch.randn(tokens, stride, generator=g).to(dtype)
    x = wide[:, :hidden]
    w = (torch.randn(experts, hidden, generator=g) * hidden**-0.5).to(dtype)
    r = _run_all("gate", dict(dtype=_dt(dtype), tokens=tokens, experts=experts, hidden=hidden,
                              hidden_stride=stride, weight_stride=hidden),
                 dict(hidden=wide, weight=w), {"logits": (dtype, (tokens, experts))})
    assert_close_to_truth(r["logits"], R.moe_gate(x, w), R.moe_gate(x.double(), w.double()))


def _rope(tokens, hq, hkv, dtype, seed):
    from models import tiny_config
    from qwen3x.rope import rope_parameters
    config = tiny_config(rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                         head_dim=D, max_position_embeddings=131072)
    rp = rope_parameters(config)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * D, generator=g).to(dtype)  # a fused projection
    q = qkv[:, : hq * D].view(tokens, hq, D)
    k = qkv[:, hq * D : (hq + hkv) * D].view(tokens, hkv, D)
    v = qkv[:, (hq + hkv) * D :].view(tokens, hkv, D)
    wq = 1 + 0.1 * torch.randn(D, generator=g).to(dtype)
    wk = 1 + 0.1 * torch.randn(D, generator=g).to(dtype)
    pos = torch.randint(0, 131072, (tokens,), generator=g)
    pos[-1] = 131071
    return q, k, v, wq, wk, pos, rp.inv_freq.float(), rp.attention_scaling


def _rope_params(q, k, dtype, pos):
    return dict(dtype=_dt(dtype), tokens=q.shape[0], hq=q.shape[1], hkv=k.shape[1],
                q_token_stride=q.stride(0), q_head_stride=q.stride(1), k_token_stride=k.stride(0),
                k_head_stride=k.stride(1), positions_int64=pos.dtype == torch.int64, eps=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,hq,hkv,pos_dtype", [(7, 16, 8, torch.int64), (3, 32, 4, torch.int32)])
def test_qk_norm_rope(dtype, tokens, hq, hkv, pos_dtype):
    """Strided q and k (views of a fused projection), YaRN, positions up to 131071."""
    from qwen3x import reference as R
    q, k, _, wq, wk, pos, inv_freq, scaling = _rope(tokens, hq, hkv, dtype, seed=tokens)
    pos = pos.to(pos_dtype)
    params = _rope_params(q, k, dtype, pos) | dict(attention_scaling=scaling)
    r = _run_all("qk_norm_rope", params,
                 dict(q=q, k=k, q_weight=wq, k_weight=wk, positions=pos, inv_freq=inv_freq),
                 {"q_out": (dtype, (tokens, hq, D)), "k_out": (dtype, (tokens, hkv, D))})
    args = (q, k, wq, wk, pos, inv_freq, scaling, 1e-6)
    _kernels_judge()(r["q_out"], args, lambda *a: R.qk_norm_rope(*a)[0])
    _kernels_judge()(r["k_out"], args, lambda *a: R.qk_norm_rope(*a)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_rope_in_place(dtype):
    """qk_norm_rope_: q and k rewritten in place, 8 + 2 heads (a warp's group of 8 heads half
    empty: its spare lanes must not read a head another lane of the warp rewrites); bitwise the
    out-of-place answer."""
    from qwen3x import reference as R
    q, k, _, wq, wk, pos, inv_freq, scaling = _rope(3, 8, 2, dtype, seed=5)
    inputs = dict(q=q, k=k, q_weight=wq, k_weight=wk, positions=pos, inv_freq=inv_freq)
    outputs = {"q_out": (dtype, (3, 8, D)), "k_out": (dtype, (3, 2, D))}
    params = _rope_params(q, k, dtype, pos) | dict(attention_scaling=scaling)
    r = _run_all("qk_norm_rope", params | dict(in_place=True), inputs, outputs)
    out_of_place = _run_all("qk_norm_rope", params, inputs, outputs)
    for name in outputs:
        assert_identical(r[name], out_of_place[name], f"{name}: in place vs out of place")
    args = (q, k, wq, wk, pos, inv_freq, scaling, 1e-6)
    _kernels_judge()(r["q_out"], args, lambda *a: R.qk_norm_rope(*a)[0])
    _kernels_judge()(r["k_out"], args, lambda *a: R.qk_norm_rope(*a)[1])


def test_qk_norm_rope_cache():
    """Decode into a static cache: k normed and rotated, v as is, at the given slots of each
    sequence; a slot past the cache is not stored; everything else of the caches untouched."""
    from qwen3x import reference as R
    B, S, hq, hkv, smax, dtype = 2, 2, 8, 2, 9, torch.bfloat16
    q, k, v, wq, wk, pos, inv_freq, scaling = _rope(B * S, hq, hkv, dtype, seed=3)
    slots = torch.tensor([5, 9], dtype=torch.int64)  # 9 = S_max: not stored
    k_cache = torch.randn(B, hkv, smax, D).to(dtype)
    v_cache = torch.randn(B, hkv, smax, D).to(dtype)
    params = _rope_params(q, k, dtype, pos) | dict(
        attention_scaling=scaling, batch=B, max_slots=smax, seqlen=S, slots_int64=True,
        v_token_stride=v.stride(0), v_head_stride=v.stride(1))
    r = _run_all("qk_norm_rope", params,
                 dict(q=q, k=k, v=v, q_weight=wq, k_weight=wk, positions=pos, inv_freq=inv_freq,
                      k_cache=k_cache, v_cache=v_cache, slots=slots),
                 {"q_out": (dtype, (B * S, hq, D)), "k_cache": (dtype, (B, hkv, smax, D)),
                  "v_cache": (dtype, (B, hkv, smax, D))})
    args = (q, k, wq, wk, pos, inv_freq, scaling, 1e-6)
    _kernels_judge()(r["q_out"], args, lambda *a: R.qk_norm_rope(*a)[0])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_v[:, :, 5] = v.view(B, S, hkv, D)[:, 0]
    assert_identical(r["v_cache"], want_v, "v cache")
    # each sequence's first token at slot 5 (the second's slot, 9, is past the cache)
    _kernels_judge()(r["k_cache"][:, :, 5], args, lambda *a: R.qk_norm_rope(*a)[1].view(B, S, hkv, D)[:, 0])
    untouched = torch.ones(smax, dtype=torch.bool)
    untouched[5] = False
    assert_identical(r["k_cache"][:, :, untouched], want_k[:, :, untouched], "k cache outside the slot")

# ---- planted bugs: each must make one of the checks above fail ---------------------------------
PLANTED = {
    # waits for one stage too few: the tile is read before its copies land (late run differs)
    "attention: cp.async wait too shallow": (
        ("attention/attention_fwd.cuh", "cp_async_wait<kStages - 1>();", "cp_async_wait<kStages>();"),
        "attention"),
    # the Hopper loop's wait lets this tile's group stay in flight: wgmma reads the tile before it lands
    "attention: wgmma loop waits for nothing": (
        ("attention/attention_fwd.cuh", "        cp_async_wait<0>();\n        if (p.proxy_fence)",
         "        cp_async_wait<1>();\n        if (p.proxy_fence)"),
        "attention_wgmma"),
    # the overlapped loop: o rescaled and P packed while the previous tile's P V still runs
    "attention: overlapped loop does not wait for P V": (
        ("attention/attention_fwd.cuh", "      warpgroup_wait_pv(o);\n", ""),
        "attention_overlap"),
    # ... or V in two stages: the next tile's V lands where the running P V reads
    "attention: overlapped loop's V in two stages": (
        ("attention/kernel_traits.cuh", "constexpr int kOverlapVStages = 3;", "constexpr int kOverlapVStages = 2;"),
        "attention_overlap"),
    # the barrier before a stage is refilled: a warp's prefetch overwrites what another still reads
    # (in the numbers only where warps work unequally: a partial row tile's idle warps run ahead;
    # the race check sees it anywhere)
    "attention: no barrier before the refill": (
        ("attention/attention_fwd.cuh",
         "__syncthreads();  // this stage is refilled by the next iteration's prefetch", ""),
        "attention_idle_warps"),
    # the expert GEMM's wgmma never waited for
    "moe: wgmma wait dropped": (
        ("moe/grouped_gemm.cuh", "wgmma_wait<0>();  // before the next barrier", "//"),
        "experts"),
    # the expert GEMM's loads one row off in the swizzle
    "moe: swizzle of the loads": (
        ("moe/grouped_gemm.cuh", "chunk ^ (row % kGemmSwizzleRows)", "chunk ^ ((row + 1) % kGemmSwizzleRows)"),
        "experts"),
    # split-KV's fused combine: the marks never reset (a replay merges unwritten partials)
    "attention: split marks not reset": (
        ("attention/combine.cuh", "store_relaxed_gpu(flags + i, 0ULL);  // for the next replay", ";"),
        "attention_replays"),
    # split-KV's fused combine run by split 0, whether or not the others have arrived
    "attention: split 0 combines": (
        ("attention/combine.cuh", "const bool all = __all_sync(kFullWarpMask, mine);",
         "const bool all = split == 0;"),
        "attention_replays"),
    # decode's split-key merge: warp 0 reads the other warps' states with no barrier after their stores
    "attention: no barrier in the split-key merge": (
        ("attention/softmax.cuh", "    __syncthreads();\n    if (warp != 0) return;", "    if (warp != 0) return;"),
        "attention_decode"),
    # the in-cluster combine reads the other splits' shared memory before the barrier that
    # publishes it (poison, or the rows a split has not yet written)
    "attention: cluster combine without its first barrier": (
        ("attention/combine.cuh", "  cluster_sync();  // every split's rows, visible to the cluster", ""),
        "attention_cluster"),
    # ... or a split's CTA leaves while the others still read its shared memory
    "attention: cluster combine without its last barrier": (
        ("attention/combine.cuh", "  cluster_sync_relaxed();  // nobody leaves while its shared memory may still be read",
         ""),
        "attention_cluster"),
    # GEMM2's fused combine summed by the first CTA to arrive, not the k-th
    "moe: the first arrival combines": (
        ("moe/gemm_epilogue.cuh", "col_tile, 1) == top_k - 1) {", "col_tile, 1) == 0) {"),
        "fused_combine"),
    # moe_experts' permutation launch: counters zeroed, not set to the dropped picks (a token with
    # a dropped pick never completes)
    "moe: dropped picks not counted": (
        ("moe/permute.cuh", "c.col_tiles + i] = dropped;", "c.col_tiles + i] = 0;"),
        "dropped_picks"),
    # ... or the row of a token with every pick dropped left unwritten
    "moe: the empty token's row not zeroed": (
        ("moe/permute.cuh", "row[v] = make_uint4(0u, 0u, 0u, 0u);", ";"),
        "dropped_picks"),
    # GEMM2's fused combine adds the unwritten y row of a dropped pick
    "moe: the fused combine reads dropped picks": (
        ("moe/gemm_epilogue.cuh", "if (inverse[n] < 0) continue;  // dropped: no y row", ";"),
        "dropped_picks"),
}


def _planted_runner(sanitizer, patches):
    """A runner with the patches applied, built for the patched op alone (attention/ or moe/
    sources, moe/gate.cuh with the memory-bound kernels: a fraction of a whole runner's compile
    time; its other ops are refused by name)."""
    from emulator import build as emu_build

    dirs = {"others" if file == "moe/gate.cuh" else file.split("/")[0] for file, _, _ in patches}
    only = {"attention": "attention", "moe": "experts", "others": "others"}.get(dirs.pop()) if len(dirs) == 1 else None
    return emu_build.build(sanitizer, patches=patches, only=only)


def _not_a_missing_op(error):
    """A planted-bug run must fail on the bug, not on an op its one-op runner lacks."""
    assert "not built into this runner" not in str(error.value), error.value


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_bug_is_caught(name, monkeypatch):
    from emulator.run import EmulatorError

    patch, op = PLANTED[name]
    exe = _planted_runner("none", (patch,))
    real_run = _emu().run
    monkeypatch.setattr(_emu(), "run", lambda *a, **kw: real_run(*a, **kw, exe=exe))
    with pytest.raises((AssertionError, EmulatorError)) as error:
        if op == "attention":
            test_attention(ATTENTION_CASES[0])
        elif op == "attention_decode":
            test_attention(ATTENTION_CASES[4])
        elif op == "attention_wgmma":
            test_attention(ATTENTION_CASES[1])
        elif op == "attention_overlap":
            test_attention_overlap_loop(OVERLAP_CASES[0])
        elif op == "attention_idle_warps":  # 420 rows: the last row tile's 36 rows leave warp 3 idle
            test_attention((1, 4, 2, 210, 200, True, torch.bfloat16, "mma_sync", "bhsd", None))
        elif op == "attention_replays":
            test_attention_split_kv_replays()
        elif op == "attention_cluster":
            test_attention_cluster_combine(CLUSTER_CASES[0])
        elif op == "fused_combine":
            test_moe_experts_fused_combine_is_the_combine_kernel(FUSED_COMBINE_CASES[1])
        elif op == "dropped_picks":
            test_moe_experts_decode_drops_picks_in_the_fused_combine()
        else:  # the prefill regime with the wgmma mainloop (every bug here is on its path)
            test_moe_experts(_WGMMA_EXPERTS)
    _not_a_missing_op(error)


# Mistakes that give the right answer here, and must be reported as what they are: (patches,
# case, the report). Tiles without their xor swizzle (8 rows of an ldmatrix phase in one bank
# group); a wgmma that reads cp.async data no fence.proxy.async made visible to the async proxy;
# a wgmma issued with no wgmma.fence after the warpgroup's registers were touched.
PLANTED_REPORTS = {
    "attention: tiles not swizzled": (
        (("attention/kernel_traits.cuh", "return row * kHeadDim + ((chunk ^ (row % kSwizzleRows)) * kChunkElems);",
          "return row * kHeadDim + chunk * kChunkElems;"),),
        lambda: test_attention(ATTENTION_CASES[0]), r"bank conflicts in ldmatrix\.x4"),
    "moe: tiles not swizzled": (
        (("moe/grouped_gemm.cuh", "((chunk ^ (row % kGemmSwizzleRows)) * (kGemmChunkBytes / 2))",
          "(chunk * (kGemmChunkBytes / 2))"),
         ("moe/grouped_gemm.cuh", "const int swz = lane % kGemmSwizzleRows;", "const int swz = 0;")),
        lambda: test_moe_experts(EXPERT_CASES[4]), r"bank conflicts in ldmatrix\.x4"),
    "attention: no proxy fence": (
        (("attention/attention_fwd.cuh", "if (p.proxy_fence) fence_proxy_async();  // this thread's copies, to wgmma's proxy", ""),),
        lambda: test_attention(ATTENTION_CASES[1]), r"no fence\.proxy\.async"),
    "moe: no wgmma.fence": (
        (("moe/grouped_gemm.cuh", "    wgmma_fence();\n", ""),),
        lambda: test_moe_experts(_WGMMA_EXPERTS), r"no wgmma\.fence"),
}


@pytest.mark.parametrize("name", list(PLANTED_REPORTS))
def test_planted_misuse_is_reported(name, monkeypatch):
    from emulator.run import EmulatorError

    patches, case, report = PLANTED_REPORTS[name]
    exe = _planted_runner("none", patches)
    real_run = _emu().run
    monkeypatch.setattr(_emu(), "run", lambda *a, **kw: real_run(*a, **kw, exe=exe))
    with pytest.raises((AssertionError, EmulatorError), match=report):
        case()


# ---- cross-CTA protocols, their CTAs side by side -------------------------------------------------
# Split-KV's arrival marks (the last split to arrive merges the tile) and GEMM2's combine counters
# (the k-th pick to arrive sums the token's rows) are protocols between CTAs, which the runs above
# meet one CTA after another (forward or reverse: one order each). EMU_COSCHEDULE runs many CTAs of
# a launch side by side, their threads interleaved at every meeting point and device-wide fence:
# several splits marking and reading at once, more than one seeing itself last, a reset beside a
# reader. The answers must be the one-after-another run's, bit for bit.
COSCHEDULE = 64
COSCHEDULED_RUNS = [RUNS[0], dict(RUNS[0], coschedule=COSCHEDULE), dict(RUNS[1], coschedule=COSCHEDULE)]
CROSS_CTA = {
    "attention split-KV, replays": lambda: test_attention_split_kv_replays(),
    "attention decode, 47 splits": lambda: test_attention(ATTENTION_CASES[11]),
    "attention varlen decode splits": lambda: test_attention_varlen_decode_splits(False),
    "experts, combine in GEMM2": lambda: test_moe_experts_fused_combine_is_the_combine_kernel(FUSED_COMBINE_CASES[2]),
    "experts, dropped picks": lambda: test_moe_experts_decode_drops_picks_in_the_fused_combine(),
}


@pytest.mark.parametrize("name", list(CROSS_CTA))
def test_cross_cta_protocols_coscheduled(name, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "RUNS", COSCHEDULED_RUNS)
    CROSS_CTA[name]()


def _cluster_blind_runner():
    """A runner whose launch_attention ignores p.cluster_combine (a plain launch): the kernel's
    cluster instructions then run outside any cluster."""
    from emulator import build as emu_build

    return emu_build.build("none", only="attention", patches=(("attention/attention_fwd.cuh",
                                             "if (p.cluster_combine) {  // the splits of a (row tile, b, kv head): one cluster",
                                             "if (false) {"),))


@pytest.mark.parametrize("coschedule", [1, 4])
def test_cluster_code_outside_a_cluster_is_an_error(coschedule):
    """The in-cluster combine launched without a cluster (a bug in the launcher) fails: alone, its
    mapa names a rank the one-CTA "cluster" lacks; co-scheduled, the CTAs beside it are no cluster."""
    from emulator.run import EmulatorError

    torch.manual_seed(5)
    q, k, v = _qkv(1, 8, 2, 1, 300)
    with pytest.raises(EmulatorError, match="in a launch without clusters" if coschedule > 1 else "outside the cluster"):
        _emu().run("attention", dict(dtype="bf16", batch=1, hq=8, hkv=2, seqlen_q=1, seqlen_k=300, total_q=1,
                                     causal=1, scale=D**-0.5, mainloop="mma_sync", cluster_combine=1,
                                     q_head_stride=q.stride(1), q_seq_stride=q.stride(2), q_batch_stride=q.stride(0),
                                     k_head_stride=k.stride(1), k_seq_stride=k.stride(2), k_batch_stride=k.stride(0),
                                     v_head_stride=v.stride(1), v_seq_stride=v.stride(2), v_batch_stride=v.stride(0)),
                   dict(q=q, k=k, v=v), {"out": (q.dtype, (1, 1, 8, D)), "lse": (torch.float32, (1, 8, 1))},
                   coschedule=coschedule, exe=_cluster_blind_runner())


# ---- racecheck: the same kernels under ThreadSanitizer -----------------------------------------
# One run each (asynchronous copies and wgmma touching shared memory both at issue and at their
# wait, reversed order): every pair of conflicting accesses by two
# threads of a CTA that no __syncthreads / __syncwarp orders is reported (emu.h), whatever order
# the scheduler happened to run them in: compute-sanitizer's racecheck, on the CPU.
RACECHECK_RUN = [dict(async_mode="both", order="reverse", dyn_smem_offset=1024 + 384, sanitizer="thread")]
RACECHECK = {
    "attention mma_sync": lambda: test_attention(ATTENTION_CASES[0]),
    "attention wgmma": lambda: test_attention(ATTENTION_CASES[1]),
    "attention wgmma overlapped": lambda: test_attention_overlap_loop(OVERLAP_CASES[0]),
    "attention decode split-KV": lambda: test_attention(ATTENTION_CASES[4]),
    "attention varlen": lambda: test_attention_varlen(),
    "experts decode": lambda: test_moe_experts(EXPERT_CASES[0]),
    "experts mid, tiled permutation": lambda: test_moe_experts(EXPERT_CASES[2]),
    "experts prefill wgmma": lambda: test_moe_experts(_WGMMA_EXPERTS),
    "rms_norm": lambda: test_rms_norm(torch.float32, 5, 200, 203, True),
    "router": lambda: test_moe_router(torch.bfloat16, 40, 128, 8, True, None),  # tokens side by side
    "moe_gate": lambda: test_moe_gate(torch.bfloat16, 5, 5, 272, 280),
    "qk_norm_rope cache": lambda: test_qk_norm_rope_cache(),
    "qk_norm_rope in place": lambda: test_qk_norm_rope_in_place(torch.bfloat16),
    "silu_and_mul": lambda: test_silu_and_mul(torch.bfloat16, 3, 768, 1536),
    "experts, combine in GEMM2": lambda: test_moe_experts_fused_combine_is_the_combine_kernel(FUSED_COMBINE_CASES[1]),
    "attention, combine in a cluster": lambda: test_attention_cluster_combine(CLUSTER_CASES[1]),
}


@pytest.mark.parametrize("name", list(RACECHECK))
def test_racecheck(name, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "RUNS", RACECHECK_RUN)
    RACECHECK[name]()


PLANTED_RACES = {
    # the overlapped Hopper loop's refill with no barrier first: a warp's copies of tile t + 1
    # into stages other warps' wgmma of tiles t - 1 (Q K^T) and t - 2 (P V) may still read
    "attention: overlapped loop without its barrier": (
        ("attention/attention_fwd.cuh", "      finish_previous();\n      __syncthreads();\n",
         "      finish_previous();\n"),
        lambda: test_attention_overlap_loop(OVERLAP_CASES[0])),
    # the barrier before a K/V stage is refilled: the prefetch races with other warps' ldmatrix
    "attention: no barrier before the refill": (PLANTED["attention: no barrier before the refill"][0],
                                                lambda: test_attention(ATTENTION_CASES[0])),
    # decode's split-key merge: the other warps' stores and warp 0's loads with no barrier between
    "attention: no barrier in the split-key merge": (PLANTED["attention: no barrier in the split-key merge"][0],
                                                     lambda: test_attention(ATTENTION_CASES[4])),
    # a warp's per-expert counters zeroed by some lanes and incremented by others with no
    # __syncwarp between (the match.any between them orders no memory)
    "permute: no __syncwarp after zeroing": (
        ("moe/permute.cuh",
         "my_warp_base[i] = 0;\n  __syncwarp();", "my_warp_base[i] = 0;"),
        lambda: test_moe_experts(EXPERT_CASES[0])),
    # split-KV's fused combine: threads read whether their CTA is the last before thread 0 wrote it
    "attention: no barrier after the marks": (
        ("attention/combine.cuh", "*s_flag = all;\n  }\n  __syncthreads();", "*s_flag = all;\n  }"),
        lambda: test_attention(ATTENTION_CASES[4])),
    # the in-cluster combine: one CTA's stores of its rows and another's DSMEM loads of them,
    # with no cluster barrier between
    "attention: cluster combine without its first barrier": (
        PLANTED["attention: cluster combine without its first barrier"][0],
        lambda: test_attention_cluster_combine(CLUSTER_CASES[1])),
    # the router GEMM reads the staged hidden rows other threads copied, with no barrier between
    "moe_gate: no barrier after staging the hidden rows": (
        ("moe/gate.cuh", "  cp_async_wait<0>();\n  __syncthreads();\n", "  cp_async_wait<0>();\n"),
        lambda: test_moe_gate(torch.bfloat16, 5, 5, 272, 280)),
    # GEMM2's fused combine reads which tokens its CTA completes before the threads that counted
    # the arrivals are past a barrier
    "experts: no barrier after the arrivals": (
        ("moe/gemm_epilogue.cuh",
         "before this CTA's reads below\n  __syncthreads();", "before this CTA's reads below"),
        lambda: test_moe_experts_fused_combine_is_the_combine_kernel(FUSED_COMBINE_CASES[1])),
}


@pytest.mark.parametrize("name", list(PLANTED_RACES))
def test_planted_race_is_reported(name, monkeypatch):
    from emulator.run import EmulatorError

    patch, case = PLANTED_RACES[name]
    exe = _planted_runner("thread", (patch,))
    monkeypatch.setattr(sys.modules[__name__], "RUNS", RACECHECK_RUN)
    real_run = _emu().run
    monkeypatch.setattr(_emu(), "run", lambda *a, **kw: real_run(*a, **kw, exe=exe))
    with pytest.raises(EmulatorError, match="ThreadSanitizer: data race"):
        case()
