"""``python -m benchmarks.readme [RESULTS_DIR]``: README's benchmark table, regenerated from rows.

Reads the rows of one run (default: the newest directory under benchmarks/results/) and replaces
the text between the BEGIN/END markers in README.md with: the device, versions, git sha and date
of the run, the measured ceilings, and one line per case giving qwen3x's median time, its
fraction of the relevant ceiling, the fastest peer from the same run and qwen3x's speedup over it;
then, run by run, the cases that only earlier runs beside it measured (each with its own header:
a GPU session rarely has time for the whole suite); the targets' verdicts, each case judged from
its newest run; and the run's committed plots (RUN/plots/*.png, drawn from the same rows by
``python -m benchmarks.plot RUN --out RUN/plots``).
Never edit that part of README by hand: measured numbers come only from committed rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import targets
from .rows import CEILING_OPS, OURS, case_key, read_rows, shape_label, timed_alike

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BEGIN = "<!-- benchmarks:begin (python -m benchmarks.readme) -->"
END = "<!-- benchmarks:end -->"
# The reference is the spec, not an alternative people use; qwen3x_<variant> rows (qwen3x_mma_sync:
# our other mainloop, qwen3x_no_pdl: plain launches, qwen3x_no_fence: no proxy fence, qwen3x_cluster /
# qwen3x_l2: split-KV always merged in a cluster / through L2, qwen3x_serial: the Hopper attention loop without the overlap) are A/B rows
# of our own (benchmarks/providers.py), shown in the rows and plots, not peers.
NOT_PEERS = {OURS, "reference"}


def is_peer(provider: str) -> bool:
    return provider not in NOT_PEERS and not provider.startswith(OURS + "_")
PLOTS = "plots"  # a run's PNGs, shown under its table


def newest_run(results: Path = RESULTS) -> Path:
    runs = sorted(p for p in results.glob("*") if p.is_dir() and any(p.glob("*.jsonl")))
    if not runs:
        raise SystemExit(f"no result rows under {results}")
    return runs[-1]


def _ms(value: float | None) -> str:
    return "" if value is None else (f"{value * 1e3:.1f} us" if value < 1 else f"{value:.2f} ms")


def _missing(row: dict | None) -> str:
    """What stands in qwen3x's column when it has no time: why, from its own row."""
    if row is None:
        return "not run"
    if row.get("status") == "failed":
        return "wrong answer" if "wrong answer" in (row.get("note") or "") else "failed"
    return row.get("status") or "no time"


def short_copies(rows: list[dict]) -> str:
    """' Copies as short as ...: 64 MiB moved in 24 us (2800 GB/s, 93%), ...' ('' when the run
    measured none)."""
    # (one per size: a run's rows files each time the ceilings)
    short = sorted({r["bytes"]: r for r in rows if r["op"] == "copy" and r.get("gbps")}.values(),
                   key=lambda r: r["bytes"])
    if not short:
        return ""
    parts = [f"{r['bytes'] / 2**20:.0f} MiB moved in {1e3 * r['median_ms']:.1f} us ({r['gbps']:.0f} GB/s, "
             f"{100 * r['fraction_of_peak']:.0f}%)" for r in short]  # fmt: skip
    flush = short[0].get("l2_flush")
    how = f" (L2 flushed '{flush}' before each call)" if flush else ""
    return f" Copies as short as the memory-bound ops' calls{how}: {', '.join(parts)}."


def read_rate(rows: list[dict]) -> str:
    """' Reading alone (2 GiB reduced to one value): 4500 GB/s, 1.05x the copy rate ...' ('' when
    the run has no such row)."""
    read = next((r for r in rows if r["op"] == "read" and r.get("gbps")), None)
    if read is None:
        return ""
    return (f" Reading alone ({read['bytes'] / 2**30:.0f} GiB reduced to one value): {read['gbps']:.0f} GB/s, "
            f"{read['fraction_of_peak']:.2f}x the copy rate (the ops that mostly read, decode attention and the "
            "MoE decode layer, are judged against the copy).")


def launch_floor(rows: list[dict]) -> str:
    """' A CUDA-graph replay of a kernel that does nothing: 4.8 us ...' ('' when the run has none)."""
    floor = next((r for r in rows if r["op"] == "launch_floor" and r.get("median_ms")), None)
    if floor is None:
        return ""
    return (f" A CUDA-graph replay of a kernel that does nothing times {1e3 * floor['median_ms']:.1f} us under the"
            f" same timer: part of every graph-timed (decode-sized) row, peers' as much as ours.")


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms")]
    ceilings = {r["op"]: r for r in rows if r["op"] in CEILING_OPS}
    first = rows[0]
    lines = [
        f"Measured on {first['device']} on {str(first['timestamp'])[:10]} (git {str(first['git_sha'])[:10]}, "
        f"torch {first['torch']}, CUDA {first['cuda']}, transformers {first['transformers']}).",
    ]
    if ceilings:
        copy, mm = ceilings.get("peak_copy", {}), ceilings.get("peak_matmul", {})
        lines.append(
            f"Ceilings measured in the same run: device copy {copy.get('gbps') or 0:.0f} GB/s, "
            f"bf16 matmul {mm.get('tflops') or 0:.0f} TFLOP/s." + short_copies(rows) + read_rate(rows)
            + launch_floor(rows)
        )
    lines += ["", "| op | shape | qwen3x | % of ceiling | fastest peer | peer | speedup |", "|---|---|---|---|---|---|---|"]
    cases: dict[tuple, list[dict]] = {}
    for r in ok:
        if r["op"] not in ceilings:
            cases.setdefault(case_key(r), []).append(r)
    our_rows = {case_key(r): r for r in rows if r["provider"] == OURS}
    for key, group in cases.items():
        op = key[0]
        ours = next((r for r in group if r["provider"] == OURS), None)
        peers = [r for r in group if is_peer(r["provider"])]
        # like with like, as the targets compare: peers timed as qwen3x was (CUDA-graph replays or
        # eager calls); where none was, the fastest other one, marked, with its speedup in brackets
        alike = [r for r in peers if ours is None or timed_alike(r, ours)]
        best = min(alike or peers, key=lambda r: r["median_ms"]) if peers else None
        frac = ours.get("fraction_of_peak") if ours else None
        speedup = f"{best['median_ms'] / ours['median_ms']:.2f}x" if ours and best else ""
        if best is not None and not alike:
            speedup = f"({speedup})" if speedup else ""
            best = {**best, "provider": best["provider"] + (" (graph)" if best.get("cuda_graph") else " (eager)")}
        lines.append(
            f"| {op} | {shape_label(group[0]['shape'])} | {_ms(ours['median_ms']) if ours else _missing(our_rows.get(key))} | "
            f"{'' if frac is None else f'{100 * frac:.0f}%'} | {_ms(best['median_ms']) if best else ''} | "
            f"{best['provider'] if best else ''} | {speedup} |"
        )
    return "\n".join(lines)


def earlier_runs(run: Path) -> list[Path]:
    """Result directories beside ``run`` whose names sort before it (runs are named by date), newest
    first."""
    return sorted((p for p in run.parent.glob("*") if p.is_dir() and p.name < run.name and any(p.glob("*.jsonl"))),
                  reverse=True)


def layered_rows(run: Path) -> list[tuple[Path, list[dict]]]:
    """(run, rows) for ``run`` and then each earlier run that measured cases no newer run did: those
    cases' rows with the run's own ceilings. A case is never shown from two runs."""
    seen: set[tuple] = set()
    layers = []
    for r in [run, *earlier_runs(run)]:
        rows = read_rows(r)
        fresh = [x for x in rows if x["op"] not in CEILING_OPS and case_key(x) not in seen]
        if fresh or r == run:
            layers.append((r, [x for x in rows if x["op"] in CEILING_OPS] + fresh))
        seen |= {case_key(x) for x in rows}
    return layers


def _where(run: Path) -> str:
    return str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)


def plots(run: Path, readme: Path) -> str:
    """Markdown images of the run's plots, addressed from README's folder ("" when it has none)."""
    pngs = sorted((run / PLOTS).glob("*.png"))
    if not pngs:
        return ""
    base = readme.resolve().parent

    def address(p: Path) -> str:
        p = p.resolve()
        return p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()

    images = "\n".join(f"![{p.stem}]({address(p)})" for p in pngs)
    return f"\n\nPlots of the same rows (`python -m benchmarks.plot`):\n\n{images}"


def update_readme(text: str, body: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a results directory (default: the newest)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    run = (args.run or newest_run()).resolve()
    layers = layered_rows(run)
    body = table(layers[0][1])
    for earlier, rows in layers[1:]:
        body += f"\n\nCases that run did not measure, from an earlier run (`{_where(earlier)}`):\n\n" + table(rows)
    judged = [x for _, rows in layers for x in rows if x["op"] not in CEILING_OPS]
    where = ", ".join(f"`{_where(r)}`" for r, _ in layers)
    body += ("\n\nThe issues' targets, each case judged from the newest run that measured it "
             "(`python -m benchmarks.targets`):\n\n" + targets.format_verdicts(targets.evaluate(judged))
             + f"\n\nRows: {where}." + plots(run, args.readme))
    args.readme.write_text(update_readme(args.readme.read_text(), body))
    print(f"README.md benchmark table regenerated from {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
