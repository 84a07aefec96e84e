"""``python -m benchmarks``: run the default suite (or a filtered part of it) on the current GPU
(without one: the CPU parity demo).

Without a GPU nothing is timed: it says so and runs the CPU parity demo (qwen3x.demo) instead.

    python -m benchmarks --list                       # every case and its providers
    python -m benchmarks --quick                      # a smoke subset: one or two shapes per op
    python -m benchmarks --ops rms_norm,moe_layer --shapes tokens=4096 --providers qwen3x,reference
    python -m benchmarks --model                      # include the whole-model benchmark
    python -m benchmarks --targets                    # only what the issues' targets judge, then verdicts
    python -m benchmarks --out DIR --resume           # go on with a run in DIR that was cut short
    python -m benchmarks.plot benchmarks/results/<run>/    # PNGs from the rows
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model, targets
from .ceilings import Ceilings
from .harness import Case, run_case
from .precompile import items_to_compile, precompile
from .rows import CEILING_OPS, RowWriter, default_results_dir, environment, format_table, read_rows
from .suites import SUITES
from .timing import L2_FLUSHES

OP_SUITES = dict(SUITES)
MODEL_SUITES = dict(model.SUITE)
ALL_SUITES = {**OP_SUITES, **MODEL_SUITES}


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", help=f"comma-separated ops (default: all but the model ones): {', '.join(ALL_SUITES)}")
    parser.add_argument(
        "--shapes",
        help="comma-separated filter: key=value terms must match the shape (tokens=4096, model=Qwen3-4B), "
        "other terms must appear in the case label",
    )
    parser.add_argument("--providers", help="comma-separated providers to run (default: all)")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<date>-<device>/)")
    parser.add_argument("--quick", action="store_true", help="a smoke subset: one or two shapes per op")
    parser.add_argument("--model", action="store_true", help="include the whole-model benchmark")
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the cases that the issues' targets judge (benchmarks/targets.py; whole-model ones "
        "included), then each target's verdict",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="time every case eagerly")
    parser.add_argument(
        "--no-precompile", action="store_true",
        help="compile the providers that compile on their first call (torch_compile, flex, liger) in the run's "
        "own process only, not first in parallel worker processes (benchmarks/precompile.py)",
    )  # fmt: skip
    parser.add_argument(
        "--l2-flush", choices=L2_FLUSHES, default="clean",
        help="how the L2 is emptied before each timed call: 'clean' (write then read a buffer twice its "
        "size: no dirty lines left; default) or 'dirty' (the write alone, as most harnesses do); rows "
        "record it",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="go on with the run whose rows are in --out (its newest rows file): run only the provider-cases "
        "it has no row for, append to that file, reuse its ceilings; refused if its rows come from other code "
        "(git sha), another device or other versions",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = parser.parse_args(argv)
    unknown = [op for op in _csv(args.ops) or [] if op not in ALL_SUITES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(ALL_SUITES)}")
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the directory of the run to go on with")
    if args.targets and args.quick:
        parser.error("--targets judges the full suite's shapes: drop --quick (narrow it with --ops or --shapes)")
    return args


def shape_matches(case: Case, terms: list[str] | None) -> bool:
    for term in terms or []:
        if "=" in term:
            key, value = term.split("=", 1)
            if str(case.shape.get(key)) != value:
                return False
        elif term not in case.label:
            return False
    return True


def select_cases(args: argparse.Namespace) -> list[Case]:
    if args.targets:
        ops = [op for op in (_csv(args.ops) or ALL_SUITES) if op in targets.judged_ops()]
    else:
        ops = _csv(args.ops) or [*OP_SUITES, *(MODEL_SUITES if args.model else [])]
    terms = _csv(args.shapes)
    cases = [case for op in ops for case in ALL_SUITES[op](args.quick) if shape_matches(case, terms)]
    if args.targets:
        cases = [c for c in cases if targets.wanted(c.op, c.shape)]
    if args.no_cuda_graphs:
        cases = [c for c in cases if not (c.op == "model_decode" and c.shape.get("cuda_graph"))]
        for c in cases:
            c.cuda_graph = False
    return cases


def list_cases(cases: list[Case], providers: list[str] | None) -> None:
    for case in cases:
        names = [
            p.name + (" (skip)" if p.skip else "") for p in case.providers if providers is None or p.name in providers
        ]  # fmt: skip
        print(f"{case.label:<72} {', '.join(names)}")
    print(f"{len(cases)} cases; (skip) = skipped in this environment (library not installed, no CUDA kernel in this build, memory budget)")


def cpu_demo() -> int:
    try:
        demo = importlib.import_module("qwen3x.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "qwen3x.demo":
            raise
        print("The CPU parity demo (qwen3x.demo) is unavailable in this checkout.")
        return 0
    print("Running the CPU parity demo (qwen3x.demo) instead.", flush=True)
    result = demo.main()
    return result if isinstance(result, int) else 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = select_cases(args)
    providers = _csv(args.providers)
    if args.list:
        list_cases(cases, providers)
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU found: nothing will be timed.", flush=True)
        return cpu_demo()

    from .ceilings import measure
    from .timing import CudaTimer

    env = {**environment(), "l2_flush": args.l2_flush}
    out = args.out or default_results_dir(env["device"])
    if args.resume:
        try:
            resumed = resume_state(Path(out), env)
        except ValueError as exc:
            print(f"--resume: {exc}", file=sys.stderr)
            return 2
        writer = RowWriter(resumed.path)
        writer.rows.extend(resumed.rows)
    else:
        resumed = None
        writer = RowWriter(_fresh(Path(out) / "rows.jsonl"))
    timer = CudaTimer(l2_flush=args.l2_flush)
    log(f"{env['device']}: {len(cases)} cases, rows -> {writer.path}"
        + (f" (resumed: {len(resumed.rows)} rows there already)" if resumed else ""))
    run_start = time.monotonic()  # the suite's wall time (issue 3: the whole suite in 10 minutes)
    done = resumed.done if resumed else set()
    if not args.no_precompile:  # before the ceilings: nothing the workers run overlaps a timed call
        precompile(argv, items_to_compile(cases, lambda i, name: name in pending_providers(cases[i], providers, done)),
                   log=log)
    if resumed and resumed.ceilings:
        ceilings = resumed.ceilings
        log(f"ceilings from the resumed run: copy {ceilings.copy_gbps:.0f} GB/s, "
            f"bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s")
    else:
        log("measuring ceilings (device copy, 8192^3 bf16 matmul)")
        ceilings, rows = measure(timer, env)
        for row in rows:
            writer.write(row)
        log(f"  copy {ceilings.copy_gbps:.0f} GB/s, bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s; "
            + ", ".join(f"{r['bytes'] / 2**20:.0f} MiB moved {r['gbps']:.0f} GB/s" for r in rows if r["op"] == "copy")
            + "".join(f"; read {r['gbps']:.0f} GB/s" for r in rows if r["op"] == "read")
            + "".join(f"; launch floor {1e3 * r['median_ms']:.1f} us" for r in rows
                      if r["op"] == "launch_floor" and r.get("median_ms")))
    start = time.monotonic()
    for i, case in enumerate(cases):
        names = pending_providers(case, providers, done)
        if not names:
            continue
        log(f"[{i + 1}/{len(cases)}, {time.monotonic() - start:.0f} s] {case.label}")
        for row in run_case(case, timer=timer, env=env, ceilings=ceilings, providers=names, log=log):
            writer.write(row)
    print(format_table(writer.rows))
    judged = [v for v in targets.evaluate(writer.rows) if v.status != "NO DATA" or args.targets]
    if judged:
        print("\nTargets (benchmarks/targets.py):\n" + targets.format_verdicts(judged))
    print(f"\nrows: {writer.path}\nplots: python -m benchmarks.plot {writer.path.parent}")
    print(f"wall time: {time.monotonic() - run_start:.0f} s for {len(cases)} cases and {len(writer.rows)} rows "
          + (f"({len(resumed.rows)} of them from earlier calls, whose time is not included)" if resumed
             else "(ceilings and precompile included)"))
    return 0


@dataclass
class Resumed:
    """What --resume takes over from a run cut short: its rows file, rows, ceilings, and the
    provider-cases it has a row for (op, shape as sorted JSON, provider)."""

    path: Path
    rows: list[dict]
    ceilings: Ceilings | None
    done: set[tuple[str, str, str]]


# What every row of a resumed run shares with this call's environment (rows.environment, the flush).
RESUME_MUST_MATCH = ("device", "git_sha", "torch", "cuda", "transformers", "prefill_mainloop", "l2_flush")


def newest_rows_file(out: Path) -> Path | None:
    """rows.jsonl, rows-2.jsonl, ...: the highest-numbered one there (_fresh's naming)."""
    numbered = []
    for f in out.glob("rows*.jsonl"):
        m = re.fullmatch(r"rows(?:-(\d+))?\.jsonl", f.name)
        if m:
            numbered.append((int(m.group(1) or 1), f))
    return max(numbered)[1] if numbered else None


def resume_state(out: Path, env: dict) -> Resumed:
    """The run in ``out`` to go on with; ValueError saying why when there is none to resume or its
    rows were measured by other code, on another device or under other versions."""
    path = newest_rows_file(out)
    if path is None:
        raise ValueError(f"no rows*.jsonl in {out} to resume")
    text = path.read_text()
    if text and not text.endswith("\n"):  # killed while writing a row: drop the torn line
        path.write_text(text[: text.rfind("\n") + 1])
    rows = read_rows(path)
    for key in RESUME_MUST_MATCH:
        seen = {json.dumps(r.get(key), sort_keys=True) for r in rows}
        mine = json.dumps(env.get(key), sort_keys=True)
        if seen and seen != {mine}:
            raise ValueError(f"{path} holds rows with {key} {', '.join(sorted(seen))}, this run has {mine}: "
                             "start a fresh run (a new --out) instead")
    peaks = {r["op"]: r for r in rows if r["op"] in ("peak_copy", "peak_matmul") and r["status"] == "ok"}
    ceilings = None
    if len(peaks) == 2:
        ceilings = Ceilings(copy_gbps=peaks["peak_copy"]["gbps"], matmul_tflops=peaks["peak_matmul"]["tflops"])
    done = {(r["op"], json.dumps(r["shape"], sort_keys=True), r["provider"])
            for r in rows if r["op"] not in CEILING_OPS}
    return Resumed(path, rows, ceilings, done)


def pending_providers(case: Case, providers: list[str] | None, done: set) -> list[str]:
    """The names of the case's providers to run: those selected that have no row in ``done``."""
    key = json.dumps(case.shape, sort_keys=True)
    return [p.name for p in case.providers
            if (providers is None or p.name in providers) and (case.op, key, p.name) not in done]


def _fresh(path: Path) -> Path:
    """rows.jsonl, or rows-2.jsonl, ... when an earlier run left one in the same directory."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


if __name__ == "__main__":
    sys.exit(main())
