"""Device ceilings measured at the start of a run: copy bandwidth and bf16 matmul FLOP/s.

Rows report ``fraction_of_peak`` against these measured numbers (not the datasheet): the larger of
achieved TFLOP/s over the matmul ceiling and achieved GB/s over the copy ceiling, i.e. the share
of whichever resource binds the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rows import make_row

COPY_BYTES = 2 * 2**30  # one buffer of the device-to-device copy (2 GiB read + 2 GiB written)
# Copies as short as the memory-bound ops' timed calls, measured beside the ceiling as rows of their
# own (op "copy"): what the memory system gives a call of that size under the same timer (launch,
# ramp-up and drain included). Buffers of a 16k-token bf16 rms_norm at hidden 1024 and 4096.
SHORT_COPY_BYTES = (16384 * 1024 * 2, 16384 * 4096 * 2)
# Reading alone (op "read"): the COPY_BYTES buffer reduced to one value (torch.amax over int32s),
# bytes = the buffer once. A row of its own beside the ceilings, not one: the ops that mostly read
# (decode attention, the MoE decode layer) are judged against the copy, as the issues say, and
# this row says how much of their fraction is reading being cheaper than copying (decode attention
# has measured 95-106% of the copy rate).
MATMUL_N = 8192  # m = n = k of the bf16 matmul
# The timer's own cost for a decode-sized case (op "launch_floor"): a CUDA-graph replay of one
# kernel that does nothing (a one-element add), timed like the cases (L2 flushed first, events
# around the replay). Every graph-timed row carries it once, peers' rows as much as ours: beside
# the rows it says how much of a few-microsecond time is the harness's rather than the op's
# (the third run timed moe_router at 1 token at 6.5 us; a decode step captured as one graph pays
# a kernel's launch once per graph, not per op).
FLOOR_KERNEL = "1-element add, CUDA-graph replay"


def copy_bytes(nbytes: int) -> int:
    """Bytes moved by copying a buffer of nbytes: read once, written once."""
    return 2 * nbytes


def matmul_flops(m: int, n: int, k: int) -> int:
    """A multiply-add per (i, j, l): 2 * m * n * k."""
    return 2 * m * n * k


@dataclass
class Ceilings:
    copy_gbps: float | None = None
    matmul_tflops: float | None = None

    def fraction(self, tflops: float | None, gbps: float | None) -> float | None:
        parts = []
        if tflops is not None and self.matmul_tflops:
            parts.append(tflops / self.matmul_tflops)
        if gbps is not None and self.copy_gbps:
            parts.append(gbps / self.copy_gbps)
        return max(parts) if parts else None


def measure(timer, env: dict) -> tuple[Ceilings, list[dict]]:
    """Time a COPY_BYTES device copy and an 8192^3 bf16 matmul, the SHORT_COPY_BYTES copies, a read of
    COPY_BYTES and the launch floor; returns the ceilings and the rows of all six."""
    with torch.inference_mode():
        src = torch.randint(0, 256, (COPY_BYTES,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy = timer(lambda: dst.copy_(src))
        short = [(n, timer(lambda n=n: dst[:n].copy_(src[:n]))) for n in SHORT_COPY_BYTES]
        sink = torch.empty((), dtype=torch.int32, device="cuda")
        read = timer(lambda: torch.amax(src.view(torch.int32), dim=(0,), out=sink))
        src = dst = sink = None  # frees them (None, not del: pyflakes flags deleting names a lambda uses)
        a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
        c = torch.empty_like(a)
        mm = timer(lambda: torch.mm(a, b, out=c))
        a = b = c = None
        tiny = torch.zeros(1, device="cuda")
        floor = timer(lambda: tiny.add_(1.0), cuda_graph=True)
    torch.cuda.empty_cache()
    gbps = copy_bytes(COPY_BYTES) / copy.median_ms / 1e6
    tflops = matmul_flops(MATMUL_N, MATMUL_N, MATMUL_N) / mm.median_ms / 1e9

    def row(op, timing, shape, fraction=1.0, **rate):
        return make_row(
            env, op, shape, "torch", "ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms,
            p80_ms=timing.p80_ms, reps=timing.reps, fraction_of_peak=fraction, **rate,
        )  # fmt: skip

    rows = [
        row("peak_copy", copy, {"bytes": COPY_BYTES}, gbps=gbps, bytes=copy_bytes(COPY_BYTES)),
        row("peak_matmul", mm, {"m": MATMUL_N, "n": MATMUL_N, "k": MATMUL_N}, tflops=tflops,
            flops=matmul_flops(MATMUL_N, MATMUL_N, MATMUL_N)),
    ]  # fmt: skip
    for n, timing in short:
        rate = copy_bytes(n) / timing.median_ms / 1e6
        rows.append(row("copy", timing, {"bytes": n}, fraction=rate / gbps, gbps=rate, bytes=copy_bytes(n)))
    read_gbps = COPY_BYTES / read.median_ms / 1e6
    rows.append(row("read", read, {"bytes": COPY_BYTES}, fraction=read_gbps / gbps, gbps=read_gbps, bytes=COPY_BYTES))
    rows.append(row("launch_floor", floor, {"kernel": FLOOR_KERNEL}, fraction=None, cuda_graph=floor.cuda_graph))
    return Ceilings(copy_gbps=gbps, matmul_tflops=tflops), rows
