"""Lane-level model of the SwiGLU activation silu_and_mul.

Mirrors csrc/activation/silu_and_mul.cuh (silu, silu_mul, silu_and_mul_vec_kernel,
silu_and_mul_scalar_kernel, silu_and_mul_vectorizable, silu_and_mul_column_blocks; all blocks and
threads of the grid at once) and csrc/activation/activation.cu (silu_and_mul). Loads and stores go
through checked GBufs (glue.Bufs).
"""
from __future__ import annotations

import numpy as np
import torch

from . import fp
from .glue import DTYPE_NAME, Bufs, aligned, collapsed_stride
from .primitives import ELEM_BYTES, WARP, ModelError, ceil_div, round_to, round_up

VECS_PER_THREAD = 2          # kVecsPerThread
MAX_THREADS = 256            # kMaxThreads
SCALAR_ELEMS_PER_THREAD = 4  # kScalarElemsPerThread
MAX_GRID_Y = 65535


def silu(x, dt="fp32"):
    """silu_for<T>: x / (1 + expf(-x)) in fp32 for fp32 outputs; for 16-bit ones
    __fdividef(x, 1 + __expf(-x)): exp2(x * log2 e) (subnormal results kept, as the build's
    SASS keeps them), times rcp.approx.ftz (exact exp2 and reciprocal here, the reciprocal
    flushed as MUFU.RCP flushes: the hardware's own ulps are not modeled)."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if dt == "fp32":
            return (x / (np.float32(1) + fp.expf(-x))).astype(np.float32)
        e = np.exp2((-x * np.float32(1.4426950408889634)).astype(np.float32).astype(np.float64)).astype(np.float32)
        r = (np.float32(1) / (np.float32(1) + e)).astype(np.float32)
        r = np.where(np.abs(r) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), r), r)
        return (x * r).astype(np.float32)


def silu_mul(gate, up, dt):
    """T(float(T(silu(gate))) * float(up))."""
    to_t = round_to(dt)
    return to_t((to_t(silu(gate, dt)) * up).astype(np.float32))


def column_blocks(inter, kvec, vectorized):
    """silu_and_mul_column_blocks: (column blocks per row, threads per block)."""
    items = inter // kvec if vectorized else inter
    per_thread = VECS_PER_THREAD if vectorized else SCALAR_ELEMS_PER_THREAD
    threads = min(round_up(ceil_div(items, per_thread), WARP), MAX_THREADS)
    return ceil_div(items, threads * per_thread), threads


def vec_kernel(dt, grid, threads, out, inp, inter, out_s, in_s):
    """silu_and_mul_vec_kernel over grid (rows, column blocks)."""
    kvec = 16 // ELEM_BYTES[dt]
    rows, cols = grid
    row = np.arange(rows)[:, None, None]
    block_y = np.arange(cols)[None, :, None]
    tx = np.arange(threads)[None, None, :]
    shape = (rows, cols, threads)
    num_vecs = inter // kvec
    first = block_y * threads * VECS_PER_THREAD + tx
    gate, up, active = [], [], []
    for i in range(VECS_PER_THREAD):
        v = first + i * threads
        act = np.broadcast_to(v < num_vecs, shape)
        src = np.broadcast_to(inp.off + row * in_s + v * kvec, shape)
        gate.append(inp.buf.load_vec(src, kvec, act, "gate load"))
        up.append(inp.buf.load_vec(src + inter, kvec, act, "up load"))
        active.append(act)
    for i in range(VECS_PER_THREAD):
        v = first + i * threads
        dst = np.broadcast_to(out.off + row * out_s + v * kvec, shape)
        out.buf.store_vec(dst, silu_mul(gate[i], up[i], dt), kvec, active[i], "out store")


def scalar_kernel(dt, grid, threads, out, inp, inter, out_s, in_s):
    """silu_and_mul_scalar_kernel over grid (rows, column blocks)."""
    rows, cols = grid
    row = np.arange(rows)[:, None, None]
    block_y = np.arange(cols)[None, :, None]
    tx = np.arange(threads)[None, None, :]
    shape = (rows, cols, threads)
    first = block_y * threads * SCALAR_ELEMS_PER_THREAD + tx
    for i in range(SCALAR_ELEMS_PER_THREAD):
        c = first + i * threads
        act = np.broadcast_to(c < inter, shape)
        src = np.broadcast_to(inp.off + row * in_s + c, shape)
        gate = inp.buf.load(src, act, "gate load")
        up = inp.buf.load(src + inter, act, "up load")
        out.buf.store(np.broadcast_to(out.off + row * out_s + c, shape), silu_mul(gate, up, dt), act, "out store")


def silu_and_mul(x):
    """activation.cu silu_and_mul -> (out, path). The output starts as NaN, so an element the
    kernel forgets shows."""
    inter = x.size(-1) // 2
    lead = x.dim() - 1
    stride = collapsed_stride(x, lead, x.size(-1))
    x_rows = x if stride is not None else x.contiguous()
    in_s = stride if stride is not None else x.size(-1)
    rows = int(np.prod(x.shape[:-1])) if lead else 1
    out = torch.full((*x.shape[:-1], inter), float("nan"), dtype=x.dtype)
    if out.numel() == 0:
        return out, "empty"
    kvec = 16 // x.element_size()
    # silu_and_mul_vectorizable (out_stride = inter)
    vectorized = inter % kvec == 0 and in_s % kvec == 0 and aligned(out) and aligned(x_rows)
    cols, threads = column_blocks(inter, kvec, vectorized)
    if cols > MAX_GRID_Y:
        raise ModelError("silu_and_mul: the column blocks exceed gridDim.y")
    bufs = Bufs()
    inp = bufs.get(x_rows, "input")
    o = bufs.get(out, "out", writable=True)
    kernel = vec_kernel if vectorized else scalar_kernel
    kernel(DTYPE_NAME[x.dtype], (rows, cols), threads, o, inp, inter, inter, in_s)
    bufs.check_written_exactly([out])
    bufs.write_back()
    return out, f"{'vec' if vectorized else 'scalar'} grid ({rows},{cols}) x {threads}"
