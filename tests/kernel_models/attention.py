"""Thread-level model of the attention forward kernel, its split-KV combine and their glue.

Every CTA of the grid (x = row tile, y = b * Hkv + kvh, z = split) runs with its 128 threads as
numpy lane vectors, statement by statement:
  kernel_traits.cuh  swizzled_offset, seq_slice (padded with key_lengths, or varlen), lse_index
  heuristics.cuh     row_tiles, min_tiles_per_split, plan_splits
  mainloop.cuh       load_q_tile and KVLoader (per-thread cp.async sources and swizzled
                     destinations, zero-filled rows with an in-bounds source address),
                     load_q_fragments / warp_qk (ldmatrix.x4) / warp_pv (ldmatrix.x4.trans) with
                     the kernel's per-lane address arithmetic (lane_offset ^ chunk_pair_xor);
                     the Hopper mainloop (p.wgmma): the two-half layout, warpgroup_qk (Q's A
                     fragments by ldmatrix, K K-major descriptors) and warpgroup_pv (P from
                     registers, V MN-major), proxy fences
                     and wgmma waits
  softmax.cuh        mask_scores (per-lane key columns, byte mask reads), OnlineSoftmax.update
                     (quad xor-shuffles, P packed to T), finalize and merge_split_keys (decode:
                     the warps' states through float4s in the K stages, merged into warp 0)
  attention_fwd.cuh  attention_tile (key range of the CTA and split, commit / wait groups and
                     barriers of the double-buffered main loop; at decode, rows <= 16, every warp
                     on warp 0's rows and a quarter of each tile's keys), attention_fwd_kernel
  epilogue.cuh       write_output (4-byte shared stores, barrier, 16-byte shared loads, 16-byte
                     global stores), write_partial, clear_outside_tokens, mark_uncovered_rows
  combine.cuh        combine_if_last (arrival marks: the CTA that sees every split's mark merges
                     the tile's rows and resets the marks), combine_row (per-lane split loops,
                     butterflies, NaN rows)
  attention.cu       common_params strides, mask strides, key_lengths, plan_and_launch
Checks: every global read in bounds, inside the tensors and of written data (keys past
key_lengths are unreadable), every address a zero-filled copy forms in bounds, write counts of
out and lse, shared-memory hazards (Smem), fully covered mma fragments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .primitives import (LANE, LANE_G, LANE_T, WARP, WGMMA_ATOM_BYTES, GBuf, ModelError, Num, Smem,
                         a_fragments_matrix, round_up,
                         accumulators_to_matrix, ceil_div, matrix_to_accumulators, mma_16816, shfl_xor,
                         wgmma_desc_sw128, wgmma_operand, wgmma_operand_mn)

# kernel_traits.cuh
NUM_WARPS = 4
BLOCK_M = 64
BLOCK_N = 64
STAGES = 2
MIN_CTAS_PER_SM = 2
HEAD_DIM = 128
THREADS = NUM_WARPS * WARP
CHUNK_ELEMS = 8
CHUNKS_PER_ROW = HEAD_DIM // CHUNK_ELEMS  # 16
LOAD_ROWS_PER_PASS = THREADS // CHUNKS_PER_ROW  # 8
SCORE_TILES_N = BLOCK_N // 8  # n8 tiles of scores per warp
HEAD_TILES_N = HEAD_DIM // 8  # n8 tiles of output per warp
HEAD_STEPS_K = HEAD_DIM // 16  # k16 steps of Q K^T
KEY_STEPS_K = BLOCK_N // 16  # k16 steps of P V
# decode, split keys: a CTA whose packed rows fit one warp has every warp on warp 0's rows, warp w
# on keys KEYS_PER_WARP w .. of each tile; the states merged into warp 0 after the last tile
SPLIT_KEYS_MAX_ROWS = 16
KEYS_PER_WARP = BLOCK_N // NUM_WARPS  # 16
WARP_SCORE_TILES_N = KEYS_PER_WARP // 8  # 2
TILE_Q_ELEMS = BLOCK_M * HEAD_DIM
TILE_KV_ELEMS = BLOCK_N * HEAD_DIM
SMEM_BYTES = (TILE_Q_ELEMS + 2 * STAGES * TILE_KV_ELEMS) * 2
ROW_BYTES = HEAD_DIM * 2  # mainloop.cuh kRowBytes
VEC_BYTES = 16
LN2_F32 = np.float32(0.693147180559945309)  # kLn2
# heuristics.cuh
TARGET_WAVES, MAX_SPLITS = 2, 128
# combine.cuh
COMBINE_DIMS_PER_LANE = HEAD_DIM // WARP  # 4
SPLIT_TAG = np.uint64(0x9E3779B97F4A7C15)  # a launch's arrival mark (attention.cu draws one per launch)
ALLOCATOR_LEFTOVER = np.uint64(0xFFFFFFFFFFFFFFFF)  # what a fresh workspace holds here
# shared-memory byte offsets of the Q (later O) tile and of the K and V stages
SQ, SK, SV = 0, TILE_Q_ELEMS * 2, (TILE_Q_ELEMS + STAGES * TILE_KV_ELEMS) * 2
# the Hopper layout (kernel_traits.cuh)
HALF_DIM = HEAD_DIM // 2
HALF_CHUNKS = CHUNKS_PER_ROW // 2
SMEM_ALLOC_WGMMA = SMEM_BYTES + WGMMA_ATOM_BYTES
HALF_TILE_KV_BYTES = BLOCK_N * HALF_DIM * 2
STEPS_PER_HALF = HALF_DIM // 16
WGMMA_STEP_BYTES = 32
KEY_STEP_BYTES = 16 * HALF_DIM * 2


def swizzled_offset(row, chunk):
    """kernel_traits.cuh swizzled_offset: element offset of (row, chunk) in a [rows][128] tile."""
    return row * HEAD_DIM + ((chunk ^ (row % 8)) * CHUNK_ELEMS)


def wgmma_offset(row, chunk, rows):
    """kernel_traits.cuh wgmma_offset: (row, chunk) in the Hopper layout (two [rows][64] halves)."""
    return (chunk // HALF_CHUNKS) * rows * HALF_DIM + row * HALF_DIM + (((chunk % HALF_CHUNKS) ^ (row % 8)) * CHUNK_ELEMS)


def tile_offset(wgmma, row, chunk, rows):
    """kernel_traits.cuh tile_offset<kWgmma>."""
    return wgmma_offset(row, chunk, rows) if wgmma else swizzled_offset(row, chunk)


# ----------------------------------------------------------------------------- params, slices
class Params:
    """kernel_traits.cuh Params (GBufs for the pointers)."""

    def __init__(self, **fields):
        self.mask = None
        self.cu_seqlens_q = None
        self.cu_seqlens_k = None
        self.key_lengths = None
        self.key_lengths_stride = 0
        self.mask_batch_stride = self.mask_head_stride = self.mask_q_stride = 0
        self.partial_o = self.partial_lse = None
        self.wgmma = False  # the Hopper mainloop (plan_and_launch decides)
        self.__dict__.update(fields)


@dataclass
class SeqSlice:
    """kernel_traits.cuh SeqSlice: one sequence's slice of the batch."""
    token0: int
    seqlen_q: int
    seqlen_k: int
    rows: int  # seqlen_q * group packed rows of one kv head
    q_offset: int
    k_offset: int
    v_offset: int
    lse_offset: int
    lse_head_stride: int


def seq_slice(p, b, what):
    """kernel_traits.cuh seq_slice: sequence b (cu_seqlens clamped, key_lengths clamped to Skv)."""
    if p.cu_seqlens_q is None:
        seqlen_k = p.seqlen_k
        if p.key_lengths is not None:
            n = int(p.key_lengths.read([b * p.key_lengths_stride], 1, what + " key_lengths")[0, 0])
            seqlen_k = min(max(n, 0), p.seqlen_k)
        return SeqSlice(token0=b * p.seqlen_q, seqlen_q=p.seqlen_q, seqlen_k=seqlen_k,
                        rows=p.seqlen_q * p.group, q_offset=b * p.q_batch_stride, k_offset=b * p.k_batch_stride,
                        v_offset=b * p.v_batch_stride, lse_offset=b * p.num_q_heads * p.seqlen_q,
                        lse_head_stride=p.seqlen_q)

    def cu(buf, i):
        return int(buf.read([i], 1, what + " cu_seqlens")[0, 0])
    q0 = min(max(cu(p.cu_seqlens_q, b), 0), p.total_q)
    q1 = min(max(cu(p.cu_seqlens_q, b + 1), q0), p.total_q)
    k0 = min(max(cu(p.cu_seqlens_k, b), 0), p.total_k)
    k1 = min(max(cu(p.cu_seqlens_k, b + 1), k0), p.total_k)
    return SeqSlice(token0=q0, seqlen_q=q1 - q0, seqlen_k=k1 - k0, rows=(q1 - q0) * p.group,
                    q_offset=q0 * p.q_seq_stride, k_offset=k0 * p.k_seq_stride, v_offset=k0 * p.v_seq_stride,
                    lse_offset=q0, lse_head_stride=p.total_q)


def lse_index(p, token, hq):
    """kernel_traits.cuh lse_index."""
    if p.cu_seqlens_q is not None:
        return hq * p.total_q + token
    b = token // p.seqlen_q
    return (b * p.num_q_heads + hq) * p.seqlen_q + (token - b * p.seqlen_q)


def owned_tokens(p, what):
    """[first, last): the tokens some sequence owns (clear_outside_tokens)."""
    def cu(i):
        return int(p.cu_seqlens_q.read([i], 1, what + " cu_seqlens")[0, 0])
    first = min(max(cu(0), 0), p.total_q)
    return first, min(max(cu(p.batch), first), p.total_q)


def row_tiles(p):
    """heuristics.cuh row_tiles."""
    return max(ceil_div(p.seqlen_q * p.group, BLOCK_M), 1)


def min_tiles_per_split(rows_per_cta):
    """heuristics.cuh min_tiles_per_split: K/V bytes of a split >= its partials' traffic."""
    tile_bytes = 2 * BLOCK_N * HEAD_DIM * 2
    partial_row_bytes = (HEAD_DIM + 1) * 4
    rows = min(max(rows_per_cta, 1), BLOCK_M)
    return max(ceil_div(2 * rows * partial_row_bytes, tile_bytes), 1)


def plan_splits(ctas, seqlen_k, rows_per_cta, num_sms, ctas_per_sm=MIN_CTAS_PER_SM):
    """heuristics.cuh plan_splits -> (num_splits, tiles_per_split)."""
    tiles = ceil_div(seqlen_k, BLOCK_N)
    wave = max(num_sms, 1) * max(ctas_per_sm, 1)
    splits = 1
    if 0 < ctas < wave:
        target = ceil_div(TARGET_WAVES * wave, ctas)
        most = max(min(2 * target, tiles // min_tiles_per_split(rows_per_cta), MAX_SPLITS), 1)

        def cost(s):  # waves(s) / s as a fraction, then the distance to the target, then s
            return (Fraction(ceil_div(ctas * s, wave), s), abs(s - target), s)

        splits = min(range(1, most + 1), key=cost)
        if cost(splits)[0] == cost(1)[0]:  # no count beats one split: a tie is not split
            splits = 1
    per_split = max(ceil_div(tiles, splits), 1)
    return max(ceil_div(tiles, per_split), 1), per_split


# ----------------------------------------------------------------------------- mainloop.cuh
def cp_async_16(sm, gbuf, dst_bytes, src, in_range, what):
    """core/mma.cuh cp_async_16 per thread: 16 bytes from src, or zeros (src-size 0) when not
    in_range; a zero-filled copy reads nothing, but its source address must be in bounds."""
    vals = np.zeros((dst_bytes.size, CHUNK_ELEMS))
    if not in_range.all():
        gbuf.check_addr(src[~in_range], CHUNK_ELEMS, what + " zero-fill source")
    if in_range.any():
        vals[in_range] = gbuf.read(src[in_range], CHUNK_ELEMS, what, align=CHUNK_ELEMS)
    sm.cp_async(dst_bytes, vals, what)


def load_q_tile(p, seq, sm, kvh, row0, tid, what, rows=BLOCK_M):
    """mainloop.cuh load_q_tile: packed rows [row0, row0 + rows) -> sQ (rows: 64, or 16 at decode);
    rows >= seq.rows zero."""
    chunk = tid % CHUNKS_PER_ROW
    for i in range(rows // LOAD_ROWS_PER_PASS):
        local_row = tid // CHUNKS_PER_ROW + i * LOAD_ROWS_PER_PASS
        r = row0 + local_row
        in_range = r < seq.rows
        s = r // p.group
        h = r - s * p.group
        src = np.where(in_range, seq.q_offset + (kvh * p.group + h) * p.q_head_stride + s * p.q_seq_stride
                       + chunk * CHUNK_ELEMS, seq.q_offset)  # never read when out of range
        cp_async_16(sm, p.q, SQ + tile_offset(p.wgmma, local_row, chunk, BLOCK_M) * 2, src, in_range,
                    what + " Q load")


class KVLoader:
    """mainloop.cuh KVLoader: thread tid copies chunk tid % 16 of rows tid / 16 + 8 i of a tile."""

    def __init__(self, head_off, seq_stride, tile, tid, wgmma=False):
        self.pass_bytes = (tile_offset(wgmma, LOAD_ROWS_PER_PASS, 0, BLOCK_N) - tile_offset(wgmma, 0, 0, BLOCK_N)) * 2
        row = tid // CHUNKS_PER_ROW
        chunk = tid % CHUNKS_PER_ROW
        self.first_key = tile * BLOCK_N + row
        self.src = head_off + self.first_key * seq_stride + chunk * CHUNK_ELEMS
        self.fallback = head_off + chunk * CHUNK_ELEMS  # key 0: the source of zero-filled rows
        self.pass_step = LOAD_ROWS_PER_PASS * seq_stride
        self.tile_step = BLOCK_N * seq_stride
        self.dst = tile_offset(wgmma, row, chunk, BLOCK_N) * 2

    def load(self, sm, gbuf, tile_base, seqlen_k, what):
        """The current tile -> the tile at shared byte address tile_base; keys >= seqlen_k zero."""
        row_src = self.src
        for i in range(BLOCK_N // LOAD_ROWS_PER_PASS):
            in_range = self.first_key + i * LOAD_ROWS_PER_PASS < seqlen_k
            cp_async_16(sm, gbuf, tile_base + self.dst + i * self.pass_bytes,
                        np.where(in_range, row_src, self.fallback), in_range, what)
            row_src = row_src + self.pass_step

    def advance(self):
        self.src = self.src + self.tile_step
        self.first_key = self.first_key + BLOCK_N


def lane_offset(row, c_lane):
    """mainloop.cuh lane_offset: byte offset of (row, c_lane) in a swizzled tile."""
    return swizzled_offset(row, c_lane) * 2


def chunk_pair_xor(c):
    """mainloop.cuh chunk_pair_xor: (2 c + c_lane) == (2 c ^ c_lane), so the k step is one xor."""
    return 2 * c * VEC_BYTES


def load_q_fragments(sm, warp, what, wgmma=False):
    """mainloop.cuh load_q_fragments<T, kWgmma>: A fragments of the warp's 16 rows, per k16 step,
    from Q in the mainloop's layout."""
    row = warp * 16 + LANE % 8 + 8 * ((LANE // 8) % 2)
    return [sm.ldmatrix_x4(SQ + tile_offset(wgmma, row, 2 * kk + LANE // 16, BLOCK_M) * 2, what + " ldm Q")
            for kk in range(HEAD_STEPS_K)]


def warp_qk(num, sm, qf, sK, what, tiles=SCORE_TILES_N):
    """mainloop.cuh warp_qk<T, kTiles>: C fragments of Q K^T for `tiles` n8 key tiles from sK (the
    tile, or at decode the warp's 16 keys of it: sK + its first key's row), unscaled."""
    s = np.zeros((tiles, WARP, 4))
    off = lane_offset(LANE % 8 + 8 * (LANE // 16), (LANE // 8) % 2)
    for kk in range(HEAD_STEPS_K):
        base = sK + (off ^ chunk_pair_xor(kk))
        for n_pair in range(tiles // 2):
            b = sm.ldmatrix_x4(base + n_pair * 2 * 8 * ROW_BYTES, what + " ldm K")
            s[2 * n_pair] = mma_16816(num, s[2 * n_pair], qf[kk], b[0], b[1])
            s[2 * n_pair + 1] = mma_16816(num, s[2 * n_pair + 1], qf[kk], b[2], b[3])
    return s


def warp_pv(num, sm, o, pf, sV, what):
    """mainloop.cuh warp_pv<T, kSteps>: o[j] += P V for head dims 8 j .. 8 j + 7 (ascending kc), P's
    len(pf) k16 steps of keys from sV (the tile, or at decode sV + the warp's first key's row)."""
    off = lane_offset(LANE % 8 + 8 * ((LANE // 8) % 2), LANE // 16)
    for dp in range(HEAD_TILES_N // 2):
        base = sV + (off ^ chunk_pair_xor(dp))
        for kc in range(len(pf)):
            b = sm.ldmatrix_x4_trans(base + kc * 16 * ROW_BYTES, what + " ldm V")
            o[2 * dp] = mma_16816(num, o[2 * dp], pf[kc], b[0], b[1])
            o[2 * dp + 1] = mma_16816(num, o[2 * dp + 1], pf[kc], b[2], b[3])


def warpgroup_qk(num, sm, qf, sK, what):
    """mainloop.cuh warpgroup_qk: S[64 x 64] = Q K^T by 8 wgmma.m64n64k16 in the RS form (A = each
    warp's Q fragments qf[w][kk], K K-major: k16 step kk in half kk / 4, 32 bytes per step),
    committed and waited for. Returns each warp's C fragments s[w] [8, 32, 4]."""
    D = np.zeros((BLOCK_M, BLOCK_N))
    for kk in range(HEAD_STEPS_K):
        step = (kk % STEPS_PER_HALF) * WGMMA_STEP_BYTES
        a = a_fragments_matrix([qf[w][kk] for w in range(NUM_WARPS)])
        b = wgmma_operand(sm, wgmma_desc_sw128(sK + (kk // STEPS_PER_HALF) * HALF_TILE_KV_BYTES + step), BLOCK_N,
                          what + " wgmma K")
        D = num.f32(D + a @ b.T)
    sm.wgmma_commit()
    sm.wgmma_wait(0)
    s = [np.zeros((SCORE_TILES_N, WARP, 4)) for _ in range(NUM_WARPS)]
    matrix_to_accumulators(D, s)
    return s


def warpgroup_pv(num, sm, o, pf, sV, what):
    """mainloop.cuh warpgroup_pv: O[64 x 128] += P V by 4 wgmma.m64n128k16, P from each warp's A
    fragments pf[w][kc], V MN-major (16 keys = 2 KB per step, leading byte offset = the second
    half of the head dims, 8-key groups 1024 bytes apart); o[w] updated in place."""
    D = accumulators_to_matrix(o)
    for kc in range(KEY_STEPS_K):
        a = a_fragments_matrix([pf[w][kc] for w in range(NUM_WARPS)])
        b = wgmma_operand_mn(sm, wgmma_desc_sw128(sV + kc * KEY_STEP_BYTES, HALF_TILE_KV_BYTES, WGMMA_ATOM_BYTES),
                             HEAD_DIM, what + " wgmma V")
        D = num.f32(D + a @ b)
    sm.wgmma_commit()
    sm.wgmma_wait(0)
    matrix_to_accumulators(D, o)


# ----------------------------------------------------------------------------- softmax.cuh
def mask_scores(p, s, mask_tile, last_key, mask_off, key0, what):
    """softmax.cuh mask_scores: -inf where (row, key) is not visible (raw scores: the scale is
    applied in OnlineSoftmax's exponent). last_key / mask_off [2 halves, 32 lanes]: the RowLimit
    of each lane's rows (mask_off -1 = none); s: len(s) n8 tiles from key key0 (the tile, or at
    decode the warp's quarter)."""
    if not mask_tile:
        return s
    lane_key0 = key0 + 2 * LANE_T
    for half in range(2):
        visible_cols = last_key[half] - lane_key0  # column c visible iff c <= this
        has_mask = mask_off[half] >= 0
        for nt in range(len(s)):
            for c in range(2):
                col = nt * 8 + c
                visible = col <= visible_cols
                read = visible & has_mask
                if read.any():
                    visible[read] = p.mask.read(mask_off[half][read] + lane_key0[read] + col, 1,
                                                what + " mask")[:, 0] != 0
                s[nt][~visible, 2 * half + c] = -np.inf
    return s


RESCALE_LOG2 = 8.0  # softmax.cuh kRescaleLog2


def rescale(num, o, alpha):
    """softmax.cuh OnlineSoftmax::rescale: o *= alpha per row, skipped when every alpha of the
    warp is exactly 1."""
    if np.all(alpha == 1.0):
        return
    for half in range(2):
        for j in range(HEAD_TILES_N):
            o[j][:, 2 * half] = num.f32(o[j][:, 2 * half] * alpha[half])
            o[j][:, 2 * half + 1] = num.f32(o[j][:, 2 * half + 1] * alpha[half])


class OnlineSoftmax:
    """softmax.cuh OnlineSoftmax of one warp: per lane, rows g (half 0) and g + 8 (half 1)."""

    def __init__(self):
        self.m = np.full((2, WARP), -np.inf)
        self.l = np.zeros((2, WARP))

    def update(self, num, s, scale_log2, o):
        """Folds a tile of raw scores into the state, rescales o, returns the A fragments of P
        [4, 4, 32, 2]."""
        pf, alpha = self.exponentiate(num, s, scale_log2)
        rescale(num, o, alpha)
        return pf

    def exponentiate(self, num, s, scale_log2):
        """update() without o: returns (pf, alpha [2, 32])."""
        alpha = np.ones((2, WARP))
        m_tile = np.empty((2, WARP))
        for half in range(2):
            tile_max = np.full(WARP, -np.inf)
            for nt in range(len(s)):
                tile_max = np.fmax(tile_max, np.fmax(s[nt][:, 2 * half], s[nt][:, 2 * half + 1]))
            tile_max = np.fmax(tile_max, shfl_xor(tile_max, 1))
            tile_max = np.fmax(tile_max, shfl_xor(tile_max, 2))
            m_tile[half] = np.fmax(self.m[half], num.f32(tile_max * scale_log2))
        # the bases move (warp-uniformly) only when some row rose more than RESCALE_LOG2 above its
        # own; -inf -> finite (inf) does, -inf -> -inf (NaN) does not
        with np.errstate(invalid="ignore"):
            move = bool(np.any(num.f32(m_tile - self.m) > RESCALE_LOG2))
        for half in range(2):
            base = np.where(self.m[half] == -np.inf, 0.0, self.m[half])
            if move:
                base = np.where(m_tile[half] == -np.inf, 0.0, m_tile[half])
                alpha[half] = num.exp2(num.f32(self.m[half] - base))
                self.m[half] = m_tile[half]
            row_sum = np.zeros(WARP)
            for nt in range(len(s)):
                for c in range(2):
                    # fmaf(s, scale_log2, -base): the product is exact in float64, one rounding
                    pv = num.exp2(num.f32(s[nt][:, 2 * half + c] * scale_log2 - base))
                    s[nt][:, 2 * half + c] = pv
                    row_sum = num.f32(row_sum + pv)
            self.l[half] = num.f32(num.f32(self.l[half] * alpha[half]) + row_sum)
        # C fragments of n8 tiles 2 kc, 2 kc + 1 are the A fragment of k16 step kc
        pf = np.empty((len(s) // 2, 4, WARP, 2))
        for kc in range(len(s) // 2):
            pf[kc][0] = num.rnd(s[2 * kc][:, 0:2])
            pf[kc][1] = num.rnd(s[2 * kc][:, 2:4])
            pf[kc][2] = num.rnd(s[2 * kc + 1][:, 0:2])
            pf[kc][3] = num.rnd(s[2 * kc + 1][:, 2:4])
        return pf, alpha

    def finalize(self, num):
        """Row totals over the quad -> (inv_l, lse2) [2, 32]; l == 0: 0 and -inf; NaN stays NaN."""
        inv_l = np.zeros((2, WARP))
        lse2 = np.zeros((2, WARP))
        for half in range(2):
            total = self.l[half]
            total = num.f32(total + shfl_xor(total, 1))
            total = num.f32(total + shfl_xor(total, 2))
            seen = ~(total == 0.0)  # true for NaN
            with np.errstate(divide="ignore", invalid="ignore"):
                inv_l[half] = np.where(seen, num.f32(1.0 / total), 0.0)
                lse2[half] = np.where(seen, num.f32(self.m[half] + num.log2(total)), -np.inf)
        return inv_l, lse2


XCHG_O = SK  # merge_split_keys: float4 [warp - 1][j][lane] of o, in the K stages
XCHG_STATE = XCHG_O + (NUM_WARPS - 1) * HEAD_TILES_N * WARP * 16  # float4 [warp - 1][lane]: m0, m1, l0, l1
XCHG_BYTES = (NUM_WARPS - 1) * (HEAD_TILES_N + 1) * WARP * 16
assert XCHG_BYTES <= STAGES * TILE_KV_ELEMS * 2


def _float4_elems(byte_addr):
    """The 8 16-bit smem elements of a float4 at each lane's byte address [32] -> [32, 8]."""
    return (byte_addr // 2)[:, None] + np.arange(8)


def _as_float4_halves(vals):
    """fp32 values [32, 4] as the model's 16-bit elements: each float in its two elements."""
    return np.repeat(vals, 2, axis=1)


def merge_split_keys(num, sm, softmax, o, what):
    """softmax.cuh OnlineSoftmax::merge_split_keys, every warp: warps 1.. store (o, m, l) as float4s
    in the K stages, a barrier, warp 0 merges the warps in the order 0, 1, 2, 3."""
    for w in range(1, NUM_WARPS):
        threads = w * WARP + LANE
        for j in range(HEAD_TILES_N):
            addr = XCHG_O + (((w - 1) * HEAD_TILES_N + j) * WARP + LANE) * 16
            sm.st_shared(_float4_elems(addr), _as_float4_halves(o[w][j]), threads, what + " merge store")
        state = np.stack([softmax[w].m[0], softmax[w].m[1], softmax[w].l[0], softmax[w].l[1]], 1)
        sm.st_shared(_float4_elems(XCHG_STATE + ((w - 1) * WARP + LANE) * 16), _as_float4_halves(state), threads,
                     what + " merge store")
    sm.barrier()
    sm0 = softmax[0]
    st = [sm.ld_shared(_float4_elems(XCHG_STATE + (w * WARP + LANE) * 16), LANE, what + " merge load")[:, 0::2]
          for w in range(NUM_WARPS - 1)]
    alpha = np.zeros((NUM_WARPS, 2, WARP))
    for half in range(2):
        m_w = [sm0.m[half]] + [st[w - 1][:, half] for w in range(1, NUM_WARPS)]
        l_w = [sm0.l[half]] + [st[w - 1][:, 2 + half] for w in range(1, NUM_WARPS)]
        m_new = m_w[0]
        for w in range(1, NUM_WARPS):
            m_new = np.fmax(m_new, m_w[w])
        base = np.where(m_new == -np.inf, 0.0, m_new)
        l_new = np.zeros(WARP)
        for w in range(NUM_WARPS):
            alpha[w][half] = num.exp2(num.f32(m_w[w] - base))
            l_new = num.f32(l_new + num.f32(l_w[w] * alpha[w][half]))
        sm0.m[half] = m_new
        sm0.l[half] = l_new
    a = alpha[:, [0, 0, 1, 1], :].transpose(0, 2, 1)  # [w, lane, e]: the half of element e
    for j in range(HEAD_TILES_N):
        o[0][j] = num.f32(o[0][j] * a[0])
        for w in range(1, NUM_WARPS):
            addr = XCHG_O + (((w - 1) * HEAD_TILES_N + j) * WARP + LANE) * 16
            ow = sm.ld_shared(_float4_elems(addr), LANE, what + " merge load")[:, 0::2]
            o[0][j] = num.f32(o[0][j] + num.f32(ow * a[w]))


# ----------------------------------------------------------------------------- attention_fwd.cuh
def last_visible_key(p, seq, s):
    """The last key that query position(s) s may see: attention_tile's
    `p.causal ? min(seq.seqlen_k - 1, s + causal_offset) : seq.seqlen_k - 1` (RowLimit::last_key,
    and all_visible_last for s = s_first)."""
    if not p.causal:
        return np.full(np.shape(s), seq.seqlen_k - 1)
    return np.minimum(seq.seqlen_k - 1, s + (seq.seqlen_k - seq.seqlen_q))


def attention_tile(p, num, sm, b, kvh, split, row0, stats, what):
    """attention_fwd.cuh attention_tile: row tile [row0, row0 + 64) of sequence b, kv head kvh."""
    seq = seq_slice(p, b, what)
    tid = np.arange(THREADS)

    # ---- the CTA's key tiles
    causal_offset = seq.seqlen_k - seq.seqlen_q  # query s sees keys <= s + causal_offset
    s_first = row0 // p.group
    s_last = (min(row0 + BLOCK_M, seq.rows) - 1) // p.group
    key_end = seq.seqlen_k  # exclusive
    if p.causal:
        key_end = max(0, min(key_end, s_last + causal_offset + 1))
    key_tiles = ceil_div(key_end, BLOCK_N)
    tile_begin = split * p.tiles_per_split
    # the last split takes every remaining tile
    tile_end = key_tiles if split == p.num_splits - 1 else min(tile_begin + p.tiles_per_split, key_tiles)
    all_visible_last = int(last_visible_key(p, seq, s_first))  # visible to every row of the CTA
    has_mask = p.mask is not None
    # attention_fwd_kernel's choice: decode (the rows fit one warp) splits the tile's keys
    split_keys = not p.wgmma and seq.rows - row0 <= SPLIT_KEYS_MAX_ROWS
    row_warp = [0 if split_keys else w for w in range(NUM_WARPS)]  # whose 16 rows warp w computes
    stats["split_key_ctas"] = stats.get("split_key_ctas", 0) + split_keys

    # ---- each lane's two rows, per warp: RowLimit {last_key, mask}
    limits = []
    for w in range(NUM_WARPS):
        r = row0 + row_warp[w] * 16 + LANE_G[None, :] + 8 * np.arange(2)[:, None]  # [half, lane]
        inside = r < seq.rows
        s = r // p.group
        hq = kvh * p.group + (r - s * p.group)
        last_key = np.where(inside, last_visible_key(p, seq, s), -1)
        mask_off = np.full(r.shape, -1)  # -1: nullptr
        if has_mask:
            mask_off = np.where(inside, b * p.mask_batch_stride + hq * p.mask_head_stride + s * p.mask_q_stride, -1)
        limits.append((last_key, mask_off))

    # ---- prologue: Q and the first K/V tile, one group
    k_loader = KVLoader(seq.k_offset + kvh * p.k_head_stride, p.k_seq_stride, tile_begin, tid, p.wgmma)
    v_loader = KVLoader(seq.v_offset + kvh * p.v_head_stride, p.v_seq_stride, tile_begin, tid, p.wgmma)
    load_q_tile(p, seq, sm, kvh, row0, tid, what, SPLIT_KEYS_MAX_ROWS if split_keys else BLOCK_M)
    if tile_begin < tile_end:
        k_loader.load(sm, p.k, SK, seq.seqlen_k, what + " K load")
        v_loader.load(sm, p.v, SV, seq.seqlen_k, what + " V load")
    sm.commit()

    warp_active = [row0 + row_warp[w] * 16 < seq.rows for w in range(NUM_WARPS)]
    o = [np.zeros((HEAD_TILES_N, WARP, 4)) for _ in range(NUM_WARPS)]
    softmax = [OnlineSoftmax() for _ in range(NUM_WARPS)]
    qf = [None] * NUM_WARPS
    tile_bytes = TILE_KV_ELEMS * 2
    stats["tiles"] += max(tile_end - tile_begin, 0)

    # ---- main loop
    for tile in range(tile_begin, tile_end):
        stage_offset = ((tile - tile_begin) % STAGES) * tile_bytes

        def prefetch_next():
            """The next tile's copies into the other buffer, one commit group (empty after the last)."""
            if tile + 1 < tile_end:
                next_offset = tile_bytes - stage_offset  # the other buffer
                k_loader.advance()
                v_loader.advance()
                k_loader.load(sm, p.k, SK + next_offset, seq.seqlen_k, what + " K prefetch")
                v_loader.load(sm, p.v, SV + next_offset, seq.seqlen_k, what + " V prefetch")
            sm.commit()

        if p.wgmma:  # wait and fence with nothing else in flight, barrier, then the prefetch
            sm.wait(0)
            sm.fence_proxy_async(tid)  # each thread's copies, to wgmma's proxy
            sm.barrier()
            prefetch_next()
        else:  # the prefetch first: two tiles in flight while this one is waited for
            prefetch_next()
            sm.wait(STAGES - 1)
            sm.barrier()
        if p.wgmma:  # every warp: wgmma is warpgroup-wide
            key0 = tile * BLOCK_N
            mask_tile = has_mask or key0 + BLOCK_N - 1 > all_visible_last
            if tile == tile_begin:
                qf = [load_q_fragments(sm, w, what, wgmma=True) for w in range(NUM_WARPS)]
            s_all = warpgroup_qk(num, sm, qf, SK + stage_offset, what)
            pf = []
            for w in range(NUM_WARPS):
                stats["masked_tiles" if mask_tile else "plain_tiles"] += 1
                s_w = mask_scores(p, s_all[w], mask_tile, *limits[w], key0, what)
                pf.append(softmax[w].update(num, s_w, p.scale_log2, o[w]))
            warpgroup_pv(num, sm, o, pf, SV + stage_offset, what)
            continue  # (the next iteration's barrier comes before its prefetch)
        for w in range(NUM_WARPS):
            if not warp_active[w]:  # all 16 rows past the end: load and sync, no math (never with split keys)
                continue
            # the whole tile, or with split keys the warp's quarter of its keys
            tiles = WARP_SCORE_TILES_N if split_keys else SCORE_TILES_N
            first_key = w * KEYS_PER_WARP if split_keys else 0
            if tile == tile_begin:
                qf[w] = load_q_fragments(sm, row_warp[w], what)
            keys_offset = stage_offset + first_key * ROW_BYTES
            s = warp_qk(num, sm, qf[w], SK + keys_offset, what, tiles)
            key0 = tile * BLOCK_N + first_key
            mask_tile = has_mask or key0 + tiles * 8 - 1 > all_visible_last
            stats["masked_tiles" if mask_tile else "plain_tiles"] += 1
            s = mask_scores(p, s, mask_tile, *limits[w], key0, what)
            pf = softmax[w].update(num, s, p.scale_log2, o[w])
            warp_pv(num, sm, o[w], pf, SV + keys_offset, what)
        sm.barrier()  # this stage is refilled by the next iteration's prefetch
    sm.wait(0)  # nothing may land in sQ while it holds the output tile
    sm.barrier()
    sm.assert_idle(what + " at the epilogue")
    if split_keys:  # the K stages are free: the warps' states into warp 0
        merge_split_keys(num, sm, softmax, o, what)

    # ---- epilogue
    final = [softmax[w].finalize(num) for w in range(NUM_WARPS)]
    if p.num_splits == 1:
        write_output(p, num, seq, sm, o, final, kvh, row0, tid, what)
    else:
        write_partial(p, num, seq, o, final, kvh, split, row0, what)
        combine_if_last(p, num, seq, kvh, split, row0, what)


# ----------------------------------------------------------------------------- epilogue.cuh
def write_output(p, num, seq, sm, o, final, kvh, row0, tid, what):
    """epilogue.cuh write_output: O / l rounded to T, staged through sQ, 16-byte global stores."""
    ln2 = LN2_F32 if num.mode != "f64" else np.log(2.0)
    for w in range(NUM_WARPS):
        inv_l, lse2 = final[w]
        for half in range(2):
            local_row = w * 16 + LANE_G + 8 * half
            for j in range(HEAD_TILES_N):  # 1. registers -> shared, 4-byte stores
                vals = num.rnd(np.stack([num.f32(o[w][j][:, 2 * half] * inv_l[half]),
                                         num.f32(o[w][j][:, 2 * half + 1] * inv_l[half])], 1))
                idx = swizzled_offset(local_row, j)[:, None] + 2 * LANE_T[:, None] + np.arange(2)
                sm.st_shared(SQ // 2 + idx, vals, w * WARP + LANE, what + " sO store")
            r = row0 + local_row
            writes = (LANE_T == 0) & (r < seq.rows)
            s = r // p.group
            hq = kvh * p.group + (r - s * p.group)
            p.lse.write((seq.lse_offset + hq * seq.lse_head_stride + s)[writes],
                        num.f32(lse2[half] * ln2)[writes][:, None], what + " lse")
    sm.barrier()
    chunk = tid % CHUNKS_PER_ROW
    for i in range(BLOCK_M // LOAD_ROWS_PER_PASS):  # 2. shared -> global, 16-byte chunks
        local_row = tid // CHUNKS_PER_ROW + i * LOAD_ROWS_PER_PASS
        r = row0 + local_row
        inside = r < seq.rows
        if not inside.any():
            continue
        idx = swizzled_offset(local_row[inside], chunk[inside])[:, None] + np.arange(CHUNK_ELEMS)
        vals = sm.ld_shared(SQ // 2 + idx, tid[inside], what + " sO load")
        s = r[inside] // p.group
        hq = kvh * p.group + (r[inside] - s * p.group)
        dst = ((seq.token0 + s) * p.num_q_heads + hq) * HEAD_DIM + chunk[inside] * CHUNK_ELEMS
        p.out.write(dst, vals, what + " out", align=CHUNK_ELEMS)


def partial_rows(p, seq, kvh, split):
    """Workspace row of (split, kvh, packed row 0 of the sequence): epilogue.cuh slice_rows."""
    return (split * p.num_kv_heads + kvh) * p.total_q * p.group + seq.token0 * p.group


def write_partial(p, num, seq, o, final, kvh, split, row0, what):
    """epilogue.cuh write_partial: fp32 O / l (8-byte stores) and lse2 to the split's slice."""
    slice_rows = partial_rows(p, seq, kvh, split)
    for w in range(NUM_WARPS):
        inv_l, lse2 = final[w]
        for half in range(2):
            r = row0 + w * 16 + LANE_G + 8 * half
            inside = r < seq.rows
            if not inside.any():
                continue
            dst = (slice_rows + r) * HEAD_DIM + 2 * LANE_T
            for j in range(HEAD_TILES_N):
                vals = np.stack([num.f32(o[w][j][:, 2 * half] * inv_l[half]),
                                 num.f32(o[w][j][:, 2 * half + 1] * inv_l[half])], 1)
                p.partial_o.write(dst[inside] + j * 8, vals[inside], what + " partial_o", align=2)
            quad_leader = inside & (LANE_T == 0)
            p.partial_lse.write((slice_rows + r)[quad_leader], lse2[half][quad_leader][:, None],
                                what + " partial_lse")


def clear_outside_tokens(p, b, kvh, what):
    """epilogue.cuh clear_outside_tokens (varlen, row tile 0, split 0): out = 0, lse = -inf for
    the tokens before cu_seqlens_q[0] (sequence 0) and from cu_seqlens_q[B] on (sequence B - 1)."""
    first, last = owned_tokens(p, what)
    chunks_per_token = p.group * CHUNKS_PER_ROW
    for begin, end, mine in ((0, first, b == 0), (last, p.total_q, b == p.batch - 1)):
        if not mine or begin >= end:
            continue
        i = np.arange((end - begin) * chunks_per_token)  # all threads' iterations at once
        token = begin + i // chunks_per_token
        c = i % chunks_per_token
        hq = kvh * p.group + c // CHUNKS_PER_ROW
        p.out.write((token * p.num_q_heads + hq) * HEAD_DIM + (c % CHUNKS_PER_ROW) * CHUNK_ELEMS,
                    np.zeros((i.size, CHUNK_ELEMS)), what + " clear out", align=CHUNK_ELEMS)
        i = np.arange((end - begin) * p.group)
        token = begin + i // p.group
        hq = kvh * p.group + i % p.group
        p.lse.write(hq * p.total_q + token, np.full((i.size, 1), -np.inf), what + " clear lse")


def mark_uncovered_rows(p, seq, kvh, covered, what):
    """epilogue.cuh mark_uncovered_rows (varlen, last row tile, split 0): packed rows from
    `covered` on get NaN out and lse."""
    if covered >= seq.rows:
        return
    rows = seq.rows - covered
    i = np.arange(rows * CHUNKS_PER_ROW)
    r = covered + i // CHUNKS_PER_ROW
    s = r // p.group
    hq = kvh * p.group + (r - s * p.group)
    p.out.write(((seq.token0 + s) * p.num_q_heads + hq) * HEAD_DIM + (i % CHUNKS_PER_ROW) * CHUNK_ELEMS,
                np.full((i.size, CHUNK_ELEMS), np.nan), what + " NaN out", align=CHUNK_ELEMS)
    first = i % CHUNKS_PER_ROW == 0
    p.lse.write(seq.lse_offset + hq[first] * seq.lse_head_stride + s[first], np.full((first.sum(), 1), np.nan),
                what + " NaN lse")


# ----------------------------------------------------------------------------- kernels, launch
def wgmma_base_pad(smem_addr):
    """attention_fwd_kernel: bytes from the dynamic allocation to the next 1024-byte boundary."""
    return round_up(smem_addr, WGMMA_ATOM_BYTES) - smem_addr

def attention_fwd_kernel(p, num, grid, stats):
    """attention_fwd.cuh attention_fwd_kernel, every CTA of grid (x, y, z)."""
    grid_x, grid_y, grid_z = grid
    for z in range(grid_z):
        for y in range(grid_y):
            b = y // p.num_kv_heads
            kvh = y - b * p.num_kv_heads
            for x in range(grid_x):
                what = f"cta({x},{y},{z})"
                p.cta = (x, y, z)
                if p.cu_seqlens_q is not None and z == 0:  # varlen bookkeeping, by split 0
                    if x == 0:
                        clear_outside_tokens(p, b, kvh, what)
                    if x == grid_x - 1:
                        mark_uncovered_rows(p, seq_slice(p, b, what), kvh, grid_x * BLOCK_M, what)
                row0 = x * BLOCK_M
                if row0 < seq_slice(p, b, what).rows:
                    if p.wgmma:  # the base rounded up to 1024 inside the larger allocation
                        raw = 3 * 128  # where the dynamic allocation may start: 128-aligned only
                        base = raw + wgmma_base_pad(raw)
                        if base % WGMMA_ATOM_BYTES or base + SMEM_BYTES > raw + SMEM_ALLOC_WGMMA:
                            raise ModelError(f"{what}: misaligned or overflowing Hopper tiles")
                    sm = Smem(SMEM_BYTES)  # addresses from the (aligned) base: 0 mod 1024
                    attention_tile(p, num, sm, b, kvh, z, row0, stats, what)
                    stats["ctas"] += 1
                    stats["max_groups"] = max(stats["max_groups"], sm.max_groups_in_flight)


def combine_if_last(p, num, seq, kvh, split, row0, what):
    """combine.cuh combine_if_last: this CTA's arrival mark in its (row tile, b, kv head) slots;
    the CTA that reads every split's mark (CTAs run one at a time here: the last one) resets them
    and merges the tile's rows."""
    x, y = p.cta[0], p.cta[1]
    slots = (y * p.grid[0] + x) * p.num_splits + np.arange(p.num_splits)
    p.split_flags.write([slots[split]], [[p.split_tag]], what + " mark")
    marks = p.split_flags.read(slots, 1, what + " marks")[:, 0]
    if not (marks == p.split_tag).all():
        return
    p.split_flags.write(slots, np.zeros((p.num_splits, 1), np.uint64), what + " marks reset")
    tile_row0 = kvh * p.total_q * p.group + seq.token0 * p.group + row0
    for r in range(min(BLOCK_M, seq.rows - row0)):  # warp r % 4 takes row r
        combine_row(p, num, tile_row0 + r, what)


def combine_row(p, num, row, what):
    """combine.cuh combine_row: one warp merges workspace row `row` of every split."""
    if p.num_splits > MAX_SPLITS:  # the lanes hold MAX_SPLITS lse values (launch_attention refuses more)
        raise ModelError(f"{what}: {p.num_splits} splits, more than the combine holds ({MAX_SPLITS})")
    what = f"{what} combine row {row}"
    rows_per_head = p.total_q * p.group
    rows_per_split = p.num_kv_heads * rows_per_head
    ln2 = LN2_F32 if num.mode != "f64" else np.log(2.0)
    # lane l handles splits l, l + 32, ...: (split of each lane, whether it has one) per round
    lane_splits = [(first + LANE, first + LANE < p.num_splits) for first in range(0, p.num_splits, WARP)]
    kvh = row // rows_per_head
    r = row - kvh * rows_per_head
    token = r // p.group
    hq = kvh * p.group + (r - token * p.group)
    out = (token * p.num_q_heads + hq) * HEAD_DIM + LANE * COMBINE_DIMS_PER_LANE
    # the lse of lane l's splits l, l + 32, ..., read once (-inf past num_splits)
    lse_s = []
    for i, has in lane_splits:
        lse_i = np.full(WARP, -np.inf)
        lse_i[has] = p.partial_lse.read(row + i[has] * rows_per_split, 1, what)[:, 0]
        lse_s.append(lse_i)
    max2 = np.full(WARP, -np.inf)
    for lse_i in lse_s:
        max2 = np.fmax(max2, lse_i)
    for offset in (16, 8, 4, 2, 1):
        max2 = np.fmax(max2, shfl_xor(max2, offset))
    base = np.where(max2 == -np.inf, 0.0, max2)
    total = np.zeros(WARP)
    for lse_i, (_, has) in zip(lse_s, lane_splits):
        total = np.where(has, num.f32(total + num.exp2(num.f32(np.where(has, lse_i, 0.0) - base))), total)
    for offset in (16, 8, 4, 2, 1):  # warp_reduce_sum
        total = num.f32(total + shfl_xor(total, offset))
    if len(set(np.isnan(total))) != 1 or len(set(total > 0)) != 1:
        raise ModelError(f"{what}: lanes disagree on the row's branch")
    lse2 = np.full(WARP, -np.inf)
    acc = np.zeros((WARP, COMBINE_DIMS_PER_LANE))
    if np.isnan(total[0]):  # a NaN partial lse: NaN out and lse, partial O not read
        lse2 = np.full(WARP, np.nan)
        acc = np.full((WARP, COMBINE_DIMS_PER_LANE), np.nan)
    elif total[0] > 0:
        lse2 = num.f32(base + num.log2(total))
        # each lane's splits' weights, taken by split i from lane i % 32 (__shfl_sync)
        weights = [num.exp2(num.f32(lse_i - lse2)) for lse_i in lse_s]
        o_row = row * HEAD_DIM + LANE * COMBINE_DIMS_PER_LANE
        for i in range(p.num_splits):
            weight = np.full(WARP, weights[i // WARP][i % WARP])
            o_i = p.partial_o.read(o_row + i * rows_per_split * HEAD_DIM, COMBINE_DIMS_PER_LANE, what,
                                   align=COMBINE_DIMS_PER_LANE)
            acc = num.f32(acc + num.f32(weight[:, None] * o_i))
    p.out.write(out, num.rnd(acc), what + " out", align=COMBINE_DIMS_PER_LANE)
    p.lse.write([lse_index(p, token, hq)], [[num.f32(lse2[0] * ln2)]], what + " lse")


def launch_attention(p, num, stats):
    """attention_fwd.cuh launch_attention."""
    if p.batch == 0 or p.total_q == 0:
        return
    grid = (row_tiles(p), p.batch * p.num_kv_heads, p.num_splits)
    stats["grid"] = p.grid = grid
    attention_fwd_kernel(p, num, grid, stats)


def plan_and_launch(p, num, seqlen_k_hint, num_sms, ctas_per_sm, force_splits, stats, wgmma=False):
    """attention.cu plan_and_launch, with the split-KV merge through L2 (the model has no clusters:
    QWEN3X_ATTENTION_COMBINE=l2, or a device where they cannot run); num_sms / ctas_per_sm stand
    for the device's sm_count and resident_ctas_per_sm; force_splits = (num_splits, tiles_per_split) overrides the plan; wgmma:
    the device runs the Hopper mainloop (an sm_90 GPU), which serves full row tiles only."""
    p.wgmma = wgmma and p.seqlen_q * p.group >= BLOCK_M
    stats["wgmma"] = p.wgmma
    ctas = max(row_tiles(p) * p.batch * p.num_kv_heads, ceil_div(p.total_q * p.num_q_heads, BLOCK_M))
    p.num_splits, p.tiles_per_split = force_splits or plan_splits(ctas, seqlen_k_hint, p.seqlen_q * p.group, num_sms,
                                                                  ctas_per_sm)
    stats["splits"] = (p.num_splits, p.tiles_per_split)
    if p.num_splits > 1:
        partial_rows_total = p.num_splits * p.num_kv_heads * p.total_q * p.group
        p.partial_o = GBuf("partial_o", numel=partial_rows_total * HEAD_DIM)
        p.partial_lse = GBuf("partial_lse", numel=partial_rows_total)
        # arrival marks as a fresh allocation may hold them (anything but the tag)
        p.split_flags = GBuf("split_flags", data=np.full(row_tiles(p) * p.batch * p.num_kv_heads * p.num_splits,
                                                         ALLOCATOR_LEFTOVER, np.uint64))
        p.split_tag = SPLIT_TAG
    launch_attention(p, num, stats)


# ----------------------------------------------------------------------------- attention.cu glue
@dataclass
class Run:
    """What a model launch produced: out and lse as arrays and as GBufs (their write counts)."""
    out: np.ndarray  # padded [B, Sq, Hq, 128] | varlen [Tq, Hq, 128]
    lse: np.ndarray  # padded [B, Hq, Sq] | varlen [Hq, Tq]
    out_buf: GBuf
    lse_buf: GBuf
    stats: dict = field(default_factory=lambda: {"tiles": 0, "ctas": 0, "max_groups": 0, "masked_tiles": 0,
                                                 "plain_tiles": 0})


def strided_gbuf(name, arr, strides, storage):
    """arr stored at element strides `strides` in a flat storage of `storage` elements; the other
    storage elements are not part of the tensor (unreadable)."""
    idx = np.zeros(arr.shape, np.int64)
    for d, st in enumerate(strides):
        shape = [1] * arr.ndim
        shape[d] = arr.shape[d]
        idx = idx + (np.arange(arr.shape[d]) * st).reshape(shape)
    buf = GBuf(name, numel=storage)
    buf.d[idx.ravel()] = arr.ravel()
    buf.init[idx.ravel()] = True
    buf.readable[:] = buf.init
    return buf


def _scale_log2(num, scale):
    """common_params: scale * log2(e) as an fp32 (exact in 'f64' mode)."""
    return scale * np.log2(np.e) if num.mode == "f64" else num.f32(scale * 1.4426950408889634)


def attention(q, k, v, mask, scale, causal, key_lengths=None, num_sms=132, mode="bf16", force_splits=None,
              q_layout="bhsd", kv_layout="bhsd", ctas_per_sm=MIN_CTAS_PER_SM, wgmma=False) -> Run:
    """attention.cu attention on numpy inputs already holding T values: q [B, Hq, Sq, 128],
    k / v [B, Hkv, Skv, 128], mask bool [B|1, 1|Hq, Sq, Skv] or None, key_lengths int [B] or [1]
    or None. Layout 'bshd': the tensor is stored [B, S, H, 128] and passed transposed (strided)."""
    num = Num(mode)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    run = Run(out=None, lse=None, out_buf=GBuf("out", numel=B * Sq * Hq * D), lse_buf=GBuf("lse", numel=B * Hq * Sq))
    if run.out_buf.d.size:
        q_strides = (Sq * Hq * D, D, Hq * D) if q_layout == "bshd" else (Hq * Sq * D, Sq * D, D)
        kv_strides = (Skv * Hkv * D, D, Hkv * D) if kv_layout == "bshd" else (Hkv * Skv * D, Skv * D, D)
        kb = strided_gbuf("k", k, kv_strides + (1,), k.size)
        vb = strided_gbuf("v", v, kv_strides + (1,), v.size)
        p = Params(q=strided_gbuf("q", q, q_strides + (1,), q.size), k=kb, v=vb, out=run.out_buf,
                   lse=run.lse_buf, q_batch_stride=q_strides[0], q_head_stride=q_strides[1],
                   q_seq_stride=q_strides[2], k_batch_stride=kv_strides[0], k_head_stride=kv_strides[1],
                   k_seq_stride=kv_strides[2], v_batch_stride=kv_strides[0], v_head_stride=kv_strides[1],
                   v_seq_stride=kv_strides[2], batch=B, num_q_heads=Hq, num_kv_heads=Hkv, group=Hq // Hkv,
                   scale_log2=_scale_log2(num, scale), causal=causal, seqlen_q=Sq, seqlen_k=Skv,
                   total_q=B * Sq)
        if mask is not None:  # mask_stride: 0 for a broadcast dim
            m = np.ascontiguousarray(mask).astype(np.float64)
            contiguous = [int(np.prod(m.shape[d + 1:])) for d in range(4)]
            p.mask = GBuf("mask", data=m)
            p.mask_batch_stride, p.mask_head_stride, p.mask_q_stride = (
                0 if m.shape[d] == 1 else contiguous[d] for d in range(3))
        if key_lengths is not None:
            n = np.asarray(key_lengths).reshape(-1)
            p.key_lengths = GBuf("key_lengths", data=n, dtype=np.int64)
            p.key_lengths_stride = 0 if n.size == 1 else 1
            for bb in range(B):  # the op promises never to read keys >= key_lengths[b]
                n_b = int(np.clip(n[0 if n.size == 1 else bb], 0, Skv))
                for h in range(Hkv):
                    for j in range(n_b, Skv):
                        off = bb * kv_strides[0] + h * kv_strides[1] + j * kv_strides[2]
                        kb.readable[off:off + D] = False
                        vb.readable[off:off + D] = False
        plan_and_launch(p, num, Skv, num_sms, ctas_per_sm, force_splits, run.stats, wgmma)
    run.out = run.out_buf.d.reshape(B, Sq, Hq, D)
    run.lse = run.lse_buf.d.reshape(B, Hq, Sq)
    return run


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, num_sms=132,
                     mode="bf16", force_splits=None, ctas_per_sm=MIN_CTAS_PER_SM, wgmma=False) -> Run:
    """attention.cu attention_varlen on numpy inputs: q [Tq, Hq, 128], k / v [Tk, Hkv, 128]."""
    num = Num(mode)
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    batch = len(cu_seqlens_q) - 1
    run = Run(out=None, lse=None, out_buf=GBuf("out", numel=Tq * Hq * D), lse_buf=GBuf("lse", numel=Hq * Tq))
    if run.out_buf.d.size and batch == 0:  # no sequence: every token is outside one
        run.out_buf.write(np.arange(0, Tq * Hq * D, CHUNK_ELEMS), np.zeros((Tq * Hq * D // CHUNK_ELEMS, CHUNK_ELEMS)),
                          "glue zero")
        run.lse_buf.write(np.arange(Hq * Tq), np.full((Hq * Tq, 1), -np.inf), "glue fill")
    elif run.out_buf.d.size:
        p = Params(q=GBuf("q", data=q), k=GBuf("k", data=k), v=GBuf("v", data=v), out=run.out_buf,
                   lse=run.lse_buf, q_batch_stride=0, q_head_stride=D, q_seq_stride=Hq * D, k_batch_stride=0,
                   k_head_stride=D, k_seq_stride=Hkv * D, v_batch_stride=0, v_head_stride=D,
                   v_seq_stride=Hkv * D, batch=batch, num_q_heads=Hq, num_kv_heads=Hkv, group=Hq // Hkv,
                   scale_log2=_scale_log2(num, scale), causal=causal,
                   cu_seqlens_q=GBuf("cu_seqlens_q", data=np.asarray(cu_seqlens_q), dtype=np.int64),
                   cu_seqlens_k=GBuf("cu_seqlens_k", data=np.asarray(cu_seqlens_k), dtype=np.int64),
                   # the grid and the split plan use the hints, clamped to the tensors
                   seqlen_q=int(np.clip(max_seqlen_q, 0, Tq)), seqlen_k=int(np.clip(max_seqlen_k, 0, Tk)),
                   total_q=Tq, total_k=Tk)
        plan_and_launch(p, num, p.seqlen_k, num_sms, ctas_per_sm, force_splits, run.stats, wgmma)
    run.out = run.out_buf.d.reshape(Tq, Hq, D)
    run.lse = run.lse_buf.d.reshape(Hq, Tq)
    return run
