"""Qwen3 layers on qwen3x ops.

Each class here is a mixin that supplies ``forward`` to a Hugging Face module class. patch.py
builds ``type("Qwen3x<HFName>", (Mixin, HFClass), {})`` and swaps an existing module's class to
it (or installs it in the HF modeling module for models built later). The module keeps its own
parameters, names and state_dict; ``super().forward`` is HF's code, used where a layer falls back.
"""

from . import dispatch, packing
from .attention import Attention, attention_forward, mask_function
from .decoder import DecoderLayer
from .mlp import MLP
from .moe import Experts, SparseMoeBlock, TopKRouter, experts_forward
from .norm import RMSNorm
from .rotary import RopeEmbeddings, RotaryEmbedding

__all__ = [
    "Attention",
    "DecoderLayer",
    "Experts",
    "MLP",
    "RMSNorm",
    "RopeEmbeddings",
    "RotaryEmbedding",
    "SparseMoeBlock",
    "TopKRouter",
    "attention_forward",
    "experts_forward",
    "mask_function",
]
