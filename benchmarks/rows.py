"""Result rows: one JSON object per line, the run's environment, the printed table."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Iterable

import torch

# Every row carries these keys (None where a value is not defined for the row).
REQUIRED_KEYS = (
    "device",
    "git_sha",
    "timestamp",
    "torch",
    "cuda",
    "transformers",
    "op",
    "shape",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "tflops",
    "gbps",
    "fraction_of_peak",
    "status",
    "note",
)
STATUSES = ("ok", "failed", "skipped")
# The rows benchmarks.ceilings writes at the start of a run (the device's two ceilings, and copies as
# short as the memory-bound ops' calls): measurements of the device, not cases of an op.
CEILING_OPS = ("peak_copy", "peak_matmul", "copy", "read", "launch_floor")
OURS = "qwen3x"  # our provider; qwen3x_<variant> are A/B rows of our own (benchmarks/providers.py)
SHAPE_KEYS = ("model", "tokens", "batch", "seqlen", "context", "hidden", "hq", "hkv", "experts", "topk", "inter")


def _git_sha() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


MAINLOOP_SETTINGS = {"attention": "QWEN3X_ATTENTION_MAINLOOP", "moe": "QWEN3X_MOE_MAINLOOP"}


def environment() -> dict:
    """What every row of this run shares: device, versions, git sha, and the mainloop qwen3x runs
    for prefill-shaped attention and MoE calls ("wgmma" / "mma_sync": csrc/core/mainloop_choice.h
    with this process's settings)."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers_version,
        "prefill_mainloop": _prefill_mainloops(),
    }


def _prefill_mainloops() -> dict:
    from qwen3x._library import wgmma_available  # noqa: PLC0415

    hopper = wgmma_available()
    return {family: "wgmma" if hopper and os.environ.get(var, "auto") != "mma_sync" else "mma_sync"
            for family, var in MAINLOOP_SETTINGS.items()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def make_row(env: dict, op: str, shape: dict, provider: str, status: str, note: str = "", **fields) -> dict:
    """A row with every required key; ``fields`` adds timings, rates and extras."""
    assert status in STATUSES, status
    row = {key: None for key in REQUIRED_KEYS}
    row.update(env)
    row.update(timestamp=now(), op=op, shape=dict(shape), provider=provider, status=status, note=note)
    row.update(fields)
    return row


def shape_label(shape: dict) -> str:
    """'tokens=4096 hidden=2048' in a fixed key order (SHAPE_KEYS first, then the rest)."""
    keys = [k for k in SHAPE_KEYS if k in shape] + sorted(k for k in shape if k not in SHAPE_KEYS)
    return " ".join(f"{k}={shape[k]}" for k in keys)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


class RowWriter:
    """Appends rows to a .jsonl file as they come (a run cut short keeps what it measured)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        row = _json_safe(row)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    """Rows from a .jsonl file, or from every .jsonl file in a directory."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def default_results_dir(device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"
    return Path(__file__).resolve().parent / "results" / f"{datetime.date.today().isoformat()}-{slug}"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


# The provider each op's speedup column divides by.
SPEEDUP_BASELINE = {"model_prefill": "hf_eager", "model_decode": "hf_eager"}


def speedup_baseline(op: str) -> str:
    return SPEEDUP_BASELINE.get(op, "reference")


def timed_alike(a: dict, b: dict) -> bool:
    """Whether two rows were timed the same way (both CUDA-graph replays, or both eager calls): a
    graph replay pays the graph's launch, an eager call's launch hides behind the flush, so only
    such rows compare."""
    return bool(a.get("cuda_graph")) == bool(b.get("cuda_graph"))


def case_key(row: dict) -> tuple:
    return row["op"], json.dumps(row["shape"], sort_keys=True)


def format_table(rows: Iterable[dict]) -> str:
    """One line per row; 'speedup' is the baseline provider's median over this row's (same case)."""
    rows = list(rows)
    base_ms = {
        case_key(r): r["median_ms"] for r in rows if r["provider"] == speedup_baseline(r["op"]) and r["status"] == "ok"
    }
    header = ("op", "shape", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "GB/s", "% peak", "speedup", "status")
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        base = base_ms.get(case_key(r))
        note = r["status"] if not r.get("note") else f"{r['status']}: {r['note']}"
        lines.append(
            (
                r["op"],
                shape_label(r["shape"]) + (" [graph]" if r.get("cuda_graph") else ""),
                r["provider"],
                _fmt(r["median_ms"], ".4f"),
                f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if ok and r.get("p20_ms") is not None else "",
                _fmt(r.get("tflops"), ".1f"),
                _fmt(r.get("gbps"), ".0f"),
                _fmt(None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"], ".0f"),
                f"{base / r['median_ms']:.2f}" if ok and base and r["median_ms"] else "",
                note[:100],
            )
        )
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)
