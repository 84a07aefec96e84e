"""Dense SwiGLU MLP (Qwen3MLP, and the dense layers of Qwen3-MoE): one gate+up GEMM, silu_and_mul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import packing


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


class MLP:
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        gate, up = self.gate_proj, self.up_proj
        if _plain_linear(gate) and _plain_linear(up):
            params = [gate.weight, up.weight]
            w = packing.weights(self, "gate_up", params, (2 * gate.out_features, gate.in_features))
            gate_up = F.linear(x, w)  # [..., 2I]
        else:  # wrapped projections (PEFT LoRA, quantized linears): call them as they are
            gate_up = torch.cat([gate(x), up(x)], dim=-1)
        return self.down_proj(ops.silu_and_mul(gate_up))
