"""The issues' acceptance targets ("Done when"), judged from a run's rows.

    python -m benchmarks --targets              # run only the cases some target judges
    python -m benchmarks.targets [RESULTS_DIR]  # each target's verdict from a run's rows

Each target names the rows it judges (an op and a shape predicate) and a rule: qwen3x's fraction
of the measured ceiling, qwen3x's speedup over a peer (or over the fastest of several) from the
same run, a sum of qwen3x times, or just that qwen3x rows exist. A target PASSes when every case
it judges passes, FAILs when one does not or when qwen3x failed its correctness check in any of
its cases, and has NO DATA when no case could be judged (a missing or failed peer, shapes not
run). `informational` targets report a figure the issue asks to be reported (the gap to cuDNN)
and pass or fail nothing. The SASS criteria are cmake/sass_check.py's, not these.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .rows import CEILING_OPS, OURS, case_key, shape_label, timed_alike

SDPA = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
UNPATCHED = "hf_eager"  # the model benchmark's unpatched transformers (sdpa, default experts)
DECODE_TOKENS = 64  # issue 4's and 6's decode sizes: 1 to 64 tokens
DECODE_KV_TOKENS = 256 * 1024  # issue 5: batch x context at least 256k
ROUTE_PERMUTE_US = 10.0  # issue 6: router + permutation under 10 us at decode sizes

Shape = dict
Pred = Callable[[Shape], bool]


@dataclass(frozen=True)
class Target:
    issue: int
    text: str  # what is promised, in the issue's words
    op: str
    where: Pred  # which cases of `op` it judges
    rule: str  # "fraction" | "speedup" | "sum_under" | "present"
    bound: float = 0.0  # fraction / speedup at least; for sum_under: microseconds at most
    peers: tuple[str, ...] = ()  # speedup over the fastest of these (each one present counts)
    with_op: str = ""  # sum_under: the op whose qwen3x time adds to `op`'s at the same shape (if any)
    strict: bool = False  # "faster than", "under": the bound itself fails
    informational: bool = False


def _model(*names: str) -> Pred:
    return lambda s: s.get("model") in names


def _all(*preds: Pred) -> Pred:
    return lambda s: all(p(s) for p in preds)


def _tokens(lo: int = 0, hi: int = 1 << 62) -> Pred:
    return lambda s: lo <= s.get("tokens", -1) <= hi


ANY: Pred = lambda s: True  # noqa: E731
PREFILL_4K_16K = _all(_model("Qwen3-4B", "Qwen3-30B-A3B"), lambda s: s.get("batch") == 1,
                      lambda s: 4096 <= s.get("seqlen", 0) <= 16384)
LONG_DECODE = lambda s: s.get("batch", 0) * s.get("context", 0) >= DECODE_KV_TOKENS  # noqa: E731
SHORT_DECODE = lambda s: s.get("batch") == 1 and s.get("context") == 1024  # noqa: E731
BATCH1_8K_DECODE = lambda s: s.get("batch") == 1 and s.get("context") == 8192  # noqa: E731
BATCH1_32K_DECODE = lambda s: s.get("batch") == 1 and s.get("context") == 32768  # noqa: E731
MOE_30B = _model("Qwen3-30B-A3B")

TARGETS = (
    # issue 4: the memory-bound ops
    Target(4, "rms_norm moves >= 90% of the measured copy bandwidth at 16k tokens and more",
           "rms_norm", _tokens(16384), "fraction", 0.90),
    Target(4, "qk_norm_rope moves >= 90% of the measured copy bandwidth at 16k tokens and more",
           "qk_norm_rope", _tokens(16384), "fraction", 0.90),
    Target(4, "qk_norm_rope >= 4x the HF eager chain (above decode sizes)",
           "qk_norm_rope", _tokens(DECODE_TOKENS + 1), "speedup", 4.0, ("hf_eager",)),
    Target(4, "qk_norm_rope >= 1.5x Liger's rope + rms_norm (above decode sizes)",
           "qk_norm_rope", _tokens(DECODE_TOKENS + 1), "speedup", 1.5, ("liger",)),
    Target(4, "qk_norm_rope no slower than any peer at 1 to 64 tokens",
           "qk_norm_rope", _tokens(1, DECODE_TOKENS), "speedup", 1.0,
           ("hf_eager", "liger", "torch_compile")),
    Target(4, "patched model prefill no slower than unpatched, every shape",
           "model_prefill", ANY, "speedup", 1.0, (UNPATCHED,)),
    Target(4, "patched model decode no slower than unpatched, every shape",
           "model_decode", ANY, "speedup", 1.0, (UNPATCHED,)),
    # issue 5: attention
    Target(5, "prefill at 4k-16k tokens (4B, 30B-A3B layouts) >= 1.1x SDPA's flash backend",
           "attention_prefill", PREFILL_4K_16K, "speedup", 1.1, ("sdpa_flash",)),
    Target(5, "prefill at 4k-16k tokens: speedup over SDPA's cuDNN backend (reported)",
           "attention_prefill", PREFILL_4K_16K, "speedup", 1.0, ("sdpa_cudnn",), informational=True),
    Target(5, "prefill at 4k-16k tokens: the overlapped Hopper loop (default) against the serial one (reported)",
           "attention_prefill", PREFILL_4K_16K, "speedup", 1.0, ("qwen3x_serial",), informational=True),
    Target(5, "decode >= 80% of the measured copy bandwidth at batch x context >= 256k",
           "attention_decode", LONG_DECODE, "fraction", 0.80),
    Target(5, "decode at batch 1, context 1k no slower than SDPA (its fastest backend)",
           "attention_decode", SHORT_DECODE, "speedup", 1.0, SDPA),
    Target(5, "decode at batch 1, context 1k: speedup of programmatic dependent launch (reported)",
           "attention_decode", SHORT_DECODE, "speedup", 1.0, ("qwen3x_no_pdl",), informational=True),
    Target(5, "decode at batch 1, context 1k: the default (in-cluster) split combine against the L2 one (reported)",
           "attention_decode", SHORT_DECODE, "speedup", 1.0, ("qwen3x_l2",), informational=True),
    Target(5, "decode at batch 1, context 8k (16 splits in a cluster, 64 through L2): the two combines (reported)",
           "attention_decode", BATCH1_8K_DECODE, "speedup", 1.0, ("qwen3x_l2",), informational=True),
    Target(5, "decode at batch 1, context 32k (the cluster's 16-split cap with 4 kv heads: 64 CTAs): the two combines (reported)",
           "attention_decode", BATCH1_32K_DECODE, "speedup", 1.0, ("qwen3x_l2",), informational=True),
    Target(5, "patched Qwen3-0.6B and Qwen3-4B prefill faster than unpatched",
           "model_prefill", _model("Qwen3-0.6B", "Qwen3-4B"), "speedup", 1.0, (UNPATCHED,), strict=True),
    # issue 6: MoE
    Target(6, "30B-A3B layer at 16k tokens >= 1.5x transformers' grouped_mm experts",
           "moe_layer", _all(MOE_30B, lambda s: s.get("tokens") == 16384), "speedup", 1.5, ("hf_grouped_mm",)),
    Target(6, "decode layer (1 to 64 tokens) >= 70% of the copy bandwidth on the weights touched",
           "moe_layer", _tokens(1, DECODE_TOKENS), "fraction", 0.70),
    Target(6, "decode layer (1 to 64 tokens): speedup of programmatic dependent launch (reported)",
           "moe_layer", _tokens(1, DECODE_TOKENS), "speedup", 1.0, ("qwen3x_no_pdl",), informational=True),
    Target(6, "the router's GEMM at 1 to 16 tokens: moe_gate against F.linear (reported)",
           "moe_gate", _tokens(1, 16), "speedup", 1.0, ("torch_linear",), informational=True),
    Target(6, "router + permutation under 10 us at 1 to 64 tokens (moe_route: what the layer runs)",
           "moe_route", _tokens(1, DECODE_TOKENS), "sum_under", ROUTE_PERMUTE_US, strict=True),
    Target(6, "router + permutation as the two separate ops, for comparison",
           "moe_router", _tokens(1, DECODE_TOKENS), "sum_under", ROUTE_PERMUTE_US, with_op="moe_permute",
           strict=True, informational=True),
    Target(6, "235B-A22B layer shape benchmarked",
           "moe_layer", _model("Qwen3-235B-A22B"), "present"),
    Target(6, "patched 30B-A3B-shaped model prefill faster than unpatched",
           "model_prefill", MOE_30B, "speedup", 1.0, (UNPATCHED,), strict=True),
    Target(6, "patched 30B-A3B-shaped model decode faster than unpatched",
           "model_decode", MOE_30B, "speedup", 1.0, (UNPATCHED,), strict=True),
)


def judged_ops() -> set[str]:
    return {t.op for t in TARGETS} | {t.with_op for t in TARGETS if t.with_op}


def wanted(op: str, shape: Shape) -> bool:
    """Whether some target judges this case (so `python -m benchmarks --targets` runs it)."""
    return any(op in (t.op, t.with_op) and t.where(shape) for t in TARGETS)


@dataclass
class Verdict:
    target: Target
    status: str  # "PASS" | "FAIL" | "NO DATA" | "INFO"
    judged: int  # cases judged
    worst: float | None  # the worst case's value (fraction, speedup or microseconds)
    worst_shape: str
    missing: int  # cases of the target's shapes that could not be judged


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(op, shape) -> provider -> the row (timed ones only)."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms"):
            out.setdefault(case_key(r), {})[r["provider"]] = r
    return out


def _value(t: Target, by: dict[str, dict], groups: dict, shape: Shape) -> float | None:
    ours = by.get(OURS)
    if ours is None:
        return None
    if t.rule == "fraction":
        return ours.get("fraction_of_peak")
    if t.rule == "speedup":  # against peers timed as ours was (rows.timed_alike)
        peers = [by[p]["median_ms"] for p in t.peers if p in by and timed_alike(by[p], ours)]
        return min(peers) / ours["median_ms"] if peers else None
    if t.rule == "sum_under":  # plus with_op's case whose shape agrees on every key of this one's
        if not t.with_op:
            return 1e3 * ours["median_ms"]
        others = [by_other[OURS] for (op, key), by_other in groups.items()
                  if op == t.with_op and OURS in by_other and json.loads(key).items() >= shape.items()]
        return 1e3 * (ours["median_ms"] + others[0]["median_ms"]) if len(others) == 1 else None
    if t.rule == "present":
        return 1.0
    raise ValueError(t.rule)


def _passes(t: Target, value: float) -> bool:
    if t.rule == "sum_under":
        return value < t.bound if t.strict else value <= t.bound
    return value > t.bound if t.strict else value >= t.bound


def evaluate(rows: list[dict]) -> list[Verdict]:
    groups = _groups(rows)
    seen: dict[tuple, dict] = {case_key(r): r["shape"] for r in rows}  # every case the run has rows of
    ours_failed = {case_key(r) for r in rows if r["provider"] == OURS and r.get("status") == "failed"}
    verdicts = []
    for t in TARGETS:
        cases = [(k, shape) for k, shape in seen.items() if k[0] == t.op and t.where(shape)]
        failed = [shape for k, shape in cases if k in ours_failed]
        if failed and not t.informational:  # a wrong answer is never "not judged"
            verdicts.append(Verdict(t, "FAIL", len(cases), None, f"qwen3x failed at {shape_label(failed[0])}",
                                    0))
            continue
        judged, missing, worst, worst_shape = 0, 0, None, ""
        for key, shape in cases:
            value = _value(t, groups.get(key, {}), groups, shape)
            if value is None:
                missing += 1
                continue
            judged += 1
            worse = worst is None or (value > worst if t.rule == "sum_under" else value < worst)
            if worse:
                worst, worst_shape = value, shape_label(shape)
        if judged == 0:
            status = "NO DATA"
        elif t.informational:
            status = "INFO"
        else:
            status = "PASS" if _passes(t, worst) else "FAIL"
        verdicts.append(Verdict(t, status, judged, worst, worst_shape, missing))
    return verdicts


def _fmt(t: Target, value: float | None) -> str:
    if value is None:
        return ""
    return {"fraction": f"{100 * value:.0f}%", "speedup": f"{value:.2f}x", "sum_under": f"{value:.1f} us",
            "present": "yes"}[t.rule]


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = ["| issue | target | verdict | worst case | at | cases judged (not judged) |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| #{v.target.issue} | {v.target.text} | {v.status} | {_fmt(v.target, v.worst)} | "
                     f"{v.worst_shape} | {v.judged} ({v.missing}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .readme import layered_rows, newest_run

    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a results directory (default: the newest)")
    args = parser.parse_args(argv)
    run = (args.run or newest_run()).resolve()
    # each case from the newest run beside this one that measured it, as README's table shows it
    rows = [r for _, layer in layered_rows(run) for r in layer if r["op"] not in CEILING_OPS]
    print(format_verdicts(evaluate(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
