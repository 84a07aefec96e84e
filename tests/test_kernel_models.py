"""The CUDA kernels' index arithmetic, checked on the CPU through their thread-level models.

Each test runs a model from tests/kernel_models (a lane-by-lane restatement of a csrc/ kernel and
its glue) on numpy / torch CPU inputs and compares it with qwen3x.reference:
  - 'f64' mode (tensor-core kernels: no rounding anywhere) must match the fp64 reference to
    ~1e-10: only a wrong index can make it differ;
  - 'bf16' / 'f16' modes must stay within 2x (max) / 1.5x (rms) the error of a same-dtype
    emulation that rounds where the kernel rounds;
  - the element-wise kernels (rope, norm, silu, router) are judged by qwen3x.testing's rule, and
    integer outputs (ids, counts, permutations) must match exactly;
  - the model's own checks raise ModelError on any out-of-bounds or out-of-tensor access, read
    of never-written memory, shared-memory hazard, or output element written other than once.
The "planted bug" tests patch one index expression of a model and check that the comparison or
the model's checks then fail, so that a pass means something.

These tests do not replace the GPU tests. The default run covers a reduced set of the attention
and MoE shapes (under a minute on two cores); `-m slow` adds the full attention and MoE sweeps
the models were first validated on (about a minute and a half more).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kernel_models import attention, fp, moe, norm, primitives, rope, router, silu
from kernel_models.primitives import ModelError, bf16_rne, fp16_rne
from models import tiny_config
from qwen3x import reference as R
from qwen3x import testing
from qwen3x.rope import rope_parameters


@pytest.fixture
def sweep(request):
    """For the full sweeps (marked slow): they run only when `-m` selects them."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full sweep: select with -m slow")


FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _torch_dtype(mode):
    return torch.float16 if mode == "f16" else torch.bfloat16


def _to_t(x, mode="bf16"):
    """numpy float64 values rounded to the mode's T (bf16 for 'f64': the kernel's inputs are T)."""
    return torch.from_numpy(x).to(_torch_dtype(mode)).double().numpy()


# =============================================================================================
# shared-memory bank conflicts (primitives.wavefronts, counted on every Smem access)
# =============================================================================================
def test_wavefronts_rule():
    """The counting rule on accesses whose cost is known."""
    w = primitives.wavefronts
    lane = np.arange(32)
    assert w(4 * lane, 4) == (1, 1)                   # 32 consecutive words
    assert w(np.zeros(32, int), 4) == (1, 1)          # one word for all: a broadcast
    assert w(128 * lane, 4) == (32, 1)                # every lane in bank 0
    assert w(8 * lane, 4) == (2, 1)                   # stride 2 words: 16 banks, two words each
    assert w(2 * lane, 2) == (1, 1)                   # 16-bit elements: two lanes per word
    assert w(16 * lane, 16) == (4, 4)                 # 16-byte vectors: four 8-lane phases
    assert w(256 * lane, 16) == (32, 4)               # rows of a [rows][128] bf16 tile, unswizzled
    rows = lane % 8 + 8 * (lane // 8)
    swizzled = rows * 256 + ((lane // 8) ^ (rows % 8)) * 16
    assert w(swizzled, 16) == (4, 4)                  # the same rows, chunk xor row % 8


def _bank_factors(run, kinds):
    """{kind: conflict factor of the accesses whose `what` ends with kind} over every Smem of
    run(); each kind must have occurred."""
    with primitives.count_bank_conflicts() as banks:
        run()
    factors = {kind: banks.factor(kind) for kind in kinds}
    assert None not in factors.values(), factors
    assert sum(v[0] for v in banks.by_what.values()) == sum(
        v[0] for k, v in banks.by_what.items() if k.endswith(tuple(kinds))), "an access kind not listed"
    return factors


ATTENTION_SMEM_TILES = ("Q load", "K load", "V load", "K prefetch", "V prefetch", "ldm Q", "ldm K", "ldm V",
                        "sO store", "sO load")
# + decode's split-key merge (float4 stores / loads of the warps' states in the K stages)
ATTENTION_SMEM = ATTENTION_SMEM_TILES + ("merge store", "merge load")
MOE_SMEM = (" A", " B", "ldm A", "ldm B")


def test_attention_smem_conflict_free():
    """Every shared-memory access of the attention kernel (Q / K / V cp.async stores, the Q, K
    and V.trans ldmatrix, the output tile's staging, decode's split-key merge) is free of bank
    conflicts, in a prefill tile, a packed-GQA decode tile with a split and a partial tile."""
    factors = _bank_factors(lambda: (run_padded("banks", 2, 4, 2, 70, 130, True, modes=("f64",)),
                                     run_padded("banks decode", 1, 16, 2, 1, 300, True, modes=("f64",),
                                                force_splits=(2, 1))), ATTENTION_SMEM)
    assert all(f == 1.0 for f in factors.values()), factors


def test_attention_wgmma_smem_conflict_free():
    """The Hopper layout's cp.async stores (8 threads = one 128-byte half-row), the ldmatrix reads
    of the Q fragments (Q K^T's registers A) and the output staging are conflict-free too (wgmma
    reads K and V itself)."""
    kinds = ("Q load", "K load", "V load", "K prefetch", "V prefetch", "ldm Q", "sO store", "sO load")
    factors = _bank_factors(lambda: run_padded("banks wgmma", 1, 8, 2, 40, 200, True, modes=("f64",), wgmma=True),
                            kinds)
    assert all(f == 1.0 for f in factors.values()), factors


def test_moe_smem_conflict_free():
    """The expert GEMMs' A / B cp.async stores and ldmatrix reads are free of bank conflicts in
    every tile configuration (decode, mid, prefill)."""
    for T_, H, I in ((30, 128, 128), (40, 256, 128), (150, 256, 128)):
        factors = _bank_factors(lambda: run_moe(T_, 4, 2, H, I, seed=T_, modes=("f64",)), MOE_SMEM)
        assert all(f == 1.0 for f in factors.values()), (T_, factors)


def test_smem_conflicts_caught(monkeypatch):
    """With the swizzle taken out of both the stores and the ldmatrix addresses (still correct
    numbers), the count shows the 8-way conflicts the swizzle exists to avoid."""
    monkeypatch.setattr(attention, "swizzled_offset", lambda row, chunk: row * HEAD_DIM + chunk * 8)
    factors = _bank_factors(lambda: run_padded("unswizzled", 1, 2, 1, 17, 130, True, modes=("f64",)),
                            ATTENTION_SMEM_TILES)
    # rows of 256 bytes: the 8 row addresses of an ldmatrix phase all start in banks 0-3; the
    # cp.async stores (8 threads = 128 contiguous bytes of one row) never conflict
    assert factors["ldm Q"] == factors["ldm K"] == factors["ldm V"] == 8.0, factors
    assert factors["K load"] == 1.0, factors
    lane_addr_terms = moe.lane_addr_terms

    def no_swizzle(cfg, warp_m, warp_n):
        _, a_row, a_chunk, b_row, b_chunk = lane_addr_terms(cfg, warp_m, warp_n)
        return 0, a_row, a_chunk, b_row, b_chunk

    monkeypatch.setattr(moe, "swizzled", lambda row, chunk: row * 64 + chunk * 8)
    monkeypatch.setattr(moe, "lane_addr_terms", no_swizzle)
    factors = _bank_factors(lambda: run_moe(40, 4, 2, 256, 128, seed=1, modes=("f64",)), MOE_SMEM)
    assert factors["ldm A"] > 1.0 and factors["ldm B"] > 1.0, factors


# =============================================================================================
# attention (kernel_models.attention vs reference.attention / attention_varlen)
# =============================================================================================
HEAD_DIM = 128
SCALE = HEAD_DIM ** -0.5


def _allowed(B, Hq, Sq, Skv, mask, causal, key_lengths):
    """[B, Hq, Sq, Skv] visibility, as the reference defines it."""
    n = np.full(B, Skv) if key_lengths is None else \
        np.clip(np.broadcast_to(np.asarray(key_lengths).reshape(-1), (B,)), 0, Skv)
    i = np.arange(Sq).reshape(1, 1, Sq, 1)
    j = np.arange(Skv).reshape(1, 1, 1, Skv)
    n = n.reshape(B, 1, 1, 1)
    allowed = j < n
    if causal:
        allowed = allowed & (j <= i + (n - Sq))
    allowed = np.broadcast_to(allowed, (B, Hq, Sq, Skv))
    if mask is not None:
        allowed = allowed & mask
    return torch.from_numpy(np.array(allowed))


def _emulate(q, k, v, allowed, mode):
    """The same attention in T: fp32 scores, P = exp(s - max) rounded to T, fp32 P V / l, out in T
    ([B, Hq, Sq, D]): the error budget the kernel model is held to."""
    if k.shape[2] == 0:
        return np.zeros(q.shape)
    qf, kf, vf = (torch.from_numpy(a).float() for a in (q, k, v))
    group = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
    s = (qf @ kf.transpose(-1, -2)) * SCALE
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = (p.to(_torch_dtype(mode)).float() @ vf) / torch.where(l == 0, torch.ones_like(l), l)
    return o.to(_torch_dtype(mode)).double().numpy()


def _check_attention(name, run, ref_out, ref_lse, emu_out, mode, nan_out=None, nan_lse=None):
    """out / lse of a model run against the reference; nan_out / nan_lse: elements that must be NaN
    (rows a varlen grid does not cover). Every out and lse element must be written exactly once."""
    problems = []
    for buf in (run.out_buf, run.lse_buf):
        if not (buf.writes == 1).all():
            problems.append(f"{buf.name} write counts {np.unique(buf.writes).tolist()} "
                            f"({(buf.writes == 0).sum()} never, {(buf.writes > 1).sum()} more than once)")
    nan_out = np.zeros(run.out.shape, bool) if nan_out is None else nan_out
    nan_lse = np.zeros(run.lse.shape, bool) if nan_lse is None else nan_lse
    if not np.array_equal(np.isnan(run.out), nan_out):
        problems.append(f"NaN pattern of out: {np.isnan(run.out).sum()} NaN, {nan_out.sum()} expected")
    keep = ~nan_out
    err = np.abs(run.out[keep] - ref_out[keep]).max(initial=0.0)
    if mode == "f64":
        if not err < 1e-10:
            problems.append(f"out max error {err:.3g} (f64: only indexing can differ)")
    else:
        rms = np.sqrt(np.mean((run.out[keep] - ref_out[keep]) ** 2)) if keep.any() else 0.0
        emu_err = np.abs(emu_out[keep] - ref_out[keep]).max(initial=0.0)
        emu_rms = np.sqrt(np.mean((emu_out[keep] - ref_out[keep]) ** 2)) if keep.any() else 0.0
        if not (err <= 2 * emu_err + 1e-6 and rms <= 1.5 * emu_rms + 1e-7):
            problems.append(f"out max error {err:.3g} rms {rms:.3g} vs emulation {emu_err:.3g} / {emu_rms:.3g}")
    if not np.array_equal(np.isnan(run.lse), nan_lse):
        problems.append(f"NaN pattern of lse: {np.isnan(run.lse).sum()} NaN, {nan_lse.sum()} expected")
    keep = ~nan_lse
    if not np.array_equal(np.isneginf(run.lse[keep]), np.isneginf(ref_lse[keep])):
        problems.append("-inf pattern of lse differs")
    finite = keep & np.isfinite(ref_lse)
    lse_err = np.abs(run.lse[finite] - ref_lse[finite]).max(initial=0.0)
    if lse_err > (1e-6 if mode == "f64" else 1e-4):  # the reference returns lse in fp32
        problems.append(f"lse max error {lse_err:.3g}")
    assert not problems, f"{name} [{mode}] stats {run.stats}: " + "; ".join(problems)


def run_padded(name, B, Hq, Hkv, Sq, Skv, causal, mask=None, key_lengths=None, num_sms=132, force_splits=None,
               q_layout="bhsd", kv_layout="bhsd", modes=("f64", "bf16"), seed=0, ctas_per_sm=2, wgmma=False):
    """Model vs reference.attention for each mode; returns the stats of the last run."""
    rng = np.random.default_rng(seed)
    for mode in modes:
        q = _to_t(rng.standard_normal((B, Hq, Sq, HEAD_DIM)) * 1.5, mode)
        k = _to_t(rng.standard_normal((B, Hkv, Skv, HEAD_DIM)), mode)
        v = _to_t(rng.standard_normal((B, Hkv, Skv, HEAD_DIM)), mode)
        run = attention.attention(q, k, v, mask, SCALE, causal, key_lengths, num_sms, mode, force_splits, q_layout,
                                  kv_layout, ctas_per_sm, wgmma)
        kl = None if key_lengths is None else torch.as_tensor(np.asarray(key_lengths))
        ref_out, ref_lse = R.attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                       None if mask is None else torch.from_numpy(mask), SCALE, causal, kl)
        emu = None
        if mode != "f64":
            emu = _emulate(q, k, v, _allowed(B, Hq, Sq, Skv, mask, causal, key_lengths), mode).transpose(0, 2, 1, 3)
        _check_attention(name, run, ref_out.numpy(), ref_lse.double().numpy(), emu, mode)
    return run.stats


def run_varlen(name, lq, lk, Hq, Hkv, causal, q_start=0, q_tail=0, max_q=None, max_k=None, num_sms=132,
               force_splits=None, modes=("f64", "bf16"), seed=0, cu_q=None, cu_k=None, Tk=None, wgmma=False):
    """Model vs reference.attention_varlen: sequences of lq queries / lk keys, q_start tokens before
    the first sequence and q_tail after the last (outside every sequence), max_q / max_k the hints
    (default: exact). Rows past the grid (max_q too small) must be NaN. Returns the last stats."""
    rng = np.random.default_rng(seed)
    if cu_q is None:
        cu_q = np.concatenate([[0], np.cumsum(lq)]) + q_start
        cu_k = np.concatenate([[0], np.cumsum(lk)])
    cu_q, cu_k = np.asarray(cu_q, np.int64), np.asarray(cu_k, np.int64)
    Tq = int(cu_q[-1]) + q_tail
    Tk = int(cu_k[-1]) if Tk is None else Tk
    max_q = int(np.diff(cu_q).max()) if max_q is None else max_q
    max_k = int(np.diff(cu_k).max()) if max_k is None else max_k
    group = Hq // Hkv
    # packed rows beyond the grid's row tiles are NaN
    covered = max(-(-min(max_q, Tq) * group // attention.BLOCK_M), 1) * attention.BLOCK_M
    nan_out = np.zeros((Tq, Hq, HEAD_DIM), bool)
    for b in range(len(cu_q) - 1):
        s = np.arange(cu_q[b + 1] - cu_q[b])[:, None]
        nan_out[cu_q[b]:cu_q[b + 1]] = (s * group + np.arange(Hq)[None, :] % group >= covered)[..., None]
    nan_lse = nan_out[..., 0].T
    for mode in modes:
        q = _to_t(rng.standard_normal((Tq, Hq, HEAD_DIM)) * 1.5, mode)
        k = _to_t(rng.standard_normal((Tk, Hkv, HEAD_DIM)), mode)
        v = _to_t(rng.standard_normal((Tk, Hkv, HEAD_DIM)), mode)
        run = attention.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, SCALE, causal, num_sms, mode,
                                         force_splits, wgmma=wgmma)
        ref_out, ref_lse = R.attention_varlen(*(torch.from_numpy(a) for a in (q, k, v)),
                                              torch.from_numpy(cu_q.astype(np.int32)),
                                              torch.from_numpy(cu_k.astype(np.int32)), max_q, max_k, SCALE, causal)
        emu = None
        if mode != "f64":
            emu = np.zeros(ref_out.shape)
            for b in range(len(cu_q) - 1):
                q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
                if q1 > q0:
                    qq = q[q0:q1].transpose(1, 0, 2)[None]
                    kk = np.repeat(k[k0:k1].transpose(1, 0, 2)[None], group, 1)
                    vv = np.repeat(v[k0:k1].transpose(1, 0, 2)[None], group, 1)
                    allowed = _allowed(1, Hq, q1 - q0, k1 - k0, None, causal, None)
                    emu[q0:q1] = _emulate(qq, kk, vv, allowed, mode)[0].transpose(1, 0, 2)
        _check_attention(name, run, ref_out.numpy(), ref_lse.double().numpy(), emu, mode, nan_out, nan_lse)
    return run.stats


def _mask(seed, shape, density, fully_masked_row):
    """A random bool mask with one fully masked (b, h, s) row."""
    m = np.random.default_rng(seed).random(shape) < density
    m[fully_masked_row] = False
    return m


@pytest.mark.parametrize("Hq,Hkv,Sq,Skv,causal", [
    (16, 1, 1, 130, False),  # decode: the group's 16 heads in the rows of one tile, 3 key tiles
    (2, 1, 17, 17, True),    # one partial tile each way, diagonal inside it
    (8, 8, 1, 1, True),      # single key
    (2, 1, 70, 20, False),   # more queries than keys: 3 row tiles, zero-filled key rows
    (2, 1, 65, 65, True),    # prefill: the diagonal crosses tiles; plain and masked tiles
    (4, 2, 3, 200, True),    # decode-like causal tail, 4 key tiles
    (2, 1, 130, 130, True),  # 5 row tiles x 3 key tiles: the double buffer wraps
])
def test_attention_padded(Hq, Hkv, Sq, Skv, causal):
    modes = ("f64", "bf16") if Sq * Hq <= 300 else ("f64",)
    stats = run_padded(f"H{Hq}/{Hkv} S{Sq}/{Skv} causal={causal}", 2 if Sq * Hq <= 300 else 1, Hq, Hkv, Sq, Skv,
                       causal, modes=modes)
    if Sq == Skv == 65:
        assert stats["plain_tiles"] > 0 and stats["masked_tiles"] > 0


def test_attention_no_keys():
    run_padded("Skv = 0", 2, 4, 2, 3, 0, False)
    run_padded("Skv = 0, causal, split plan", 2, 4, 2, 3, 0, True, num_sms=2)


def test_attention_strided_layouts():
    run_padded("q [B, S, H, D] transposed", 2, 4, 2, 17, 70, True, q_layout="bshd")
    run_padded("q, k, v [B, S, H, D] (qk_norm_rope_attention)", 1, 8, 2, 70, 70, True, q_layout="bshd",
               kv_layout="bshd", modes=("f64",))


@pytest.mark.parametrize("shape,causal", [((2, 4, 17, 130), False), ((2, 4, 17, 130), True),
                                          ((1, 4, 17, 130), True), ((2, 1, 17, 130), False),
                                          ((1, 1, 3, 200), True)])
def test_attention_mask(shape, causal):
    """Full and broadcast (batch, head, both) masks, each with a fully masked row (out 0, lse -inf)."""
    mb, mh, Sq, Skv = shape
    Hq, Hkv = (16, 1) if Sq == 3 else (4, 2)
    m = _mask(mb * 10 + mh, shape, 0.6 if mb * mh == 8 else 0.4, (mb - 1, mh - 1, 1))
    run_padded(f"mask {list(shape)}", 2, Hq, Hkv, Sq, Skv, causal, mask=m, modes=("f64", "bf16") if mb * mh == 8
               else ("f64",))


@pytest.mark.parametrize("key_lengths,Sq,causal", [
    (np.array([130, 5]), 1, False),      # decode over a static cache: per-sequence fill
    (np.array([0, 64], np.int32), 3, True),  # an empty cache, and one ending on a tile boundary
    (np.array([129]), 3, True),          # one value for the batch
    (np.array([300, 70]), 17, True),     # longer than Skv: clamped
])
def test_attention_key_lengths(key_lengths, Sq, causal):
    Hq, Hkv = (16, 1) if Sq == 1 else (4, 2)
    run_padded(f"key_lengths {key_lengths.tolist()}", 2, Hq, Hkv, Sq, 200, causal, key_lengths=key_lengths)


def test_attention_key_lengths_and_mask():
    m = _mask(3, (2, 4, 17, 130), 0.6, (1, 2, 5))
    run_padded("key_lengths + mask", 2, 4, 2, 17, 130, True, key_lengths=np.array([100, 17]), mask=m,
               modes=("f64",))


@pytest.mark.parametrize("ctas,seqlen_k,rows,want", [
    (64, 32768, 8, (8, 64)),     # batch 16 x Hkv 4: 8 splits fill 1.94 waves of 264 (9 would be 2.18)
    (64, 131072, 16, (8, 256)),
    (8, 131072, 4, (64, 32)),    # batch 1 x Hkv 8: 66 wanted (2 waves), dealt as 64 splits of 32 tiles
    (8, 1024, 4, (16, 1)),       # latency bound: one tile per split
    (200, 32768, 8, (5, 103)),   # 5 splits: 3.8 waves (3 would leave a last wave 27% full)
    (256, 8192, 16, (1, 128)),   # a wave of (b, kv head) CTAs already: no count beats one split
    (256, 1024, 64, (1, 16)),    # Qwen3-0.6B prefill, 1k tokens: likewise (3 splits tied before)
    (264, 32768, 8, (1, 512)),   # a full wave: no split
    (4, 2048, 64, (8, 4)),       # full 64-row tiles: at least 3 tiles a split (10 wanted, dealt as 8 of 4)
])
def test_split_plan_fills_its_last_wave(ctas, seqlen_k, rows, want):
    """heuristics.cuh plan_splits on an H100 (132 SMs, 2 CTAs each): among 1 .. 2 x the target split
    count, the one with the fewest waves per split, nearest the target; one split where none does
    better than it."""
    assert attention.plan_splits(ctas, seqlen_k, rows, 132, 2) == want
    splits, per_split = want
    assert (splits - 1) * per_split < -(-seqlen_k // attention.BLOCK_N) <= splits * per_split  # no empty split


@pytest.mark.parametrize("case", ["plan", "last split takes the rest", "empty split", "empty causal splits",
                                  "mask and key_lengths", "key_lengths 0"])
def test_attention_split_kv(case):
    m = _mask(3, (2, 4, 17, 130), 0.6, (1, 2, 5))
    args = {
        "plan": dict(B=1, Hq=16, Hkv=1, Sq=1, Skv=600, causal=True, num_sms=4, ctas_per_sm=1),  # sm_86-like
        "last split takes the rest": dict(B=2, Hq=4, Hkv=2, Sq=1, Skv=130, causal=False, force_splits=(2, 1)),
        "empty split": dict(B=2, Hq=4, Hkv=2, Sq=3, Skv=130, causal=True, force_splits=(4, 1)),
        "empty causal splits": dict(B=1, Hq=4, Hkv=2, Sq=70, Skv=130, causal=True, force_splits=(2, 1)),
        "mask and key_lengths": dict(B=2, Hq=4, Hkv=2, Sq=17, Skv=130, causal=True, mask=m,
                                     key_lengths=np.array([100, 17]), force_splits=(3, 1)),
        "key_lengths 0": dict(B=2, Hq=4, Hkv=2, Sq=3, Skv=200, causal=True, key_lengths=np.array([0, 64]),
                              force_splits=(2, 1)),
    }[case]
    stats = run_padded(f"split-KV: {case}", **args, modes=("f64", "bf16") if case == "plan" else ("f64",))
    assert stats["splits"][0] > 1


@pytest.mark.parametrize("case", ["splits of several tiles, key_lengths in a quarter", "group of 5, 3 queries",
                                  "mask", "key_lengths 0, empty splits", "one key tile, no split"])
def test_attention_split_keys(case):
    """Decode (a CTA's packed rows fit one warp): every warp computes warp 0's 16 rows over its
    quarter of each tile's keys, the four softmax states merged into warp 0 after the last tile.
    Key ends inside a warp's quarter (key_lengths 389 = warp 0's, 421 = warp 2's quarter of tile
    6), per-row causal ends inside one (3 queries x group 5 = 15 rows), a mask, quarters and
    splits that see no key."""
    m = _mask(5, (1, 16, 1, 130), 0.4, (0, 3, 0))
    args = {
        "splits of several tiles, key_lengths in a quarter": dict(
            B=2, Hq=8, Hkv=2, Sq=1, Skv=700, causal=True, key_lengths=np.array([389, 421]), force_splits=(3, 4)),
        "group of 5, 3 queries": dict(B=1, Hq=10, Hkv=2, Sq=3, Skv=200, causal=True, force_splits=(2, 2)),
        "mask": dict(B=1, Hq=16, Hkv=1, Sq=1, Skv=130, causal=False, mask=m),
        "key_lengths 0, empty splits": dict(B=2, Hq=4, Hkv=2, Sq=3, Skv=200, causal=True,
                                            key_lengths=np.array([0, 70]), force_splits=(4, 1)),
        "one key tile, no split": dict(B=2, Hq=4, Hkv=1, Sq=1, Skv=37, causal=True),
    }[case]
    stats = run_padded(f"split keys: {case}", **args)
    assert stats["split_key_ctas"] == stats["ctas"] > 0, stats


def test_attention_split_keys_not_for_wider_tiles():
    """17 packed rows take the per-warp rows path (warp 1 holds row 16)."""
    stats = run_padded("17 rows", 1, 17, 1, 1, 130, True, modes=("f64",))
    assert stats["split_key_ctas"] == 0, stats


def test_attention_split_keys_planted_bugs(monkeypatch):
    """The model catches a merge with no barrier after the warps' stores, and warps that all take
    the first quarter of the keys."""
    with monkeypatch.context() as patch:
        barrier = primitives.Smem.barrier
        calls = []

        def no_merge_barrier(self):  # the merge's barrier is the last one before the epilogue's stores
            import inspect
            if inspect.stack()[1].function == "merge_split_keys":
                calls.append(1)
                return None
            return barrier(self)
        patch.setattr(primitives.Smem, "barrier", no_merge_barrier)
        with pytest.raises(ModelError, match="no barrier"):
            run_padded("merge without its barrier", 1, 8, 2, 1, 130, True, modes=("f64",))
        assert calls
    with monkeypatch.context() as patch:
        patch.setattr(attention, "KEYS_PER_WARP", 0)
        with pytest.raises(AssertionError, match="out max error"):
            run_padded("every warp on keys 0-15", 1, 8, 2, 1, 130, True, modes=("f64",))


@pytest.mark.parametrize("case", [
    "empty sequences", "outside tokens", "max_seqlen_q too small", "max_seqlen_q too small, split",
    "max_seqlen_q = 0", "split plan", "key hint too small", "key hint too big", "split + outside tokens",
    "no sequence",
])
def test_attention_varlen(case):
    args = {
        "empty sequences": dict(lq=[5, 0, 70, 1], lk=[5, 3, 130, 0], Hq=4, Hkv=2, causal=True),
        "outside tokens": dict(lq=[3, 2], lk=[70, 0], Hq=16, Hkv=1, causal=True, q_start=2, q_tail=3),
        "max_seqlen_q too small": dict(lq=[100, 3, 30], lk=[100, 3, 30], Hq=2, Hkv=1, causal=True, max_q=20),
        "max_seqlen_q too small, split": dict(lq=[100, 3, 30], lk=[200, 130, 30], Hq=2, Hkv=1, causal=True,
                                              max_q=20, force_splits=(2, 1), q_start=1, q_tail=2),
        "max_seqlen_q = 0": dict(lq=[3, 2], lk=[10, 2], Hq=4, Hkv=2, causal=True, max_q=0),
        "split plan": dict(lq=[1, 3, 1], lk=[600, 130, 0], Hq=16, Hkv=1, causal=True, num_sms=2, q_start=1,
                           q_tail=1),
        "key hint too small": dict(lq=[1, 3], lk=[600, 300], Hq=4, Hkv=2, causal=True, max_k=256, num_sms=2,
                                   force_splits=(2, 2)),
        "key hint too big": dict(lq=[1, 3], lk=[60, 30], Hq=4, Hkv=2, causal=True, max_k=1000, num_sms=2,
                                 force_splits=(4, 4)),
        "split + outside tokens": dict(lq=[2, 0, 3], lk=[70, 5, 0], Hq=8, Hkv=2, causal=True, force_splits=(3, 1),
                                       q_start=2, q_tail=3),
        "no sequence": dict(lq=[], lk=[], Hq=4, Hkv=2, causal=True, cu_q=[0], cu_k=[0], q_tail=4, Tk=3, max_q=4,
                            max_k=3),
    }[case]
    modes = ("f64", "bf16") if case in ("empty sequences", "max_seqlen_q too small, split") else ("f64",)
    stats = run_varlen(f"varlen: {case}", **args, modes=modes)
    if "split" in case:
        assert stats["splits"][0] > 1


@pytest.mark.parametrize("case", ["causal GQA 4", "padded rows, split", "mask and key_lengths", "varlen",
                                  "decode stays mma.sync", "f16"])
def test_attention_wgmma(case):
    """The Hopper mainloop (two-half layout, descriptor operands, P from registers, V MN-major)
    against the reference, through the same checks as the mma.sync path."""
    m = _mask(5, (2, 4, 70, 130), 0.6, (1, 2, 5))
    runs = {
        "causal GQA 4": lambda: run_padded("wgmma", 1, 8, 2, 70, 130, True, wgmma=True),
        "padded rows, split": lambda: run_padded("wgmma split", 2, 4, 2, 40, 200, True, force_splits=(2, 2),
                                                 modes=("f64",), wgmma=True),
        "mask and key_lengths": lambda: run_padded("wgmma mask", 2, 4, 2, 70, 130, False, mask=m,
                                                   key_lengths=np.array([100, 17]), modes=("f64",), wgmma=True),
        "varlen": lambda: run_varlen("wgmma varlen", [70, 3, 130], [70, 200, 130], 4, 2, True, q_start=1, q_tail=2,
                                     modes=("f64", "bf16"), wgmma=True),
        "decode stays mma.sync": lambda: run_padded("wgmma decode", 2, 16, 2, 1, 300, True, modes=("f64",),
                                                    wgmma=True),
        "f16": lambda: run_padded("wgmma f16", 1, 4, 2, 33, 100, True, modes=("f16",), wgmma=True),
    }
    stats = runs[case]()
    assert stats["wgmma"] == (case != "decode stays mma.sync"), stats


@pytest.mark.parametrize("bug", ["V leading byte offset 4096", "V LBO and SBO swapped", "no proxy fence",
                                 "K k step of 16 bytes",
                                 "Q halves swapped", "loader pass of 256-byte rows", "no wgmma wait"])
def test_attention_wgmma_planted_bugs(monkeypatch, bug):
    """Each planted bug in the Hopper mainloop must give wrong numbers or a ModelError."""
    desc, offset = attention.wgmma_desc_sw128, attention.wgmma_offset

    init = attention.KVLoader.__init__

    def loader_256(self, *args):
        init(self, *args)
        self.pass_bytes = attention.LOAD_ROWS_PER_PASS * attention.ROW_BYTES

    def v_lbo_4096(addr, leading=16, stride=1024):
        return desc(addr, 4096 if leading == attention.HALF_TILE_KV_BYTES else leading, stride)

    target, name, patched = {
        "V leading byte offset 4096": (attention, "wgmma_desc_sw128", v_lbo_4096),
        "V LBO and SBO swapped": (attention, "wgmma_desc_sw128",
                                  lambda addr, leading=16, stride=1024: desc(addr, stride, leading)
                                  if leading == attention.HALF_TILE_KV_BYTES else desc(addr, leading, stride)),
        "no proxy fence": (primitives.Smem, "fence_proxy_async", lambda self, threads: None),
        "K k step of 16 bytes": (attention, "WGMMA_STEP_BYTES", 16),
        "Q halves swapped": (attention, "wgmma_offset",
                             lambda row, chunk, rows: offset(row, chunk ^ 8, rows) if rows == attention.BLOCK_M
                             else offset(row, chunk, rows)),
        "loader pass of 256-byte rows": (attention.KVLoader, "__init__", loader_256),
        "no wgmma wait": (primitives.Smem, "wgmma_wait", lambda self, n: None),
    }[bug]
    monkeypatch.setattr(target, name, patched)
    try:
        run_padded("planted", 1, 8, 2, 40, 130, True, modes=("f64",), wgmma=True)
    except (AssertionError, ModelError):
        return
    pytest.fail(f"planted bug '{bug}' not caught")


def test_attention_f16():
    run_padded("f16", 2, 4, 2, 17, 130, True, modes=("f16",))


def test_attention_planted_bugs(monkeypatch):
    """Index bugs the comparison must catch: K / V ldmatrix addresses without the swizzle, and a
    causal limit one key too far."""
    def unswizzled(row, c_lane):
        return (row * attention.HEAD_DIM + c_lane * attention.CHUNK_ELEMS) * 2

    with monkeypatch.context() as patch:
        patch.setattr(attention, "lane_offset", unswizzled)
        with pytest.raises(AssertionError, match="out max error"):
            run_padded("ldmatrix without swizzle", 2, 2, 1, 1, 130, False, modes=("f64",))
    last_visible_key = attention.last_visible_key
    with monkeypatch.context() as patch:
        patch.setattr(attention, "last_visible_key", lambda p, seq, s: last_visible_key(p, seq, s) + p.causal)
        with pytest.raises(AssertionError, match="out max error"):
            run_padded("causal off by one", 2, 2, 1, 17, 17, True, modes=("f64",))


def test_attention_planted_bug_stray_zero_fill_address(monkeypatch):
    """The loader before commit 58baa8c gave a zero-filled K / V row's cp.async the row's own
    address, past the keys (past the tensor for the last sequence): the address check must fire."""
    rows_per_pass = attention.LOAD_ROWS_PER_PASS

    def load_with_row_address(self, sm, gbuf, tile_base, seqlen_k, what):
        row_src = self.src
        for i in range(attention.BLOCK_N // rows_per_pass):
            in_range = self.first_key + i * rows_per_pass < seqlen_k
            dst = tile_base + self.dst + i * rows_per_pass * attention.ROW_BYTES
            attention.cp_async_16(sm, gbuf, dst, row_src, in_range, what)  # was: in_range ? row_src : fallback
            row_src = row_src + self.pass_step

    monkeypatch.setattr(attention.KVLoader, "load", load_with_row_address)
    with pytest.raises(ModelError, match="zero-fill source"):
        run_padded("row address for zero-filled rows", 2, 4, 2, 17, 130, True, modes=("f64",))


def test_attention_hazards_caught(monkeypatch):
    """Pipeline bugs the shared-memory model must catch: no barrier after the wait, and a wait that
    leaves the current tile in flight."""
    with monkeypatch.context() as patch:
        patch.setattr(primitives.Smem, "barrier", lambda self: None)
        with pytest.raises(ModelError, match="no barrier"):
            run_padded("no __syncthreads", 1, 2, 1, 1, 130, False, modes=("f64",))
    wait = primitives.Smem.wait
    with monkeypatch.context() as patch:
        patch.setattr(primitives.Smem, "wait", lambda self, n: wait(self, n + 1))
        with pytest.raises(ModelError, match="in flight"):
            run_padded("wait_group one deeper", 1, 2, 1, 1, 130, False, modes=("f64",))


@pytest.mark.slow
def test_attention_sweep(sweep):
    """The padded grid the model was first validated on, every mask in both modes, and the rest of
    its split-KV and varlen cases (about a minute)."""
    for (Hq, Hkv), (Sq, Skv), causal in itertools.product(
            [(2, 1), (4, 2), (8, 8), (16, 1)], [(1, 1), (1, 130), (3, 200), (17, 17), (70, 20), (65, 65), (130, 130)],
            (False, True)):
        if Sq >= 65 and Hq >= 8 and not causal:
            continue
        small = Sq * Hq <= 300
        run_padded(f"H{Hq}/{Hkv} S{Sq}/{Skv} causal={causal}", 2 if small else 1, Hq, Hkv, Sq, Skv, causal,
                   modes=("f64", "bf16") if small else ("f64",))
    for shape, causal in [((2, 4, 17, 130), False), ((2, 4, 17, 130), True), ((1, 4, 17, 130), True),
                          ((2, 1, 17, 130), False), ((1, 1, 3, 200), True)]:
        mb, mh, Sq, Skv = shape
        Hq, Hkv = (16, 1) if Sq == 3 else (4, 2)
        run_padded(f"mask {list(shape)}", 2, Hq, Hkv, Sq, Skv, causal,
                   mask=_mask(mb * 10 + mh, shape, 0.5, (mb - 1, mh - 1, 1)))
    run_padded("split plan, not causal", 1, 16, 1, 1, 600, False, num_sms=2)
    run_padded("split 3x1 causal", 2, 2, 1, 3, 200, True, force_splits=(3, 1))
    run_varlen("varlen, not causal", [5, 0, 70, 1], [5, 3, 130, 0], 4, 2, False)
    run_varlen("varlen outside tokens H8/8", [5, 20, 1], [5, 200, 1], 8, 8, True, q_start=3, q_tail=5)


# =============================================================================================
# MoE experts pipeline (kernel_models.moe vs reference.moe_permute / moe_experts)
# =============================================================================================
def _moe_case(T, E, k, H, I, ids=None, seed=0, empty=()):
    rng = np.random.default_rng(seed)
    if ids is None:
        allowed = [e for e in range(E) if e not in empty]
        ids = np.stack([rng.choice(allowed, size=k, replace=len(allowed) < k) for _ in range(T)]) if T \
            else np.zeros((0, k), np.int64)
    ids = np.asarray(ids, np.int64).reshape(T, k)
    x = _to_t(rng.standard_normal((T, H)))
    w = rng.random((T, k)) + 0.05
    w = (w / w.sum(1, keepdims=True) if T else w).astype(np.float32).astype(np.float64)  # fp32 weights
    gate_up = _to_t(rng.standard_normal((E, 2 * I, H)) / np.sqrt(H))
    down = _to_t(rng.standard_normal((E, H, I)) / np.sqrt(I))
    return x, ids, w, gate_up, down


def _moe_reference(x, ids, w, gate_up, down, dtype):
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return R.moe_experts(t(x), torch.from_numpy(ids), torch.from_numpy(w).float(), t(gate_up), t(down)).double().numpy()


def run_moe(T, E, k, H, I, ids=None, empty=(), seed=0, hidden_stride=None, modes=("f64", "bf16"), wgmma=False):
    """Model vs reference.moe_experts: 'f64' to 1e-12, 'bf16' / 'f16' within 2x the reference's
    own error in that dtype. Returns the f64 run's stats."""
    x, ids, w, gate_up, down = _moe_case(T, E, k, H, I, ids=ids, seed=seed, empty=empty)
    truth = _moe_reference(x, ids, w, gate_up, down, torch.float64)
    stats = None
    for mode in modes:
        if mode == "f16":
            x, gate_up, down = (torch.from_numpy(a).half().double().numpy() for a in (x, gate_up, down))
            truth = _moe_reference(x, ids, w, gate_up, down, torch.float64)
        out, run_stats = moe.run_experts(x, ids, w, gate_up, down, mode=mode, hidden_stride=hidden_stride,
                                         wgmma=wgmma)
        if mode == "f64":
            stats = run_stats
            assert np.abs(out - truth).max(initial=0.0) < 1e-12, run_stats.get("cfg")
        elif T:
            baseline = _moe_reference(x, ids, w, gate_up, down, _torch_dtype(mode))
            err, base_err = np.abs(out - truth).max(), np.abs(baseline - truth).max()
            assert err <= 2 * base_err + 1e-6, f"{mode}: error {err:.3g}, reference in {mode} {base_err:.3g}"
    return stats


@pytest.mark.parametrize("N,E,row_align,ids", [
    (48, 4, 16, None), (10, 8, 16, None), (1, 4, 16, None),
    (280, 4, 128, "all on expert 2"),
    (2049, 8, 64, None),  # two launches: count kernel + multi-tile scatter
    (6000, 128, 16, None),
])
def test_moe_permute(N, E, row_align, ids):
    rng = np.random.default_rng(N)
    ids = np.full(N, 2) if ids else rng.integers(0, E, N)
    sorted_rows, offsets, inverse = moe.permute(ids, E, row_align)
    ref_sorted, ref_offsets, ref_inverse = R.moe_permute(torch.from_numpy(ids).view(-1, 1), E, row_align)
    assert np.array_equal(sorted_rows.d, ref_sorted.numpy())
    assert np.array_equal(offsets.d, ref_offsets.numpy())
    assert np.array_equal(inverse.d, ref_inverse.numpy())


@pytest.mark.parametrize("T,k,E,row_align", [(1, 8, 128, 16), (3, 2, 8, 16), (16, 8, 128, 16), (16, 16, 512, 64),
                                               (5, 1, 4, 1), (16, 8, 8, 128), (64, 8, 128, 16), (32, 16, 512, 64),
                                               (64, 8, 8, 16)])  # up to 512 picks: one per thread
def test_router_one_block_permutation(T, k, E, row_align):
    """The router's one-block decode launch (router.cuh kPermute): its picks, then permute_one_block on
    them, equal reference.moe_router then reference.moe_permute."""
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = _distinct_logits(g, T, E, torch.bfloat16)
    if E == 8:  # crowd: every token's picks over few experts
        logits[:, :4] += 8
    _, ids, counts = router.moe_router(logits, k, True)
    sorted_rows, offsets, inverse = moe.permute_one_block(ids.numpy().reshape(-1), counts.numpy(), E, row_align)
    ref_ids = R.moe_router(logits, k, True)[1]
    ref_sorted, ref_offsets, ref_inverse = R.moe_permute(ref_ids, E, row_align)
    assert np.array_equal(sorted_rows.d, ref_sorted.numpy())
    assert np.array_equal(offsets.d, ref_offsets.numpy())
    assert np.array_equal(inverse.d, ref_inverse.numpy())


def test_moe_permute_drops_out_of_range_ids():
    sorted_rows, _, inverse = moe.permute(np.array([0, 5, 1, -1, 1, 0, 7, 2]), 4, 16)
    assert list(inverse.d[[1, 3, 6]]) == [-1, -1, -1]
    assert (sorted_rows.d >= 0).sum() == 5


@pytest.mark.parametrize("case", [
    "decode, an empty expert, k-tiles < stages",  # H 128 / I 64: 2 and 1 k-tiles, 4 stages
    "decode, three empty experts",
    "decode, one token",
    "decode, all picks on one expert",
    "decode, k 1 on one expert, strided hidden",
    "no tokens",
    "mid, two empty experts",
    "mid, H 384",
    "prefill, all picks on two experts",  # GEMM1: 4 k-tiles (the 3-stage ring wraps); GEMM2: 2 < 3
    "prefill, an empty expert, strided hidden",
])
def test_moe_experts(case):
    args = {
        "decode, an empty expert, k-tiles < stages": dict(T=24, E=4, k=2, H=128, I=64, empty=(3,)),
        "decode, three empty experts": dict(T=30, E=8, k=2, H=128, I=128, empty=(1, 4, 6), seed=2),
        "decode, one token": dict(T=1, E=4, k=2, H=128, I=64, seed=3),
        "decode, all picks on one expert": dict(T=20, E=4, k=2, H=128, I=64, ids=np.full((20, 2), 2), seed=4),
        "decode, k 1 on one expert, strided hidden": dict(T=17, E=4, k=1, H=256, I=64, ids=np.zeros((17, 1)),
                                                          seed=5, hidden_stride=256 + 64),
        "no tokens": dict(T=0, E=4, k=2, H=128, I=64, modes=("f64",)),
        "mid, two empty experts": dict(T=40, E=4, k=2, H=256, I=128, empty=(0, 3), seed=6),
        "mid, H 384": dict(T=60, E=4, k=2, H=384, I=256, seed=7, modes=("f64",)),
        "prefill, all picks on two experts": dict(T=140, E=4, k=2, H=256, I=128, ids=np.tile([1, 2], (140, 1)),
                                                  seed=8, modes=("f64",)),
        "prefill, an empty expert, strided hidden": dict(T=150, E=4, k=2, H=256, I=128, empty=(0,), seed=9,
                                                         hidden_stride=256 + 8, modes=("f64",)),
    }[case]
    stats = run_moe(**args)
    if args["T"]:
        assert stats["cfg"] == case.split(",")[0]


def test_moe_experts_f16():
    run_moe(40, 4, 2, 256, 128, seed=21, empty=(2,), modes=("f16",))


@pytest.mark.parametrize("case", ["all picks on two experts", "an empty expert, strided hidden", "f16"])
def test_moe_experts_wgmma(case):
    """The Hopper mainloop of the prefill regime: the same loads and epilogues, operands read
    through SW128 descriptors from the 1024-byte aligned stages."""
    args = {
        "all picks on two experts": dict(T=140, E=4, k=2, H=256, I=128, ids=np.tile([1, 2], (140, 1)), seed=8,
                                         modes=("f64", "bf16")),
        "an empty expert, strided hidden": dict(T=150, E=4, k=2, H=256, I=128, empty=(0,), seed=9,
                                                hidden_stride=256 + 8, modes=("f64",)),
        "f16": dict(T=140, E=4, k=2, H=128, I=64, seed=12, modes=("f16",)),
    }[case]
    stats = run_moe(**args, wgmma=True)
    assert stats is None or (stats["cfg"] == "prefill" and stats["wgmma"])


@pytest.mark.parametrize("bug", ["descriptor stride 512", "no proxy fence", "proxy fence after the barrier",
                                 "proxy fence by one thread", "no wgmma wait", "A rows of warpgroup 0 for both",
                                 "k step of 16 bytes", "stages not 1024-aligned"])
def test_moe_wgmma_planted_bugs(monkeypatch, bug):
    """Each planted bug in the wgmma mainloop must give wrong numbers or a ModelError."""
    desc, fence, barrier = moe.wgmma_desc_sw128, primitives.Smem.fence_proxy_async, primitives.Smem.barrier

    def barrier_then_fence(self):
        barrier(self)
        fence(self, np.arange(256))

    target, name, patched = {
        "descriptor stride 512": (moe, "wgmma_desc_sw128", lambda a: desc(a) - ((512 >> 4) << 32)),
        "no proxy fence": (primitives.Smem, "fence_proxy_async", lambda self, threads: None),
        "proxy fence after the barrier": (primitives.Smem, "barrier", barrier_then_fence),
        "proxy fence by one thread": (primitives.Smem, "fence_proxy_async",
                                      lambda self, threads: fence(self, threads[:1])),
        "no wgmma wait": (primitives.Smem, "wgmma_wait", lambda self, n: None),
        "A rows of warpgroup 0 for both": (moe, "wgmma_a_offset", lambda grp: 0),
        "k step of 16 bytes": (moe, "WGMMA_STEP_BYTES", 16),
        "stages not 1024-aligned": (moe, "round_up", lambda a, b: a),
    }[bug]
    if bug == "proxy fence after the barrier":
        monkeypatch.setattr(primitives.Smem, "fence_proxy_async", lambda self, threads: None)
    x, ids, w, gate_up, down = _moe_case(140, 4, 2, 256, 128, seed=13)
    truth = _moe_reference(x, ids, w, gate_up, down, torch.float64)
    monkeypatch.setattr(target, name, patched)
    try:
        out, _ = moe.run_experts(x, ids, w, gate_up, down, mode="f64", wgmma=True)
    except ModelError:
        return
    assert np.abs(out - truth).max() > 1e-9, f"planted bug '{bug}' not caught"


@pytest.mark.parametrize("bug", ["no swizzle on the cp.async store", "B ldmatrix chunk = lane / 16",
                                 "GEMM1 weight rows not per-warp interleaved", "wait_group one deeper",
                                 "no __syncthreads in the mainloop"])
def test_moe_planted_bugs(monkeypatch, bug):
    """Each planted bug must give wrong numbers or a ModelError."""
    lane_addr_terms, weight_row, wait = moe.lane_addr_terms, moe.weight_row, primitives.Smem.wait

    def b_chunk_swapped(cfg, warp_m, warp_n):
        swz, a_row, a_chunk, b_row, _ = lane_addr_terms(cfg, warp_m, warp_n)
        return swz, a_row, a_chunk, b_row, np.arange(32) // 16

    def gate_up_not_interleaved(cfg, kind, r, col_tile, n_out):
        if kind == moe.DOWN:
            return weight_row(cfg, kind, r, col_tile, n_out)
        half = cfg.kWarpN // 2
        return (r // half % 2) * n_out + col_tile * (cfg.kBlockN // 2) + r % half

    target, name, patched = {
        "no swizzle on the cp.async store": (moe, "swizzled", lambda row, chunk: row * 64 + chunk * 8),
        "B ldmatrix chunk = lane / 16": (moe, "lane_addr_terms", b_chunk_swapped),
        "GEMM1 weight rows not per-warp interleaved": (moe, "weight_row", gate_up_not_interleaved),
        "wait_group one deeper": (primitives.Smem, "wait", lambda self, n: wait(self, n + 1)),
        "no __syncthreads in the mainloop": (primitives.Smem, "barrier", lambda self: None),
    }[bug]
    x, ids, w, gate_up, down = _moe_case(40, 4, 2, 256, 128, seed=11)
    truth = _moe_reference(x, ids, w, gate_up, down, torch.float64)
    monkeypatch.setattr(target, name, patched)
    try:
        out, _ = moe.run_experts(x, ids, w, gate_up, down, mode="f64")
    except ModelError:
        return
    assert np.abs(out - truth).max() > 1e-9, f"planted bug '{bug}' not caught"


@pytest.mark.slow
def test_moe_sweep(sweep):
    for N, E, row_align in [(80, 4, 64), (2048, 16, 128), (20000, 64, 128)]:
        ids = np.random.default_rng(N).integers(0, E, N)
        sorted_rows, offsets, inverse = moe.permute(ids, E, row_align)
        ref = R.moe_permute(torch.from_numpy(ids).view(-1, 1), E, row_align)
        assert all(np.array_equal(a.d, b.numpy()) for a, b in zip((sorted_rows, offsets, inverse), ref))
    run_moe(140, 4, 2, 256, 256, ids=np.tile([1, 2], (140, 1)), seed=8)
    run_moe(150, 4, 2, 256, 128, empty=(0,), seed=9, hidden_stride=256 + 8)  # bf16 too
    run_moe(60, 4, 2, 384, 256, seed=7)


# =============================================================================================
# router (kernel_models.router vs reference.moe_router)
# =============================================================================================
def _distinct_logits(g, T, E, dtype):
    """Logits without ties: a permutation of E distinct values per token."""
    perm = torch.argsort(torch.rand(T, E, generator=g), dim=-1)
    return ((perm - E // 2).float() / 32).to(dtype)


def check_router(logits, k, norm_topk_prob, num_sms=132, expect_ids=None):
    """Model vs reference.moe_router (ids and counts exactly, weights within 1 ulp / 1e-6), and the
    kernel's softmax bitwise equal to PyTorch's CUDA warp softmax (emulated)."""
    w, ids, counts = router.moe_router(logits, k, norm_topk_prob, num_sms)
    ref_w, ref_ids, ref_counts = R.moe_router(logits, k, norm_topk_prob)
    x = logits.float().numpy()
    T, E = x.shape
    slots = router.SLOTS_SMALL if E <= router.SLOTS_SMALL * 32 else router.SLOTS_LARGE
    lanes = np.full((T, 32, slots), -np.inf, np.float32)
    for e in range(E):
        lanes[:, e % 32, e // 32] = x[:, e]
    p_kernel = router.softmax_lanes(lanes, slots)
    p_kernel = np.stack([p_kernel[:, e % 32, e // 32] for e in range(E)], 1)
    p_torch_cuda = router.torch_cuda_softmax(x)
    assert np.array_equal(p_kernel, p_torch_cuda, equal_nan=True), "softmax differs from torch's CUDA softmax"
    assert np.array_equal(ids.numpy(), np.argsort(-p_torch_cuda, axis=1, kind="stable")[:, :k])
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=E).int())
    if expect_ids is not None:
        assert torch.equal(ids, expect_ids)
        return w
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, ref_counts)
    if logits.dtype == torch.float32:
        assert ((w - ref_w).abs() / ref_w.abs().clamp_min(1e-38)).max().item() <= 1e-6
    else:
        assert (w.view(torch.int16).int() - ref_w.view(torch.int16).int()).abs().max().item() <= 1
    return w


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (8, 8), (64, 8), (128, 8), (128, 16), (512, 16), (512, 2), (60, 4),
                                 (5, 5), (160, 16)])
def test_router_distinct(dtype, E, k):
    """Both register footprints (E <= 128: 4 slots, else 16), E not a multiple of 32, k = E."""
    g = torch.Generator().manual_seed(E * 100 + k)
    for T, norm_topk_prob in itertools.product((1, 7, 83), (True, False)):
        check_router(_distinct_logits(g, T, E, dtype), k, norm_topk_prob)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("E,k", [(8, 2), (128, 8), (512, 16)])
def test_router_random_and_strided(dtype, E, k):
    """Natural logits (bf16 ties included: the reference fixes their order), and strided logits
    on a small grid (1 SM: 4 blocks, warps loop over tokens)."""
    g = torch.Generator().manual_seed(E)
    check_router(torch.randn(83, E, generator=g).to(dtype), k, True)
    wide = torch.randn(257, 3 * E + 1, generator=g).to(dtype)
    check_router(wide[:, E:2 * E], k, True, num_sms=1)


def test_router_ties():
    """Exact ties go to the lower expert index."""
    for E in (8, 128, 512):
        w = check_router(torch.zeros(37, E), 8, False, expect_ids=torch.arange(8, dtype=torch.int32).expand(37, 8))
        assert (w == 1.0 / E).all()
    logits = torch.zeros(4, 64, dtype=torch.bfloat16)
    logits[:, [3, 40, 9, 33]] = 1.0
    check_router(logits, 3, True, expect_ids=torch.tensor([[3, 9, 33]] * 4, dtype=torch.int32))
    g = torch.Generator().manual_seed(5)  # natural bf16 ties at the k-th place (~6% of tokens)
    for E, k in ((128, 8), (512, 16)):
        logits = torch.randn(300, E, generator=g).to(torch.bfloat16)
        assert torch.equal(router.moe_router(logits, k, True)[1], R.moe_router(logits, k, True)[1])


def test_router_nan_inf():
    """NaN / inf logits: every pick a distinct expert in [0, E), counts consistent."""
    g = torch.Generator().manual_seed(6)
    for E, k in ((128, 8), (60, 4)):
        logits = torch.randn(5, E, generator=g)
        logits[0, 3] = logits[1, :] = float("nan")
        logits[2, 7] = float("inf")
        logits[3, :] = float("-inf")
        logits[4, : E // 2] = float("-inf")
        _, ids, counts = router.moe_router(logits, k, True)
        assert all(len(set(row)) == k for row in ids.tolist())
        assert ids.min().item() >= 0 and ids.max().item() < E
        assert counts.sum().item() == 5 * k


def test_router_planted_bug(monkeypatch):
    """Ties to the higher expert index must be caught."""
    def highest_candidate(v):
        return np.where(v == router.NO_CANDIDATE, 0, v).max(axis=1, keepdims=True)
    monkeypatch.setattr(router, "warp_min_u32", highest_candidate)
    with pytest.raises(AssertionError):
        check_router(torch.zeros(37, 8), 2, False, expect_ids=torch.arange(2, dtype=torch.int32).expand(37, 2))


# =============================================================================================
# qk_norm_rope (kernel_models.rope vs reference.qk_norm_rope)
# =============================================================================================
_ROPE = rope_parameters(tiny_config(rope={"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 32768},
                                    head_dim=HEAD_DIM, max_position_embeddings=131072))
INV_FREQ, ATTN_SCALING, EPS = _ROPE.inv_freq, _ROPE.attention_scaling, 1e-6


def _rope_inputs(g, lead, hq, hkv, dtype):
    q = torch.randn(*lead, hq, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(*lead, hkv, HEAD_DIM, generator=g).to(dtype)
    wq = (1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to(dtype)
    wk = (1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to(dtype)
    pos = torch.randint(0, 131072, lead, generator=g)
    pos.view(-1)[-1] = 131071
    return q, k, wq, wk, pos


def _rope_reference(q, k, wq, wk, pos):
    """(truth in fp64, baseline in q's dtype) of reference.qk_norm_rope."""
    truth = R.qk_norm_rope(q.double(), k.double(), wq.double(), wk.double(), pos, INV_FREQ.double(), ATTN_SCALING,
                           EPS)
    return truth, R.qk_norm_rope(q, k, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)


def _judge(pairs):
    """testing.check on (name, got, baseline, truth) tuples."""
    problems = [f"{name}: {problem}" for name, got, base, truth in pairs
                if (problem := testing.check(got, base, truth))]
    assert not problems, "; ".join(problems)


def _rope_spec(x, w, pos, dt):
    """The formula of qk_norm_rope.cuh's header, element-indexed (no lanes), with the kernel's
    sum-of-squares order (per lane, FFMA over its element pairs i, i + 64, then the butterfly)
    and rotation (fmaf(n, cos, -(partner sin)) below 64): the lane model must agree bitwise."""
    to_t = {"bf16": bf16_rne, "fp16": fp16_rne, "fp32": lambda a: np.asarray(a, np.float32)}[dt]
    xf = x.float().numpy()
    kvec = 16 // x.element_size()
    lanes = 64 // kvec
    halves = xf.reshape(xf.shape[:-1] + (2, lanes, kvec))
    part = np.zeros(xf.shape[:-1] + (lanes,), np.float32)
    for j in range(kvec):
        for half in range(2):
            e = halves[..., half, :, j]
            part = fp.fma32(e, e, part)
    offset = lanes // 2
    while offset:
        part = (part + part[..., np.arange(lanes) ^ offset]).astype(np.float32)
        offset //= 2
    rstd = fp.rsqrtf((part[..., 0] * np.float32(1 / 128) + np.float32(EPS)).astype(np.float32))
    n = to_t((to_t((xf * rstd[..., None]).astype(np.float32)) * w.float().numpy()).astype(np.float32))
    angle = (pos.reshape(-1).numpy().astype(np.float32)[:, None] * INV_FREQ.numpy()[None, :]).astype(np.float32)
    s, c = fp.sincos_accurate(angle)
    c = (np.concatenate([c, c], -1) * np.float32(ATTN_SCALING)).astype(np.float32)[:, None]
    s = (np.concatenate([s, s], -1) * np.float32(ATTN_SCALING)).astype(np.float32)[:, None]
    partner_s = (np.concatenate([n[..., 64:], n[..., :64]], -1) * s).astype(np.float32)
    return to_t(fp.fma32(n, c, np.concatenate([-partner_s[..., :64], partner_s[..., 64:]], -1)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T", [1, 7, 83])
@pytest.mark.parametrize("hq,hkv", [(16, 8), (32, 4), (64, 4), (5, 3)])
def test_rope_layouts(dtype, T, hq, hkv):
    """Functional on contiguous inputs (also bitwise against the element-indexed formula); in
    place on the q / k slices of a fused qkv projection (int32 positions for T = 7); functional on
    a misaligned q and a head-major k (the glue copies them)."""
    g = torch.Generator().manual_seed(T * 100 + hq)
    q, k, wq, wk, pos = _rope_inputs(g, (T,), hq, hkv, dtype)
    (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
    qo, ko = rope.qk_norm_rope(q, k, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    _judge([("q", qo, bq, tq), ("k", ko, bk, tk)])
    for got, x, w in ((qo, q, wq), (ko, k, wk)):
        assert np.array_equal(got.float().numpy(), _rope_spec(x, w, pos, rope.DTYPE_NAME[dtype]))

    D = HEAD_DIM
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g).to(dtype)
    qkv[:, :hq * D] = q.reshape(T, -1)
    qkv[:, hq * D:(hq + hkv) * D] = k.reshape(T, -1)
    v_before = qkv[:, (hq + hkv) * D:].clone()
    qv, kv = qkv[:, :hq * D].view(T, hq, D), qkv[:, hq * D:(hq + hkv) * D].view(T, hkv, D)
    rope.qk_norm_rope_(qv, kv, wq, wk, pos.int() if T == 7 else pos, INV_FREQ, ATTN_SCALING, EPS)
    assert torch.equal(qkv[:, (hq + hkv) * D:], v_before)
    _judge([("q in place", qv, bq, tq), ("k in place", kv, bk, tk)])

    big = torch.randn(T * hq * D + 1, generator=g).to(dtype)
    q_misaligned = big[1:].view(T, hq, D)
    q_misaligned.copy_(q)
    k_head_major = k.transpose(0, 1).contiguous().transpose(0, 1)
    qo, ko = rope.qk_norm_rope(q_misaligned, k_head_major, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    _judge([("q misaligned", qo, bq, tq), ("k head-major", ko, bk, tk)])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rope_rare_layouts(dtype):
    """In place on a non-collapsible [B, S(+1)] q (copy, then write back); single heads with an odd
    head stride (ignored when H == 1)."""
    g = torch.Generator().manual_seed(1)
    B, S, hq, hkv = 3, 5, 32, 4
    q, k, wq, wk, pos = _rope_inputs(g, (B, S), hq, hkv, dtype)
    (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
    qb = torch.zeros(B, S + 1, hq, HEAD_DIM).to(dtype)[:, :S]
    qb.copy_(q)
    kb = k.clone()
    rope.qk_norm_rope_(qb, kb, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    _judge([("q", qb, bq, tq), ("k", kb, bk, tk)])

    q1 = torch.zeros(7, 1, HEAD_DIM + 1).to(dtype)[..., :HEAD_DIM]
    q1.copy_(q.reshape(-1, hq, HEAD_DIM)[:7, :1])
    k1 = k.reshape(-1, hkv, HEAD_DIM)[:7, :1].clone()
    p1 = pos.reshape(-1)[:7]
    (tq, tk), (bq, bk) = _rope_reference(q1, k1, wq, wk, p1)
    qo, ko = rope.qk_norm_rope(q1, k1, wq, wk, p1, INV_FREQ, ATTN_SCALING, EPS)
    _judge([("q H=1", qo, bq, tq), ("k H=1", ko, bk, tk)])


def run_rope_cache(g, dtype, B, S, hq, hkv, slots, s_max=64, fused=True):
    """qk_norm_rope_cache_ model: q in place, k / v into the cache at in-range slots only, every
    other cache slot and the k / v inputs untouched."""
    q, k, wq, wk, pos = _rope_inputs(g, (B, S), hq, hkv, dtype)
    v = torch.randn(B, S, hkv, HEAD_DIM, generator=g).to(dtype)
    if fused:  # q, k, v slices of one projection
        qkv = torch.zeros(B, S, (hq + 2 * hkv) * HEAD_DIM).to(dtype)
        qv, kv, vv = (qkv[..., a * HEAD_DIM:b * HEAD_DIM].view(B, S, -1, HEAD_DIM)
                      for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
        qv.copy_(q), kv.copy_(k), vv.copy_(v)
    else:
        qv, kv, vv = q.clone(), k.clone(), v.clone()
    caches = torch.randn(2, B, hkv, s_max + 8, HEAD_DIM, generator=g).to(dtype)[..., :s_max, :]  # padded slots
    before = caches.clone()
    (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
    rope.qk_norm_rope_cache_(qv, kv, vv, caches[0], caches[1], slots, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    sl = slots.long()
    in_range = (sl >= 0) & (sl < s_max)
    s_idx, written = torch.nonzero(in_range).flatten(), sl[in_range]
    assert torch.equal(caches[1][:, :, written].transpose(1, 2), v[:, s_idx])
    others = [i for i in range(s_max) if i not in written.tolist()]
    assert torch.equal(caches[:, :, :, others], before[:, :, :, others])
    assert torch.equal(kv, k) and torch.equal(vv, v)
    _judge([("q", qv, bq, tq), ("k_cache", caches[0][:, :, written].transpose(1, 2), bk[:, s_idx], tk[:, s_idx])])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rope_cache(dtype):
    g = torch.Generator().manual_seed(2)
    for (B, S), (hq, hkv) in itertools.product([(1, 1), (4, 1), (3, 4), (2, 37)], [(16, 8), (32, 4), (64, 4)]):
        run_rope_cache(g, dtype, B, S, hq, hkv, torch.arange(5, 5 + S, dtype=torch.int32 if S == 4 else torch.int64))
    run_rope_cache(g, dtype, 2, 3, 16, 8, torch.tensor([-1, 3, 16]), s_max=16)  # slots out of range: skipped
    run_rope_cache(g, dtype, 2, 3, 5, 3, torch.tensor([7, 0, 2], dtype=torch.int32), s_max=8, fused=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_cache_v_layout_and_copied_q(dtype):
    """v_cache with other strides than k_cache (slot-major), and a q the kernel cannot address."""
    g = torch.Generator().manual_seed(4)
    B, S, hq, hkv, s_max = 3, 4, 16, 8, 12
    q, k, wq, wk, pos = _rope_inputs(g, (B, S), hq, hkv, dtype)
    v = torch.randn(B, S, hkv, HEAD_DIM, generator=g).to(dtype)
    qb = torch.zeros(B, S + 1, hq, HEAD_DIM).to(dtype)[:, :S]
    qb.copy_(q)
    k_cache = torch.randn(B, hkv, s_max, HEAD_DIM, generator=g).to(dtype)
    v_cache = torch.randn(B, s_max, hkv, HEAD_DIM, generator=g).to(dtype).transpose(1, 2)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([11, 0, 4, 7])
    rope.qk_norm_rope_cache_(qb, k, v, k_cache, v_cache, slots, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
    _judge([("q", qb, bq, tq), ("k_cache", k_cache[:, :, slots].transpose(1, 2), bk, tk)])
    assert torch.equal(v_cache[:, :, slots].transpose(1, 2), v)
    others = [i for i in range(s_max) if i not in slots.tolist()]
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


@pytest.mark.parametrize("ulps", [-2, 2])
def test_rope_and_norm_tolerate_rsqrtf_error(monkeypatch, ulps):
    """The GPU's rsqrtf is within 2 ulp, not correctly rounded: the checks must still pass."""
    monkeypatch.setattr(fp, "RSQRT_ULP_SHIFT", ulps)
    g = torch.Generator().manual_seed(8)
    for dtype in FLOAT_DTYPES:
        q, k, wq, wk, pos = _rope_inputs(g, (7,), 32, 4, dtype)
        (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
        qo, ko = rope.qk_norm_rope(q, k, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
        x = (torch.randn(7, 2560, generator=g) * 4).to(dtype)
        w = torch.randn(2560, generator=g).to(dtype)
        out, _, _ = norm.rms_norm(x, w, 1e-6)
        _judge([("q", qo, bq, tq), ("k", ko, bk, tk),
                ("rms_norm", out, R.rms_norm(x, w, 1e-6), R.rms_norm(x.double(), w.double(), 1e-6))])


def test_rope_planted_bug(monkeypatch):
    """A token's cos / sin taken from the wrong lane of the warp must be caught."""
    source = rope.sincos_source
    monkeypatch.setattr(rope, "sincos_source", lambda j, i, lanes, per: source((j + per) % (2 * per), i, lanes, per))
    g = torch.Generator().manual_seed(9)
    q, k, wq, wk, pos = _rope_inputs(g, (3,), 16, 8, torch.bfloat16)
    (tq, tk), (bq, bk) = _rope_reference(q, k, wq, wk, pos)
    qo, ko = rope.qk_norm_rope(q, k, wq, wk, pos, INV_FREQ, ATTN_SCALING, EPS)
    with pytest.raises(AssertionError):
        _judge([("q", qo, bq, tq), ("k", ko, bk, tk)])


# =============================================================================================
# rms_norm / add_rms_norm (kernel_models.norm vs reference.rms_norm / add_rms_norm)
# =============================================================================================
def check_norm(x, w, eps=1e-6, residual=None):
    """Model vs reference; add_rms_norm's residual_out must equal the rounded sum exactly."""
    if residual is None:
        out, _, path = norm.rms_norm(x, w, eps)
        _judge([(path, out, R.rms_norm(x, w, eps), R.rms_norm(x.double(), w.double(), eps))])
    else:
        out, res_out, path = norm.rms_norm(x, w, eps, residual=residual)
        truth, _ = R.add_rms_norm(x.double(), residual.double(), w.double(), eps)
        base, base_sum = R.add_rms_norm(x, residual, w, eps)
        assert torch.equal(res_out, base_sum), path
        _judge([(path, out, base, truth)])
    return path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("H,path_16bit,path_fp32", [
    (128, "vec block (32,4)", "vec block (32,4)"),  # a warp per row, 4 rows per block
    (1000, "vec block (32,4)", "vec block (64,1)"),
    (1001, "scalar", "scalar"),                     # not whole 16-byte vectors
    (2560, "vec block (96,1)", "vec block (160,1)"),
    (8192, "vec block (256,1)", "vec block (512,1)"),
    (8200, "vec block (288,1)", "scalar"),          # fp32: more than 512 threads x 4 vectors
    (16384, "vec block (512,1)", "scalar"),
])
def test_norm(dtype, H, path_16bit, path_fp32):
    """Warp-per-row, block-per-row and scalar paths, with and without the residual add."""
    g = torch.Generator().manual_seed(H)
    for T in (1, 7, 83):
        x = (torch.randn(T, H, generator=g) * 4).to(dtype)
        w = torch.randn(H, generator=g).to(dtype)
        assert check_norm(x, w).startswith(path_fp32 if dtype == torch.float32 else path_16bit)
        check_norm(x, w, residual=(torch.randn(T, H, generator=g) * 4).to(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_norm_layouts(dtype):
    g = torch.Generator().manual_seed(11)
    H = 2560
    big = (torch.randn(7, 3 * H, generator=g) * 4).to(dtype)

    def w():
        return torch.randn(H, generator=g).to(dtype)
    assert check_norm(big[:, H:2 * H], w()).startswith("vec")  # rows of stride 3H
    assert check_norm(big[:, 1:H + 1], w()).startswith("scalar")  # misaligned rows
    assert check_norm(big[:, :H], torch.randn(H + 1, generator=g).to(dtype)[1:]).startswith("scalar")
    check_norm((torch.randn(3, 6, H, generator=g) * 4).to(dtype)[:, :5], w())  # non-collapsible: copy
    check_norm(big[:, :H], w(), residual=big[:, 2 * H:])
    check_norm(big[:, :H], w(), residual=big[:, H + 1:2 * H + 1])
    check_norm(torch.randn(2, 83, 128, generator=g).to(dtype), torch.randn(128, generator=g).to(dtype))


def test_norm_zero_rows_eps_0():
    """rsqrt(0) = inf: the model gives NaN exactly where the reference does."""
    for dtype in FLOAT_DTYPES:
        x = torch.zeros(5, 256).to(dtype)
        w = torch.randn(256).to(dtype)
        out, _, _ = norm.rms_norm(x, w, 0.0)
        assert torch.equal(torch.isnan(out), torch.isnan(R.rms_norm(x, w, 0.0)))


def test_norm_planted_bug(monkeypatch):
    """A warp reduction over half the lanes must be caught: wrong numbers on the warp-per-row path,
    threads disagreeing on the total in block_reduce_sum."""
    warp_reduce_sum = norm.warp_reduce_sum
    monkeypatch.setattr(norm, "warp_reduce_sum", lambda v, width, lane_axis: warp_reduce_sum(v, width // 2, lane_axis))
    for H, caught in ((256, AssertionError), (2560, ModelError)):
        x = (torch.randn(7, H) * 4).to(torch.bfloat16)
        with pytest.raises(caught):
            check_norm(x, torch.randn(H).to(torch.bfloat16))


# =============================================================================================
# silu_and_mul (kernel_models.silu vs reference.silu_and_mul)
# =============================================================================================
def check_silu(x):
    out, path = silu.silu_and_mul(x)
    _judge([(path, out, R.silu_and_mul(x), R.silu_and_mul(x.double()))])
    return path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("I", [8, 12, 1000, 1001, 3072, 9728, 25600])
def test_silu(dtype, I):
    """Vector and scalar kernels, one and several column blocks."""
    g = torch.Generator().manual_seed(I)
    for T in (1, 7, 83):
        path = check_silu((torch.randn(T, 2 * I, generator=g) * 3).to(dtype))
        assert path.startswith("vec" if I % (16 // torch.empty(0, dtype=dtype).element_size()) == 0 else "scalar")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_silu_layouts_and_specials(dtype):
    g = torch.Generator().manual_seed(12)
    I = 768
    big = (torch.randn(7, 5 * I, generator=g) * 3).to(dtype)
    assert check_silu(big[:, I:3 * I]).startswith("vec")  # rows of stride 5I
    assert check_silu(big[:, 1:2 * I + 1]).startswith("scalar")  # misaligned
    check_silu(torch.randn(3, 6, 2 * I, generator=g).to(dtype)[:, :5])  # non-collapsible: copy
    x = torch.tensor([[float("-inf"), float("inf"), float("nan"), -100.0, 100.0, -0.0, 1e-30, 88.8] * 2]).to(dtype)
    out, _ = silu.silu_and_mul(x)
    torch.testing.assert_close(out, R.silu_and_mul(x), rtol=0, atol=0, equal_nan=True)  # inf, NaN, overflow


def test_silu_planted_bug(monkeypatch):
    """A grid one column block short leaves outputs unwritten: the write-count check must fire."""
    column_blocks = silu.column_blocks

    def one_short(inter, kvec, vectorized):
        cols, threads = column_blocks(inter, kvec, vectorized)
        return cols - 1, threads
    monkeypatch.setattr(silu, "column_blocks", one_short)
    with pytest.raises(ModelError, match="written"):
        silu.silu_and_mul(torch.randn(2, 2 * 25600).to(torch.bfloat16))  # 7 column blocks


# =============================================================================================
# fp helpers (kernel_models.fp) against exact arithmetic
# =============================================================================================
def test_fp_rounding_and_fma():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50000) * np.exp(rng.uniform(-20, 20, 50000))).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, np.nan, 0, -0.0, 3.3895314e38], np.float32)])
    t = torch.from_numpy(x)
    assert np.array_equal(bf16_rne(x), t.bfloat16().float().numpy(), equal_nan=True)
    assert np.array_equal(fp16_rne(x), t.half().float().numpy(), equal_nan=True)
    # fma near cancellation, against the exactly rounded rational
    from fractions import Fraction
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = (-(a.astype(np.float64) * b)).astype(np.float32) + rng.standard_normal(2000).astype(np.float32) * 1e-6

    def exact_f32(value):
        f = np.float32(float(value))
        candidates = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
        return min(candidates, key=lambda v: (abs(Fraction(float(v)) - value), int(np.array(v).view(np.uint32)) & 1))
    want = np.array([exact_f32(Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci)))
                     for ai, bi, ci in zip(a, b, c)], np.float32)
    assert np.array_equal(fp.fma32(a, b, c), want)


def test_fp_sincos_accuracy():
    """trig.cuh's claim: within 1.5 ulp of fp64 sin / cos at RoPE angles and random ones."""
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 131072, 100).astype(np.float32)
    angle = (pos[:, None] * INV_FREQ.numpy()[None, :]).astype(np.float32).reshape(-1)
    angle = np.concatenate([angle, rng.uniform(-3e5, 3e5, 4000).astype(np.float32),
                            np.float32([0, -0.0, 1e-30, np.pi / 4, 131071.0, -131071.0])])
    s, c = fp.sincos_accurate(angle)

    def ulps(got, want):
        e = np.floor(np.log2(np.maximum(np.abs(want), 1e-38)))
        return np.abs(got.astype(np.float64) - want) / 2.0 ** (e - 23)
    assert ulps(s, np.sin(angle.astype(np.float64))).max() <= 1.5
    assert ulps(c, np.cos(angle.astype(np.float64))).max() <= 1.5
    s, c = fp.sincos_accurate(np.float32([np.nan, np.inf, -np.inf]))
    assert np.isnan(s).all() and np.isnan(c).all()
