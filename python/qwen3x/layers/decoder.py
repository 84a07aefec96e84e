"""Decoder layer with the residual add fused into the post-attention RMSNorm (add_rms_norm)."""

from __future__ import annotations

import torch

from .. import ops
from . import packing
from .dispatch import reference_instead


class DecoderLayer:
    # HF's models call their decoder layers with keywords only; their positional orders differ
    # between transformers versions and dense/MoE, so this forward takes keywords after the input.
    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:  # [B, S, H] -> [B, S, H]
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        norm = self.post_attention_layernorm
        fused = (norm.weight.dtype == hidden_states.dtype == residual.dtype
                 and norm.weight.device == hidden_states.device == residual.device  # (a hook would move them)
                 and not packing.has_hooks(norm))
        if fused and not reference_instead("add_rms_norm", hidden_states):
            hidden_states, residual = ops.add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
        else:  # mixed dtypes (autocast), a hooked norm, no kernel for the dtype: HF's two steps
            residual = residual + hidden_states
            hidden_states = norm(residual)
        hidden_states = self.mlp(hidden_states)
        if isinstance(hidden_states, tuple):  # transformers 4.57's MoE block returns (out, router_logits)
            hidden_states = hidden_states[0]
        return residual + hidden_states
