"""RMSNorm (Qwen3RMSNorm / Qwen3MoeRMSNorm) on the rms_norm op."""

from __future__ import annotations

import torch

from .. import ops, reference


class RMSNorm:
    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        if self.weight.dtype != hidden_states.dtype:  # e.g. under autocast: HF promotes, the kernels don't
            return reference.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
