"""Dense SwiGLU MLP (Qwen3MLP, and the dense layers of Qwen3-MoE): one gate+up GEMM over the packed
weights, silu_and_mul (training: HF's forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops, reference
from . import packing
from .dispatch import reference_instead

SWIGLU_ACTS = ("silu", "swish")  # the activation silu_and_mul implements


def is_silu(config) -> bool:
    return getattr(config, "hidden_act", "silu") in SWIGLU_ACTS


class MLP(packing.Owner):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        gate, up = self.gate_proj, self.up_proj
        plain = (is_silu(self.config) and packing.plain_linear(gate) and packing.plain_linear(up)
                 and packing.uniform([gate.weight, up.weight]) and not packing.is_member(self))
        params = [gate.weight, up.weight] if plain else []
        if not plain or packing.needs_grad(params):
            # another activation, wrapped / hooked projections (PEFT LoRA, offloading, quantized
            # linears), weights of two dtypes, an expert of 4.57's MoE block, which packs its weights
            # (HF's expert loop, where the block falls back to it), or training, where one GEMM over
            # both weights would copy them every step and keep the copy for the backward (2/3 of the
            # MLP's weights more memory than HF through full fine-tuning): HF's own forward
            packing.release_stale(self, "gate_up", params if plain else None)  # (of parameters FSDP2 replaced)
            return super().forward(x)
        w = packing.packed(self, "gate_up", params, (2 * gate.out_features, gate.in_features))
        gate_up = F.linear(x, w)  # [..., 2I]
        act = reference.silu_and_mul if reference_instead("silu_and_mul", gate_up) else ops.silu_and_mul
        return self.down_proj(act(gate_up))
