"""Lane-level model of the fused QK-norm + RoPE kernel and its glue.

Mirrors csrc/rope/qk_norm_rope.cuh (qk_norm_rope_kernel<T, kCache>, launch_qk_norm_rope; all
warps of the grid at once, lanes as an array axis) and csrc/rope/rope.cu (check_args' prepared
operands, head_strides, addressed, and the three ops qk_norm_rope, qk_norm_rope_,
qk_norm_rope_cache_). Every load and store goes through checked GBufs (glue.Bufs): bounds,
reads only of the input views, writes only to the output views, 16-byte alignment of vector
accesses, and every expected output element written exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import fp
from .glue import DTYPE_NAME, Bufs, Ptr, aligned, collapsed_stride
from .primitives import ELEM_BYTES, WARP, ceil_div, round_to, warp_reduce_sum

HEAD_DIM = 128
ROTARY_HALF = 64
HEADS_PER_WARP = 8   # kHeadsPerWarp
WARPS_PER_BLOCK = 4  # kWarpsPerBlock


@dataclass
class CacheWrite:
    """qk_norm_rope.cuh CacheWrite: where k and v go in the kCache variant."""
    k_cache: Ptr
    v_cache: Ptr
    v: Ptr
    k_strides: tuple  # (batch, head, slot)
    v_strides: tuple
    v_in: tuple       # (token, head) strides of v
    slots: Ptr
    seqlen: int
    max_slots: int


def sincos_source(j, lane_in_head, lanes_per_head, freqs_per_lane):
    """(lane, register) holding the cos / sin of frequency elem0 + j for the lanes lane_in_head."""
    return lane_in_head + (j // freqs_per_lane) * lanes_per_head, j % freqs_per_lane


def qk_norm_rope_kernel(dt, with_cache, grid, q_out, k_out, q_in, k_in, q_weight, k_weight, positions,
                        inv_freq, num_tokens, num_q_heads, num_kv_heads, q_out_s, k_out_s, q_in_s, k_in_s,
                        attention_scaling, eps, cache: CacheWrite | None):
    """qk_norm_rope.cuh qk_norm_rope_kernel<T, kCache>: every warp of the grid. Strides are
    (token, head) element pairs; pointers are Ptr."""
    kvec = 16 // ELEM_BYTES[dt]      # HeadLayout::kVec
    lanes_per_head = ROTARY_HALF // kvec  # kLanesPerHead: lane i holds elements i*kvec.. and +64
    heads_per_iter = WARP // lanes_per_head
    iters = HEADS_PER_WARP // heads_per_iter
    freqs_per_lane = kvec // heads_per_iter  # kFreqsPerLane
    assert freqs_per_lane == 2
    to_t = round_to(dt)
    attention_scaling = np.float32(attention_scaling)
    eps = np.float32(eps)

    lane = np.arange(WARP)
    num_qk_heads = num_q_heads + num_kv_heads
    num_heads = num_qk_heads + (num_kv_heads if with_cache else 0)
    groups_per_token = ceil_div(num_heads, HEADS_PER_WARP)
    warp_id = np.arange(grid * WARPS_PER_BLOCK, dtype=np.int64)
    token = warp_id // groups_per_token
    live = token < num_tokens  # whole warps exit together
    warp_id, token = warp_id[live], token[live]
    num_warps = warp_id.size
    if num_warps == 0:
        return
    head_base = (warp_id % groups_per_token) * HEADS_PER_WARP  # [W]

    head_slot = lane // lanes_per_head
    lane_in_head = lane % lanes_per_head
    elem0 = lane_in_head * kvec
    tok = token[:, None]
    shape = (num_warps, WARP)

    # ---- issue every load of the warp before any math
    lo = np.zeros((iters,) + shape + (kvec,), np.float32)  # elements elem0 ..
    hi = np.zeros_like(lo)                                  # elements elem0 + 64 ..
    valid = np.zeros((iters,) + shape, bool)
    is_q = np.zeros_like(valid)
    is_v = np.zeros_like(valid)
    head_in_tensor = np.zeros((iters,) + shape, np.int64)
    for it in range(iters):
        h = head_base[:, None] + it * heads_per_iter + head_slot[None, :]
        valid[it] = h < num_heads
        # a lane past the token's last head copies nothing (zero-filled), addresses the group's
        # first head (never read), stores nothing
        head = np.where(valid[it], h, head_base[:, None])
        is_q[it] = head < num_q_heads
        is_v[it] = with_cache & (head >= num_qk_heads)
        head_in_tensor[it] = np.where(is_q[it], head, np.where(is_v[it], head - num_qk_heads, head - num_q_heads))
        sources = [(valid[it] & is_q[it], q_in, q_in_s), (valid[it] & ~is_q[it] & ~is_v[it], k_in, k_in_s)]
        if with_cache:
            sources.append((valid[it] & is_v[it], cache.v, cache.v_in))
        for sel, ptr, strides in sources:
            if sel.any():  # lanes without a head keep 0 and still take part in the shuffles
                src = ptr.off + tok * strides[0] + head_in_tensor[it] * strides[1] + elem0[None, :]
                lo[it] = np.where(sel[..., None], ptr.buf.load_vec(src, kvec, sel, "x load"), lo[it])
                hi[it] = np.where(sel[..., None], ptr.buf.load_vec(src + ROTARY_HALF, kvec, sel, "x load"),
                                  hi[it])
    pos = positions.buf.load(positions.off + np.broadcast_to(tok, shape), what="positions load")
    if with_cache:
        batch_row = token // cache.seqlen
        s = token - batch_row * cache.seqlen
        slot = cache.slots.buf.load(cache.slots.off + np.broadcast_to(s[:, None], shape),
                                    what="slots load").astype(np.int64)
        batch_row = np.broadcast_to(batch_row[:, None], shape)

    # ---- cos / sin: lane (i, g) computes frequencies elem0 + 2 g + {0, 1}; the lane needing
    # frequency elem0 + j takes it from lane (i, j // 2), register j % 2 (__shfl_sync)
    own_freq = inv_freq.buf.load_vec(np.broadcast_to(inv_freq.off + elem0 + head_slot * freqs_per_lane, shape),
                                     freqs_per_lane, what="inv_freq load")
    pos_f = pos.astype(np.float32)  # static_cast<float>(int64): round to nearest even
    own_sin, own_cos = fp.sincos_accurate((pos_f[..., None] * own_freq).astype(np.float32))  # __fmul_rn
    own_cos = (own_cos * attention_scaling).astype(np.float32)
    own_sin = (own_sin * attention_scaling).astype(np.float32)
    cos_v = np.zeros(shape + (kvec,), np.float32)
    sin_v = np.zeros_like(cos_v)
    for j in range(kvec):
        src_lane, reg = sincos_source(j, lane_in_head, lanes_per_head, freqs_per_lane)
        cos_v[..., j] = own_cos[:, src_lane, reg]
        sin_v[..., j] = own_sin[:, src_lane, reg]

    # ---- norm + rotate + store, one step (4 or 2 heads per warp) at a time
    for it in range(iters):
        a, b = lo[it], hi[it]
        sum_sq = np.zeros(shape, np.float32)
        for j in range(kvec):  # fmaf(a, a, sum), fmaf(b, b, sum) per element pair
            sum_sq = fp.fma32(a[..., j], a[..., j], sum_sq)
            sum_sq = fp.fma32(b[..., j], b[..., j], sum_sq)
        sum_sq = warp_reduce_sum(sum_sq, lanes_per_head, lane_axis=1)
        rstd = fp.rsqrtf(fp.fma32(sum_sq, np.float32(1.0 / HEAD_DIM), eps))
        w_lo = np.zeros_like(a)
        w_hi = np.zeros_like(a)
        for weight, sel in ((q_weight, is_q[it]), (k_weight, ~is_q[it])):  # this step's weights
            idx = np.broadcast_to(weight.off + elem0, shape)
            w_lo = np.where(sel[..., None], weight.buf.load_vec(idx, kvec, sel, "weight load"), w_lo)
            w_hi = np.where(sel[..., None], weight.buf.load_vec(idx + ROTARY_HALF, kvec, sel, "weight load"), w_hi)
        # HF's norm: T(x * rstd), times the weight rounded to T (the pair multiply, mul_pair_rn)
        na = to_t((to_t((a * rstd[..., None]).astype(np.float32)) * w_lo).astype(np.float32))
        nb = to_t((to_t((b * rstd[..., None]).astype(np.float32)) * w_hi).astype(np.float32))
        y_lo = to_t(fp.fma32(na, cos_v, -(nb * sin_v).astype(np.float32)))
        y_hi = to_t(fp.fma32(nb, cos_v, (na * sin_v).astype(np.float32)))
        rest = valid[it]
        if with_cache:  # k or v head -> its cache slot (if in range); q heads go on below
            in_range = valid[it] & ~is_q[it] & (slot >= 0) & (slot < cache.max_slots)
            for dst_ptr, strides, values, sel in ((cache.k_cache, cache.k_strides, (y_lo, y_hi),
                                                   in_range & ~is_v[it]),
                                                  (cache.v_cache, cache.v_strides, (lo[it], hi[it]),
                                                   in_range & is_v[it])):
                if sel.any():
                    dst = (dst_ptr.off + batch_row * strides[0] + head_in_tensor[it] * strides[1]
                           + slot * strides[2] + elem0[None, :])
                    dst_ptr.buf.store_vec(dst, values[0], kvec, sel, "cache store")
                    dst_ptr.buf.store_vec(dst + ROTARY_HALF, values[1], kvec, sel, "cache store")
            rest = valid[it] & is_q[it]
        for ptr, strides, sel in ((q_out, q_out_s, rest & is_q[it]), (k_out, k_out_s, rest & ~is_q[it])):
            if sel.any():
                dst = ptr.off + tok * strides[0] + head_in_tensor[it] * strides[1] + elem0[None, :]
                ptr.buf.store_vec(dst, y_lo, kvec, sel, "out store")
                ptr.buf.store_vec(dst + ROTARY_HALF, y_hi, kvec, sel, "out store")


def launch_grid(num_tokens, num_q_heads, num_kv_heads, with_cache):
    """qk_norm_rope.cuh launch_qk_norm_rope: blocks of the grid (0: no launch)."""
    num_heads = num_q_heads + num_kv_heads * (2 if with_cache else 1)
    if num_tokens == 0 or num_heads == 0:
        return 0
    return ceil_div(num_tokens * ceil_div(num_heads, HEADS_PER_WARP), WARPS_PER_BLOCK)


# ----------------------------------------------------------------------------- rope.cu glue
def head_strides(t: torch.Tensor, vec: int):
    """rope.cu head_strides: (token, head) strides, or None when the kernel cannot address t."""
    head = HEAD_DIM if t.size(-2) == 1 else t.stride(-2)
    token = collapsed_stride(t, t.dim() - 2, t.size(-2) * head)
    if token is None or not aligned(t) or token % vec or head % vec:
        return None
    return (token, head)


def addressed(t: torch.Tensor, vec: int):
    """rope.cu addressed: t itself when addressable, else a contiguous copy; and its strides."""
    strides = head_strides(t, vec)
    if strides is not None:
        return t, strides
    copy = t.clone(memory_format=torch.contiguous_format)
    return copy, head_strides(copy, vec)


def _prepare(positions, q_weight, k_weight, inv_freq):
    """rope.cu check_args' Prepared: flat contiguous positions, 16-byte aligned small operands."""
    def vector_aligned(t):
        return t if aligned(t) else t.clone()
    return (positions.reshape(-1).contiguous(), vector_aligned(q_weight), vector_aligned(k_weight),
            vector_aligned(inv_freq))


def _launch(q_out, k_out, q_out_s, k_out_s, q_in, k_in, q_in_s, k_in_s, prepared, attention_scaling, eps,
            expected_writes, cache=None):
    """rope.cu launch through the lane model: registers the tensors, runs every warp, checks that
    exactly `expected_writes` were written (once) and writes the results back."""
    positions, q_weight, k_weight, inv_freq = prepared
    num_tokens = positions.numel()
    if num_tokens == 0:
        return
    bufs = Bufs()
    ptr = dict(q_in=bufs.get(q_in, "q_in"), k_in=bufs.get(k_in, "k_in"),
               q_weight=bufs.get(q_weight, "q_weight"), k_weight=bufs.get(k_weight, "k_weight"),
               positions=bufs.get(positions, "positions"), inv_freq=bufs.get(inv_freq, "inv_freq"),
               q_out=bufs.get(q_out, "q_out", writable=True),
               k_out=bufs.get(k_out, "k_out", writable=cache is None))  # with a cache k_out is unused
    cache_write = None
    if cache is not None:
        cache_write = CacheWrite(
            k_cache=bufs.get(cache["k_cache"], "k_cache", writable=True),
            v_cache=bufs.get(cache["v_cache"], "v_cache", writable=True),
            v=bufs.get(cache["v"], "v"), v_in=cache["v_strides"],
            k_strides=tuple(cache["k_cache"].stride()[:3]), v_strides=tuple(cache["v_cache"].stride()[:3]),
            slots=bufs.get(cache["slots"], "slots"), seqlen=cache["seqlen"],
            max_slots=cache["k_cache"].size(2))
    num_q_heads, num_kv_heads = q_in.size(-2), k_in.size(-2)
    grid = launch_grid(num_tokens, num_q_heads, num_kv_heads, cache is not None)
    if grid:
        qk_norm_rope_kernel(DTYPE_NAME[q_in.dtype], cache is not None, grid, ptr["q_out"], ptr["k_out"],
                            ptr["q_in"], ptr["k_in"], ptr["q_weight"], ptr["k_weight"], ptr["positions"],
                            ptr["inv_freq"], num_tokens, num_q_heads, num_kv_heads, q_out_s, k_out_s,
                            q_in_s, k_in_s, attention_scaling, eps, cache_write)
    bufs.check_written_exactly(expected_writes)
    bufs.write_back()


def qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    """rope.cu qk_norm_rope (functional, via `functional`): returns (q_out, k_out). The outputs
    start as NaN, so an element the kernel forgets shows."""
    prepared = _prepare(positions, q_weight, k_weight, inv_freq)
    vec = 16 // q.element_size()
    q_in, q_in_s = addressed(q, vec)
    k_in, k_in_s = addressed(k, vec)
    q_out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    k_out = torch.full(k.shape, float("nan"), dtype=k.dtype)
    _launch(q_out, k_out, (q.size(-2) * HEAD_DIM, HEAD_DIM), (k.size(-2) * HEAD_DIM, HEAD_DIM), q_in, k_in,
            q_in_s, k_in_s, prepared, attention_scaling, eps, expected_writes=[q_out, k_out])
    return q_out, k_out


def qk_norm_rope_(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps):
    """rope.cu qk_norm_rope_: in place when both are addressable, else functional + copy back."""
    vec = 16 // q.element_size()
    q_s, k_s = head_strides(q, vec), head_strides(k, vec)
    if q_s and k_s:
        prepared = _prepare(positions, q_weight, k_weight, inv_freq)
        _launch(q, k, q_s, k_s, q, k, q_s, k_s, prepared, attention_scaling, eps, expected_writes=[q, k])
        return
    q_new, k_new = qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)
    q.copy_(q_new)
    k.copy_(k_new)


def qk_norm_rope_cache_(q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq,
                        attention_scaling, eps):
    """rope.cu qk_norm_rope_cache_: q in place (through a copy when not addressable), k (normed,
    rotated) and v to cache slot cache_position[s] of their batch row; slots outside
    [0, max_cache_len) are not written."""
    prepared = _prepare(positions, q_weight, k_weight, inv_freq)
    vec = 16 // q.element_size()
    k_in, k_in_s = addressed(k, vec)
    v_in, v_in_s = addressed(v, vec)
    slots = cache_position.contiguous()
    cache = dict(v=v_in, v_strides=v_in_s, k_cache=k_cache, v_cache=v_cache, slots=slots, seqlen=q.size(1))
    in_range = [s for s in slots.long().tolist() if 0 <= s < k_cache.size(2)]
    cache_views = [c[:, :, s] for c in (k_cache, v_cache) for s in in_range]
    q_s = head_strides(q, vec)
    if q_s is not None:
        _launch(q, q, q_s, q_s, q, k_in, q_s, k_in_s, prepared, attention_scaling, eps,
                expected_writes=[q] + cache_views, cache=cache)
        return
    q_tmp, q_tmp_s = addressed(q.clone(memory_format=torch.contiguous_format), vec)
    _launch(q_tmp, q_tmp, q_tmp_s, q_tmp_s, q_tmp, k_in, q_tmp_s, k_in_s, prepared, attention_scaling, eps,
            expected_writes=[q_tmp] + cache_views, cache=cache)
    q.copy_(q_tmp)
