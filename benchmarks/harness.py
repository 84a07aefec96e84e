"""The benchmark harness: a Case is one op at one shape with its providers; ``run_case`` checks
every provider against the reference, then times the ones that pass.

Tolerance: qwen3x.testing's rule (DESIGN.md section 4), with ``truth`` the reference on
fp32-upcast inputs and ``baseline`` the same-dtype PyTorch computation. Integer outputs (expert
ids, offsets, permutations) must match exactly. A provider that raises or fails the check
gets a 'failed' row with the error and is never timed, unless the case's ``excuse`` accepts the
failure as no fault of the provider's (a whole MoE model routing a token otherwise at a near tie):
that row is 'ok' and timed, its note says what was excused.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from qwen3x.testing import error_pattern
from qwen3x.testing import max_abs_error as _max_abs
from qwen3x.testing import tolerance
from qwen3x.testing import worst as _worst

from .ceilings import Ceilings
from .rows import make_row, shape_label
from .timing import Timer, first_line

SEED = 0
_LOW_PRECISION = (torch.bfloat16, torch.float16)

Inputs = dict  # name -> tensor (or any pre-built object a provider needs)


class Skip(Exception):
    """Raised by a provider's build when it cannot run this case here (reported as 'skipped')."""


@dataclass
class Provider:
    """One implementation of a case's op.

    ``build(inputs)`` does all untimed setup (modules, caches, compilation handles, layout
    changes) and returns the zero-argument call that is checked and timed. ``canon(output)``,
    untimed, converts the call's output to the reference's layout (a tensor or tuple of tensors).
    ``skip`` names why it cannot run here (missing library, memory); it is then never built.
    ``build`` may also raise ``Skip``, and may set a ``note`` attribute on the call it returns
    (and others its case's ``excuse`` reads, as the whole-model cases' ``model``).
    """

    name: str
    build: Callable[[Inputs], Callable[[], Any]]
    canon: Callable[[Any], Any] | None = None
    skip: str | None = None
    note: str = ""
    graphable: bool = True  # False when the call syncs with the host (no CUDA-graph capture)


class Excuse(NamedTuple):
    """What a case's ``excuse`` found about a provider whose output failed the check: ``accepted``
    makes the row 'ok' (timed as usual) with ``note`` saying what was excused; otherwise the row
    stays a wrong answer and ``note`` is added to it."""

    accepted: bool
    note: str


# excuse(call, inputs, got, truth, tolerances): called only when the provider's output ``got``
# (canonicalized, a tuple) failed the check against ``truth``; None when it has nothing to say.
ExcuseFn = Callable[[Callable[[], Any], Inputs, tuple, tuple, list], Excuse | None]


@dataclass
class Case:
    """One op at one shape. ``flops`` / ``bytes`` come from the suite's formulas for the shape."""

    op: str
    shape: dict
    make_inputs: Callable[[torch.device], Inputs]
    reference: Callable[[Inputs], Any]  # the spec: also the truth on upcast inputs by default
    providers: list[Provider]
    flops: float | None = None
    bytes: float | None = None
    truth: Callable[[Inputs], Any] | None = None  # default: reference(upcast(inputs))
    baseline: Callable[[Inputs], Any] | None = None  # default: reference(inputs)
    cuda_graph: bool = False  # time CUDA-graph replays (launch-bound decode shapes)
    tokens: int | None = None  # tokens per call, for tokens_per_s (whole-model rows)
    extra: dict = field(default_factory=dict)  # copied into every row of the case
    # Collect and empty the cache after every provider (else after failures only): for providers
    # that each build large state of their own, possibly in reference cycles (a model copy).
    release_each_provider: bool = False
    excuse: ExcuseFn | None = None  # a failed check that is no fault of the provider's (see Excuse)
    # Row fields that depend on the inputs drawn (the MoE cases: the experts their routing actually
    # touches, and the bytes of those); a "bytes" among them replaces the formula's expectation.
    inputs_fields: Callable[[Inputs], dict] | None = None

    @property
    def label(self) -> str:
        return f"{self.op} {shape_label(self.shape)}" + (" [graph]" if self.cuda_graph else "")


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------
def as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def upcast(inputs: Inputs) -> Inputs:
    """bf16/fp16 tensors to fp32; everything else unchanged."""
    return {
        k: v.float() if isinstance(v, torch.Tensor) and v.dtype in _LOW_PRECISION else v for k, v in inputs.items()
    }


def _tensors(out: Any):
    """The tensors of an output: a tensor, or nested in tuples, lists and dicts (model outputs)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)


POISON_FLOAT_BYTE = 0xFF  # NaN in bf16 / fp16 / fp32 / fp64
POISON_INT_BYTE = 0x7F  # 0x7F7F7F7F in int32: no id, count, offset or slot (-1 is the permutation's padding)


def poison(out: Any, inputs: Inputs) -> None:
    """Fill the memory of every tensor in ``out`` with a value no answer holds (NaN in floats, 0x7F..
    in integers), except memory an input shares (an in-place op's output): the caching allocator
    hands freed blocks of a size to the next request of that size, so a checked answer left in
    memory could otherwise pass the next provider's check for it, one that wrote nothing. (The
    contract with providers: an output is the provider's own memory or one of its inputs.)"""
    kept = {v.untyped_storage().data_ptr() for v in inputs.values() if isinstance(v, torch.Tensor)}
    for t in _tensors(out):
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in kept:
            storage.fill_(POISON_FLOAT_BYTE if t.is_floating_point() or t.is_complex() else POISON_INT_BYTE)


def check(got: Sequence, truth: Sequence, tolerances: Sequence) -> tuple[list, str | None]:
    """(max abs error per output, None) when ``got`` passes, else (errors, what went wrong)."""
    if len(got) != len(truth):
        return [], f"returned {len(got)} outputs, expected {len(truth)}"
    errors = []
    for i, (g, t, tol) in enumerate(zip(got, truth, tolerances)):
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(t.shape):
            shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            return errors, f"output {i}: got shape {shape}, expected {list(t.shape)}"
        if tol is None:
            bad = int((g.to(torch.int64) != t.to(torch.int64)).sum())
            errors.append(bad)
            if bad:
                return errors, (f"output {i}: {bad} of {t.numel()} integer values differ; {_worst(g, t)}; "
                                f"{error_pattern(g, t, None)}")
            continue
        err = _max_abs(g, t) if g.numel() else 0.0
        errors.append(err)
        if not err <= tol:  # also catches NaN
            return errors, (f"output {i}: max abs error {err:.3g} > tolerance {tol:.3g}; {_worst(g, t)}; "
                            f"{error_pattern(g, t, tol)}")
    return errors, None


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rates(case: Case, median_ms: float, ceilings: Ceilings | None) -> dict:
    tflops = case.flops / median_ms / 1e9 if case.flops else None
    gbps = case.bytes / median_ms / 1e6 if case.bytes else None
    out = {"tflops": tflops, "gbps": gbps, "fraction_of_peak": ceilings.fraction(tflops, gbps) if ceilings else None}
    if case.tokens:
        out["tokens_per_s"] = case.tokens / (median_ms / 1e3)
    return out


def run_case(
    case: Case,
    *,
    timer: Timer,
    env: dict,
    ceilings: Ceilings | None = None,
    device: str | torch.device = "cuda",
    providers: Sequence[str] | None = None,
    log: Callable[[str], None] = _log,
) -> list[dict]:
    """Rows for every provider of ``case`` (filtered by name when ``providers`` is given)."""
    chosen = [p for p in case.providers if providers is None or p.name in providers]
    base = {"flops": case.flops, "bytes": case.bytes, "cuda_graph": case.cuda_graph, **case.extra}

    def row(p: Provider, status: str, note: str, **fields) -> dict:
        note = "; ".join(n for n in (p.note, note) if n)
        return make_row(env, case.op, case.shape, p.name, status, note, **{**base, **fields})

    rows = [row(p, "skipped", p.skip) for p in chosen if p.skip]
    runnable = [p for p in chosen if not p.skip]
    if not runnable:
        return rows
    device = torch.device(device)
    with torch.inference_mode():
        setup = _setup(case, device)
        if isinstance(setup, str):
            _release(device)
            return rows + [row(p, "failed", f"case setup failed: {setup}") for p in runnable]
        inputs, truth, tolerances, fields = setup
        del setup
        if fields:
            base.update(fields)
            case.bytes = base["bytes"]
        for p in runnable:
            rows.append(_run_provider(case, p, inputs, truth, tolerances, timer, ceilings, device, row))
            r = rows[-1]
            ms = f"{r['median_ms']:.4f} ms" if r["median_ms"] is not None else r["note"]
            log(f"  {case.label}: {p.name}: {r['status']} {ms}")
            if case.release_each_provider or r["status"] == "failed":
                _release(device)
        del inputs, truth
    # Kernel cases' providers hold tensors, not cycles: a collection per case would cost about
    # 0.2 s (with transformers loaded), a fifth of a typical kernel case.
    _release(device, collect=False)
    return rows


def _release(device: torch.device, collect: bool = True) -> None:
    """Hand back what the last case or provider held. Called where nothing it built can still be
    reached from a live frame: after _setup / _run_provider returned (an exception's traceback
    holds the frames that held the model, until its ``except`` block ends). The collection
    first: objects in reference cycles (Liger binds methods to module instances: a model copy)
    outlive their last reference until the cyclic collector runs, and empty_cache only returns
    segments with nothing alive in them."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _setup(case: Case, device: torch.device) -> tuple | str:
    """(inputs, truth, tolerances, the inputs' row fields), or the first line of what went wrong."""
    try:
        torch.manual_seed(SEED)
        inputs = case.make_inputs(device)
        truth = as_tuple(case.truth(inputs) if case.truth else case.reference(upcast(inputs)))
        baseline = as_tuple(case.baseline(inputs) if case.baseline else case.reference(inputs))
        tolerances = [tolerance(t, b) for t, b in zip(truth, baseline)]
        if case.excuse is None:  # (op cases; a whole model's outputs may hold its cache)
            poison(baseline, inputs)  # a correct answer of the providers' shape, about to be freed
        fields = case.inputs_fields(inputs) if case.inputs_fields is not None else {}
        return inputs, truth, tolerances, fields
    except Exception as exc:  # noqa: BLE001 (reported in the rows)
        return first_line(exc)


def _excuse(case: Case, fn, inputs, got, truth, tolerances) -> Excuse | None:
    """The case's excuse for a failed check, if it has one. The excuse is a diagnosis, not the
    benchmark: its own failure (a model whose routers cannot be observed, memory) leaves the row
    a wrong answer, saying why it could not be excused."""
    if case.excuse is None:
        return None
    try:
        return case.excuse(fn, inputs, got, truth, tolerances)
    except Exception as exc:  # noqa: BLE001 (reported in the row)
        return Excuse(False, f"not excused: {first_line(exc)}")


def _replay_check(case: Case, p: Provider, inputs: Inputs, truth, tolerances):
    """The timer's check of a graph's replay (timing.ReplayCheck): its output poisoned, one replay,
    then the eager call's check. Not for cases with an excuse (the whole models: a near-tie
    routing flip is judged by the excuse, which runs the model eagerly)."""
    if case.excuse is not None:
        return None

    def replay_check(out, replay) -> str | None:
        poison(out, inputs)
        replay()
        torch.cuda.synchronize()
        return check(as_tuple(p.canon(out) if p.canon else out), truth, tolerances)[1]

    return replay_check


def _run_provider(case, p, inputs, truth, tolerances, timer, ceilings, device, row) -> dict:
    """The provider's row. Releases nothing itself: the caller does, once this frame (which holds
    the provider's call and with it its model) and any exception's traceback are gone."""
    cuda = device.type == "cuda"
    if cuda:  # peak_mem_gb: what the provider's setup and run add at their peak (inputs excluded)
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    try:
        fn = p.build(inputs)
        out = fn()
        got = as_tuple(p.canon(out) if p.canon else out)
        errors, problem = check(got, truth, tolerances)
        if not problem and case.excuse is None:  # as the baseline's (a failed answer is excused
            poison(out, inputs)                   # or reported, below)
        del out
    except Skip as exc:
        return row(p, "skipped", str(exc))
    except Exception as exc:  # noqa: BLE001
        return row(p, "failed", first_line(exc))
    checked = {"max_abs_err": errors, "tolerance": tolerances}
    peak_before_excuse = torch.cuda.max_memory_allocated() if cuda else 0
    excuse = _excuse(case, fn, inputs, got, truth, tolerances) if problem else None
    del got
    if cuda and excuse:  # the excuse's own forwards (the truth's among them) are not the provider's
        torch.cuda.reset_peak_memory_stats()
    if problem and not (excuse and excuse.accepted):
        notes = (f"wrong answer: {problem}", excuse.note if excuse else "")
        return row(p, "failed", "; ".join(n for n in notes if n), **checked)
    build_note = getattr(fn, "note", "")
    try:
        graphed = case.cuda_graph and p.graphable
        timing = timer(fn, cuda_graph=True, replay_check=_replay_check(case, p, inputs, truth, tolerances)) \
            if graphed else timer(fn)
    except Exception as exc:  # noqa: BLE001
        return row(p, "failed", f"timing failed: {first_line(exc)}", **checked)
    del fn
    peak = (max(peak_before_excuse, torch.cuda.max_memory_allocated()) - mem_before) / 2**30 if cuda else None
    eager = case.cuda_graph and not p.graphable
    excused = excuse.note if excuse else ""
    notes = (excused, build_note, timing.note, "not graph-capturable (host sync): timed eagerly" if eager else "")
    note = "; ".join(n for n in notes if n)
    return row(
        p,
        "ok",
        note,
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        reps=timing.reps,
        cuda_graph=timing.cuda_graph,
        peak_mem_gb=peak,
        **_rates(case, timing.median_ms, ceilings),
        **checked,
    )
