"""Lane-level model of the MoE router, and of PyTorch's CUDA warp softmax it claims to match bitwise.

Mirrors csrc/moe/router.cuh (router_detail prob_key / key_prob / warp_max_u32 / warp_min_u32,
moe_router_kernel<T, kSlots>, launch_moe_router: every warp of the grid, looping over tokens) and
the moe_router glue of csrc/moe/moe.cu. torch_cuda_softmax restates PyTorch's
softmax_warp_forward (aten/src/ATen/native/cuda/PersistentSoftmax.cuh) for E <= 1024, so that a
CPU test can check the kernel's softmax is bitwise torch's on CUDA.
"""
from __future__ import annotations

import numpy as np
import torch

from . import fp
from .glue import DTYPE_NAME, Bufs
from .primitives import WARP, ModelError, ceil_div, round_to, warp_reduce_max, warp_reduce_sum

ROUTER_WARPS = 16         # kRouterWarps
ROUTER_BLOCKS_PER_SM = 2  # kRouterBlocksPerSm
SLOTS_SMALL = 4           # kRouterSlotsSmall
SLOTS_LARGE = 16          # kRouterSlotsLarge
MAX_EXPERTS = 512         # kMaxExperts
MAX_TOP_K = 16            # kMaxTopK
TAKEN_KEY = np.uint32(0)
NAN_KEY = np.uint32(0xFFFFFFFF)
NO_CANDIDATE = np.uint32(0xFFFFFFFF)


def prob_key(p):
    """p >= 0 or NaN -> a key ordering like p: bits(|p|) + 1, NaN above everything."""
    p = np.asarray(p, np.float32)
    bits = np.abs(p).view(np.uint32).astype(np.uint64) + 1
    return np.where(np.isnan(p), np.uint64(0xFFFFFFFF), bits).astype(np.uint32)


def key_prob(key):
    key = np.asarray(key, np.uint32)
    return np.where(key == NAN_KEY, np.float32(np.nan), (key - np.uint32(1)).view(np.float32)).astype(np.float32)


def warp_max_u32(v):
    """__reduce_max_sync over the lane axis (1) of [warps, 32]."""
    return v.max(axis=1, keepdims=True)


def warp_min_u32(v):
    """__reduce_min_sync over the lane axis (1) of [warps, 32]."""
    return v.min(axis=1, keepdims=True)


def softmax_lanes(x, slots):
    """The kernel's softmax of x [warps, 32, slots] (fp32, -inf in slots past E): per-lane max and
    sum in slot order, then warp butterflies. Returns p [warps, 32, slots]."""
    row_max = x[..., 0]
    for i in range(1, slots):
        row_max = np.fmax(row_max, x[..., i])
    row_max = warp_reduce_max(row_max, lane_axis=1)
    with np.errstate(invalid="ignore"):
        e = fp.expf((x - row_max[..., None]).astype(np.float32))
    total = np.zeros(row_max.shape, np.float32)
    for i in range(slots):
        total = (total + e[..., i]).astype(np.float32)
    total = warp_reduce_sum(total, WARP, lane_axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (e / total[..., None]).astype(np.float32)


def moe_router_kernel(dt, grid, slots, weights, expert_ids, tokens_per_expert, logits, num_tokens, stride,
                      num_experts, top_k, norm_topk_prob):
    """router.cuh moe_router_kernel<T, kSlots>: all warps of the grid, token loop in lockstep."""
    to_t = round_to(dt)
    histogram = np.zeros((grid, MAX_EXPERTS), np.int64)  # per block, shared
    lane = np.arange(WARP)
    warps_in_grid = grid * ROUTER_WARPS
    seen = np.zeros(num_tokens, np.int64)
    block = np.repeat(np.arange(grid), ROUTER_WARPS)
    token = block * ROUTER_WARPS + np.tile(np.arange(ROUTER_WARPS), grid)
    while (token < num_tokens).any():
        live = token < num_tokens
        tok, blk = token[live], block[live]
        np.add.at(seen, tok, 1)
        num_warps = tok.size
        expert = lane[None, :, None] + WARP * np.arange(slots)[None, None, :]
        present = np.broadcast_to(expert < num_experts, (num_warps, WARP, slots))
        x = logits.buf.load(logits.off + tok[:, None, None] * stride + expert, present, "logits load")
        x = np.where(present, x.astype(np.float32), np.float32(-np.inf)).astype(np.float32)
        key = np.where(present, prob_key(softmax_lanes(x, slots)), TAKEN_KEY).astype(np.uint32)

        # k rounds of warp argmax; lane j keeps round j's pick; a lane's taken slots are bits of `taken`
        my_prob = np.zeros((num_warps, WARP), np.float32)
        my_expert = np.zeros((num_warps, WARP), np.int64)
        picked_sum = np.zeros((num_warps, WARP), np.float32)
        taken = np.zeros((num_warps, WARP), np.int64)

        def slot_key(i):
            return np.where((taken >> i) & 1 == 1, TAKEN_KEY, key[..., i]).astype(np.uint32)

        for j in range(top_k):
            # slots ascend in expert index: a strict > keeps the lowest; real keys are above TAKEN_KEY
            best = np.full((num_warps, WARP), TAKEN_KEY, np.uint32)
            best_slot = np.zeros((num_warps, WARP), np.int64)
            for i in range(slots):
                k_i = slot_key(i)
                greater = k_i > best
                best = np.where(greater, k_i, best)
                best_slot = np.where(greater, i, best_slot)
            top = warp_max_u32(best)
            if not (top >= 1).all():
                raise ModelError("router: no untaken expert left in a round")
            candidate = np.where(best == top, (lane[None, :] + best_slot * WARP).astype(np.uint32), NO_CANDIDATE)
            winner = warp_min_u32(candidate).astype(np.int64)
            prob = key_prob(top)
            picked_sum = (picked_sum + prob).astype(np.float32)
            mine = lane[None, :] == j
            my_prob = np.where(mine, prob, my_prob)
            my_expert = np.where(mine, winner, my_expert)
            owner = lane[None, :] == winner % WARP
            taken = np.where(owner, taken | (1 << (winner // WARP)), taken)

        writes = np.broadcast_to(lane[None, :] < top_k, (num_warps, WARP))
        with np.errstate(invalid="ignore", divide="ignore"):
            w = (my_prob / picked_sum).astype(np.float32) if norm_topk_prob else my_prob
        out = tok[:, None] * top_k + lane[None, :]
        weights.buf.store(out, to_t(w), writes, "weights store")
        expert_ids.buf.store(out, my_expert, writes, "expert_ids store")
        picks = my_expert[writes]
        if not ((picks >= 0) & (picks < num_experts)).all():
            raise ModelError("router: an expert id outside [0, E)")
        np.add.at(histogram, (np.broadcast_to(blk[:, None], writes.shape)[writes], picks), 1)
        token = token + warps_in_grid
    if not (seen == 1).all():
        raise ModelError("router: a token processed other than once")
    if grid == 1:  # one block: its counts are the counts, stored (zeros included; no memset)
        tokens_per_expert.buf.write(tokens_per_expert.off + np.arange(num_experts),
                                    histogram[0, :num_experts, None], "counts store")
        return
    # flush: one global atomicAdd per non-zero expert per block
    for b in range(grid):
        nonzero = np.nonzero(histogram[b, :num_experts])[0]
        tokens_per_expert.buf.atomic_add(tokens_per_expert.off + nonzero, histogram[b, nonzero], "counts flush")


def moe_router(logits, top_k, norm_topk_prob, num_sms=132):
    """moe.cu moe_router + router.cuh launch_moe_router: returns (weights, expert_ids,
    tokens_per_expert). Outputs start as garbage (NaN, -7, 12345)."""
    num_tokens, num_experts = logits.shape
    if not (1 <= num_experts <= MAX_EXPERTS and 1 <= top_k <= min(num_experts, MAX_TOP_K)):
        raise ModelError("moe_router: E or k outside the glue's checked range")
    stride = num_experts if num_tokens <= 1 else logits.stride(0)
    weights = torch.full((num_tokens, top_k), float("nan"), dtype=logits.dtype)
    ids = torch.full((num_tokens, top_k), -7, dtype=torch.int32)
    counts = torch.full((num_experts,), 12345, dtype=torch.int32)
    bufs = Bufs()
    lg = bufs.get(logits, "logits")
    w_ptr = bufs.get(weights, "weights", writable=True)
    id_ptr = bufs.get(ids, "expert_ids", writable=True)
    c_ptr = bufs.get(counts, "tokens_per_expert", writable=True)
    grid = min(ceil_div(num_tokens, ROUTER_WARPS), num_sms * ROUTER_BLOCKS_PER_SM)
    if grid != 1:  # cudaMemsetAsync, unless one block stores every count
        c_ptr.buf.write(c_ptr.off + np.arange(num_experts), np.zeros((num_experts, 1)), "memset")
    if num_tokens:
        slots = SLOTS_SMALL if num_experts <= SLOTS_SMALL * WARP else SLOTS_LARGE
        moe_router_kernel(DTYPE_NAME[logits.dtype], grid, slots, w_ptr, id_ptr, c_ptr, lg, num_tokens, stride,
                          num_experts, top_k, norm_topk_prob)
    bufs.check_written_exactly([weights, ids, counts])  # counts: the memset or the one block's stores
    bufs.write_back()
    return weights, ids, counts


def torch_cuda_softmax(x):
    """PyTorch's softmax_warp_forward on x [T, E] fp32 (E <= 1024): per-lane max / sum over
    elements l + 32 i, then xor butterflies; returns p [T, E] fp32."""
    num_tokens, num_experts = x.shape
    pow2 = 1 << (num_experts - 1).bit_length() if num_experts > 1 else 1
    warp = min(pow2, WARP)
    iters = pow2 // warp
    xs = np.full((num_tokens, warp, iters), -np.inf, np.float32)
    for lane in range(warp):
        for i in range(iters):
            if lane + i * warp < num_experts:
                xs[:, lane, i] = x[:, lane + i * warp]
    m = xs[..., 0].copy()
    for i in range(1, iters):
        m = np.where(m > xs[..., i], m, xs[..., i])  # (max > e) ? max : e
    offset = warp // 2
    while offset:
        other = np.take(m, np.arange(warp) ^ offset, axis=1)
        m = np.where(m < other, other, m)  # Max: a < b ? b : a
        offset //= 2
    with np.errstate(invalid="ignore"):
        e = fp.expf((xs - m[..., None]).astype(np.float32))
    total = np.zeros((num_tokens, warp), np.float32)
    for i in range(iters):
        total = (total + e[..., i]).astype(np.float32)
    offset = warp // 2
    while offset:
        total = (total + np.take(total, np.arange(warp) ^ offset, axis=1)).astype(np.float32)
        offset //= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (e / total[..., None]).astype(np.float32)
    out = np.zeros((num_tokens, num_experts), np.float32)
    for lane in range(warp):
        for i in range(iters):
            if lane + i * warp < num_experts:
                out[:, lane + i * warp] = p[:, lane, i]
    return out
