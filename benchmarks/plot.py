"""PNGs from benchmark rows (needs matplotlib, an optional dependency).

    python -m benchmarks.plot benchmarks/results/<run>/ [--out DIR]    # a directory or a .jsonl file

- each op, for each combination of its other shape keys: speed vs size, one line per provider
  (TFLOP/s where the op has a FLOP formula, else GB/s);
- the whole-model ops: speedup over unpatched transformers (hf_eager), bars per case and provider.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from .rows import CEILING_OPS, OURS, read_rows, shape_label, speedup_baseline

X_KEYS = ("context", "seqlen", "tokens", "batch")  # the first one a shape has is the x axis
MODEL_OPS = ("model_prefill", "model_decode")
MARKERS = "osD^vP<X>*"
# 20 colours: the default cycle's ten (C0-C9), then the light halves of matplotlib's tab20
# palette (a figure of the suite can have 11 or more providers; the default cycle repeats at 10)
COLOURS = tuple(f"C{i}" for i in range(10)) + (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
    "#dbdb8d", "#9edae5")


def line_style(provider: str, index: int) -> dict:
    """Plot keywords for the index-th provider of a figure: qwen3x a thick black line on top, its
    own A/B variants (qwen3x_*) dashed, every other provider a colour and a marker of its own."""
    name = provider.removesuffix(" (graph)")
    if name == OURS:
        return dict(color="black", linewidth=2.5, marker="o", zorder=3)
    style = dict(color=COLOURS[index % len(COLOURS)], marker=MARKERS[index % len(MARKERS)], linewidth=1.2)
    if name.startswith(OURS + "_"):
        style["linestyle"] = "--"
    return style


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (op, shape, provider, cuda_graph): reruns into one directory replace."""
    keyed = {}
    for r in rows:
        keyed[(r["op"], json.dumps(r["shape"], sort_keys=True), r["provider"], r.get("cuda_graph"))] = r
    return list(keyed.values())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "all"


def _metric(rows: list[dict], copy_gbps: float | None = None,
            matmul_tflops: float | None = None) -> tuple[str, str]:
    """The y axis: where rows have both TFLOP/s and GB/s and the run's ceilings are known, the one
    the op is bound by (the larger median share of its ceiling, as fraction_of_peak takes it:
    decode attention is drawn in GB/s, prefill in TFLOP/s); else TFLOP/s, GB/s, ms in that order."""
    both = [r for r in rows if r.get("tflops") is not None and r.get("gbps") is not None]
    if both and copy_gbps and matmul_tflops:
        compute = statistics.median(r["tflops"] / matmul_tflops for r in both)
        memory = statistics.median(r["gbps"] / copy_gbps for r in both)
        return ("gbps", "GB/s") if memory > compute else ("tflops", "TFLOP/s")
    if any(r.get("tflops") is not None for r in rows):
        return "tflops", "TFLOP/s"
    if any(r.get("gbps") is not None for r in rows):
        return "gbps", "GB/s"
    return "median_ms", "median ms"


def _op_figures(rows: list[dict], out: Path, plt, copy_gbps: float | None = None,
                matmul_tflops: float | None = None) -> list[Path]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        x_key = next((k for k in X_KEYS if k in r["shape"]), None)
        if x_key is None:
            continue
        rest = {k: v for k, v in r["shape"].items() if k != x_key}
        groups[(r["op"], x_key, shape_label(rest))].append(r)
    paths = []
    for (op, x_key, rest), group in sorted(groups.items()):
        metric, label = _metric(group, copy_gbps, matmul_tflops)
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        by_provider: dict[str, list[dict]] = defaultdict(list)
        for r in group:
            by_provider[r["provider"] + (" (graph)" if r.get("cuda_graph") else "")].append(r)
        for index, (provider, prs) in enumerate(sorted(by_provider.items())):
            prs = sorted((r for r in prs if r.get(metric) is not None), key=lambda r: r["shape"][x_key])
            if prs:
                ax.plot([r["shape"][x_key] for r in prs], [r[metric] for r in prs], label=provider,
                        **line_style(provider, index))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.set_title(f"{op}  {rest}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, the lines
        paths.append(_save(fig, out / f"{op}-{_slug(rest)}.png", plt))
    return paths


def _model_figures(rows: list[dict], out: Path, plt) -> list[Path]:
    paths = []
    for op in MODEL_OPS:
        op_rows = [r for r in rows if r["op"] == op]
        base = {shape_label(r["shape"]): r["median_ms"] for r in op_rows if r["provider"] == speedup_baseline(op)}
        cases = [c for c in dict.fromkeys(shape_label(r["shape"]) for r in op_rows) if c in base]
        providers = sorted({r["provider"] for r in op_rows} - {speedup_baseline(op)})
        if not cases or not providers:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4.5))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            ms = {shape_label(r["shape"]): r["median_ms"] for r in op_rows if r["provider"] == provider}
            speedups = [base[c] / ms[c] if ms.get(c) else 0.0 for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], speedups, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"speedup over {speedup_baseline(op)}")
        ax.set_title(op)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / f"{op}-speedup.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rows(rows: list[dict], out: Path) -> list[Path]:
    """Draw every figure for ``rows`` into ``out``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    newest = latest(rows)
    ok = [r for r in newest if r["status"] == "ok" and r["op"] not in CEILING_OPS]
    ops = [r for r in ok if r["op"] not in MODEL_OPS]
    ceiling = {r["op"]: r for r in newest if r["op"] in ("peak_copy", "peak_matmul") and r["status"] == "ok"}
    copy_gbps = ceiling.get("peak_copy", {}).get("gbps")
    matmul_tflops = ceiling.get("peak_matmul", {}).get("tflops")
    return _op_figures(ops, out, plt, copy_gbps, matmul_tflops) + _model_figures(ok, out, plt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, help="a rows .jsonl file or a results directory")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: next to the rows)")
    args = parser.parse_args(argv)
    out = args.out or (args.rows if args.rows.is_dir() else args.rows.parent)
    paths = plot_rows(read_rows(args.rows), out)
    print(f"{len(paths)} figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
