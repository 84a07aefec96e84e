"""Dense SwiGLU MLP (Qwen3MLP, and the dense layers of Qwen3-MoE): one gate+up GEMM, silu_and_mul."""

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
        if not (is_silu(self.config) and packing.plain_linear(gate) and packing.plain_linear(up)
                and packing.uniform([gate.weight, up.weight])) or packing.is_member(self):
            # another activation, wrapped / hooked projections (PEFT LoRA, offloading, quantized
            # linears), weights of two dtypes, or an expert of 4.57's MoE block, which packs its
            # weights (HF's expert loop, where the block falls back to it): HF's own forward
            packing.release_stale(self, "gate_up")  # (a buffer of parameters FSDP2 has since replaced)
            return super().forward(x)
        params = [gate.weight, up.weight]
        w = packing.weights(self, "gate_up", params, (2 * gate.out_features, gate.in_features))
        gate_up = F.linear(x, w)  # [..., 2I]
        act = reference.silu_and_mul if reference_instead("silu_and_mul", gate_up) else ops.silu_and_mul
        return self.down_proj(act(gate_up))
