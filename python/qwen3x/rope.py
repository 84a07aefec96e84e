"""RoPE parameters from a Hugging Face config: inverse frequencies and the cos/sin scaling.

Reads transformers 5.x ``config.rope_parameters`` and transformers 4.57 ``config.rope_theta`` +
``config.rope_scaling``, and gives the same ``(inv_freq, attention_scaling)`` as HF's
``ROPE_INIT_FUNCTIONS`` for the rope types Qwen3 checkpoints use: default, linear, dynamic
(NTK-aware, for a given sequence length) and YaRN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# YaRN defaults (HF _compute_yarn_parameters)
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeParameters:
    inv_freq: torch.Tensor  # [head_dim / 2] fp32
    attention_scaling: float  # multiplies cos and sin


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim


def rope_config(config) -> dict:
    """The RoPE settings of a config as one dict with ``rope_type`` and ``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5.x
        out = dict(params)
    else:  # transformers 4.57: rope_theta + optional rope_scaling
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = config.rope_theta
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    return out


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def rope_parameters(config, seq_len: int | None = None) -> RopeParameters:
    """inv_freq and attention scaling for ``config``, as HF computes them.

    ``seq_len`` matters only for 'dynamic' RoPE (the current maximum position + 1).
    """
    p = rope_config(config)
    rope_type = p["rope_type"]
    base = float(p["rope_theta"])
    dim = int(_head_dim(config) * p.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    max_pos = config.max_position_embeddings

    if rope_type == "default":
        return RopeParameters(_base_inv_freq(base, dim), 1.0)
    if rope_type == "linear":
        return RopeParameters(_base_inv_freq(base, dim) / p["factor"], 1.0)
    if rope_type == "dynamic":
        factor = p["factor"]
        length = max_pos if seq_len is None else max(int(seq_len), max_pos)
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return RopeParameters(_base_inv_freq(base, dim), 1.0)
    if rope_type == "yarn":
        return _yarn(p, base, dim, max_pos)
    raise NotImplementedError(
        f"qwen3x.rope_parameters: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


def _yarn(p: dict, base: float, dim: int, max_pos: int) -> RopeParameters:
    original = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or YARN_BETA_FAST
    beta_slow = p.get("beta_slow") or YARN_BETA_SLOW

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return RopeParameters(inv_freq, float(attention_factor))
