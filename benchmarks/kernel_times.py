"""``python -m benchmarks.kernel_times --ops OP [--shapes ...] [--providers ...]``: where a case's
time goes, kernel by kernel.

The suite times a provider's whole call (a CUDA-graph replay at decode sizes); this runs the same
call eagerly under torch.profiler and lists every GPU kernel it launched with its mean device
time per call, their sum, and the wall time of one eager call, so that a layer that misses its
bandwidth target says which of its kernels does (the MoE decode layer: router GEMM, routing,
GEMM1, GEMM2). Eager launches are not programmatic (the gaps between kernels are the launch
path's), and by default the L2 is emptied before each call as the suite does (``--warm-l2`` to
keep it; the flush's own kernels are left out of the list): a breakdown, not a benchmark.
``--plain`` only makes the calls (warm-up included, flushes as above), for a profiler outside the
process: Nsight Compute's counters say why a kernel takes the time it does (make gpu's ncu step).
``--timeline`` also captures the call into a CUDA graph, as the suite times decode-sized cases, and
profiles single replays (each after the flush): every kernel's start and end from the first
kernel's start, and the gap before it (negative: it overlapped the one before, as programmatic
dependent launch allows), medians over the replays. What a layer's graph-timed row spends beyond
its kernels' own times is there: the gaps, and the graph's launch (the row minus the span).
``--warm-code`` (with ``--timeline``) makes one eager call of the same provider on other inputs of
the same shape between each flush and its replay: the replay's kernels then find their code in the
L2 (and the SMs' instruction caches) but not their data. Against the flushed time line it says
what fetching a kernel's instructions from memory costs it (the suspect of batch-1 decode
attention's fixed cost, benchmarks/NOTES.md "What batch-1 decode spends"); ``--warm-l2`` leaves
both code and data cached, so it cannot tell the two apart.

    python -m benchmarks.kernel_times --ops moe_layer --shapes tokens=1 --providers qwen3x
    ncu --kernel-name regex:rms_norm --launch-skip 5 --launch-count 1 \
        python -m benchmarks.kernel_times --plain --calls 1 --ops rms_norm --shapes tokens=16384,hidden=1024
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from functools import partial

import torch

from .run import ALL_SUITES, _csv, shape_matches
from .timing import first_line, percentile

CALLS = 20  # profiled calls per provider
TIMELINE_REPLAYS = 9  # --timeline: single replays profiled (in one profiler session)
WARMUP_CALLS = 5
NAME_WIDTH = 90  # kernel names are cut to this many characters


def _profile(fn, calls: int, before=None) -> tuple[dict[str, float], dict[str, int], float]:
    """Total device us and launch count per kernel name over ``calls`` calls of fn (each after
    ``before()`` when given), and the wall ms of them all."""
    from torch.profiler import ProfilerActivity, profile

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            if before is not None:
                before()
            fn()
        end.record()
        torch.cuda.synchronize()
    total_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total_us[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            count[e.name] += 1
    return total_us, count, start.elapsed_time(end)


def kernel_times(fn, calls: int = CALLS, flush=None) -> tuple[list[tuple[str, float, int]], float]:
    """([(kernel name, mean device us per call, launches per call)], mean wall us per call) of
    ``calls`` eager calls of fn, after WARMUP_CALLS. With ``flush`` (a callable emptying the L2)
    each call runs after a flush; the flush's kernels, found by profiling it alone, are left out
    (so is the wall time: it is None then)."""
    for _ in range(WARMUP_CALLS):
        fn()
    torch.cuda.synchronize()
    flush_names = set(_profile(flush, 1)[0]) if flush is not None else set()
    total_us, count, wall_ms = _profile(fn, calls, before=flush)
    rows = sorted(((name, us / calls, count[name] // calls) for name, us in total_us.items()
                   if name not in flush_names), key=lambda r: -r[1])  # fmt: skip
    return rows, (None if flush is not None else wall_ms * 1e3 / calls)


def timeline(replays: list[list[tuple[str, float, float]]]) -> tuple[list[tuple], float] | None:
    """Per kernel position of a replay: (name, median start, median duration, median gap before
    it), in us from the replay's first kernel start, and the median span (first start to last
    end). ``replays``: each replay's kernels as (name, start us, end us), any order. None when the
    replays saw no kernels or disagree on the kernels' sequence."""
    ordered = [sorted(r, key=lambda k: k[1]) for r in replays if r]
    if not ordered or len({tuple(k[0] for k in r) for r in ordered}) != 1:
        return None
    rows = []
    for i, (name, _, _) in enumerate(ordered[0]):
        starts = [r[i][1] - r[0][1] for r in ordered]
        durations = [r[i][2] - r[i][1] for r in ordered]
        gaps = [r[i][1] - r[i - 1][2] for r in ordered] if i else [0.0]
        rows.append((name, percentile(starts, 50), percentile(durations, 50), percentile(gaps, 50)))
    return rows, percentile([max(k[2] for k in r) - r[0][1] for r in ordered], 50)


MARKER_KERNEL = "spin_kernel"  # torch.cuda._sleep's kernel: brackets each profiled replay
MARKER_CYCLES = 100


def split_replays(kernels: list[tuple[str, float, float]], marker: str = MARKER_KERNEL) -> list[list]:
    """One profiler session's kernels (name, start, end), any order, into the replays: what runs
    between a marker kernel and the next one, every other span (the flushes run in the others)."""
    replays, current, inside = [], [], False
    for k in sorted(kernels, key=lambda k: k[1]):
        if marker in k[0]:
            if inside:
                replays.append(current)
            current, inside = [], not inside
        elif inside:
            current.append(k)
    return replays


def replay_timeline(fn, calls: int, flush=None, warm=None):
    """timeline() of ``calls`` single replays of fn captured into a CUDA graph (each after
    ``flush()`` and then ``warm()`` when given: outside the markers, so their kernels are not the
    replay's), in one profiler session, each replay between two marker kernels; None as timeline()
    says. Raises what the capture raised."""
    from torch.profiler import ProfilerActivity, profile

    from .timing import capture_graph, release_rng_from_failed_capture

    def device_kernels(prof):
        return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA]

    try:
        replay = capture_graph(fn)
    except Exception:
        torch.cuda.synchronize()
        release_rng_from_failed_capture()
        raise
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            if flush is not None:
                flush()
            if warm is not None:
                warm()
            torch.cuda._sleep(MARKER_CYCLES)
            replay()
            torch.cuda._sleep(MARKER_CYCLES)
        torch.cuda.synchronize()
    return timeline(split_replays(device_kernels(prof)))


def format_timeline(label: str, result) -> str:
    if result is None:
        return f"{label}: no timeline (the profiler saw no kernels in the replays, or not the same ones)"
    rows, span = result
    lines = [f"{label} (one CUDA-graph replay, medians; us from the first kernel's start)",
             f"  {'start':>8} {'us':>8} {'gap':>7}  kernel"]
    lines += [f"  {start:8.2f} {us:8.2f} {gap:7.2f}  {name[:NAME_WIDTH]}" for name, start, us, gap in rows]
    lines.append(f"  {span:8.2f} {'':8} {'':7}  span: first kernel start to last kernel end")
    return "\n".join(lines)


def plain_calls(fn, calls: int, flush=None) -> None:
    """WARMUP_CALLS calls of fn, then ``calls`` more, each after ``flush()`` when given: kernel
    launch i of the profiled calls is launch WARMUP_CALLS * (launches per call) + i."""
    for _ in range(WARMUP_CALLS):
        fn()
    for _ in range(calls):
        if flush is not None:
            flush()
        fn()
    torch.cuda.synchronize()


def format_times(label: str, rows, wall_us: float) -> str:
    lines = [label, f"  {'us/call':>9} {'launches':>8}  kernel"]
    lines += [f"  {us:9.2f} {n:8d}  {name[:NAME_WIDTH]}" for name, us, n in rows]
    wall = "" if wall_us is None else f"; one eager call {wall_us:.2f} us wall"
    lines.append(f"  {sum(us for _, us, _ in rows):9.2f} {'':8}  sum of kernel times{wall}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_times", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", required=True, help=f"comma-separated ops: {', '.join(ALL_SUITES)}")
    parser.add_argument("--shapes", help="as python -m benchmarks --shapes")
    parser.add_argument("--providers", default="qwen3x", help="comma-separated providers (default: qwen3x)")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--plain", action="store_true",
                        help=f"no profiling and no report: {WARMUP_CALLS} warm-up calls, then --calls calls "
                        "(each after the flush), for a profiler outside the process (ncu)")
    parser.add_argument("--timeline", action="store_true",
                        help="also profile single CUDA-graph replays: each kernel's start, time and the gap before it")
    parser.add_argument("--warm-l2", action="store_true",
                        help="no L2 flush before each call (kernel times with the last call's data cached; "
                        "the wall time of an eager call is reported only then)")
    parser.add_argument("--warm-code", action="store_true",
                        help="with --timeline: before each replay, after the flush, one eager call on other "
                        "inputs of the same shape (the kernels' code cached, their data not)")
    args = parser.parse_args(argv)
    if args.warm_code and not args.timeline:
        parser.error("--warm-code applies to the replays of --timeline")
    if args.warm_code and args.warm_l2:
        parser.error("--warm-code needs the flush that --warm-l2 leaves out")
    ops, terms, providers = _csv(args.ops), _csv(args.shapes), _csv(args.providers)
    unknown = [op for op in ops if op not in ALL_SUITES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}")
    if not torch.cuda.is_available():
        print("No CUDA GPU found: nothing to profile.")
        return 0
    device = torch.device("cuda")
    flush = None  # --warm-l2; else the suite's flush, with its own buffer
    if not args.warm_l2:
        from .timing import flush_l2, l2_bytes

        flush = partial(flush_l2, torch.empty(2 * l2_bytes(), dtype=torch.uint8, device=device),
                        torch.empty((), dtype=torch.int32, device=device), "clean")
    for op in ops:
        for case in ALL_SUITES[op](False):
            if not shape_matches(case, terms):
                continue
            with torch.inference_mode():
                torch.manual_seed(0)
                inputs = case.make_inputs(device)
                if args.warm_code:  # the same shapes, other tensors (other data, the same code)
                    torch.manual_seed(1)
                    other_inputs = case.make_inputs(device)
                for p in case.providers:
                    if p.name not in providers:
                        continue
                    if p.skip:
                        print(f"{case.label} {p.name}: skipped ({p.skip})")
                        continue
                    if args.plain:
                        plain_calls(p.build(inputs), args.calls, flush)
                        print(f"{case.label} {p.name}: {WARMUP_CALLS} + {args.calls} calls", flush=True)
                        continue
                    rows, wall = kernel_times(p.build(inputs), args.calls, flush)
                    print(format_times(f"{case.label} {p.name}", rows, wall), flush=True)
                    if args.timeline and not p.graphable:
                        print(f"{case.label} {p.name}: no timeline (not graph-capturable: host syncs)")
                    elif args.timeline:
                        try:
                            warm = p.build(other_inputs) if args.warm_code else None
                            line = replay_timeline(p.build(inputs), min(args.calls, TIMELINE_REPLAYS), flush, warm)
                        except Exception as exc:  # noqa: BLE001 (said, and the next provider goes on)
                            print(f"{case.label} {p.name}: no timeline (capture failed: {first_line(exc)})")
                        else:
                            label = f"{case.label} {p.name}" + (" (code warmed, data flushed)" if args.warm_code else "")
                            print(format_timeline(label, line), flush=True)
                del inputs
                if args.warm_code:
                    del other_inputs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
