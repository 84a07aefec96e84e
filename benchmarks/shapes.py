"""Qwen3 model dimensions from the public configs (DESIGN.md section 3), shared by every suite."""

from __future__ import annotations

from dataclasses import dataclass

VOCAB = 151936
HEAD_DIM = 128
RMS_EPS = 1e-6
ROPE_THETA = 1e6
ORIGINAL_CONTEXT = 32768
YARN_FACTOR = 4.0
MAX_CONTEXT = int(ORIGINAL_CONTEXT * YARN_FACTOR)  # 131072 with YaRN factor 4


@dataclass(frozen=True)
class ModelDims:
    name: str
    layers: int
    hidden: int
    hq: int  # query heads
    hkv: int  # key-value heads
    inter: int  # dense MLP intermediate size
    experts: int = 0
    topk: int = 0
    moe_inter: int = 0  # expert intermediate size
    tied: bool = False
    head_dim: int = HEAD_DIM

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def mlp_inter(self) -> int:
        """The intermediate size a token's MLP actually uses (the expert's for MoE models)."""
        return self.moe_inter if self.is_moe else self.inter


QWEN3_0_6B = ModelDims("Qwen3-0.6B", 28, 1024, 16, 8, 3072, tied=True)
QWEN3_4B = ModelDims("Qwen3-4B", 36, 2560, 32, 8, 9728, tied=True)
QWEN3_30B_A3B = ModelDims("Qwen3-30B-A3B", 48, 2048, 32, 4, 6144, experts=128, topk=8, moe_inter=768)
QWEN3_235B_A22B = ModelDims("Qwen3-235B-A22B", 94, 4096, 64, 4, 12288, experts=128, topk=8, moe_inter=1536)

MODELS = (QWEN3_0_6B, QWEN3_4B, QWEN3_30B_A3B, QWEN3_235B_A22B)
MOE_MODELS = tuple(m for m in MODELS if m.is_moe)
