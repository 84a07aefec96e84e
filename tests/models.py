"""Tiny Qwen3 / Qwen3-MoE models from configs, for transformers 4.57 and 5.x alike."""

from __future__ import annotations

import torch
import transformers
from qwen3x.testing import cache_keyword
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

TF_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])
TF5 = TF_VERSION >= (5, 0)
# transformers 5.7 and later accept an experts implementation registered by name ("qwen3x");
# 5.0 to 5.6 only their own ("eager", "grouped_mm", ...): there qwen3x.patch is the way in
EXPERTS_BY_NAME = TF_VERSION >= (5, 7)
CACHE = cache_keyword()  # the models' cache argument and output field: cache (5.24+) or past_key_values
VOCAB = 97


def rope_kwargs(rope: dict | None, theta: float = 1e6) -> dict:
    """rope settings in the config format of the installed transformers."""
    if TF5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **(rope or {})}}
    return {"rope_theta": theta, "rope_scaling": rope}


def tiny_config(moe: bool = False, rope: dict | None = None, **overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **rope_kwargs(rope),
    )
    if moe:
        base.update(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    base.update(overrides)
    return (Qwen3MoeConfig if moe else Qwen3Config)(**base)


def tiny_model(moe: bool = False, rope: dict | None = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(moe, rope, **overrides)
    model = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(config).eval()
    if moe:  # HF initializes the router to zeros on some versions: make routing non-trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mlp.gate" in name and "proj" not in name:
                    p.normal_(0, 0.5)
    return model
