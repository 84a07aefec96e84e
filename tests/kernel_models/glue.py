"""Torch tensors as the element-wise kernel models see them (the rope, norm, silu and router glue).

Bufs gives every torch storage one checked GBuf (so that views of one storage, such as the q and
k slices of a fused qkv projection, share it) and a Ptr (buffer, element offset) per tensor. An
element is readable by the kernel when it belongs to a view passed as an input, writable when it
belongs to a view passed as an output. After the launch, check_written_exactly asserts that the
kernel wrote exactly the expected views' elements, each once, and write_back copies the results
into the torch storages.

collapsed_stride and aligned mirror csrc/core/checks.h collapsed_stride and
csrc/core/gpu_constants.h is_aligned (torch's CPU storages are at least 64-byte aligned, so the
alignment of a view is that of its storage offset).
"""
from __future__ import annotations

import numpy as np
import torch

from .primitives import GBuf

DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Ptr:
    """A kernel's pointer argument: a buffer and an element offset into it."""

    def __init__(self, buf: GBuf, off: int = 0):
        self.buf, self.off = buf, off


def collapsed_stride(t: torch.Tensor, end_dim: int, fallback: int):
    """The one stride of dims [0, end_dim) seen as a single dim (size-1 dims ignored), else None."""
    inner = None
    extent = 0
    for d in range(end_dim - 1, -1, -1):
        if t.size(d) == 1:
            continue
        if inner is None:
            inner = t.stride(d)
            extent = t.stride(d) * t.size(d)
        elif t.stride(d) != extent:
            return None
        else:
            extent *= t.size(d)
    return inner if inner is not None else fallback


def aligned(t: torch.Tensor) -> bool:
    return (t.storage_offset() * t.element_size()) % 16 == 0


def view_mask(t: torch.Tensor, size: int) -> np.ndarray:
    """Bool mask of the storage elements (of `size`) that the view t covers."""
    mask = np.zeros(size, bool)
    idx = np.full((), t.storage_offset(), np.int64)
    for n, s in zip(t.shape, t.stride()):
        idx = idx[..., None] + np.arange(n) * s
    mask[idx.reshape(-1)] = True
    return mask


def _flat_storage(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


class Bufs:
    """The GBufs of one launch, one per torch storage."""

    def __init__(self):
        self.by_storage: dict[int, tuple[GBuf, torch.Tensor]] = {}

    def get(self, t: torch.Tensor, name: str, writable: bool = False) -> Ptr:
        key = t.untyped_storage().data_ptr()
        if key not in self.by_storage:
            flat = _flat_storage(t)
            data = flat.float().numpy() if flat.is_floating_point() else flat.numpy()
            none = np.zeros(data.size, bool)
            self.by_storage[key] = (GBuf(name, data=data, readable=none, writable=none), flat)
        buf = self.by_storage[key][0]
        mask = view_mask(t, buf.d.size)
        buf.readable |= mask
        if writable:
            buf.writable |= mask
        return Ptr(buf, t.storage_offset())

    def check_written_exactly(self, expected: list[torch.Tensor]):
        """Every element of the views in `expected` written once, nothing else in any storage."""
        want = {key: np.zeros(buf.d.size, bool) for key, (buf, _) in self.by_storage.items()}
        for t in expected:
            key = t.untyped_storage().data_ptr()
            want[key] |= view_mask(t, want[key].size)
        for key, (buf, _) in self.by_storage.items():
            buf.check_written_once(want[key])

    def write_back(self):
        for buf, flat in self.by_storage.values():
            if buf.writes.any():
                flat.copy_(torch.from_numpy(buf.d).to(flat.dtype))
