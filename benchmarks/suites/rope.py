"""qk_norm_rope: per-head RMSNorm of q and k, then YaRN RoPE (factor 4), at Qwen3 head layouts.

The hf_eager peer is the chain Qwen3Attention runs: q_norm, k_norm, transpose, then
apply_rotary_pos_emb with cos/sin from Qwen3RotaryEmbedding. Those cos/sin are computed once per
forward and shared by every layer, so they are built untimed; qwen3x computes them inside.
"""

from __future__ import annotations

import functools

import torch
from qwen3x import ops, reference, rope_parameters

from ..harness import Case, Provider
from ..providers import liger_provider, qwen3x_provider, reference_provider, torch_compile_provider
from ..shapes import HEAD_DIM, MAX_CONTEXT, MODELS, ORIGINAL_CONTEXT, RMS_EPS, ROPE_THETA, YARN_FACTOR
from .common import ELEM, LONG_TOKENS, TOKENS, graph_worthy, hf_module, randn

LAYOUTS = tuple((m.name, m.hq, m.hkv) for m in MODELS)  # 16/8, 32/8, 32/4, 64/4


def qk_norm_rope_bytes(tokens: int, hq: int, hkv: int, head_dim: int = HEAD_DIM, elem: int = ELEM) -> int:
    """Read and write q and k; positions (int64), the two norm weights, inv_freq (fp32)."""
    return 2 * tokens * (hq + hkv) * head_dim * elem + tokens * 8 + 2 * head_dim * elem + head_dim // 2 * 4


@functools.cache
def yarn_config(hq: int = 32, hkv: int = 8):
    """A Qwen3 config with YaRN factor 4 over the 32k original context (the long-context setup)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=hq * HEAD_DIM,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=HEAD_DIM,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        rope_scaling={"rope_type": "yarn", "factor": YARN_FACTOR, "original_max_position_embeddings": ORIGINAL_CONTEXT},
        max_position_embeddings=MAX_CONTEXT,
    )


def _args(x):
    return (x["q"], x["k"], x["q_weight"], x["k_weight"], x["positions"], x["inv_freq"], x["scaling"], RMS_EPS)


def _reference(x):
    return reference.qk_norm_rope(*_args(x))


def hf_rotary(device: torch.device):
    """HF's rotary embedding for yarn_config() on ``device`` (built, then moved: the ``device``
    argument of its constructor is deprecated in transformers 5.17)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(yarn_config()).to(device)


def _hf_cos_sin(x):
    return hf_rotary(x["q"].device)(x["q"], x["positions"][None])  # [1, T, D] each, in q's dtype


def _canon_hf(out):
    q, k = out  # [1, H, T, D]
    return q[0].transpose(0, 1), k[0].transpose(0, 1)


def _hf_eager(x):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    q_norm = hf_module(lambda: Qwen3RMSNorm(HEAD_DIM, RMS_EPS), weight=x["q_weight"])
    k_norm = hf_module(lambda: Qwen3RMSNorm(HEAD_DIM, RMS_EPS), weight=x["k_weight"])
    cos, sin = _hf_cos_sin(x)
    q, k = x["q"][None], x["k"][None]  # [1, T, H, D] as q_proj(...).view(hidden_shape)

    def call():
        return apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)

    return call


def _liger(x):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    q_norm = hf_module(lambda: LigerRMSNorm(HEAD_DIM, eps=RMS_EPS), weight=x["q_weight"])
    k_norm = hf_module(lambda: LigerRMSNorm(HEAD_DIM, eps=RMS_EPS), weight=x["k_weight"])
    cos, sin = _hf_cos_sin(x)
    q, k = x["q"][None], x["k"][None]

    def call():
        return liger_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)

    return call


def case(tokens: int, hq: int, hkv: int, model: str | None = None) -> Case:
    def make_inputs(device):
        params = rope_parameters(yarn_config())
        return {
            "q": randn(tokens, hq, HEAD_DIM, device=device),
            "k": randn(tokens, hkv, HEAD_DIM, device=device),
            "q_weight": randn(HEAD_DIM, device=device, scale=0.1) + 1,
            "k_weight": randn(HEAD_DIM, device=device, scale=0.1) + 1,
            "positions": torch.randint(0, MAX_CONTEXT, (tokens,), device=device),
            "inv_freq": params.inv_freq.to(device),
            "scaling": params.attention_scaling,
        }

    shape = {"model": model} if model else {}
    shape.update(tokens=tokens, hq=hq, hkv=hkv)
    return Case(
        op="qk_norm_rope",
        shape=shape,
        make_inputs=make_inputs,
        reference=_reference,
        providers=[
            qwen3x_provider("qk_norm_rope", lambda x: ops.qk_norm_rope(*_args(x))),
            reference_provider(_reference),
            torch_compile_provider(_reference),
            Provider("hf_eager", _hf_eager, canon=_canon_hf, note="cos/sin precomputed (once per forward in HF)"),
            liger_provider(_liger, canon=_canon_hf, note="cos/sin precomputed"),
        ],
        bytes=qk_norm_rope_bytes(tokens, hq, hkv),
        cuda_graph=graph_worthy(tokens),
    )


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(1, 32, 8, "Qwen3-4B"), case(4096, 32, 8, "Qwen3-4B")]
    return [case(t, hq, hkv, name) for name, hq, hkv in LAYOUTS for t in (*TOKENS, LONG_TOKENS)]


SUITE = {"qk_norm_rope": cases}
