"""One weight buffer behind several HF parameters, so one GEMM can serve them all.

HF keeps gate_proj and up_proj (and 4.57's per-expert MLPs) as separate Linear weights; the
kernels want them as one tensor ([2I, H] for the dense MLP, [E, 2I, H] / [E, H, I] for experts).
``packed`` copies the parameters once into a new buffer and re-points each parameter's ``.data``
at its slice, so memory is not doubled and the parameters (names, shapes, values, identity) stay
as they were. If anything later moves a parameter (``model.to``, ``load_state_dict(assign=True)``)
the views no longer match and the buffer is rebuilt on the next call. Gradients flow to the
parameters only through ``torch.stack`` / ``torch.cat``: callers use ``needs_grad`` to choose.
"""

from __future__ import annotations

import torch
from torch import nn

_ATTR = "_qwen3x_packed"


def needs_grad(params: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _is_view_of(buffer: torch.Tensor, params: list[torch.Tensor]) -> bool:
    first = params[0]
    if buffer.device != first.device or buffer.dtype != first.dtype:
        return False
    step = first.numel() * first.element_size()
    base = buffer.data_ptr()
    return all(
        p.data_ptr() == base + i * step and p.shape == first.shape and p.is_contiguous() for i, p in enumerate(params)
    )


def packed(owner: nn.Module, key: str, params: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` whose ``view(len(params), *params[0].shape)[i]`` is ``params[i]``."""
    buffers = owner.__dict__.setdefault(_ATTR, {})
    buffer = buffers.get(key)
    if buffer is not None and _is_view_of(buffer, params):
        return buffer
    if torch.compiler.is_compiling():  # never rewrite parameters inside a traced graph
        return torch.stack([p.detach() for p in params]).view(shape)
    with torch.no_grad():
        buffer = torch.stack([p.detach() for p in params]).view(shape)
        slots = buffer.view(len(params), *params[0].shape)
        for i, p in enumerate(params):
            p.data = slots[i]
    buffers[key] = buffer
    return buffer


def stacked(params: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The same layout as ``packed``, built with autograd (a copy per call) for training."""
    return torch.stack(params).view(shape)


def weights(owner: nn.Module, key: str, params: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return stacked(params, shape) if needs_grad(params) else packed(owner, key, params, shape)
