"""Timing: CUDA events around each call, cold L2, optional CUDA-graph replay.

A timer is any callable ``timer(fn, cuda_graph=bool, replay_check=None) -> Timing``; the harness
takes one as an argument, so its correctness-then-time logic runs on the CPU with a fake timer in
the tests. ``replay_check(out, replay)`` (graph cases): called once after the capture with the
graph's output and its replay; a non-None answer (what is wrong) fails the timing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100; the device's own value is used when torch reports it
WARMUP_MS = 25.0  # warm-up time, also used to estimate the per-call time
TARGET_MS = 100.0  # timed repetitions aim at about this much GPU time per provider
# Timed calls per provider: TARGET_MS of GPU time, at least MIN_REPS, at most MAX_REPS (which also
# caps the warm-up's calls). The cap binds for every call under 0.5 ms, and each of those reps also
# costs a flush (~70 us: 100 MB written, then read) and its launches. With 200 samples the median's
# standard error is about 5% of the p20-p80 spread (normal noise; that spread was under 2% of the
# median in 69% of the first two H100 runs' op rows, under 5.3% in 90%). And they keep a full
# suite's ~1,500 provider-cases inside its 10-minute budget: estimated from those runs' per-call
# times where they have the case and from the byte and FLOP formulas elsewhere, the op suite's
# timing loops take about 2.7 minutes (4.4 with TARGET_MS 200 and 500 reps, the settings until
# 2026-11-27); compiles and setup come on top (benchmarks/NOTES.md, "The whole suite's wall time").
MIN_REPS, MAX_REPS = 10, 200
GRAPH_WARMUP_CALLS = 3
# How the L2 is emptied before each timed call (CudaTimer's l2_flush; every row records it):
#   "clean": write a buffer twice the L2's size, then read it back: the L2 ends full of clean lines,
#            which the timed call evicts for free (the default since 2026-11-26; the first two GPU
#            runs' rows were timed with "dirty");
#   "dirty": only the write (torch's zero_, as triton's do_bench and most harnesses flush): the L2
#            ends full of dirty lines, and a timed call that moves more than a few MB pays for
#            writing them back to DRAM -- the harness's bytes, charged to the op (the suspect for
#            4-6 us that the 16k-token rms_norm rows at hidden 1024, 2048, 4096 spent beyond their
#            bytes at the copy rate).
L2_FLUSHES = ("clean", "dirty")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    cuda_graph: bool = False  # True when the times are CUDA-graph replays
    note: str = ""  # e.g. why a requested CUDA graph could not be used


ReplayCheck = Callable[[object, Callable[[], None]], "str | None"]


class ReplayMismatch(RuntimeError):
    """A CUDA graph's replay answered wrongly (the eager call had passed its check)."""


class Timer(Protocol):
    def __call__(self, fn: Callable[[], object], cuda_graph: bool = False,
                 replay_check: ReplayCheck | None = None) -> Timing: ...


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], cuda_graph: bool = False, note: str = "") -> Timing:
    return Timing(
        median_ms=percentile(times_ms, 50),
        p20_ms=percentile(times_ms, 20),
        p80_ms=percentile(times_ms, 80),
        reps=len(times_ms),
        cuda_graph=cuda_graph,
        note=note,
    )


def l2_bytes(device: torch.device | None = None) -> int:
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def capture_graph(fn: Callable[[], object], outputs: list | None = None) -> Callable[[], None]:
    """Record ``fn`` into a CUDA graph (after warm-up on a side stream); returns its replay (and
    appends the captured call's output, which every replay rewrites, to ``outputs``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture's pool can be let go
    previous = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except BaseException:
        # torch.cuda.graph's exit leaves its capture stream current when capture_end raises
        torch.cuda.set_stream(previous)
        release_pool_of_failed_capture(graph, pool)
        raise
    torch.cuda.synchronize()
    if outputs is not None:
        outputs.append(out)
    return graph.replay


def release_pool_of_failed_capture(graph: torch.cuda.CUDAGraph, pool) -> None:
    """When cudaStreamEndCapture fails, torch's capture_end throws before it tells the caching
    allocator to stop routing the capture's allocations to the graph's private pool, and the
    graph's destructor releases that pool only after a capture that ended; so the pool (whatever
    the capture allocated, as cached blocks no one else can use) stayed for the rest of the run:
    "556 MiB allocated in private pools" in every later out-of-memory message on 2026-11-26.
    Ends the routing and drops the pool's one use, which makes empty_cache return its blocks once
    they are free. Nothing to do where the capture ended (graph.pool() answers; the graph
    releases its pool itself) or never began routing (the calls then fail, harmlessly). Uses
    torch's private bindings, as torch.cuda.use_mem_pool does; not yet seen on a GPU."""
    try:
        graph.pool()
        return
    except RuntimeError:
        pass
    device = torch.cuda.current_device()
    for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        with contextlib.suppress(AttributeError, RuntimeError):
            getattr(torch._C, release)(device, pool)


def release_rng_from_failed_capture() -> None:
    """A capture that fails leaves the device's default CUDA generator in capture mode (torch
    never runs its capture epilogue), and every later random op on the device then fails with
    "Offset increment outside graph capture encountered unexpectedly": on 2026-11-26 one failed
    Liger capture took the setup of every later whole-model case with it. A fresh copy of the
    generator's state (same seed and offset, not capturing) should put it back in order (not yet
    seen on a GPU: the next run's whole-model cases after a failed capture will say)."""
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    if hasattr(gen, "graphsafe_set_state"):
        gen.graphsafe_set_state(gen.clone_state())


def flush_l2(buffer: torch.Tensor, sink: torch.Tensor, mode: str) -> None:
    """Evict the L2 by writing ``buffer`` (uint8, twice the L2's size), and for "clean" read it back
    into ``sink`` (a 0-dim int32): the write evicts whatever the last call left, the read writes
    the flush's own dirty lines back now, untimed, instead of inside the next timed call."""
    if mode not in L2_FLUSHES:
        raise ValueError(f"l2_flush must be one of {L2_FLUSHES}, got {mode!r}")
    buffer.zero_()
    if mode == "clean":
        torch.amax(buffer.view(torch.int32), dim=(0,), out=sink)


class CudaTimer:
    """Median / p20 / p80 of CUDA-event times, with L2 flushed before every timed call.

    The flush (``flush_l2``: a write of twice the L2 size, then by default a read of it) is
    enqueued before the start event, so it is not timed; it also keeps the GPU busy while the host
    launches the call, so event times measure the GPU and not the launch path. With ``cuda_graph`` the call is captured once and replays
    are timed (for launch-bound decode shapes); a call that cannot be captured (host syncs) is
    timed eagerly and the Timing says why.
    """

    def __init__(
        self, target_ms: float = TARGET_MS, warmup_ms: float = WARMUP_MS, max_reps: int = MAX_REPS,
        l2_flush: str = "clean",
    ):  # fmt: skip
        if l2_flush not in L2_FLUSHES:
            raise ValueError(f"l2_flush must be one of {L2_FLUSHES}, got {l2_flush!r}")
        self.target_ms = target_ms
        self.warmup_ms = warmup_ms
        self.max_reps = max_reps
        self.l2_flush = l2_flush
        self.flush_buffer = torch.empty(2 * l2_bytes(), dtype=torch.uint8, device="cuda")
        self.flush_sink = torch.empty((), dtype=torch.int32, device="cuda")

    def _estimate_ms(self, fn: Callable[[], object]) -> float:
        """Warm up for about warmup_ms; returns the mean time per call (launches included)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        calls, elapsed = 0, 0.0
        while calls < 3 or elapsed < self.warmup_ms:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed += start.elapsed_time(end)
            calls += 1
            if calls >= self.max_reps:
                break
        return elapsed / calls

    def __call__(self, fn: Callable[[], object], cuda_graph: bool = False,
                 replay_check: ReplayCheck | None = None) -> Timing:
        note = ""
        if cuda_graph:
            outputs = []
            try:
                fn = capture_graph(fn, outputs)
            except Exception as exc:  # noqa: BLE001 (any capture failure: time it eagerly)
                torch.cuda.synchronize()
                release_rng_from_failed_capture()
                cuda_graph = False
                note = f"CUDA graph capture failed, timed eagerly: {capture_error(exc)}"
            else:  # what is timed is the replay: its answer is checked too
                problem = replay_check(outputs[0], fn) if replay_check is not None else None
                if problem:
                    raise ReplayMismatch(f"CUDA graph replay: wrong answer: {problem}")
        per_call = max(self._estimate_ms(fn), 1e-3)
        reps = int(min(self.max_reps, max(MIN_REPS, self.target_ms / per_call)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush_l2(self.flush_buffer, self.flush_sink, self.l2_flush)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return summarize(times, cuda_graph=cuda_graph, note=note)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def capture_error(exc: BaseException) -> str:
    """What made a capture fail. An op the capture cannot contain (a host sync) raises inside
    ``with torch.cuda.graph``, and the capture's end then raises its own "operation failed due to
    a previous error during capture" with the first as its context: name both."""
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return first_line(exc) + (f" (after {first_line(cause)})" if cause is not None else "")
