"""Building blocks the kernel models share: checked memories, tensor-core fragments, shuffles, rounding.

A model runs a kernel's threads in lockstep, as numpy arrays over lanes (or threads), and sends
every memory access through the objects here, so that a wrong index raises ModelError or gives
wrong numbers instead of passing silently:

  GBuf          a global allocation: bounds, reads of elements that hold no value or lie outside
                the tensors the kernel may read, writes outside the tensors it may write,
                misaligned vector accesses, and a write count per element (exactly-once checks)
  Smem          a CTA's shared memory: cp.async commit / wait groups (data lands as late as the
                waits allow), __syncthreads epochs, RAW / WAR / WAW hazards between threads,
                ldmatrix.x4 (and .trans) with PTX's lane-to-address map, st.shared / ld.shared,
                and, inside count_bank_conflicts(), the bank conflicts of every access
                (see wavefronts)
  mma_16816     mma.sync.m16n8k16 with PTX's fragment tables (csrc/core/mma.cuh)
  wgmma_desc_sw128, wgmma_operand, wgmma_operand_mn, a_fragments_matrix
                the Hopper wgmma operands (csrc/core/wgmma.cuh): shared-memory descriptors
                decoded as the PTX ISA states them, A from registers
  shfl_xor, warp_reduce_sum, warp_reduce_max    csrc/core/reduce.cuh over a lane axis
  bf16_rne, fp16_rne, round_to                   rounding to T as __float2bfloat16_rn / __float2half_rn
  Num           the values of the tensor-core kernels: 'bf16' / 'f16' (fp32 math, rounded to T
                where the kernel rounds) or 'f64' (no rounding at all: then only the indexing
                can make a model differ from an fp64 reference)
"""
from __future__ import annotations

import contextlib

import numpy as np


class ModelError(Exception):
    """A kernel model did something the hardware or the kernel's contract forbids."""


WARP = 32
LANE = np.arange(WARP)
LANE_G = LANE // 4  # PTX fragment tables: groupID
LANE_T = LANE % 4   # threadID_in_group


def ceil_div(a, b):
    return -(-a // b)


def round_up(a, b):
    return ceil_div(a, b) * b


# ----------------------------------------------------------------------------- rounding to T
def bf16_rne(x):
    """float32 -> bf16 (round to nearest even, NaN kept quiet) -> float32: __float2bfloat16_rn."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    rounded = np.where(np.isnan(x), (u | 0x00400000) & 0xFFFF0000, rounded)
    return (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def fp16_rne(x):
    """float32 -> fp16 (round to nearest even) -> float32: __float2half_rn."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def round_to(dtype: str):
    """T(x) for T = 'bf16' | 'fp16' | 'fp32', on float32 values."""
    return {"bf16": bf16_rne, "fp16": fp16_rne, "fp32": lambda x: np.asarray(x, np.float32)}[dtype]


ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class Num:
    """Values of the tensor-core kernels (attention, MoE experts), held as float64 arrays.

    mode 'bf16' / 'f16': fp32 arithmetic (f32), rounding to T (rnd) where the kernel rounds;
    'f64': no rounding anywhere and exact exp2 / log2, so that a model compared with an fp64
    reference can differ only through its indexing."""

    def __init__(self, mode: str):
        assert mode in ("f64", "bf16", "f16"), mode
        self.mode = mode
        self._float = np.float64 if mode == "f64" else np.float32

    def f32(self, x):
        """The result of an fp32 operation whose exact value is x."""
        x = np.asarray(x, dtype=np.float64)
        return x if self.mode == "f64" else x.astype(np.float32).astype(np.float64)

    def rnd(self, x):
        """from_float<T> then to_float."""
        x = np.asarray(x, dtype=np.float64)
        if self.mode == "f64":
            return x
        rounding = bf16_rne if self.mode == "bf16" else fp16_rne
        return rounding(x.astype(np.float32)).astype(np.float64)

    def exp2(self, x):
        with np.errstate(invalid="ignore"):
            return self.f32(np.exp2(np.asarray(x, np.float64).astype(self._float)))

    def log2(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.f32(np.log2(np.asarray(x, np.float64).astype(self._float)))

    def silu(self, x):
        """activation/silu_and_mul.cuh silu: x / (1 + expf(-x)) in fp32."""
        if self.mode == "f64":
            return x / (1.0 + np.exp(-x))
        xf = np.asarray(x).astype(np.float32)
        return (xf / (np.float32(1.0) + np.exp(-xf))).astype(np.float64)

    def silu_mul(self, gate, up):
        """activation/silu_and_mul.cuh silu_mul: T(float(T(silu(gate))) * float(up))."""
        return self.rnd(self.f32(self.rnd(self.silu(gate)) * up))


# ----------------------------------------------------------------------------- global memory
class GBuf:
    """A global allocation, addressed in elements from its (16-byte aligned) base.

    Per element: its value `d`; `init`, whether it holds a value (initial data or a kernel's
    write); `readable` / `writable`, whether it belongs to a tensor the kernel may read / write
    (default: all of it); `writes`, how many times a kernel wrote it.

    Two interfaces: read / write (rows of n consecutive elements at given offsets, for the tile
    kernels) and load / store / load_vec / store_vec (one element or one 16-byte vector per lane,
    with an `active` mask of the lanes that take part, for the element-wise kernels)."""

    def __init__(self, name, data=None, numel=None, dtype=None, fill=np.nan, readable=None,
                 writable=None):
        self.name = name
        if data is not None:
            self.d = np.array(data, dtype=dtype).ravel()
            self.init = np.ones(self.d.size, bool)
        else:
            self.d = np.full(numel, fill, dtype=dtype or np.float64)
            self.init = np.zeros(numel, bool)
        n = self.d.size
        self.readable = np.ones(n, bool) if readable is None else np.array(readable, bool)
        self.writable = np.ones(n, bool) if writable is None else np.array(writable, bool)
        self.writes = np.zeros(n, np.int64)

    # ---- rows of n elements
    def _span(self, offs, n, what):
        offs = np.asarray(offs, dtype=np.int64).reshape(-1)
        bad = (offs < 0) | (offs + n > self.d.size)
        if bad.any():
            raise ModelError(f"{what}: {self.name} access out of bounds at element {offs[bad][:4]} "
                             f"(+{n}), size {self.d.size}")
        return offs[:, None] + np.arange(n)[None, :]

    @staticmethod
    def _check_align(offs, align, what, name):
        if align and (np.asarray(offs) % align).any():
            raise ModelError(f"{what}: misaligned access to {name}")

    def check_addr(self, offs, n, what):
        """An address the kernel forms but does not dereference (a zero-filled cp.async source)."""
        self._span(offs, n, what)

    def read(self, offs, n, what, align=None):
        """[len(offs), n]: elements offs[i] .. offs[i] + n - 1."""
        idx = self._span(offs, n, what)
        self._check_align(offs, align, what, self.name)
        if not self.readable[idx].all():
            raise ModelError(f"{what}: read of {self.name} outside the tensors the kernel may read "
                             f"(first {idx[~self.readable[idx]][:4]})")
        if not self.init[idx].all():
            raise ModelError(f"{what}: read of never-written {self.name} elements "
                             f"(first {idx[~self.init[idx]][:4]})")
        return self.d[idx].copy()

    def write(self, offs, vals, what, align=None):
        """vals [len(offs), n] (or broadcastable) to elements offs[i] .. offs[i] + n - 1."""
        vals = np.asarray(vals)
        idx = self._span(offs, vals.shape[-1], what)
        self._check_align(offs, align, what, self.name)
        if not self.writable[idx].all():
            raise ModelError(f"{what}: write of {self.name} outside the tensors the kernel may write "
                             f"(first {idx[~self.writable[idx]][:4]})")
        self.d[idx] = np.broadcast_to(vals.reshape(-1, idx.shape[1]), idx.shape)
        self.init[idx] = True
        np.add.at(self.writes, idx.ravel(), 1)

    def atomic_add(self, offs, vals, what):
        """atomicAdd: a read-modify-write of an element that must hold a value; not counted in
        `writes` (those are for exactly-once stores)."""
        idx = self._span(offs, 1, what)[:, 0]
        if not (self.init[idx] & self.writable[idx]).all():
            raise ModelError(f"{what}: atomicAdd on an uninitialised or read-only {self.name} element")
        np.add.at(self.d, idx, vals)

    # ---- per lane, with an active mask
    def load(self, idx, active=None, what="load"):
        """idx: element index per lane (any shape); inactive lanes read nothing and get 0."""
        idx = np.asarray(idx, np.int64)
        act = np.ones(idx.shape, bool) if active is None else np.broadcast_to(active, idx.shape)
        out = np.zeros(idx.shape, self.d.dtype)
        if act.any():
            out[act] = self.read(idx[act], 1, what)[:, 0]
        return out

    def store(self, idx, vals, active=None, what="store"):
        idx = np.asarray(idx, np.int64)
        vals = np.broadcast_to(np.asarray(vals), idx.shape)
        act = np.ones(idx.shape, bool) if active is None else np.broadcast_to(active, idx.shape)
        if act.any():
            self.write(idx[act], vals[act][:, None], what)

    def load_vec(self, idx0, kvec, active=None, what="16-byte load"):
        """A 16-byte vector (kvec elements) per lane from element idx0 (a multiple of kvec)."""
        idx0 = np.asarray(idx0, np.int64)
        act = np.ones(idx0.shape, bool) if active is None else np.broadcast_to(active, idx0.shape)
        self._check_align(idx0[act], kvec, what, self.name)
        return self.load(idx0[..., None] + np.arange(kvec), act[..., None], what)

    def store_vec(self, idx0, vals, kvec, active=None, what="16-byte store"):
        idx0 = np.asarray(idx0, np.int64)
        act = np.ones(idx0.shape, bool) if active is None else np.broadcast_to(active, idx0.shape)
        self._check_align(idx0[act], kvec, what, self.name)
        self.store(idx0[..., None] + np.arange(kvec), vals, act[..., None], what)

    def check_written_once(self, expected):
        """Every element of the bool mask `expected` written exactly once, no other written."""
        twice = expected & (self.writes != 1)
        if twice.any():
            bad = np.nonzero(twice)[0]
            raise ModelError(f"{self.name}: {bad.size} expected elements written "
                             f"{np.unique(self.writes[bad]).tolist()} times (first {bad[:4].tolist()})")
        stray = ~expected & (self.writes != 0)
        if stray.any():
            bad = np.nonzero(stray)[0]
            raise ModelError(f"{self.name}: {bad.size} unexpected elements written (first {bad[:4].tolist()})")


# ----------------------------------------------------------------------------- shared memory
SMEM_BANKS = 32
BANK_BYTES = 4
WAVEFRONT_BYTES = SMEM_BANKS * BANK_BYTES  # 128 bytes: what one shared-memory wavefront serves


def wavefronts(addr_bytes, width):
    """(wavefronts, ideal) of one warp-wide shared-memory access: addr_bytes [lanes] the first
    byte of each active lane's `width`-byte access, in lane order (lane i = row i).

    The model of the hardware that the kernels are tuned for (NVIDIA's documented rule, as
    Nsight Compute counts it): a warp's request is split into phases of 128 / width lanes for
    8- and 16-byte accesses (16 lanes, 8 lanes), one phase of 32 lanes for narrower ones; an
    ldmatrix.x4 is four phases, one per 8x16-byte matrix, the same as a 16-byte access by 32
    lanes. Within a phase, each bank serves one 4-byte word per wavefront (lanes reading the
    same word share it), so the phase costs the largest number of distinct words it touches in
    any one bank. `ideal` is what the same bytes would cost with no conflicts: per phase,
    ceil(distinct words / 32)."""
    a = np.asarray(addr_bytes, np.int64).reshape(-1)
    lanes_per_phase = WARP if width <= BANK_BYTES else WAVEFRONT_BYTES // width
    words_per_lane = max(width // BANK_BYTES, 1)
    total = ideal = 0
    for p0 in range(0, a.size, lanes_per_phase):
        words = np.unique((a[p0:p0 + lanes_per_phase, None] // BANK_BYTES
                           + np.arange(words_per_lane)[None, :]).ravel())
        total += int(np.bincount(words % SMEM_BANKS, minlength=SMEM_BANKS).max())
        ideal += ceil_div(words.size, SMEM_BANKS)
    return total, ideal


class BankStats:
    """Wavefronts per kind of shared-memory access, summed over every warp-wide instruction the
    model issued: {what: [instructions, wavefronts, ideal wavefronts]}. The conflict factor of
    an access is wavefronts / ideal (1.0: conflict-free)."""

    def __init__(self):
        self.by_what = {}

    def add(self, what, addr_bytes, width, warp_of=None):
        """addr_bytes [rows] in lane order; warp_of [rows] the warp of each row (default: rows
        0-31 are warp 0, and so on). Each warp's rows are one instruction."""
        a = np.asarray(addr_bytes, np.int64).reshape(-1)
        w = np.arange(a.size) // WARP if warp_of is None else np.asarray(warp_of).reshape(-1)
        entry = self.by_what.setdefault(what, [0, 0, 0])
        for warp in np.unique(w):
            total, ideal = wavefronts(a[w == warp], width)
            entry[0] += 1
            entry[1] += total
            entry[2] += ideal

    def factor(self, suffix):
        """Conflict factor of all accesses whose `what` ends with suffix (None if there are none)."""
        rows = [v for k, v in self.by_what.items() if k.endswith(suffix)]
        if not rows:
            return None
        return sum(r[1] for r in rows) / sum(r[2] for r in rows)

    def merge(self, other):
        for k, v in other.by_what.items():
            entry = self.by_what.setdefault(k, [0, 0, 0])
            for i in range(3):
                entry[i] += v[i]


_ACTIVE_BANKS = None


@contextlib.contextmanager
def count_bank_conflicts():
    """Every Smem created inside the block counts into the BankStats yielded."""
    global _ACTIVE_BANKS
    saved, _ACTIVE_BANKS = _ACTIVE_BANKS, BankStats()
    try:
        yield _ACTIVE_BANKS
    finally:
        _ACTIVE_BANKS = saved


class Smem:
    """A CTA's shared memory of 16-bit elements, with the hazards of cp.async and barriers.

    cp.async data lands at the latest moment the program allows: when a cp.async.wait_group
    forces its group. `epoch` counts __syncthreads. Per element: `done_epoch`, the epoch in which
    its data became complete (its wait, or its st.shared); `read_epoch`, the last epoch it was
    read in; `writer`, the thread of its last st.shared (-1 for cp.async data). A read needs its
    data complete in an earlier epoch (a barrier in between) unless the reading thread stored
    it itself; a write must not hit bytes read in the current epoch (WAR) or still in flight (WAW)."""

    def __init__(self, nbytes):
        n = nbytes // 2
        self.nbytes = nbytes
        self.v = np.full(n, np.nan)
        self.inflight = np.zeros(n, bool)
        self.done_epoch = np.full(n, -1, np.int64)
        self.read_epoch = np.full(n, -1, np.int64)
        self.writer = np.full(n, -1, np.int64)
        self.epoch = 0
        self.pending = []  # committed groups, oldest first: lists of (element index, values)
        self.current = []  # issued, not yet committed
        self.max_groups_in_flight = 0
        self.banks = _ACTIVE_BANKS  # counted only inside count_bank_conflicts() (it costs time)
        # wgmma operands (async proxy): per element the thread whose cp.async / st.shared wrote
        # it, the clock of that write landing, of its writer's fence.proxy.async after it
        # (-1: none yet), and whether an issued, not yet waited-for wgmma group reads it.
        self.clock = 0
        self.last_barrier = -1
        self.issuer = np.full(n, -1, np.int64)
        self.landed_at = np.full(n, -1, np.int64)
        self.fenced_at = np.full(n, -1, np.int64)
        self.wgmma_reading = np.zeros(n, bool)
        self.wgmma_groups = []  # committed groups of element indices, oldest first
        self.wgmma_current = []

    # ---- cp.async (core/mma.cuh cp_async_16 / cp_async_commit / cp_async_wait)
    def cp_async(self, dst_bytes, vals, what):
        """One 16-byte cp.async per row of vals [threads, 8] to shared byte addresses dst_bytes."""
        dst_bytes = np.asarray(dst_bytes, np.int64)
        if (dst_bytes % 16).any() or dst_bytes.min() < 0 or dst_bytes.max() + 16 > self.nbytes:
            raise ModelError(f"{what}: cp.async smem destination misaligned/out of range "
                             f"({dst_bytes.min()}..{dst_bytes.max()}, smem {self.nbytes})")
        idx = dst_bytes[:, None] // 2 + np.arange(8)[None, :]
        if len(np.unique(idx.ravel())) != idx.size:
            raise ModelError(f"{what}: two copies of one instruction hit the same smem bytes")
        if self.inflight[idx].any():
            raise ModelError(f"{what}: cp.async into bytes still in flight (WAW)")
        if (self.read_epoch[idx] == self.epoch).any():
            raise ModelError(f"{what}: cp.async overwrites bytes read since the last barrier (WAR)")
        if self.wgmma_reading[idx].any():
            raise ModelError(f"{what}: cp.async overwrites bytes an unfinished wgmma reads (WAR)")
        self.inflight[idx] = True
        self.issuer[idx] = np.arange(len(idx))[:, None]  # rows in thread order
        self.current.append((idx, np.asarray(vals, np.float64)))
        if self.banks is not None:
            self.banks.add(what, dst_bytes, 16)  # rows in thread order: 32 per warp

    def commit(self):
        self.pending.append(self.current)
        self.current = []
        self.max_groups_in_flight = max(self.max_groups_in_flight, len(self.pending))

    def wait(self, n):
        """cp.async.wait_group n: all but the newest n committed groups complete."""
        while len(self.pending) > n:
            for idx, vals in self.pending.pop(0):
                self.v[idx] = vals
                self.inflight[idx] = False
                self.done_epoch[idx] = self.epoch
                self.writer[idx] = -1
                self.clock += 1
                self.landed_at[idx] = self.clock
                self.fenced_at[idx] = -1

    def barrier(self):
        self.epoch += 1
        self.clock += 1
        self.last_barrier = self.clock

    def fence_proxy_async(self, threads):
        """fence.proxy.async.shared::cta by `threads` (core/wgmma.cuh fence_proxy_async): their
        writes that have landed become visible to async-proxy reads ordered after the fence."""
        self.clock += 1
        mine = np.isin(self.issuer, np.asarray(threads)) & (self.landed_at >= 0) & ~self.inflight
        self.fenced_at[mine] = self.clock

    def wgmma_read(self, elem_idx, what):
        """A wgmma operand (async proxy) read of elem_idx (any shape), part of the current
        (uncommitted) wgmma group: the data must have landed, been fenced into the async proxy
        by its writer after landing, and a barrier must separate that fence from this read; the
        bytes stay 'being read' until a wgmma_wait retires the group."""
        idx = np.asarray(elem_idx, np.int64)
        if idx.min() < 0 or idx.max() >= self.v.size:
            raise ModelError(f"{what}: wgmma operand out of range")
        self._check_read(idx, what)
        fenced = self.fenced_at[idx]
        if ((fenced < 0) | (fenced < self.landed_at[idx])).any():
            raise ModelError(f"{what}: wgmma reads data not fenced into the async proxy after it landed")
        if (fenced > self.last_barrier).any():
            raise ModelError(f"{what}: wgmma reads data whose proxy fence no barrier follows")
        self.wgmma_current.append(idx.ravel())
        self.wgmma_reading[idx] = True
        return self.v[idx].copy()

    def wgmma_commit(self):
        self.wgmma_groups.append(self.wgmma_current)
        self.wgmma_current = []

    def wgmma_wait(self, n):
        """wgmma.wait_group n: all but the newest n committed groups complete (their reads end)."""
        while len(self.wgmma_groups) > n:
            self.wgmma_groups.pop(0)
        self.wgmma_reading[:] = False
        for group in self.wgmma_groups + [self.wgmma_current]:
            for idx in group:
                self.wgmma_reading[idx] = True

    def assert_idle(self, what):
        if self.pending or self.current or self.inflight.any():
            raise ModelError(f"{what}: cp.async still in flight")
        if self.wgmma_groups or self.wgmma_current:
            raise ModelError(f"{what}: wgmma still in flight")

    # ---- reads and writes
    def _check_read(self, idx, what):
        if self.inflight[idx].any():
            raise ModelError(f"{what}: reads bytes whose cp.async is still in flight")
        if (self.done_epoch[idx] < 0).any():
            raise ModelError(f"{what}: reads never-written smem")
        if (self.done_epoch[idx] >= self.epoch).any():
            raise ModelError(f"{what}: reads data with no barrier after its wait/store")
        self.read_epoch[idx] = self.epoch

    def _check_row_addresses(self, addr_bytes, what):
        a = np.asarray(addr_bytes, np.int64)
        if (a % 16).any() or a.min() < 0 or a.max() + 16 > self.nbytes:
            raise ModelError(f"{what}: ldmatrix row address misaligned/out of range")
        return a

    def ldmatrix_x4(self, addr_bytes, what):
        """ldmatrix.x4 (core/mma.cuh ldmatrix_x4): matrix j's 8 row addresses come from lanes
        8j .. 8j + 7; register j of lane l = row l / 4, elements 2 (l % 4), 2 (l % 4) + 1 of
        matrix j. Returns [4, 32, 2]."""
        a = self._check_row_addresses(addr_bytes, what)
        if self.banks is not None:
            self.banks.add(what, a, 16)
        out = np.empty((4, WARP, 2))
        for j in range(4):
            row_elem = a[8 * j + LANE_G] // 2
            idx = row_elem[:, None] + 2 * LANE_T[:, None] + np.arange(2)[None, :]
            self._check_read(idx, what)
            out[j] = self.v[idx]
        return out

    def ldmatrix_x4_trans(self, addr_bytes, what):
        """ldmatrix.x4.trans: lane l (g = l / 4, t = l % 4) gets M_j[2t][g], M_j[2t + 1][g]."""
        a = self._check_row_addresses(addr_bytes, what)
        if self.banks is not None:
            self.banks.add(what, a, 16)
        out = np.empty((4, WARP, 2))
        for j in range(4):
            idx = np.stack([a[8 * j + 2 * LANE_T] // 2 + LANE_G, a[8 * j + 2 * LANE_T + 1] // 2 + LANE_G],
                           axis=1)
            self._check_read(idx, what)
            out[j] = self.v[idx]
        return out

    def st_shared(self, elem_idx, vals, threads, what):
        """A generic store: elem_idx [threads, n] elements, `threads` the storing thread of each row."""
        idx = np.asarray(elem_idx, np.int64)
        if idx.min() < 0 or idx.max() >= self.v.size:
            raise ModelError(f"{what}: st.shared out of range")
        if self.inflight[idx].any():
            raise ModelError(f"{what}: st.shared to bytes with a cp.async in flight (WAW)")
        if (self.read_epoch[idx] == self.epoch).any():
            raise ModelError(f"{what}: st.shared to bytes read since the last barrier (WAR)")
        if len(np.unique(idx.ravel())) != idx.size:
            raise ModelError(f"{what}: two threads store the same smem element in one instruction")
        self._count_banks(idx, threads, what)
        if self.wgmma_reading[idx].any():
            raise ModelError(f"{what}: st.shared to bytes an unfinished wgmma reads (WAR)")
        self.v[idx] = vals
        self.done_epoch[idx] = self.epoch
        self.clock += 1
        self.issuer[idx] = np.broadcast_to(np.asarray(threads)[:, None], idx.shape)
        self.landed_at[idx] = self.clock
        self.fenced_at[idx] = -1
        self.writer[idx] = np.broadcast_to(np.asarray(threads)[:, None], idx.shape)

    def ld_shared(self, elem_idx, threads, what):
        idx = np.asarray(elem_idx, np.int64)
        if idx.min() < 0 or idx.max() >= self.v.size:
            raise ModelError(f"{what}: ld.shared out of range")
        if self.inflight[idx].any():
            raise ModelError(f"{what}: ld.shared of bytes with a cp.async in flight")
        if (self.done_epoch[idx] < 0).any():
            raise ModelError(f"{what}: ld.shared of never-written smem")
        reader = np.broadcast_to(np.asarray(threads)[:, None], idx.shape)
        if ((self.done_epoch[idx] >= self.epoch) & (self.writer[idx] != reader)).any():
            raise ModelError(f"{what}: ld.shared of another thread's store with no barrier between")
        self.read_epoch[idx] = self.epoch
        self._count_banks(idx, threads, what)
        return self.v[idx].copy()

    def _count_banks(self, idx, threads, what):
        """A generic access of idx.shape[1] consecutive 16-bit elements per thread."""
        if self.banks is None:
            return
        threads = np.broadcast_to(np.asarray(threads), idx.shape[:1])
        self.banks.add(what, idx[:, 0] * 2, idx.shape[1] * 2, warp_of=threads // WARP)


# ----------------------------------------------------------------------------- tensor cores
def mma_16816(num: Num, d, a, b0, b1):
    """mma.sync.m16n8k16 (core/mma.cuh mma_16816): d [32, 4] += A x B with PTX's fragment tables.
    a [4, 32, 2] holds a0..a3, b0 / b1 [32, 2] (lo, hi) register pairs. An element of A, B or C
    that no lane supplies, or a NaN operand (never-written shared memory), raises."""
    g, t = LANE_G, LANE_T
    A = np.full((16, 16), np.nan)
    for reg, row_off, col_off in ((0, 0, 0), (1, 8, 0), (2, 0, 8), (3, 8, 8)):
        A[g + row_off, 2 * t + col_off] = a[reg][:, 0]
        A[g + row_off, 2 * t + col_off + 1] = a[reg][:, 1]
    B = np.full((16, 8), np.nan)
    B[2 * t, g] = b0[:, 0]
    B[2 * t + 1, g] = b0[:, 1]
    B[2 * t + 8, g] = b1[:, 0]
    B[2 * t + 9, g] = b1[:, 1]
    C = np.full((16, 8), np.nan)
    C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
    if np.isnan(A).any() or np.isnan(B).any() or np.isnan(C).any():
        raise ModelError("mma: NaN operand (uncovered fragment element or never-written smem)")
    D = num.f32(C + A @ B)
    return np.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], axis=1)


# ----------------------------------------------------------------------------- wgmma (sm_90a)
WGMMA_ATOM_BYTES = 1024  # 8 rows x 128 bytes: the 128-byte swizzle atom


def wgmma_desc_sw128(smem_addr, leading_bytes=16, stride_bytes=WGMMA_ATOM_BYTES):
    """core/wgmma.cuh wgmma_desc_sw128."""
    return (((smem_addr & 0x3FFFF) >> 4) | (((leading_bytes >> 4) & 0x3FFF) << 16)
            | (((stride_bytes >> 4) & 0x3FFF) << 32) | (1 << 62))


def _desc_fields(desc, what):
    """(start, leading, stride) bytes of a SW128 descriptor with base offset 0."""
    if (desc >> 62) != 1 or (desc >> 49) & 7:
        raise ModelError(f"{what}: descriptor not SW128 with base offset 0")
    return (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4


def _swizzle128(logical):
    """The 128-byte swizzle on absolute shared addresses: bits [4, 7) ^= bits [7, 10)."""
    return logical ^ (((logical >> 7) & 7) << 4)


def _wgmma_read(sm, byte_addr, what):
    if byte_addr.min() < 0 or byte_addr.max() + 2 > sm.nbytes:
        raise ModelError(f"{what}: wgmma operand past the shared memory")
    vals = sm.wgmma_read(byte_addr // 2, what)
    if np.isnan(vals).any():
        raise ModelError(f"{what}: wgmma reads NaN (never-written shared memory)")
    return vals


def wgmma_operand(sm, desc, rows, what):
    """The [rows, 16] K-major operand (A [M, K] or B stored [N, K]) a wgmma reads through desc,
    decoded as the PTX ISA states it: row r, element k at byte start + (r / 8) SBO + (r % 8) 128
    + 2 k (the leading byte offset unused), then the 128-byte swizzle."""
    start, _, sbo = _desc_fields(desc, what)
    r = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    return _wgmma_read(sm, _swizzle128(start + (r // 8) * sbo + (r % 8) * 128 + 2 * k), what)


def wgmma_operand_mn(sm, desc, n_cols, what):
    """The [16, n_cols] MN-major B operand (K rows, N contiguous; tnsp-b = 1) a wgmma reads
    through desc: element (k, n) at byte start + (n / 64) LBO + (k / 8) SBO + (k % 8) 128
    + 2 (n % 64), then the 128-byte swizzle (CUTLASS's canonical ((8,n),(8,k)):((1,LBO),(8,SBO))
    in 16-byte units)."""
    start, lbo, sbo = _desc_fields(desc, what)
    k = np.arange(16)[:, None]
    n = np.arange(n_cols)[None, :]
    return _wgmma_read(sm, _swizzle128(start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (n % 64)),
                       what)


def a_fragments_matrix(frags):
    """The [16 * warps, 16] A operand of a register-A wgmma: frags[w] = warp w's mma.m16n8k16 A
    fragment [4 registers, 32 lanes, 2] of its rows 16 w .. 16 w + 15 (the PTX ISA's wgmma A
    register layout is that fragment per warp)."""
    g, t = LANE_G, LANE_T
    A = np.full((16 * len(frags), 16), np.nan)
    for w, a in enumerate(frags):
        for reg, row_off, col_off in ((0, 0, 0), (1, 8, 0), (2, 0, 8), (3, 8, 8)):
            A[16 * w + g + row_off, 2 * t + col_off] = a[reg][:, 0]
            A[16 * w + g + row_off, 2 * t + col_off + 1] = a[reg][:, 1]
    if np.isnan(A).any():
        raise ModelError("wgmma: NaN A register operand")
    return A


def accumulators_to_matrix(frags):
    """[16 * warps, 8 * tiles] from per-warp C fragments frags[w][j] ([32 lanes, 4]): the wgmma
    accumulator layout (warp w: rows 16 w + g (+ 8), n8 block j: columns 8 j + 2 t (+ 1))."""
    g, t = LANE_G, LANE_T
    tiles = len(frags[0])
    D = np.empty((16 * len(frags), 8 * tiles))
    for w, acc in enumerate(frags):
        for j in range(tiles):
            rows, cols = 16 * w + g, 8 * j + 2 * t
            D[rows, cols], D[rows, cols + 1], D[rows + 8, cols], D[rows + 8, cols + 1] = np.asarray(acc[j]).T
    return D


def matrix_to_accumulators(D, frags):
    """The inverse of accumulators_to_matrix, written into frags in place."""
    g, t = LANE_G, LANE_T
    for w, acc in enumerate(frags):
        for j in range(len(acc)):
            rows, cols = 16 * w + g, 8 * j + 2 * t
            acc[j][:] = np.stack([D[rows, cols], D[rows, cols + 1], D[rows + 8, cols], D[rows + 8, cols + 1]], axis=1)


# ----------------------------------------------------------------------------- warp shuffles
def shfl_xor(v, mask, lane_axis=0):
    """__shfl_xor_sync(0xffffffff, v, mask), all 32 lanes active: lane l reads lane l ^ mask."""
    assert 0 < mask < WARP
    return np.take(v, LANE ^ mask, axis=lane_axis)


def warp_reduce_sum(v, width=WARP, lane_axis=0):
    """core/reduce.cuh warp_reduce_sum<width> in fp32: v += shfl_xor(v, offset), offset width/2 .. 1."""
    v = np.asarray(v, np.float32)
    offset = width // 2
    while offset > 0:
        v = (v + shfl_xor(v, offset, lane_axis)).astype(np.float32)
        offset //= 2
    return v


def warp_reduce_max(v, lane_axis=0):
    """core/reduce.cuh warp_reduce_max: fmaxf butterfly (a NaN loses against a number)."""
    v = np.asarray(v, np.float32)
    offset = WARP // 2
    while offset > 0:
        v = np.fmax(v, shfl_xor(v, offset, lane_axis)).astype(np.float32)
        offset //= 2
    return v
