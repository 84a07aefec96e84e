"""Lane-level model of RMSNorm and fused residual-add + RMSNorm.

Mirrors csrc/norm/rms_norm.cuh (rms_norm_vec_kernel, rms_norm_scalar_kernel, launch_rms_norm; all
blocks and threads of the grid at once) and csrc/norm/norm.cu (as_rows, rms_norm / add_rms_norm),
with core/reduce.cuh block_reduce_sum. Loads and stores go through checked GBufs (glue.Bufs).
"""
from __future__ import annotations

import numpy as np
import torch

from . import fp
from .glue import DTYPE_NAME, Bufs, aligned, collapsed_stride
from .primitives import ELEM_BYTES, WARP, ModelError, ceil_div, round_to, round_up, warp_reduce_sum

TARGET_VECS_PER_THREAD = 4  # kTargetVecsPerThread
MAX_VECS_PER_THREAD = 4     # kMaxVecsPerThread
MAX_THREADS_PER_ROW = 512   # kMaxThreadsPerRow
ROWS_PER_WARP_BLOCK = 4     # kRowsPerWarpBlock
SCALAR_THREADS = 256        # kScalarThreads


def block_reduce_sum(v, num_threads):
    """core/reduce.cuh block_reduce_sum over v [rows, num_threads] (one block per row)."""
    rows = v.shape[0]
    num_warps = num_threads // WARP
    v = warp_reduce_sum(v.reshape(rows, num_warps, WARP), WARP, lane_axis=2)
    warp_sums = v[:, :, 0]  # lane 0 of each warp writes warp_sums[warp]; __syncthreads
    lane_vals = np.zeros((rows, num_warps, WARP), np.float32)
    lane_vals[:, :, :num_warps] = warp_sums[:, None, :]  # lane < num_warps ? warp_sums[lane] : 0
    total = warp_reduce_sum(lane_vals, WARP, lane_axis=2)
    if not ((total == total[:, :1, :1]) | np.isnan(total)).all():
        raise ModelError("block_reduce_sum: threads of a block disagree on the total")
    return total.reshape(rows, num_threads)


def rms_norm_vec_kernel(dt, grid, block, out, res_out, inp, res, weight, num_rows, hidden,
                        out_s, res_out_s, in_s, res_s, eps):
    """rms_norm.cuh rms_norm_vec_kernel; block = (threads per row, rows per block)."""
    kvec = 16 // ELEM_BYTES[dt]
    to_t = round_to(dt)
    threads, rows_per_block = block
    eps = np.float32(eps)
    row = (np.arange(grid)[:, None] * rows_per_block + np.arange(rows_per_block)[None, :]).reshape(-1)
    live = row < num_rows  # early return: whole warps, only when rows_per_block > 1
    if rows_per_block == 1 and not live.all():
        raise ModelError("rms_norm_vec_kernel: a block-per-row launch has a row past the end")
    row = row[live][:, None]
    shape = (row.size, threads)
    tx = np.arange(threads)
    add_residual = res is not None
    num_vecs = hidden // kvec
    x = np.zeros((MAX_VECS_PER_THREAD,) + shape + (kvec,), np.float32)
    w = np.zeros_like(x)
    active = np.zeros((MAX_VECS_PER_THREAD,) + shape, bool)
    vec = [tx + i * threads for i in range(MAX_VECS_PER_THREAD)]  # v = threadIdx.x + i * blockDim.x
    for i in range(MAX_VECS_PER_THREAD):
        active[i] = np.broadcast_to(vec[i] < num_vecs, shape)
        x[i] = inp.buf.load_vec(inp.off + row * in_s + vec[i] * kvec, kvec, active[i], "input load")
        w[i] = weight.buf.load_vec(np.broadcast_to(weight.off + vec[i] * kvec, shape), kvec, active[i],
                                   "weight load")
    if add_residual:
        r = [res.buf.load_vec(res.off + row * res_s + vec[i] * kvec, kvec, active[i], "residual load")
             for i in range(MAX_VECS_PER_THREAD)]
        for i in range(MAX_VECS_PER_THREAD):
            x[i] = to_t((x[i] + r[i]).astype(np.float32))
            res_out.buf.store_vec(res_out.off + row * res_out_s + vec[i] * kvec, x[i], kvec, active[i],
                                  "residual_out store")
    sum_sq = np.zeros(shape, np.float32)
    for i in range(MAX_VECS_PER_THREAD):
        for j in range(kvec):
            f = x[i][..., j]
            sum_sq = np.where(active[i], fp.fma32(f, f, sum_sq), sum_sq)  # sum_sq += f * f, an FFMA
    if threads == WARP:
        sum_sq = warp_reduce_sum(sum_sq, WARP, lane_axis=1)
    else:
        sum_sq = block_reduce_sum(sum_sq, threads)
    rstd = fp.rsqrtf(((sum_sq / np.float32(hidden)).astype(np.float32) + eps).astype(np.float32))
    for i in range(MAX_VECS_PER_THREAD):
        with np.errstate(invalid="ignore"):  # 0 * inf (eps = 0, a zero row): NaN, as on the GPU
            n = to_t((x[i] * rstd[..., None]).astype(np.float32))
        y = to_t((w[i] * n).astype(np.float32))
        out.buf.store_vec(out.off + row * out_s + vec[i] * kvec, y, kvec, active[i], "out store")


def rms_norm_scalar_kernel(dt, grid, out, res_out, inp, res, weight, hidden, out_s, res_out_s, in_s, res_s,
                           eps):
    """rms_norm.cuh rms_norm_scalar_kernel: one block of SCALAR_THREADS per row."""
    to_t = round_to(dt)
    eps = np.float32(eps)
    row = np.arange(grid)[:, None]
    shape = (grid, SCALAR_THREADS)
    tx = np.arange(SCALAR_THREADS)
    add_residual = res is not None
    iters = ceil_div(hidden, SCALAR_THREADS)

    def load_sum(c, active):
        x = inp.buf.load(inp.off + row * in_s + c, active, "input load")
        if add_residual:
            return to_t((x + res.buf.load(res.off + row * res_s + c, active, "residual load")).astype(np.float32))
        return x

    sum_sq = np.zeros(shape, np.float32)
    for it in range(iters):
        c = tx + it * SCALAR_THREADS
        active = np.broadcast_to(c < hidden, shape)
        s = load_sum(c, active)
        if add_residual:
            res_out.buf.store(res_out.off + row * res_out_s + c, s, active, "residual_out store")
        sum_sq = np.where(active, fp.fma32(s, s, sum_sq), sum_sq)
    sum_sq = block_reduce_sum(sum_sq, SCALAR_THREADS)
    rstd = fp.rsqrtf(((sum_sq / np.float32(hidden)).astype(np.float32) + eps).astype(np.float32))
    for it in range(iters):
        c = tx + it * SCALAR_THREADS
        active = np.broadcast_to(c < hidden, shape)
        with np.errstate(invalid="ignore"):
            n = to_t((load_sum(c, active) * rstd).astype(np.float32))
        w = weight.buf.load(np.broadcast_to(weight.off + c, shape), active, "weight load")
        out.buf.store(out.off + row * out_s + c, to_t((w * n).astype(np.float32)), active, "out store")


def launch_rms_norm(dt, out, res_out, inp, res, weight, num_rows, hidden, out_s, res_out_s, in_s, res_s, eps,
                    is_aligned):
    """rms_norm.cuh launch_rms_norm; is_aligned: pointer name -> 16-byte aligned. Returns the path."""
    if num_rows == 0 or hidden == 0:
        return "none"
    kvec = 16 // ELEM_BYTES[dt]
    add_residual = res is not None
    num_vecs = hidden // kvec
    threads_per_row = round_up(ceil_div(num_vecs, TARGET_VECS_PER_THREAD), WARP)
    vec_ok = (hidden % kvec == 0 and threads_per_row <= MAX_THREADS_PER_ROW
              and threads_per_row * MAX_VECS_PER_THREAD >= num_vecs
              and is_aligned["out"] and is_aligned["input"] and is_aligned["weight"]
              and out_s % kvec == 0 and in_s % kvec == 0
              and (not add_residual or (is_aligned["residual"] and is_aligned["residual_out"]
                                        and res_s % kvec == 0 and res_out_s % kvec == 0)))
    if vec_ok:
        rows_per_block = ROWS_PER_WARP_BLOCK if threads_per_row == WARP else 1
        grid = ceil_div(num_rows, rows_per_block)
        rms_norm_vec_kernel(dt, grid, (threads_per_row, rows_per_block), out, res_out, inp, res, weight,
                            num_rows, hidden, out_s, res_out_s, in_s, res_s, eps)
        return f"vec block ({threads_per_row},{rows_per_block}) grid {grid}"
    rms_norm_scalar_kernel(dt, num_rows, out, res_out, inp, res, weight, hidden, out_s, res_out_s, in_s,
                           res_s, eps)
    return f"scalar grid {num_rows}"


def as_rows(t: torch.Tensor):
    """norm.cu as_rows: (tensor, rows, row stride); a contiguous copy when the rows have no one stride."""
    hidden = t.size(-1)
    lead = t.dim() - 1
    rows = int(np.prod(t.shape[:-1])) if lead else 1
    stride = collapsed_stride(t, lead, hidden)
    if stride is not None:
        return t, rows, stride
    return t.contiguous(), rows, hidden


def rms_norm(inp, weight, eps, residual=None):
    """norm.cu rms_norm (residual None) / add_rms_norm. Returns (out, residual_out or None, path).
    The outputs start as NaN, so an element the kernel forgets shows."""
    x, num_rows, in_s = as_rows(inp)
    out = torch.full(inp.shape, float("nan"), dtype=inp.dtype)
    res_out = torch.full(inp.shape, float("nan"), dtype=inp.dtype) if residual is not None else None
    if out.numel() == 0:
        return out, res_out, "empty"
    bufs = Bufs()
    ptr = dict(input=bufs.get(x, "input"), weight=bufs.get(weight, "weight"), out=bufs.get(out, "out", True))
    is_aligned = dict(input=aligned(x), weight=aligned(weight), out=aligned(out))
    res_s = 0
    if residual is not None:
        r, _, res_s = as_rows(residual)
        ptr["residual"] = bufs.get(r, "residual")
        ptr["residual_out"] = bufs.get(res_out, "residual_out", True)
        is_aligned.update(residual=aligned(r), residual_out=aligned(res_out))
    hidden = inp.size(-1)
    path = launch_rms_norm(DTYPE_NAME[inp.dtype], ptr["out"], ptr.get("residual_out"), ptr["input"],
                           ptr.get("residual"), ptr["weight"], num_rows, hidden, hidden,
                           hidden if residual is not None else 0, in_s, res_s, eps, is_aligned)
    bufs.check_written_exactly([out] + ([res_out] if res_out is not None else []))
    bufs.write_back()
    return out, res_out, path
