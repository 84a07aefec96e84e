"""Thread-level model of the MoE experts pipeline: permutation, two grouped GEMMs, combine.

Statement by statement, in lockstep over a CTA's threads (barriers and cp.async groups explicit):
  permute.cuh          permute_tiling, moe_permute_count_kernel / moe_permute_scatter_kernel
                       (count_tile's warp match_any counts, block_exclusive_scan starts, per-warp
                       bases, -1 padding and trailing slots)
  tile_scheduler.cuh   schedule_row_tile: the tile's expert, s_picks, s_route
  grouped_gemm.cuh     moe_expert_gemm_kernel: per-thread cp.async sources and swizzled
                       destinations (zero-fill of padding rows), the kStages-deep commit / wait
                       pipeline with one __syncthreads per k step, per-lane ldmatrix.x4 addresses,
                       mma.m16n8k16 fragments; weight_row (GEMM1's per-warp gate / up interleave);
                       the kWgmma mainloop: the 1024-byte aligned stage base, the proxy fence,
                       the SW128 descriptors (decoded as the hardware reads them, core/wgmma.cuh)
                       and the m64n128k16 accumulator layout
  gemm_epilogue.cuh    epilogue_swiglu / epilogue_weighted: per-lane 4-byte stores
  combine.cuh          moe_combine_kernel: fixed-order sum of a token's picks
  gemm_config.h        the three tile configs, select_gemm_regime, max_row_tiles
  moe.cu, experts.cuh  run_experts / launch_moe_experts_with: workspaces, strides, the launches
Every global access is bounds- and initialisation-checked (GBuf); shared memory tracks
in-flight cp.async data and barrier epochs (Smem). After each stage the model checks that every
output row was written exactly as often as it should be (once, or never for padding).
"""
from __future__ import annotations

import numpy as np

from .primitives import (LANE_G, LANE_T, WARP, GBuf, ModelError, Num, Smem, ceil_div, mma_16816,
                         WGMMA_ATOM_BYTES, round_up, wgmma_desc_sw128, wgmma_operand)

BLOCK_K = 64     # kGemmBlockK
CHUNK_ELEMS = 8  # kGemmChunkBytes / 2
SWIZZLE_ROWS = 8  # kGemmSwizzleRows


WGMMA_ROWS, WGMMA_WARPS, WGMMA_N = 64, 4, 128  # kWgmmaRows, kWgmmaWarps, kWgmmaN
WGMMA_STEP_BYTES = 32                            # kWgmmaStepBytes


class GemmConfig:
    """gemm_config.h GemmConfig<kBlockM, kBlockN, kWarpsM, kWarpsN, kStages, kMainloop>."""

    def __init__(self, name, block_m, block_n, warps_m, warps_n, stages, mainloop="mma_sync"):
        self.name = name
        self.kWgmma = mainloop == "wgmma"
        self.kBlockM, self.kBlockN, self.kStages = block_m, block_n, stages
        self.kWarpsM, self.kWarpsN = warps_m, warps_n
        self.kThreads = WARP * warps_m * warps_n
        self.kWarpM = block_m // warps_m
        self.kWarpN = block_n // warps_n
        self.kMmaM = self.kWarpM // 16
        self.kMmaN = self.kWarpN // 8
        self.kChunksPerRow = BLOCK_K * 2 // 16
        self.kRowsPerPass = self.kThreads // self.kChunksPerRow
        self.kALoads = block_m // self.kRowsPerPass
        self.kBLoads = block_n // self.kRowsPerPass
        self.kStageElems = (block_m + block_n) * BLOCK_K
        self.kSmemBytes = stages * self.kStageElems * 2
        self.kSmemAllocBytes = self.kSmemBytes + (WGMMA_ATOM_BYTES if self.kWgmma else 0)
        assert self.kWarpM % 16 == 0 and self.kWarpN % 16 == 0
        assert self.kMmaN % 2 == 0
        assert self.kChunksPerRow == SWIZZLE_ROWS
        assert self.kRowsPerPass % SWIZZLE_ROWS == 0
        assert block_m % self.kRowsPerPass == 0 and block_n % self.kRowsPerPass == 0
        assert stages >= 2
        if self.kWgmma:
            assert warps_n == 1 and self.kWarpM == 16 and block_m % WGMMA_ROWS == 0 and block_n == WGMMA_N
            assert (block_m * BLOCK_K * 2) % WGMMA_ATOM_BYTES == 0
            assert (self.kStageElems * 2) % WGMMA_ATOM_BYTES == 0


DECODE = GemmConfig("decode", 16, 64, 1, 4, 7)
MID = GemmConfig("mid", 64, 128, 2, 4, 4)
PREFILL = GemmConfig("prefill", 128, 128, 2, 4, 3)
PREFILL_WGMMA = GemmConfig("prefill", 128, 128, 8, 1, 3, mainloop="wgmma")  # sm_90a
H_MULTIPLE = PREFILL.kBlockN       # kExpertsHMultiple
I_MULTIPLE = PREFILL.kBlockN // 2  # kExpertsIMultiple


def select_config(num_picks, num_experts, wgmma=False):
    """gemm_config.h select_gemm_regime (+ experts.cuh launch_moe_experts: the prefill mainloop)."""
    if num_picks <= 16 * num_experts:
        return DECODE
    if num_picks <= 64 * num_experts:
        return MID
    return PREFILL_WGMMA if wgmma else PREFILL


def max_row_tiles(num_picks, num_experts, block_m):
    """gemm_config.h max_row_tiles."""
    by_slots = (num_picks + num_experts * (block_m - 1)) // block_m
    by_picks = min(num_picks, num_experts) + num_picks // block_m
    return min(by_slots, by_picks)


# ----------------------------------------------------------------------------- grouped GEMM
GATEUP, DOWN = "gateup", "down"  # GemmKind::kGateUp, kDown


def swizzled(row, chunk):
    """grouped_gemm.cuh gemm_detail::swizzled (the cp.async store side)."""
    return row * BLOCK_K + ((chunk ^ (row % SWIZZLE_ROWS)) * CHUNK_ELEMS)


def weight_row(cfg, kind, r, col_tile, n_out):
    """grouped_gemm.cuh gemm_detail::weight_row: the W_e row that B-tile row r holds."""
    if kind == GATEUP:
        half = cfg.kWarpN // 2
        warp_col = r // cfg.kWarpN
        within = r % cfg.kWarpN
        is_up = within // half
        return is_up * n_out + col_tile * (cfg.kBlockN // 2) + warp_col * half + within % half
    return col_tile * cfg.kBlockN + r


def lane_addr_terms(cfg, warp_m, warp_n):
    """moe_expert_gemm_kernel's ldmatrix lane terms: (swz, a_row, a_chunk, b_row, b_chunk)."""
    lane = np.arange(WARP)
    swz = lane % SWIZZLE_ROWS
    a_row = warp_m * cfg.kWarpM + lane % 8 + 8 * ((lane // 8) % 2)
    a_chunk = lane // 16
    b_row = warp_n * cfg.kWarpN + lane % 8 + 8 * (lane // 16)
    b_chunk = (lane // 8) % 2
    return swz, a_row, a_chunk, b_row, b_chunk


class GemmParams:
    """grouped_gemm.cuh ExpertGemmParams (GBufs for the pointers)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def schedule_row_tile(cfg, kind, p, bx, what):
    """tile_scheduler.cuh schedule_row_tile -> (row0, expert, s_picks, s_route), expert -1 = no work."""
    num_experts = p.num_experts
    row0 = bx * cfg.kBlockM
    used = int(p.expert_offsets.read([num_experts], 1, what)[0, 0])
    if row0 >= used:
        return row0, -1, None, None
    matches = []
    for e in range(num_experts):  # for (e = threadIdx.x; e < E; e += kThreads): every e once
        lo = int(p.expert_offsets.read([e], 1, what)[0, 0])
        hi = int(p.expert_offsets.read([e + 1], 1, what)[0, 0])
        if lo <= row0 < hi:
            matches.append(e)
    if len(matches) != 1:
        raise ModelError(f"{what}: {len(matches)} experts claim row0 {row0}")
    s_picks = p.sorted_rows.read(row0 + np.arange(cfg.kBlockM), 1, what)[:, 0].astype(np.int64)
    s_route = np.zeros(cfg.kBlockM)
    if kind == DOWN:
        live = s_picks >= 0
        s_route[live] = p.route_weights.read(s_picks[live], 1, what + " route")[:, 0]
    return row0, matches[0], s_picks, s_route


def desc_sw128(smem_addr):
    """core/wgmma.cuh wgmma_desc_sw128 with its K-major defaults (the expert GEMMs' operands)."""
    return wgmma_desc_sw128(smem_addr)


def wgmma_a_offset(grp):
    """grouped_gemm.cuh a_group_offset: warpgroup grp's A rows start 64 rows into the tile."""
    return grp * WGMMA_ROWS * BLOCK_K * 2


def wgmma_k_tile(num, sm, acc, sA, sB, what):
    """grouped_gemm.cuh mainloop_wgmma, the issue part: per warpgroup g, 4 k16 steps of wgmma.m64n128k16
    (A rows [64 g, 64 g + 64), all 128 B rows); the caller commits and waits. The model computes
    the products at issue; the shared-memory reads stay open until the wait.
    acc [warps, 1, 16, 32, 4]: warp 4 g + w holds D rows 16 w + g_lane (+ 8), columns 8 j + 2 t (+ 1)."""
    groups = acc.shape[0] // WGMMA_WARPS
    for grp in range(groups):
        D = np.empty((WGMMA_ROWS, WGMMA_N))
        for w in range(WGMMA_WARPS):
            for j in range(WGMMA_N // 8):
                d = acc[grp * WGMMA_WARPS + w, 0, j]
                rows = 16 * w + LANE_G
                cols = 8 * j + 2 * LANE_T
                D[rows, cols], D[rows, cols + 1], D[rows + 8, cols], D[rows + 8, cols + 1] = d.T
        a_group_offset = wgmma_a_offset(grp)
        for kk in range(BLOCK_K // 16):
            a = wgmma_operand(sm, desc_sw128(sA + a_group_offset + kk * WGMMA_STEP_BYTES), WGMMA_ROWS,
                              what + " wgmma A")
            b = wgmma_operand(sm, desc_sw128(sB + kk * WGMMA_STEP_BYTES), WGMMA_N, what + " wgmma B")
            D = num.f32(D + a @ b.T)
        for w in range(WGMMA_WARPS):
            for j in range(WGMMA_N // 8):
                rows = 16 * w + LANE_G
                cols = 8 * j + 2 * LANE_T
                acc[grp * WGMMA_WARPS + w, 0, j] = np.stack(
                    [D[rows, cols], D[rows, cols + 1], D[rows + 8, cols], D[rows + 8, cols + 1]], axis=1)


def gemm_cta(cfg, kind, p, num, bx, by, stats):
    """grouped_gemm.cuh moe_expert_gemm_kernel, CTA (bx, by)."""
    what = f"{kind} cta({bx},{by})"
    row0, expert, s_picks, s_route = schedule_row_tile(cfg, kind, p, bx, what)
    if expert < 0:
        return

    # ---- copy sources: thread copies chunk `chunk` of rows load_row + i * kRowsPerPass
    tid = np.arange(cfg.kThreads)
    chunk = tid % cfg.kChunksPerRow
    load_row = tid // cfg.kChunksPerRow
    a_src, a_valid = [], []
    for i in range(cfg.kALoads):
        pick = s_picks[load_row + i * cfg.kRowsPerPass]
        valid = pick >= 0
        if kind == GATEUP:
            src_row = np.where(valid, pick // p.top_k, 0)  # padding: nothing read, address row 0
        else:
            src_row = np.where(valid, row0 + load_row + i * cfg.kRowsPerPass, 0)
        a_src.append(src_row * p.a_stride + chunk * CHUNK_ELEMS)
        a_valid.append(valid)
    b_src = []
    for i in range(cfg.kBLoads):
        rows = np.array([weight_row(cfg, kind, int(r), by, p.n_out) for r in load_row + i * cfg.kRowsPerPass])
        b_src.append(expert * p.w_expert_stride + rows * p.w_row_stride + chunk * CHUNK_ELEMS)
    store_offset = swizzled(load_row, chunk)
    pass_elems = cfg.kRowsPerPass * BLOCK_K
    stage_bytes = cfg.kStageElems * 2
    b_offset_bytes = cfg.kBlockM * BLOCK_K * 2
    # The dynamic allocation starts after the static shared variables, 128-byte aligned but not
    # 1024-byte aligned (modelled at 3 x 128); kWgmma rounds the stage base up to 1024.
    raw_base = 3 * 128
    smem_base = round_up(raw_base, WGMMA_ATOM_BYTES) if cfg.kWgmma else raw_base
    sm = Smem(raw_base + cfg.kSmemAllocBytes)
    if smem_base + cfg.kSmemBytes > sm.nbytes:
        raise ModelError(f"{what}: stages end past the dynamic shared memory")

    def load_a(stage, k_tile):
        sA = smem_base + stage * stage_bytes
        k0 = k_tile * BLOCK_K
        for i in range(cfg.kALoads):
            vals = np.zeros((cfg.kThreads, CHUNK_ELEMS))
            valid = a_valid[i]
            p.a.check_addr(a_src[i] + k0, CHUNK_ELEMS, what + " A address")  # formed even when zero-filled
            if valid.any():
                vals[valid] = p.a.read(a_src[i][valid] + k0, CHUNK_ELEMS, what + " A load", align=CHUNK_ELEMS)
            sm.cp_async(sA + (store_offset + i * pass_elems) * 2, vals, what + " A")

    def load_b(stage, k_tile):
        sB = smem_base + stage * stage_bytes + b_offset_bytes
        k0 = k_tile * BLOCK_K
        for i in range(cfg.kBLoads):
            vals = p.w.read(b_src[i] + k0, CHUNK_ELEMS, what + " B load", align=CHUNK_ELEMS)
            sm.cp_async(sB + (store_offset + i * pass_elems) * 2, vals, what + " B")

    def load_stage(stage, k_tile):
        load_a(stage, k_tile)
        load_b(stage, k_tile)

    num_warps = cfg.kThreads // WARP
    acc = np.zeros((num_warps, cfg.kMmaM, cfg.kMmaN, WARP, 4))
    k_tiles = p.k_dim // BLOCK_K
    early = kind == DOWN  # GEMM2: its prologue's weights before the PDL wait, in the first group
    if early:
        for s in range(cfg.kStages - 1):
            if s < k_tiles:
                load_b(s, s)
    for s in range(cfg.kStages - 1):
        if s < k_tiles:
            load_a(s, s) if early else load_stage(s, s)
        sm.commit()
    for kt in range(k_tiles):
        sm.wait(cfg.kStages - 2)
        if cfg.kWgmma:
            sm.fence_proxy_async(tid)  # each thread's landed copies, to the async proxy
            sm.barrier()  # stage kt complete; every warpgroup done with kt - 1
            sA = smem_base + (kt % cfg.kStages) * stage_bytes
            wgmma_k_tile(num, sm, acc, sA, sA + b_offset_bytes, what)
            sm.wgmma_commit()
            nxt = kt + cfg.kStages - 1  # refill while the tensor cores work
            if nxt < k_tiles:
                load_stage(nxt % cfg.kStages, nxt)
            sm.commit()
            sm.wgmma_wait(0)
            continue
        sm.barrier()  # stage kt visible to all; slot (kt - 1) % kStages free
        nxt = kt + cfg.kStages - 1
        if nxt < k_tiles:
            load_stage(nxt % cfg.kStages, nxt)
        sm.commit()
        sA = smem_base + (kt % cfg.kStages) * stage_bytes
        sB = sA + b_offset_bytes
        for warp in range(num_warps):
            warp_m, warp_n = warp // cfg.kWarpsN, warp % cfg.kWarpsN
            swz, a_row, a_chunk, b_row, b_chunk = lane_addr_terms(cfg, warp_m, warp_n)
            for kk in range(BLOCK_K // 16):
                a = []
                for mi in range(cfg.kMmaM):
                    row = a_row + mi * 16
                    a.append(sm.ldmatrix_x4(
                        sA + (row * BLOCK_K + (((2 * kk + a_chunk) ^ swz) * CHUNK_ELEMS)) * 2, what + " ldm A"))
                b = [None] * cfg.kMmaN
                for n_pair in range(cfg.kMmaN // 2):
                    row = b_row + n_pair * 16
                    r = sm.ldmatrix_x4(
                        sB + (row * BLOCK_K + (((2 * kk + b_chunk) ^ swz) * CHUNK_ELEMS)) * 2, what + " ldm B")
                    b[2 * n_pair] = (r[0], r[1])
                    b[2 * n_pair + 1] = (r[2], r[3])
                for mi in range(cfg.kMmaM):
                    for ni in range(cfg.kMmaN):
                        acc[warp, mi, ni] = mma_16816(num, acc[warp, mi, ni], a[mi], b[ni][0], b[ni][1])
    sm.wait(0)
    sm.assert_idle(what + " at kernel exit")
    stats["max_groups"] = max(stats["max_groups"], sm.max_groups_in_flight)

    # ---- gemm_epilogue.cuh: rows g and g + 8 of each m16 tile, columns 2t, 2t + 1 of each n8 tile
    g, t = LANE_G, LANE_T
    for warp in range(num_warps):
        warp_m, warp_n = warp // cfg.kWarpsN, warp % cfg.kWarpsN
        for mi in range(cfg.kMmaM):
            for h in range(2):
                r = warp_m * cfg.kWarpM + mi * 16 + g + 8 * h
                pick = s_picks[r]
                live = pick >= 0
                if not live.any():
                    continue
                if kind == GATEUP:  # epilogue_swiglu: n8 tile ni (gate) pairs with ni + kMmaN / 2 (up)
                    dst = (row0 + r) * p.out_stride + by * (cfg.kBlockN // 2) + warp_n * (cfg.kWarpN // 2) + 2 * t
                    for ni in range(cfg.kMmaN // 2):
                        gate = acc[warp, mi, ni][:, 2 * h:2 * h + 2]
                        up = acc[warp, mi, ni + cfg.kMmaN // 2][:, 2 * h:2 * h + 2]
                        val = num.silu_mul(num.rnd(gate), num.rnd(up))
                        p.out.write(dst[live] + ni * 8, val[live], what + " act store", align=2)
                else:  # epilogue_weighted
                    w = s_route[r]
                    dst = pick * p.out_stride + by * cfg.kBlockN + warp_n * cfg.kWarpN + 2 * t
                    for ni in range(cfg.kMmaN):
                        val = num.rnd(num.f32(num.rnd(acc[warp, mi, ni][:, 2 * h:2 * h + 2]) * w[:, None]))
                        p.out.write(dst[live] + ni * 8, val[live], what + " y store", align=2)


def launch_gemm(cfg, kind, p, num, row_tiles, stats):
    """grouped_gemm.cuh launch_moe_expert_gemm: grid (row_tiles, gemm_col_tiles)."""
    col_tiles = p.n_out // (cfg.kBlockN // 2) if kind == GATEUP else p.n_out // cfg.kBlockN
    assert p.k_dim % BLOCK_K == 0
    for bx in range(row_tiles):
        for by in range(col_tiles):
            gemm_cta(cfg, kind, p, num, bx, by, stats)


# ----------------------------------------------------------------------------- permute
PERMUTE_THREADS = 512
PERMUTE_WARPS = PERMUTE_THREADS // WARP
SINGLE_BLOCK_MAX_PICKS = 4 * PERMUTE_THREADS
TARGET_TILES = 128
COUNT_UNROLL = 4
NO_EXPERT = -1


def permute_tiling(num_picks):
    """permute.cuh permute_tiling -> (tile_picks, num_tiles)."""
    if num_picks <= SINGLE_BLOCK_MAX_PICKS:
        return SINGLE_BLOCK_MAX_PICKS, 1
    tile = ceil_div(ceil_div(num_picks, TARGET_TILES), PERMUTE_THREADS) * PERMUTE_THREADS
    return tile, ceil_div(num_picks, tile)


def place_step(e, next_slot, num_experts):
    """permute_detail::place_step: one step of the block's stable placement. e [PERMUTE_THREADS]:
    each thread's pick's expert (NO_EXPERT: none); next_slot [PERMUTE_THREADS]: the owner's next
    free slot of each expert (thread e owns expert e), advanced here past the step's picks.
    Returns each thread's slot (-1 for NO_EXPERT): its warp's base for the expert (the owner's
    scan over the warps' counts) plus its rank among its warp's peers (__match_any_sync)."""
    warp = np.arange(PERMUTE_THREADS) // WARP
    warp_base = np.zeros((PERMUTE_WARPS, max(num_experts, 1)), np.int64)
    rank = np.zeros(PERMUTE_THREADS, np.int64)
    for w in range(PERMUTE_WARPS):  # __match_any_sync: rank among peers, leader's count
        ew = e[w * WARP:(w + 1) * WARP]
        for ln in range(WARP):
            peers = ew == ew[ln]
            rank[w * WARP + ln] = peers[:ln].sum()
            if ew[ln] != NO_EXPERT and rank[w * WARP + ln] == 0:
                warp_base[w, ew[ln]] = peers.sum()
    for ex in range(num_experts):  # owned expert: counts over the warps -> first slots
        for w in range(PERMUTE_WARPS):
            count = warp_base[w, ex]
            warp_base[w, ex] = next_slot[ex]
            next_slot[ex] += count
    safe = np.where(e == NO_EXPERT, 0, e)
    return np.where(e == NO_EXPERT, -1, warp_base[warp, safe] + rank)


def permute(ids_flat, num_experts, row_align):
    """permute.cuh launch_moe_permute: (count kernel when num_tiles > 1, then) the scatter kernel,
    block by block. Returns the GBufs sorted_rows, expert_offsets, inverse (each element checked
    written exactly once)."""
    ids = np.asarray(ids_flat, np.int64)
    num_picks = ids.size
    num_slots = num_picks + num_experts * (row_align - 1)
    sorted_rows = GBuf("sorted_rows", numel=num_slots, dtype=np.int64, fill=-12345)
    offsets = GBuf("expert_offsets", numel=num_experts + 1, dtype=np.int64, fill=-12345)
    inverse = GBuf("inverse", numel=num_picks, dtype=np.int64, fill=-12345)
    tile_picks, num_tiles = permute_tiling(num_picks)
    tid = np.arange(PERMUTE_THREADS)

    def expert_of(n, end):
        """permute_detail::expert_of per thread."""
        n = np.asarray(n)
        out = np.full(n.shape, NO_EXPERT)
        inside = n < end
        id_ = ids[n[inside]]
        out[inside] = np.where((id_ >= 0) & (id_ < num_experts), id_, NO_EXPERT)
        return out

    def count_tile(begin, end):
        """permute_detail::count_tile: the leader of each match_any group adds popc(peers)."""
        histogram = np.zeros(num_experts, np.int64)
        for base in range(begin, end, COUNT_UNROLL * PERMUTE_THREADS):
            for i in range(COUNT_UNROLL):
                e = expert_of(base + i * PERMUTE_THREADS + tid, end)
                for w in range(PERMUTE_WARPS):
                    ew = e[w * WARP:(w + 1) * WARP]
                    for val in np.unique(ew[ew != NO_EXPERT]):
                        histogram[val] += (ew == val).sum()
        return histogram

    def tile_range(b):
        begin = b * tile_picks
        return begin, min(begin + tile_picks, num_picks)

    tile_counts = None
    if num_tiles > 1:  # moe_permute_count_kernel
        tile_counts = np.array([count_tile(*tile_range(b)) for b in range(num_tiles)])
    for b in range(num_tiles):  # moe_permute_scatter_kernel, block b
        begin, end = tile_range(b)
        # 1. picks of the owned expert (thread e owns expert e): in all tiles, in earlier tiles
        total = np.zeros(PERMUTE_THREADS, np.int64)
        earlier = np.zeros(PERMUTE_THREADS, np.int64)
        owns = tid < num_experts
        if tile_counts is None:
            total[:num_experts] = count_tile(begin, end)
        else:
            total[:num_experts] = tile_counts.sum(0)
            earlier[:num_experts] = tile_counts[:b].sum(0)
        # 2. padded segments (block_exclusive_scan), offsets, -1 padding and trailing slots
        padded = np.where(owns, (total + row_align - 1) // row_align * row_align, 0)
        start = np.cumsum(padded) - padded
        used = int(padded.sum())
        next_slot = start + earlier
        if b == 0:
            offsets.write(np.arange(num_experts), start[:num_experts, None], "offsets")
            offsets.write([num_experts], [[used]], "offsets")
        for e in range(num_experts):
            if e % num_tiles == b:
                s = np.arange(start[e] + total[e], start[e] + padded[e])
                if s.size:
                    sorted_rows.write(s, np.full((s.size, 1), -1), "padding")
        s = used + b * PERMUTE_THREADS + tid
        while (s < num_slots).any():
            inside = s < num_slots
            sorted_rows.write(s[inside], np.full((inside.sum(), 1), -1), "trailing")
            s = s + num_tiles * PERMUTE_THREADS
        # 3. stable placement, PERMUTE_THREADS picks per step
        for base in range(begin, end, PERMUTE_THREADS):
            n = base + tid
            slot = place_step(expert_of(n, end), next_slot, num_experts)
            for th in np.nonzero(n < end)[0]:
                if slot[th] != -1:
                    sorted_rows.write([slot[th]], [[n[th]]], "scatter")
                inverse.write([n[th]], [[slot[th]]], "inverse")
    for buf in (sorted_rows, offsets, inverse):
        buf.check_written_once(np.ones(buf.d.size, bool))
    return sorted_rows, offsets, inverse


def permute_one_block(ids_flat, counts, num_experts, row_align):
    """permute.cuh permute_one_block, the end of the router's one-block decode launch (router.cuh
    kPermute): ids_flat (the router's picks, all in [0, E), at most PERMUTE_THREADS of them) and
    counts (its histogram) from shared memory; one pick per thread, placed as one step of the
    scatter kernel (place_step). Returns the GBufs sorted_rows, expert_offsets, inverse (each
    element checked written exactly once)."""
    ids = np.asarray(ids_flat, np.int64)
    num_picks = ids.size
    if num_picks > PERMUTE_THREADS or not ((ids >= 0) & (ids < num_experts)).all():
        raise ModelError("permute_one_block: more picks than threads, or an id outside [0, E)")
    num_slots = num_picks + num_experts * (row_align - 1)
    sorted_rows = GBuf("sorted_rows", numel=num_slots, dtype=np.int64, fill=-12345)
    offsets = GBuf("expert_offsets", numel=num_experts + 1, dtype=np.int64, fill=-12345)
    inverse = GBuf("inverse", numel=num_picks, dtype=np.int64, fill=-12345)
    tid = np.arange(PERMUTE_THREADS)
    owns = tid < num_experts
    count = np.zeros(PERMUTE_THREADS, np.int64)
    count[:num_experts] = np.asarray(counts, np.int64)[:num_experts]
    padded = (count + row_align - 1) // row_align * row_align
    start = np.cumsum(padded) - padded  # block_exclusive_scan
    used = int(padded.sum())
    offsets.write(np.arange(num_experts), start[owns, None], "offsets")
    offsets.write([num_experts], [[used]], "offsets")
    for e in range(num_experts):
        s = np.arange(start[e] + count[e], start[e] + padded[e])
        if s.size:
            sorted_rows.write(s, np.full((s.size, 1), -1), "padding")
    s = used + tid
    while (s < num_slots).any():
        inside = s < num_slots
        sorted_rows.write(s[inside], np.full((inside.sum(), 1), -1), "trailing")
        s = s + PERMUTE_THREADS
    e = np.full(PERMUTE_THREADS, NO_EXPERT)
    e[:num_picks] = ids
    slot = place_step(e, start.copy(), num_experts)
    for n in range(num_picks):  # thread n
        sorted_rows.write([slot[n]], [[n]], "scatter")
        inverse.write([n], [[slot[n]]], "inverse")
    for buf in (sorted_rows, offsets, inverse):
        buf.check_written_once(np.ones(buf.d.size, bool))
    return sorted_rows, offsets, inverse


# ----------------------------------------------------------------------------- combine
def combine(num, out, y, inverse, num_tokens, hidden, top_k):
    """combine.cuh moe_combine_kernel: out[t] = T(sum_j float(y[t * k + j])), dropped picks skipped."""
    vec = 8
    for tok in range(num_tokens):
        for c0 in range(0, hidden, vec):
            s = np.zeros(vec)
            for j in range(top_k):
                n = tok * top_k + j
                if inverse.read([n], 1, "combine inverse")[0, 0] < 0:
                    continue
                s = num.f32(s + y.read([n * hidden + c0], vec, "combine y", align=vec)[0])
            out.write([tok * hidden + c0], num.rnd(s)[None, :], "combine out", align=vec)


# ----------------------------------------------------------------------------- glue
def run_experts(hidden, ids, weights, gate_up, down, mode="f64", hidden_stride=None, wgmma=False):
    """moe.cu run_experts + experts.cuh launch_moe_experts_with on numpy inputs: hidden [T, H]
    (stored with row stride hidden_stride when given; the pad columns are unreadable), ids [T, k],
    weights [T, k], gate_up [E, 2I, H], down [E, H, I]; wgmma: the prefill regime's Hopper
    mainloop (an sm_90 GPU). Returns (out [T, H], stats)."""
    num = Num(mode)
    T, H = hidden.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    k = ids.shape[1]
    N = T * k
    if H % H_MULTIPLE or I % I_MULTIPLE:
        raise ModelError("the glue rejects H / I that are not multiples of the tiles")
    stats = {"max_groups": 0}
    out = GBuf("out", numel=T * H)
    if N == 0:
        return out.d.reshape(T, H), stats
    cfg = select_config(N, E, wgmma)
    block_m = cfg.kBlockM
    sorted_rows, offsets, inverse = permute(ids.reshape(-1), E, block_m)
    row_tiles = max_row_tiles(N, E, block_m)
    stats.update(cfg=cfg.name, wgmma=cfg.kWgmma, row_tiles=row_tiles, used=int(offsets.d[E]))
    if offsets.d[E] > row_tiles * block_m:
        raise ModelError("the row-tile grid does not cover the permutation")
    act = GBuf("act", numel=row_tiles * block_m * I)
    y = GBuf("y", numel=N * H)
    route = GBuf("route", data=num.rnd(weights.reshape(-1)))  # expert_weights.to(T)
    hs = hidden_stride or H
    a_stride = hs if T > 1 else H
    storage = np.zeros((T, hs))
    storage[:, :H] = hidden
    hid = GBuf("hidden", data=storage.reshape(-1)[:(T - 1) * hs + H])
    hid.readable[:] = (np.arange(hid.d.size) % hs) < H  # pad columns are never to be read
    w1 = GBuf("gate_up", data=gate_up)
    w2 = GBuf("down", data=down)
    g1 = GemmParams(a=hid, a_stride=a_stride, w=w1, w_expert_stride=2 * I * H, w_row_stride=H,
                    out=act, out_stride=I, sorted_rows=sorted_rows, expert_offsets=offsets,
                    route_weights=None, num_experts=E, top_k=k, k_dim=H, n_out=I)
    launch_gemm(cfg, GATEUP, g1, num, row_tiles, stats)
    # every act row of a real pick written once (each column), padding rows never
    covered = min(sorted_rows.d.size, row_tiles * block_m)
    pick_slot = np.zeros(row_tiles * block_m, bool)
    pick_slot[:covered] = sorted_rows.d[:covered] >= 0
    act.check_written_once(np.repeat(pick_slot, I))
    g2 = GemmParams(a=act, a_stride=I, w=w2, w_expert_stride=H * I, w_row_stride=I, out=y, out_stride=H,
                    sorted_rows=sorted_rows, expert_offsets=offsets, route_weights=route,
                    num_experts=E, top_k=k, k_dim=I, n_out=H)
    launch_gemm(cfg, DOWN, g2, num, row_tiles, stats)
    y.check_written_once(np.repeat(inverse.d >= 0, H))  # dropped picks: no y row
    combine(num, out, y, inverse, T, H, k)
    out.check_written_once(np.ones(out.d.size, bool))
    stats.update(act=act.d.reshape(row_tiles * block_m, I), sorted_rows=sorted_rows.d, y=y.d.reshape(N, H))
    return out.d.reshape(T, H), stats
