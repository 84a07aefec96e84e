"""Rotary embedding that also hands the fused attention what it needs.

HF's rotary module returns (cos, sin) [B, S, D] that every attention layer multiplies in. The
fused qk_norm_rope op computes cos/sin itself from positions and inv_freq, so the patched rotary
module returns a tuple that still unpacks to (cos, sin) (for HF code, caches and fallbacks) and
carries inv_freq, attention_scaling and the positions. Dynamic RoPE keeps working: HF's forward
has already updated ``self.inv_freq`` when we read it.
"""

from __future__ import annotations

import torch


class RopeEmbeddings(tuple):
    """(cos, sin), plus the inputs of the fused op as attributes.

    ``to(device)`` moves all of it (accelerate's hooks call it as they move a layer's inputs to
    its device under a multi-GPU device_map or offloading). Code that rebuilds a tuple from its
    items, ``type(t)(items)``, gets a plain (cos, sin) pair: attributes left on the old device
    would be wrong there, and attention runs its unfused path on a plain pair. Copies and pickles
    keep everything (``__reduce__``).
    """

    inv_freq: torch.Tensor  # [D/2] fp32
    attention_scaling: float
    positions: torch.Tensor  # [B, S], contiguous: one position per token, shared by every layer

    def __new__(cls, cos, sin=None, inv_freq=None, attention_scaling=1.0, positions=None):
        if sin is None:  # rebuilt from its items: (cos, sin) alone
            return tuple(cos)
        self = super().__new__(cls, (cos, sin))
        self.inv_freq = inv_freq
        self.attention_scaling = float(attention_scaling)
        self.positions = positions
        return self

    def __reduce__(self):
        return type(self), (*self, self.inv_freq, self.attention_scaling, self.positions)

    def to(self, device, non_blocking: bool = False) -> RopeEmbeddings:
        """Every tensor on ``device``, dtypes kept: accelerate's hooks move a layer's inputs with
        ``.to`` where an object has one, so the attributes travel with (cos, sin)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, non_blocking=non_blocking)

        return RopeEmbeddings(move(self[0]), move(self[1]), move(self.inv_freq), self.attention_scaling,
                              move(self.positions))


class RotaryEmbedding:
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        cos, sin = super().forward(x, position_ids, *args, **kwargs)
        positions = position_ids.expand(x.shape[0], -1).contiguous()  # [1 or B, S] -> [B, S]
        return RopeEmbeddings(cos, sin, self.inv_freq.float(), self.attention_scaling, positions)
