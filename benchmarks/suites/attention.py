"""attention_prefill (causal, q = k = v length), attention_varlen (causal prefill of packed
variable-length sequences), attention_decode (one query against a KV cache) and
qk_norm_rope_attention (prefill from the projections' q and k: QK-norm, YaRN RoPE, attention).

Head layouts of the Qwen3 models, head_dim 128, bf16. Correctness: the truth is HF-eager math in
fp32 and the same-dtype baseline is HF-eager math in bf16 (scores and P @ V in bf16, softmax in
fp32), the rule flash-attention's own tests use; both are computed per (batch, kv head, query
chunk) so they fit in memory at 32k tokens and 128k contexts.
"""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from qwen3x import ops, reference

from ..harness import Case, Provider, Skip
from ..providers import (
    cluster_combine_provider,
    l2_combine_provider,
    compiled,
    mma_sync_provider,
    no_fence_provider,
    serial_provider,
    no_pdl_provider,
    over_budget,
    qwen3x_provider,
)
from ..shapes import HEAD_DIM, MODELS, RMS_EPS
from .common import DTYPE, ELEM, hf_module, randn

ROW_TILE = 64  # kernel_traits.cuh kBlockM: the Hopper mainloop serves Sq * group >= one tile

LAYOUTS = tuple((m.name, m.hq, m.hkv) for m in MODELS)
PREFILL = ((1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (1, 32768), (8, 2048))  # (batch, seqlen)
DECODE_BATCH = (1, 16, 64, 256)
DECODE_CONTEXT = (1024, 8192, 32768, 131072)
CLUSTER_AB_MAX_BATCH = 16  # decode batches whose plans split the keys: qwen3x_cluster's and qwen3x_l2's A/B
VARLEN = {  # packed batches of 16384 tokens: documents of mixed lengths; many short ones
    "mixed": (3000, 500, 7000, 1200, 4000, 684),
    "short": (256,) * 64,
}
KV_BUDGET_BYTES = 16 * 2**30  # decode shapes whose K and V caches exceed this are left out
TRUTH_CHUNK = 1024  # queries per block in the chunked truth / baseline
SCALE = HEAD_DIM**-0.5
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


# ---------------------------------------------------------------------------------------------
# FLOP and byte formulas
# ---------------------------------------------------------------------------------------------
def causal_pairs(sq: int, skv: int) -> int:
    """(query, key) pairs a bottom-right causal mask keeps: query i sees keys j <= i + skv - sq."""
    return sq * (skv - sq + 1) + sq * (sq - 1) // 2


def attention_flops(batch: int, hq: int, sq: int, skv: int, head_dim: int = HEAD_DIM) -> int:
    """QK^T and PV: 2 * 2 * head_dim FLOPs per visible (query, key) pair and query head."""
    return 4 * batch * hq * head_dim * causal_pairs(sq, skv)


def attention_bytes(batch: int, hq: int, hkv: int, sq: int, skv: int, head_dim: int = HEAD_DIM, elem: int = ELEM) -> int:
    """Read q and write out ([batch, hq, sq, d]); read k and v ([batch, hkv, skv, d]) once."""
    return elem * batch * head_dim * (2 * hq * sq + 2 * hkv * skv)


def varlen_flops(lengths, hq: int) -> int:
    """Causal self-attention of each packed sequence: the sum of attention_flops over them."""
    return sum(attention_flops(1, hq, n, n) for n in lengths)


def kv_bytes(batch: int, hkv: int, context: int, head_dim: int = HEAD_DIM, elem: int = ELEM) -> int:
    return 2 * batch * hkv * context * head_dim * elem


# ---------------------------------------------------------------------------------------------
# Truth and baseline
# ---------------------------------------------------------------------------------------------
def attention_math(q, k, v, dtype: torch.dtype, causal: bool = True, chunk: int = TRUTH_CHUNK) -> torch.Tensor:
    """HF eager attention numerics in ``dtype`` without materializing [B, Hq, Sq, Skv]:
    scores = q @ k^T * scale in dtype, softmax in fp32 cast to dtype, then @ v in dtype.
    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> out [B, Sq, Hq, D] in dtype (bottom-right causal)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.empty(B, Sq, Hq, D, dtype=dtype, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            heads = slice(h * G, (h + 1) * G)
            kh, vh, qh = k[b, h].to(dtype), v[b, h].to(dtype), q[b, heads].to(dtype)
            for s0 in range(0, Sq, chunk):
                s1 = min(Sq, s0 + chunk)
                seen = s1 + Skv - Sq if causal else Skv  # keys visible to the block's last query
                scores = (qh[:, s0:s1] @ kh[:seen].T) * SCALE  # [G, s1 - s0, seen]
                if causal:
                    i = torch.arange(s0, s1, device=q.device)[:, None] + (Skv - Sq)
                    j = torch.arange(seen, device=q.device)[None, :]
                    scores = scores.masked_fill(j > i, float("-inf"))
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
                out[b, s0:s1, heads] = (probs @ vh[:seen]).transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------
def _first(out):
    return out[0]


def _bhsd_to_bshd(out):
    return out.transpose(1, 2)


def _reference(x, causal: bool):
    return reference.attention(x["q"], x["k"], x["v"], None, SCALE, causal)


def _hf_eager(causal: bool):
    def build(x):
        from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward

        q, k, v = x["q"], x["k"], x["v"]
        module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
        mask = None
        if causal:  # HF's additive mask for eager attention: finfo.min above the (bottom-right) diagonal
            sq, skv = q.shape[2], k.shape[2]
            mask = torch.full((sq, skv), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
            mask = mask.triu(1 + skv - sq)[None, None]
        return lambda: eager_attention_forward(module, q, k, v, mask, scaling=SCALE)

    return build


@functools.cache
def _sdpa_has_gqa(backend: str, device: str) -> bool:
    """Whether this SDPA backend takes enable_gqa here (probed once on tiny tensors)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 128, HEAD_DIM, dtype=DTYPE, device=device)
    k = torch.randn(1, 2, 128, HEAD_DIM, dtype=DTYPE, device=device)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def _sdpa(name: str, causal: bool):
    def build(x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPA_BACKENDS[name]
        q, k, v = x["q"], x["k"], x["v"]
        groups = q.shape[1] // k.shape[1]
        gqa = groups == 1 or _sdpa_has_gqa(backend, str(q.device))
        if not gqa:  # expand the kv heads once, untimed
            skip = over_budget(k.numel() * groups * 2 * k.element_size(), "expanding k and v to the query heads")
            if skip:
                raise Skip(skip)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        choice = getattr(SDPBackend, backend)

        def call():
            with sdpa_kernel(choice):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE, enable_gqa=gqa and groups > 1)

        call.note = "" if gqa else "no enable_gqa in this backend: kv heads expanded untimed"
        return call

    return build


def _flex(causal: bool):
    def build(x):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = x["q"], x["k"], x["v"]
        sq, skv = q.shape[2], k.shape[2]
        block_mask = None
        if causal:  # the block mask's lengths are Python ints: flex compiles once per causal shape
            block_mask = create_block_mask(
                lambda b, h, qi, ki: qi + (skv - sq) >= ki, None, None, sq, skv, device=q.device
            )  # fmt: skip
        else:  # decode: the context symbolic, one compile per head layout and batch, not per case
            # The batch stays static: inductor serves a short query with its split-KV decoding
            # kernel only when batch and heads are static (flex_decoding._use_flex_decoding), and
            # falls back to one CTA per query head otherwise, a far slower peer at long contexts.
            # A symbolic context costs nothing there: the decoding kernel's boundary checks stay
            # on at any query length under the block size (1 is not a multiple of 128).
            for t in (k, v):
                torch._dynamo.maybe_mark_dynamic(t, 2)
        flex = compiled(flex_attention)
        return lambda: flex(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True)

    return build


def _providers(batch: int, hq: int, hkv: int, sq: int, skv: int, causal: bool, decode: bool) -> list[Provider]:
    scores = batch * hq * sq * skv
    kv_fp32 = 2 * batch * hkv * skv * HEAD_DIM * 4
    hf_bytes = 10 * scores + (kv_bytes(batch, hq, skv) if hq > hkv else 0) + 2 * sq * skv * causal
    ref_bytes = 16 * scores + kv_fp32 * (1 + hq // hkv) + batch * hq * sq * HEAD_DIM * 4
    ref = functools.partial(_reference, causal=causal)

    def qwen3x_call(x):
        return ops.attention(x["q"], x["k"], x["v"], None, SCALE, causal=causal)

    wgmma_served = sq * (hq // hkv) >= ROW_TILE  # full row tiles: the Hopper mainloop's calls
    return [
        qwen3x_provider("attention", qwen3x_call, canon=_first),
        mma_sync_provider("QWEN3X_ATTENTION_MAINLOOP", qwen3x_call, wgmma_served, canon=_first),
        no_fence_provider("QWEN3X_ATTENTION_MAINLOOP", qwen3x_call, wgmma_served, canon=_first),
        serial_provider("QWEN3X_ATTENTION_MAINLOOP", qwen3x_call, wgmma_served, canon=_first),
        no_pdl_provider(qwen3x_call, decode, canon=_first),
        # (at batch 64 and up the CTAs fill a wave: no split, so no combine to compare)
        cluster_combine_provider(qwen3x_call, decode and batch <= CLUSTER_AB_MAX_BATCH, canon=_first),
        l2_combine_provider(qwen3x_call, decode and batch <= CLUSTER_AB_MAX_BATCH, canon=_first),
        Provider("reference", lambda x: lambda: ref(x), canon=_first, skip=over_budget(ref_bytes, "fp32 scores")),
        Provider("hf_eager", _hf_eager(causal), canon=_first, skip=over_budget(hf_bytes, "materialized scores")),
        *(Provider(name, _sdpa(name, causal), canon=_bhsd_to_bshd) for name in SDPA_BACKENDS),
        Provider("flex", _flex(causal), canon=_bhsd_to_bshd, note="torch.compile(flex_attention)"),
    ]


def _case(op: str, shape: dict, batch: int, hq: int, hkv: int, sq: int, skv: int, causal: bool, graph: bool) -> Case:
    def make_inputs(device):
        return {
            "q": randn(batch, hq, sq, HEAD_DIM, device=device),
            "k": randn(batch, hkv, skv, HEAD_DIM, device=device),
            "v": randn(batch, hkv, skv, HEAD_DIM, device=device),
        }

    return Case(
        op=op,
        shape=shape,
        make_inputs=make_inputs,
        reference=functools.partial(_reference, causal=causal),
        truth=lambda x: attention_math(x["q"], x["k"], x["v"], torch.float32, causal),
        baseline=lambda x: attention_math(x["q"], x["k"], x["v"], x["q"].dtype, causal),
        providers=_providers(batch, hq, hkv, sq, skv, causal, decode=graph),
        flops=attention_flops(batch, hq, sq, skv),
        bytes=attention_bytes(batch, hq, hkv, sq, skv),
        cuda_graph=graph,
    )


def prefill_case(batch: int, seqlen: int, hq: int, hkv: int, model: str | None = None) -> Case:
    shape = ({"model": model} if model else {}) | {"batch": batch, "seqlen": seqlen, "hq": hq, "hkv": hkv}
    return _case("attention_prefill", shape, batch, hq, hkv, seqlen, seqlen, causal=True, graph=False)


def decode_case(batch: int, context: int, hq: int, hkv: int, model: str | None = None) -> Case:
    """One new query per sequence; ``context`` keys in the cache (the new token's included)."""
    shape = ({"model": model} if model else {}) | {"batch": batch, "context": context, "hq": hq, "hkv": hkv}
    return _case("attention_decode", shape, batch, hq, hkv, 1, context, causal=False, graph=True)


def prefill_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [prefill_case(1, 2048, 32, 8, "Qwen3-4B")]
    return [prefill_case(b, s, hq, hkv, name) for name, hq, hkv in LAYOUTS for b, s in PREFILL]


def decode_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [decode_case(16, 8192, 32, 8, "Qwen3-4B")]
    return [
        decode_case(b, c, hq, hkv, name)
        for name, hq, hkv in LAYOUTS
        for b in DECODE_BATCH
        for c in DECODE_CONTEXT
        if kv_bytes(b, hkv, c) <= KV_BUDGET_BYTES
    ]


# ---------------------------------------------------------------------------------------------
# Packed variable-length sequences
# ---------------------------------------------------------------------------------------------
def _sequences(x):
    """Per packed sequence: (q, k, v) as [1, H, S, D] views of the packed [T, H, D] tensors."""
    bounds = x["bounds"]
    return [
        tuple(x[n][lo:hi].transpose(0, 1).unsqueeze(0) for n in ("q", "k", "v"))
        for lo, hi in zip(bounds, bounds[1:])
    ]


def _varlen_math(x, dtype):
    return torch.cat([attention_math(q, k, v, dtype)[0] for q, k, v in _sequences(x)], dim=0)


def _varlen_reference(x):
    n = max(b - a for a, b in zip(x["bounds"], x["bounds"][1:]))
    return reference.attention_varlen(x["q"], x["k"], x["v"], x["cu"], x["cu"], n, n, SCALE, True)


def _varlen_qwen3x(x):
    n = max(b - a for a, b in zip(x["bounds"], x["bounds"][1:]))
    return ops.attention_varlen(x["q"], x["k"], x["v"], x["cu"], x["cu"], n, n, SCALE, True)


def _cat_sequences(outs):
    """Per-sequence SDPA outputs [1, Hq, S, D] -> packed [T, Hq, D]."""
    return torch.cat([o[0].transpose(0, 1) for o in outs], dim=0)


def _sdpa_varlen(name: str):
    """What a user without a varlen kernel runs: SDPA once per packed sequence."""

    def build(x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPA_BACKENDS[name]
        if x["q"].shape[1] != x["k"].shape[1] and not _sdpa_has_gqa(backend, str(x["q"].device)):
            raise Skip("no enable_gqa in this backend")
        seqs, choice = _sequences(x), getattr(SDPBackend, backend)

        def call():
            with sdpa_kernel(choice):
                return [
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
                    for q, k, v in seqs
                ]

        return call

    return build


def _flex_varlen(x):
    """FlexAttention over the whole pack with a document-causal block mask (its varlen idiom)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = x["q"].shape[0]
    bounds = torch.tensor(x["bounds"][1:-1], device=x["q"].device)
    doc = torch.bucketize(torch.arange(T, device=x["q"].device), bounds, right=True)  # token -> sequence

    def document_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block_mask = create_block_mask(document_causal, None, None, T, T, device=x["q"].device)
    q, k, v = (x[n].transpose(0, 1).unsqueeze(0) for n in ("q", "k", "v"))
    flex = compiled(flex_attention)
    return lambda: flex(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True)


def varlen_case(lengths, hq: int, hkv: int, model: str | None = None, name: str | None = None) -> Case:
    T = sum(lengths)
    bounds = [0, *itertools.accumulate(lengths)]
    shape = ({"model": model} if model else {}) | {
        "tokens": T, "batch": len(lengths), "seqlens": name or "-".join(map(str, lengths)), "hq": hq, "hkv": hkv,
    }  # fmt: skip

    def make_inputs(device):
        return {
            "q": randn(T, hq, HEAD_DIM, device=device),
            "k": randn(T, hkv, HEAD_DIM, device=device),
            "v": randn(T, hkv, HEAD_DIM, device=device),
            "cu": torch.tensor(bounds, dtype=torch.int32, device=device),
            "bounds": bounds,
        }

    longest = max(lengths)
    ref_bytes = 16 * hq * longest * longest + 4 * 2 * T * hq * HEAD_DIM * 3
    return Case(
        op="attention_varlen",
        shape=shape,
        make_inputs=make_inputs,
        reference=_varlen_reference,
        truth=lambda x: _varlen_math(x, torch.float32),
        baseline=lambda x: _varlen_math(x, x["q"].dtype),
        providers=[
            qwen3x_provider("attention_varlen", _varlen_qwen3x, canon=_first),
            Provider("reference", lambda x: lambda: _varlen_reference(x), canon=_first,
                     skip=over_budget(ref_bytes, "fp32 scores")),  # fmt: skip
            *(Provider(n, _sdpa_varlen(n), canon=_cat_sequences, note="one call per sequence") for n in SDPA_BACKENDS),
            Provider("flex", _flex_varlen, canon=lambda o: o[0].transpose(0, 1), note="document-causal block mask"),
        ],
        flops=varlen_flops(lengths, hq),
        bytes=attention_bytes(1, hq, hkv, T, T),
    )


def varlen_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [varlen_case(VARLEN["mixed"], 32, 8, "Qwen3-4B", "mixed")]
    return [varlen_case(lengths, hq, hkv, name, kind) for name, hq, hkv in LAYOUTS for kind, lengths in VARLEN.items()]


# ---------------------------------------------------------------------------------------------
# QK-norm + RoPE + attention from the projections (Qwen3Attention's chain)
# ---------------------------------------------------------------------------------------------
QK_NORM_PREFILL = (1024, 4096, 16384)  # seqlen, batch 1: with the qk_norm_rope and attention_prefill
# rows at the same shapes, these bound what fusing the norm into the attention kernel could save


def _norm_args(x):
    return (x["q_weight"], x["k_weight"], x["positions"], x["inv_freq"], x["scaling"], RMS_EPS)


def _qk_norm_math(x, dtype):
    """qk_norm_rope in ``dtype`` (reference), then attention_math in ``dtype``."""
    cast = {n: x[n].to(dtype) for n in ("q", "k", "v", "q_weight", "k_weight")}
    qn, kn = reference.qk_norm_rope(cast["q"], cast["k"], cast["q_weight"], cast["k_weight"], *_norm_args(x)[2:])
    return attention_math(qn.transpose(1, 2), kn.transpose(1, 2), cast["v"].transpose(1, 2), dtype)


def _hf_chain(x):
    """Qwen3Attention unpatched: q_norm, k_norm, apply_rotary_pos_emb (cos/sin precomputed, once per
    forward in HF), SDPA with its default backend choice."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    from .rope import hf_rotary

    q_norm = hf_module(lambda: Qwen3RMSNorm(HEAD_DIM, RMS_EPS), weight=x["q_weight"])
    k_norm = hf_module(lambda: Qwen3RMSNorm(HEAD_DIM, RMS_EPS), weight=x["k_weight"])
    cos, sin = hf_rotary(x["q"].device)(x["q"], x["positions"])
    q, k, v = x["q"], x["k"], x["v"].transpose(1, 2)

    def call():
        qr, kr = apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
        return F.scaled_dot_product_attention(qr, kr, v, is_causal=True, scale=SCALE, enable_gqa=True)

    return call


def qk_norm_case(seqlen: int, hq: int, hkv: int, model: str | None = None) -> Case:
    from qwen3x import rope_parameters

    from .rope import yarn_config

    def make_inputs(device):
        params = rope_parameters(yarn_config())
        return {
            "q": randn(1, seqlen, hq, HEAD_DIM, device=device),
            "k": randn(1, seqlen, hkv, HEAD_DIM, device=device),
            "v": randn(1, seqlen, hkv, HEAD_DIM, device=device),
            "q_weight": randn(HEAD_DIM, device=device, scale=0.1) + 1,
            "k_weight": randn(HEAD_DIM, device=device, scale=0.1) + 1,
            "positions": torch.arange(seqlen, device=device)[None],
            "inv_freq": params.inv_freq.to(device),
            "scaling": params.attention_scaling,
        }

    def qwen3x_call(x):
        return ops.qk_norm_rope_attention(x["q"], x["k"], x["v"], *_norm_args(x), None, SCALE, True)

    def reference_call(x):
        return reference.qk_norm_rope_attention(x["q"], x["k"], x["v"], *_norm_args(x), None, SCALE, True)

    shape = ({"model": model} if model else {}) | {"batch": 1, "seqlen": seqlen, "hq": hq, "hkv": hkv}
    scores = hq * seqlen * seqlen
    return Case(
        op="qk_norm_rope_attention",
        shape=shape,
        make_inputs=make_inputs,
        reference=reference_call,
        truth=lambda x: _qk_norm_math(x, torch.float32),
        baseline=lambda x: _qk_norm_math(x, x["q"].dtype),
        providers=[
            qwen3x_provider("qk_norm_rope_attention", qwen3x_call, canon=_first),
            Provider("reference", lambda x: lambda: reference_call(x), canon=_first,
                     skip=over_budget(16 * scores, "fp32 scores")),  # fmt: skip
            Provider("hf_sdpa", _hf_chain, canon=_bhsd_to_bshd, note="HF's norm + rope chain, then SDPA"),
        ],
        flops=attention_flops(1, hq, seqlen, seqlen),
        bytes=attention_bytes(1, hq, hkv, seqlen, seqlen),
    )


def qk_norm_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [qk_norm_case(4096, 32, 8, "Qwen3-4B")]
    return [qk_norm_case(s, hq, hkv, name) for name, hq, hkv in LAYOUTS for s in QK_NORM_PREFILL]


SUITE = {
    "attention_prefill": prefill_cases,
    "attention_varlen": varlen_cases,
    "attention_decode": decode_cases,
    "qk_norm_rope_attention": qk_norm_cases,
}
