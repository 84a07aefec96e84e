"""Compile the suite's compiling providers in parallel before anything is timed.

The `torch_compile` and `flex` providers compile on their first (correctness) call, and Liger's
Triton kernels JIT-compile on theirs: ~80 graphs in the whole suite (flex at causal prefill once
per shape, on purpose: benchmarks/NOTES.md), each a few seconds of tracing, inductor code
generation and Triton compilation, one after another in the run's process. Here worker processes
(spawned before the ceilings, so nothing they run on the GPU overlaps a timed call) build the same
cases and call those providers once each. What they compile lands in inductor's and Triton's
on-disk caches (keyed by the graph, the input shapes and the settings), so the run's own first
call of each finds it there and only traces. Nothing here changes a provider or a measurement: a
worker that fails or runs out of time only leaves the run to compile for itself (its rows say
nothing of this phase).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from typing import Callable, Sequence

import torch

# Providers whose first call compiles: providers.torch_compile_provider, the attention suite's flex,
# and Liger's Triton kernels (JIT-compiled per shape; Triton's on-disk cache keeps them too).
COMPILING_PROVIDERS = ("torch_compile", "flex", "liger")
# Whole-model cases are left to the run: a worker would build a model of several GB for them.
SKIPPED_OPS = ("model_prefill", "model_decode")
MAX_WORKERS = 8
MIN_ITEMS = 8  # fewer: not worth starting processes (~10-15 s each to import torch and init CUDA)
TIMEOUT_S = 120.0  # the whole phase; past it the run goes on and compiles what is left itself

Item = tuple[int, str]  # (index into the run's case list, provider name)


def default_workers() -> int:
    """Half the CPUs, at most MAX_WORKERS (each compiles one kernel at a time: _worker)."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // 2))


def items_to_compile(cases: Sequence, wanted: Callable[[int, str], bool]) -> list[Item]:
    """(case index, provider) for every compiling provider that the run will call and can run here."""
    return [
        (i, p.name)
        for i, case in enumerate(cases)
        for p in case.providers
        if p.name in COMPILING_PROVIDERS and case.op not in SKIPPED_OPS and not p.skip and wanted(i, p.name)
    ]  # fmt: skip


def compile_items(argv: list[str], items: list[Item], device: str,
                  on_item: Callable[[str, float, str | None], None]) -> None:
    """In a worker: rebuild the run's cases from its command line and call each item's provider
    once on the case's inputs (as harness.run_case builds them: the same seed, inference mode);
    ``on_item(what, seconds, failure)`` after each item, failure None or one line (the run will
    report it properly)."""
    from .harness import SEED  # noqa: PLC0415
    from .run import parse_args, select_cases  # noqa: PLC0415

    cases = select_cases(parse_args(argv))
    for index, name in items:
        case = cases[index]
        provider = next(p for p in case.providers if p.name == name)
        start, failure = time.monotonic(), None
        try:
            with torch.inference_mode():
                torch.manual_seed(SEED)
                inputs = case.make_inputs(torch.device(device))
                provider.build(inputs)()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (the run itself reports what fails)
            failure = f"{case.label}: {name}: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            inputs = None
            if device == "cuda":
                torch.cuda.empty_cache()
        on_item(f"{case.label}: {name}", time.monotonic() - start, failure)


def _worker(argv: list[str], items: list[Item], device: str, results) -> None:
    # One compile at a time in each worker: the workers are the parallelism (inductor's own pool of
    # compile processes per worker would put workers x CPUs processes on the machine). Not part of
    # the cache key (inductor's config leaves compile_threads out of it).
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    inductor_config.compile_threads = 1
    # One message per item as it ends (so that a worker killed at the phase's limit still says what it
    # compiled and how long each took), then one for the worker's end.
    compile_items(argv, items, device, lambda what, seconds, failure: results.put(("item", what, seconds, failure)))
    results.put(("end",))


def precompile(
    argv: list[str], items: list[Item], device: str = "cuda", workers: int | None = None,
    timeout_s: float = TIMEOUT_S, log: Callable[[str], None] = print, min_items: int = MIN_ITEMS,
) -> None:  # fmt: skip
    """Spread ``items`` (at least ``min_items``, else nothing is started) over ``workers`` spawned
    processes (round robin, so that each gets some of every op) and wait for them, at most
    ``timeout_s``; a worker still running then is killed (nothing of this phase may run beside a
    timed call). The calling program's main module must not start a run when a spawned process
    imports it (``if __name__ == "__main__"``)."""
    if len(items) < min_items:
        return
    workers = min(workers or default_workers(), len(items))
    start = time.monotonic()
    log(f"precompiling {len(items)} provider-cases that compile on their first call, in {workers} processes")
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(argv, items[w::workers], device, results)) for w in range(workers)]
    failures, timings, reported = [], [], 0

    def take(message) -> None:
        nonlocal reported
        if message[0] == "end":
            reported += 1
            return
        _, what, seconds, failure = message
        timings.append((seconds, what))
        if failure is not None:
            failures.append(failure)

    try:
        for proc in procs:
            proc.start()
    except Exception as exc:  # noqa: BLE001 (the phase is a head start, never a reason to stop the run)
        log(f"  could not start its processes ({type(exc).__name__}: {exc}): the run compiles for itself")
    try:
        deadline = start + timeout_s
        while reported < workers and time.monotonic() < deadline:
            try:
                take(results.get(timeout=min(1.0, max(0.0, deadline - time.monotonic()))))
            except queue.Empty:
                if not any(proc.is_alive() for proc in procs):  # all ended, some without reporting
                    break
        while True:  # what the workers put just before they ended or the limit came
            try:
                take(results.get(timeout=0.2))
            except queue.Empty:
                break
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join()
    lost = workers - reported
    log(f"  {time.monotonic() - start:.0f} s, {len(timings)} of {len(items)} compiled"
        + (f"; {lost} of {workers} processes did not finish (crashed or out of time): the run compiles "
           "their part itself" if lost else "")
        + (f"; {len(failures)} provider-cases failed there (the run reports them)" if failures else ""))
    for line in failures[:3]:
        log(f"    {line}")
    if timings:  # where the phase's time went: the next tuning's evidence (benchmarks/NOTES.md)
        slowest = ", ".join(f"{what} {seconds:.0f} s" for seconds, what in sorted(timings, reverse=True)[:5])
        log(f"    {sum(t for t, _ in timings):.0f} s of compiles in the processes; slowest: {slowest}")
