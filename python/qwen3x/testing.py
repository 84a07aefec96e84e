"""The tolerance rule of qwen3x, written once (../shared/DESIGN.md section 4).

A result is judged against a high-precision "truth" (the reference on fp64 or fp32 inputs): its
max abs error may be at most RATIO x the error of the same-dtype PyTorch computation (the
"baseline"), plus the rounding error of the truth in the result's dtype (the unavoidable part),
plus ABS_FLOOR. Integer outputs (expert ids, offsets, permutations) must match exactly. Failures
name the worst elements. Used by the tests and by the benchmark suite's correctness check.

For MoE models also the routing rule (``routing_agreement``): which tokens a candidate model
routes to other experts than the truth, and whether only at near ties of the router probabilities
(excused: the logits of those tokens are left out) or at a decided gap (a fault).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ._library import wgmma_available  # noqa: F401  (the GPU tests' skip condition)

RATIO = 2.0
ABS_FLOOR = 1e-6


SMOKE_FAILED_ENV = "QWEN3X_SMOKE_FAILED"  # tests/wgmma_smoke.py: A/B settings that failed there


def smoke_failed(setting: str) -> str | None:
    """Why a GPU test or benchmark provider of an A/B setting (an environment variable such as
    QWEN3X_ATTENTION_OVERLAP) must not run here, or None: `make gpu`'s smoke step ran the setting
    in a process of its own and it failed or hung (its log says how), so a test or a timed run in
    a shared process would only hang or poison the CUDA context for everything after it."""
    failed = [s for s in os.environ.get(SMOKE_FAILED_ENV, "").split(",") if s]
    return f"{setting}: FAILED in the smoke run (tests/wgmma_smoke.py; its log)" if setting in failed else None


def cache_keyword() -> str:
    """The name under which the installed transformers' models take their cache (and return it):
    ``cache`` from 5.24 on, ``past_key_values`` before (deprecated in 5.24, removed in 5.40)."""
    import transformers

    release = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    return "cache" if release >= (5, 24) else "past_key_values"


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def tolerance(truth: torch.Tensor, baseline: torch.Tensor) -> float | None:
    """Allowed max abs error of a result in baseline's dtype; None means 'must match exactly'."""
    if not truth.is_floating_point():
        return None
    rounded = truth.to(baseline.dtype)
    rounding = max_abs_error(rounded, truth)
    if rounded is not truth:
        # a correct answer in the results' dtype and shape, about to be freed: poisoned, so that a
        # result allocated next and never written (torch.empty) cannot inherit it from the allocator
        rounded.fill_(float("nan"))
    return RATIO * max_abs_error(baseline, truth) + rounding + ABS_FLOOR


def worst(got: torch.Tensor, want: torch.Tensor, n: int = 3) -> str:
    """The n elements where got and want differ most, as text."""
    diff = (got.double() - want.double()).abs().nan_to_num(float("inf")).flatten()
    rows = []
    values, indices = torch.topk(diff, min(n, diff.numel()))
    for i in indices[values > 0].tolist():
        index = [int(j) for j in torch.unravel_index(torch.tensor(i), want.shape)]
        rows.append(f"at {index}: got {got.flatten()[i].item():.6g}, expected {want.flatten()[i].item():.6g}")
    return "; ".join(rows)


# Where the bad elements are, per dimension: a kernel's layout bug (a wrong fragment, swizzle or
# tile offset) shows as a pattern (the second 64 columns, every other 8 rows), and a failing GPU
# run may be the only one a session gets, so its log must say enough to find the bug without it.
_PATTERN_RANGES = 4  # index ranges shown per dimension before looking for a period
_PATTERN_PERIODS = (2, 4, 8, 16, 32, 64, 128, 256)


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints as inclusive (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _runs_text(runs: list[tuple[int, int]]) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:_PATTERN_RANGES])
    return shown + (f", ... ({len(runs)} runs)" if len(runs) > _PATTERN_RANGES else "")


def _describe_indices(mask: torch.Tensor) -> str:
    """A 1-D bool mask (which indices of a dimension hold a bad element) in a few words."""
    size, count = mask.numel(), int(mask.sum())
    if count == size:
        return "all"
    runs = _ranges(torch.nonzero(mask).flatten().tolist())
    if len(runs) > _PATTERN_RANGES:
        for period in _PATTERN_PERIODS:
            if 2 * period > size:
                break
            if torch.equal(mask[period:], mask[:-period]):
                residues = _ranges(torch.nonzero(mask[:period]).flatten().tolist())
                return f"{count} of {size}: index mod {period} in {_runs_text(residues)}"
    return f"{count} of {size}: {_runs_text(runs)}"


def error_pattern(got: torch.Tensor, want: torch.Tensor, tol: float | None) -> str:
    """Which elements of ``got`` are out of tolerance (all of them differing, for tol None): how
    many, how many are NaN (a poisoned output element never written, or a NaN produced), and for
    each dimension the indices that hold one."""
    if tol is None:
        bad = got.to(torch.int64) != want.to(torch.int64)
    else:
        bad = ~((got.double() - want.double()).abs() <= tol)
    count = int(bad.sum())
    if count == 0:
        return "no element out of tolerance"
    nans = int(torch.isnan(got).sum()) if got.is_floating_point() else 0
    parts = [f"{count} of {bad.numel()} elements bad ({count / bad.numel():.1%}), {nans} NaN"]
    for d in range(bad.dim()):
        others = [i for i in range(bad.dim()) if i != d]
        mask = bad.any(dim=others) if others else bad
        parts.append(f"dim {d}: {_describe_indices(mask.cpu())}")
    return "; ".join(parts)


def check(got: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, extra_floor: float = 0.0) -> str | None:
    """None when ``got`` passes the rule, else what went wrong."""
    if tuple(got.shape) != tuple(truth.shape):
        return f"shape {list(got.shape)}, expected {list(truth.shape)}"
    tol = tolerance(truth, baseline)
    if tol is None:
        bad = int((got.to(torch.int64) != truth.to(torch.int64)).sum())
        return (f"{bad} of {truth.numel()} integer values differ; {worst(got, truth)}; "
                f"{error_pattern(got, truth, None)}") if bad else None
    err = max_abs_error(got, truth)
    if not err <= tol + extra_floor:  # also catches NaN
        return (f"max abs error {err:.3g} > {RATIO:g} x baseline error {max_abs_error(baseline, truth):.3g} "
                f"+ rounding + floor = {tol + extra_floor:.3g}; {worst(got, truth)}; "
                f"{error_pattern(got, truth, tol + extra_floor)}")
    return None


def assert_close_to_truth(got, baseline, truth, extra_floor: float = 0.0) -> None:
    problem = check(got, baseline, truth, extra_floor)
    assert problem is None, problem


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str = "results") -> None:
    """Equal tensors (repeated runs, untouched memory, values copied as they are; NaN where the
    other has NaN counts as equal, as the rows a kernel marks NaN must); a failure says where they
    differ."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
    same = torch.equal(got, want)
    if not same and want.is_floating_point():
        same = bool(((got == want) | (got.isnan() & want.isnan())).all())
    if not same:
        tol = 0.0 if want.is_floating_point() else None
        raise AssertionError(f"{what} differ: {worst(got, want)}; {error_pattern(got, want, tol)}")


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |got - expected| <= rel * max |expected| (the model-parity rule)."""
    err, scale = max_abs_error(got, expected), expected.double().abs().max().item()
    assert err <= rel * scale, (f"max error {err:.3g} > {rel:g} x max |expected| {scale:.3g}; {worst(got, expected)}; "
                                f"{error_pattern(got, expected, rel * scale)}")


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


# ---------------------------------------------------------------------------------------------
# MoE routing at near ties
# ---------------------------------------------------------------------------------------------
# A token whose k-th and (k+1)-th router probabilities (the truth's) nearly tie may be routed
# either way by any bf16 computation, and other experts give other outputs: a different top-k set
# there is no kernel's error, so logits comparisons leave such tokens out. "Nearly" is the
# tolerance rule's RATIO applied to routing: a gap under NEAR_TIE_NOISE times the unpatched bf16
# model's router error at that token. A different pick at a decided gap is a fault.
NEAR_TIE_NOISE = RATIO
MAX_EXCUSED = 0.25  # at most this fraction of the compared tokens may be excused (the GPU tests' bound)
ROUTER_MODULE_SUFFIX = "mlp.gate"  # Qwen3-MoE's router: Qwen3MoeTopKRouter (5.x), nn.Linear (4.57)


@dataclass
class RoutingAgreement:
    """A candidate model's top-k expert sets against the truth's, per token (the router
    probabilities' leading dimensions: [B, S] from ``router_probs``): in how many MoE layers it
    picked another set at a near tie (excused) and at a decided gap (a fault)."""

    near_ties: torch.Tensor  # int64 per token
    decisive: torch.Tensor  # int64 per token
    layers: int  # MoE layers compared

    @property
    def agrees(self) -> torch.Tensor:
        """bool per token: the truth's top-k set in every MoE layer."""
        return (self.near_ties == 0) & (self.decisive == 0)

    @property
    def excused(self) -> torch.Tensor:
        """bool per token: routed otherwise, but only at near ties."""
        return (self.near_ties > 0) & (self.decisive == 0)

    @property
    def decisive_flips(self) -> list[list[int]]:
        """Indices of the tokens routed otherwise at a decided gap in some layer."""
        return (self.decisive > 0).nonzero().tolist()


@contextlib.contextmanager
def recording_router_probs(model):
    """Within the block, each forward of an MoE layer's router appends the fp32 router
    probabilities (softmax of its logits, as HF routes) of the tokens it sees, [T, E], to the
    list it yields: layer by layer, in call order."""
    found: list[torch.Tensor] = []

    def hook(module, args, out):
        logits = out[0] if isinstance(out, tuple) else out  # 5.x: (logits, weights, ids)
        found.append(logits.float().softmax(-1))

    hooks = [m.register_forward_hook(hook) for name, m in model.named_modules() if name.endswith(ROUTER_MODULE_SUFFIX)]
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


def router_probs(model, ids: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Per MoE layer, [*ids.shape, E] fp32 router probabilities of one forward over ``ids``
    (``kw`` passed on to the model); an empty list for a dense model."""
    with torch.no_grad(), recording_router_probs(model) as found:
        model(ids, **kw)
    return [p.view(*ids.shape, -1) for p in found]


def compare_routing(truth: list, baseline: list, candidate: list, k: int, shape=None) -> RoutingAgreement:
    """The near-tie rule on per-layer router probabilities [..., E] of the same tokens: the fp32
    truth's, the unpatched bf16 model's (which measures bf16's router noise at each token) and the
    candidate's. ``shape``: the tokens' leading shape where there are no MoE layers."""
    if not len(truth) == len(baseline) == len(candidate):
        raise ValueError(f"router outputs of {len(truth)}, {len(baseline)} and {len(candidate)} MoE layers "
                         "(truth, baseline, candidate): a model whose routers were not seen")
    shape = tuple(truth[0].shape[:-1]) if truth else tuple(shape)
    device = truth[0].device if truth else None
    near_ties = torch.zeros(shape, dtype=torch.int64, device=device)
    decisive = torch.zeros_like(near_ties)
    for p_truth, p_bf16, p_cand in zip(truth, baseline, candidate):
        top = p_truth.topk(k + 1, dim=-1)
        picked = p_cand.to(p_truth.device).topk(k, dim=-1).indices.sort(-1).values
        other = (picked != top.indices[..., :k].sort(-1).values).any(-1)
        gap = top.values[..., k - 1] - top.values[..., k]
        near = gap < NEAR_TIE_NOISE * (p_bf16.to(p_truth.device) - p_truth).abs().amax(-1)
        near_ties += other & near
        decisive += other & ~near
    return RoutingAgreement(near_ties, decisive, len(truth))


def routing_agreement(truth, baseline, candidate, ids: torch.Tensor, **kw) -> RoutingAgreement:
    """compare_routing on one forward of each model over ``ids`` (``kw`` passed on): all tokens
    agree for a dense model."""
    k = getattr(truth.config, "num_experts_per_tok", 0)
    probs = [router_probs(m, ids, **kw) for m in (truth, baseline, candidate)]
    if (k == 0) != (len(probs[0]) == 0):
        raise ValueError(f"{len(probs[0])} MoE router outputs seen for num_experts_per_tok={k}")
    return compare_routing(*probs, k, shape=ids.shape)
