"""What the op suites share: dtype, token grids, building HF modules around given tensors."""

from __future__ import annotations

from typing import Callable

import torch

DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
TOKENS = (1, 64, 4096, 16384)  # decode, small batch, prefill chunk, long prefill
# The memory-bound ops also at 64k tokens (a batch of long prompts): four times the waves of
# blocks of 16k, which tells a partial last wave's cost (gone at 64k) from a per-row one.
LONG_TOKENS = 65536
DECODE_TOKENS = 64  # at or below this many tokens a call is launch-bound: time CUDA-graph replays


def graph_worthy(tokens: int) -> bool:
    return tokens <= DECODE_TOKENS


def hf_module(factory: Callable[[], torch.nn.Module], **params: torch.Tensor) -> torch.nn.Module:
    """An HF module built on the meta device whose parameters are the given tensors (no copy)."""
    with torch.device("meta"):
        module = factory()
    for name, tensor in params.items():
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
    return module.eval()


def randn(*shape: int, device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(DTYPE)
