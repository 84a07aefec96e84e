"""The tolerance rule of qwen3x, written once (../shared/DESIGN.md section 4).

A result is judged against a high-precision "truth" (the reference on fp64 or fp32 inputs): its
max abs error may be at most RATIO x the error of the same-dtype PyTorch computation (the
"baseline"), plus the rounding error of the truth in the result's dtype (the unavoidable part),
plus ABS_FLOOR. Integer outputs (expert ids, offsets, permutations) must match exactly. Failures
name the worst elements. Used by the tests and by the benchmark suite's correctness check.
"""

from __future__ import annotations

import torch

from ._library import wgmma_available  # noqa: F401  (the GPU tests' skip condition)

RATIO = 2.0
ABS_FLOOR = 1e-6


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def tolerance(truth: torch.Tensor, baseline: torch.Tensor) -> float | None:
    """Allowed max abs error of a result in baseline's dtype; None means 'must match exactly'."""
    if not truth.is_floating_point():
        return None
    rounding = max_abs_error(truth.to(baseline.dtype), truth)
    return RATIO * max_abs_error(baseline, truth) + rounding + ABS_FLOOR


def worst(got: torch.Tensor, want: torch.Tensor, n: int = 3) -> str:
    """The n elements where got and want differ most, as text."""
    diff = (got.double() - want.double()).abs().nan_to_num(float("inf")).flatten()
    rows = []
    for i in torch.topk(diff, min(n, diff.numel())).indices.tolist():
        index = [int(j) for j in torch.unravel_index(torch.tensor(i), want.shape)]
        rows.append(f"at {index}: got {got.flatten()[i].item():.6g}, expected {want.flatten()[i].item():.6g}")
    return "; ".join(rows)


def check(got: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, extra_floor: float = 0.0) -> str | None:
    """None when ``got`` passes the rule, else what went wrong."""
    if tuple(got.shape) != tuple(truth.shape):
        return f"shape {list(got.shape)}, expected {list(truth.shape)}"
    tol = tolerance(truth, baseline)
    if tol is None:
        bad = int((got.to(torch.int64) != truth.to(torch.int64)).sum())
        return f"{bad} of {truth.numel()} integer values differ; {worst(got, truth)}" if bad else None
    err = max_abs_error(got, truth)
    if not err <= tol + extra_floor:  # also catches NaN
        return (f"max abs error {err:.3g} > {RATIO:g} x baseline error {max_abs_error(baseline, truth):.3g} "
                f"+ rounding + floor = {tol + extra_floor:.3g}; {worst(got, truth)}")
    return None


def assert_close_to_truth(got, baseline, truth, extra_floor: float = 0.0) -> None:
    problem = check(got, baseline, truth, extra_floor)
    assert problem is None, problem


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |got - expected| <= rel * max |expected| (the model-parity rule)."""
    err, scale = max_abs_error(got, expected), expected.double().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x max |expected| {scale:.3g}; {worst(got, expected)}"


# PyTorch's caching allocator serves requests of at most 1 MiB from a pool of its own (2 MiB
# segments) and larger ones from another; a poisoned block must sit in the pool the output will
# come from.
_SMALL_REQUEST_BYTES = 1 << 20
_SMALL_POISON_BLOCKS = 16


def poison_allocator(nbytes: int, device: str = "cuda") -> None:
    """Leave freed NaN-filled blocks in both pools of the caching allocator, at least ``nbytes`` in
    the large one, so that the next allocations (a kernel's outputs) start as NaN and an element
    the kernel forgets to write shows up. Also NaN for integer outputs read as float bits: they
    fail exact comparisons."""
    nan = float("nan")
    torch.empty(max(nbytes, _SMALL_REQUEST_BYTES + 1) // 4 + 1024, dtype=torch.float32, device=device).fill_(nan)
    small = [torch.empty(_SMALL_REQUEST_BYTES // 4, dtype=torch.float32, device=device).fill_(nan)
             for _ in range(_SMALL_POISON_BLOCKS)]
    del small
