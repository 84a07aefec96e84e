"""RMSNorm (Qwen3RMSNorm / Qwen3MoeRMSNorm) on the rms_norm op."""

from __future__ import annotations

import torch

from .. import ops, reference
from .dispatch import reference_instead


class RMSNorm:
    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        # mixed dtypes (autocast: HF promotes, the kernels don't) or a dtype without a kernel
        if self.weight.dtype != hidden_states.dtype or reference_instead("rms_norm", hidden_states):
            return reference.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
