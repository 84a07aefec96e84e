"""The benchmark suite (benchmarks/): formulas, rows, the check-then-time harness, plots, the CLI.

CPU tests run everywhere in a few seconds; the GPU quick run carries the ``gpu`` marker.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import runpy
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import ceilings, harness, model, providers, rows, run  # noqa: E402
from benchmarks.harness import Case, Provider, Skip  # noqa: E402
from benchmarks.shapes import QWEN3_0_6B, QWEN3_30B_A3B, ModelDims  # noqa: E402
from benchmarks.suites import SUITES, activation, attention, moe, norm, rope  # noqa: E402
from benchmarks.timing import Timing, percentile  # noqa: E402
from qwen3x.testing import router_probs  # noqa: E402

ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])}
ALL_OPS = (
    "rms_norm qk_norm_rope silu_and_mul attention_prefill attention_varlen attention_decode qk_norm_rope_attention "
    "moe_gate moe_router moe_permute moe_route moe_experts moe_layer model_prefill model_decode"
).split()


class FakeTimer:
    """Records what it was asked to time; every timing is 1 ms."""

    def __init__(self):
        self.timed = []

    def __call__(self, fn, cuda_graph=False, replay_check=None):
        self.timed.append(fn)
        return Timing(median_ms=1.0, p20_ms=0.9, p80_ms=1.1, reps=10, cuda_graph=cuda_graph)


def run_cpu(case, providers=None):
    timer = FakeTimer()
    out = harness.run_case(
        case, timer=timer, env=rows.environment(), device="cpu", providers=providers, log=lambda m: None
    )  # fmt: skip
    return {r["provider"]: r for r in out}, timer


# ---------------------------------------------------------------------------------------------
# FLOP and byte formulas on known shapes (numbers worked out by hand)
# ---------------------------------------------------------------------------------------------
def test_elementwise_formulas():
    assert norm.rms_norm_bytes(1, 1024) == 2 * 1024 * 2 + 1024 * 2 == 6144
    assert norm.rms_norm_bytes(4096, 2048) == 33_558_528
    # q+k = 24 heads * 128 * 2 B, read and written = 12288; positions 8; weights 512; inv_freq 256
    assert rope.qk_norm_rope_bytes(1, 16, 8) == 13_064
    assert activation.silu_and_mul_bytes(1, 3072) == 18_432


def test_attention_formulas():
    assert attention.causal_pairs(4, 4) == 10
    assert attention.causal_pairs(2, 5) == 4 + 5
    assert attention.causal_pairs(1, 1024) == 1024
    # 4 * 32 heads * 128 * (1024 * 1025 / 2 pairs)
    assert attention.attention_flops(1, 32, 1024, 1024) == 8_598_323_200
    # 2 B * 128 * (q + out: 2 * 32 * 1024, k + v: 2 * 8 * 1024)
    assert attention.attention_bytes(1, 32, 8, 1024, 1024) == 20_971_520
    assert attention.attention_flops(1, 32, 1, 1024) == 16_777_216
    assert attention.attention_bytes(1, 32, 8, 1, 1024) == 4_210_688
    assert attention.kv_bytes(64, 8, 32768) == 8 * 2**30
    # causal pairs 3 + 1 + 6 = 10 (lengths 2, 1, 3) -> 4 * 4 heads * 128 * 10
    assert attention.varlen_flops((2, 1, 3), 4) == 20_480


def test_moe_formulas():
    assert moe.experts_touched(1, 128, 8) == pytest.approx(8)
    assert moe.experts_touched(10**6, 128, 8) == pytest.approx(128)
    assert moe.moe_router_bytes(1, 128, 8) == 256 + 48 + 512
    assert moe.moe_permute_bytes(1, 128, 8) == 4 * (8 + 8 + 129 + 8)
    assert moe.moe_experts_flops(1, 8, 2048, 768) == 75_497_472  # 6 * 8 * 2048 * 768
    # 8 experts * 3 * 2048 * 768 * 2 B + x and out (8192) + ids and weights (48)
    assert moe.moe_experts_bytes(1, 128, 8, 2048, 768) == pytest.approx(75_505_712)
    assert moe.moe_layer_flops(1, 128, 8, 2048, 768) == 75_497_472 + 2 * 2048 * 128
    # the experts a case's routing actually touches: 16 tokens whose picks hit 80 of the 128 experts
    ids = torch.arange(16 * 8).reshape(16, 8) % 80
    fields = moe._touched_fields(QWEN3_30B_A3B, 16, ids, layer=True)
    assert fields["experts_touched"] == 80
    assert fields["bytes"] == pytest.approx(80 * 3 * 2048 * 768 * 2 + 2 * 16 * 2048 * 2 + 16 * 8 * 6 + 128 * 2048 * 2)


def test_input_dependent_fields_replace_the_formula_in_the_rows():
    """Case.inputs_fields (the MoE cases' experts touched): computed from the inputs drawn, written
    into every row of the case, its "bytes" behind gbps."""
    good = Provider("reference", lambda x: lambda: (x["x"] * 2, x["w"] + 1))
    case = _toy_case([good])
    case.inputs_fields = lambda x: {"bytes": 1024, "experts_touched": int(x["w"].numel())}
    by, _ = run_cpu(case)
    r = by["reference"]
    assert (r["bytes"], r["experts_touched"]) == (1024, 4) and r["gbps"] == pytest.approx(1024 / 1.0 / 1e6)


def test_model_and_ceiling_formulas():
    # attention 1024 * 32 * 128 + 16 * 128 * 1024 = 6291456, MLP 3 * 1024 * 3072 = 9437184
    assert model.active_layer_params(QWEN3_0_6B) == 15_728_640
    # 2 * (28 layers * 15728640 + LM head 1024 * 151936) + 28 * 4 * 16 * 128 * 2048
    assert model.decode_flops(QWEN3_0_6B, 1, 2048) == 1_661_730_816
    assert model.prefill_flops(QWEN3_0_6B, 1, 2048) == 2_285_468_647_424
    assert model.decode_bytes(QWEN3_0_6B, 1, 2048) == 1_427_079_168
    assert ceilings.copy_bytes(2**30) == 2**31
    assert ceilings.matmul_flops(8192, 8192, 8192) == 1_099_511_627_776
    peak = ceilings.Ceilings(copy_gbps=3000.0, matmul_tflops=800.0)
    assert peak.fraction(400.0, 600.0) == pytest.approx(0.5)
    assert peak.fraction(None, 1500.0) == pytest.approx(0.5)
    assert ceilings.Ceilings().fraction(1.0, 1.0) is None


def test_percentile():
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    assert percentile([7.0], 80) == 7.0


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def test_row_schema(tmp_path):
    row = rows.make_row(rows.environment(), "rms_norm", {"tokens": 1, "hidden": 1024}, "qwen3x", "ok", median_ms=0.1)
    assert set(rows.REQUIRED_KEYS) <= set(row)
    writer = rows.RowWriter(tmp_path / "rows.jsonl")
    writer.write(row)
    (back,) = rows.read_rows(tmp_path)
    assert back["shape"] == {"tokens": 1, "hidden": 1024} and back["status"] == "ok"
    with pytest.raises(AssertionError):
        rows.make_row({}, "rms_norm", {}, "qwen3x", "great")
    assert "rms_norm" in rows.format_table([back])


# ---------------------------------------------------------------------------------------------
# Harness: check before timing, failures never timed
# ---------------------------------------------------------------------------------------------
def _toy_case(providers, cuda_graph=False):
    def make_inputs(device):
        return {"x": torch.randn(8, 16, device=device).to(torch.bfloat16), "w": torch.arange(4, device=device)}

    def ref(x):
        return x["x"] * 2, x["w"] + 1

    return Case(
        "rms_norm", {"tokens": 8, "hidden": 16}, make_inputs, ref, providers, bytes=512, cuda_graph=cuda_graph
    )  # fmt: skip


def _raise(x):
    raise RuntimeError("kernel exploded")


def _skip(x):
    raise Skip("not on this device")


def test_a_provider_that_writes_nothing_fails_even_where_a_checked_answer_was_freed():
    """The baseline and each passing provider's output are poisoned before they are freed: an
    output from torch.empty that nothing writes cannot inherit a correct answer from the allocator
    (before: such a provider passed at 64 x 1024 on the CPU)."""
    def make_inputs(device):
        return {"x": torch.randn(64, 1024, device=device).to(torch.bfloat16)}

    writes_nothing = Provider("qwen3x", lambda x: lambda: torch.empty(64, 1024, dtype=torch.bfloat16))
    good = Provider("reference", lambda x: lambda: x["x"] * 2)
    case = Case("rms_norm", {"tokens": 64, "hidden": 1024}, make_inputs, lambda x: x["x"] * 2,
                [good, writes_nothing], bytes=1)
    by, _ = run_cpu(case)
    assert by["reference"]["status"] == "ok"
    assert by["qwen3x"]["status"] == "failed" and "wrong answer" in by["qwen3x"]["note"]


def test_poison_spares_memory_an_input_shares():
    x = torch.ones(4, 4)
    out = (x[:2], torch.ones(3, dtype=torch.int32), {"logits": torch.ones(2)})
    harness.poison(out, {"x": x})
    assert (x == 1).all()  # an in-place op's output is its input: left alone
    assert (out[1] == 0x7F7F7F7F).all() and torch.isnan(out[2]["logits"]).all()  # -1 is an answer (padding)


def test_a_graph_replay_is_checked_after_its_output_is_poisoned(monkeypatch):
    """harness._replay_check: the replay must rewrite the graph's output (poisoned first) with a
    passing answer; the timer fails the timing on its answer (timing.ReplayMismatch)."""
    good = Provider("qwen3x", lambda x: lambda: (x["x"] * 2, x["w"] + 1))
    case = _toy_case([good], cuda_graph=True)
    inputs, truth, tolerances, _ = harness._setup(case, torch.device("cpu"))
    check = harness._replay_check(case, good, inputs, truth, tolerances)
    out = (inputs["x"] * 2, inputs["w"] + 1)

    def rewrites():
        out[0].copy_(inputs["x"] * 2)
        out[1].copy_(inputs["w"] + 1)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # (the check waits for the GPU)
    assert check(out, rewrites) is None
    assert "integer values differ" in check(out, lambda: out[0].copy_(inputs["x"] * 2))  # w never rewritten
    case.excuse = lambda *a: None  # whole models: their excuse judges, not this check
    assert harness._replay_check(case, good, inputs, truth, tolerances) is None


def test_failing_providers_are_reported_and_never_timed():
    good = Provider("reference", lambda x: lambda: (x["x"] * 2, x["w"] + 1))
    providers = [
        good,
        Provider("qwen3x", lambda x: lambda: _raise(x)),
        Provider("hf_eager", lambda x: lambda: (x["x"] * 2 + 0.5, x["w"] + 1)),
        Provider("liger", lambda x: lambda: (x["x"] * 2, x["w"] + 2)),
        Provider("torch_compile", lambda x: lambda: (x["x"] * float("nan"), x["w"] + 1)),
        Provider("flex", _skip),
        Provider("sdpa_flash", lambda x: lambda: x["x"], skip="not installed"),
    ]
    by, timer = run_cpu(_toy_case(providers))
    assert by["reference"]["status"] == "ok" and by["reference"]["median_ms"] == 1.0
    assert by["reference"]["gbps"] == pytest.approx(512 / 1.0 / 1e6)
    assert by["qwen3x"]["status"] == "failed" and "kernel exploded" in by["qwen3x"]["note"]
    assert by["hf_eager"]["status"] == "failed" and "wrong answer" in by["hf_eager"]["note"]
    assert "got 2.25" in by["hf_eager"]["note"]  # names the worst elements
    assert by["liger"]["status"] == "failed" and "integer values differ" in by["liger"]["note"]
    assert by["torch_compile"]["status"] == "failed"  # NaN never passes
    assert by["flex"]["status"] == "skipped" and "not on this device" in by["flex"]["note"]
    assert by["sdpa_flash"]["status"] == "skipped"
    assert len(timer.timed) == 1  # only the correct provider was timed
    for r in by.values():
        assert set(rows.REQUIRED_KEYS) <= set(r)
        json.dumps(r)
        if r["status"] != "ok":
            assert r["median_ms"] is None


def test_tolerance_policy():
    from qwen3x.testing import ABS_FLOOR, check

    truth = torch.tensor([1.0, 2.0, 3.0])
    baseline = truth.to(torch.bfloat16)
    tol = harness.tolerance(truth, baseline)
    assert tol == pytest.approx(2 * 0 + 0 + ABS_FLOOR)  # exact in bf16: only the floor
    noisy = torch.tensor([1.0, 2.0, 3.015625]).to(torch.bfloat16)
    assert harness.tolerance(truth, noisy) == pytest.approx(2 * 0.015625 + ABS_FLOOR)
    assert harness.tolerance(torch.tensor([1, 2]), torch.tensor([1, 2])) is None
    assert check(noisy, noisy, truth) is None
    assert "max abs error" in check(torch.tensor([1.0, 2.0, 3.1]).bfloat16(), noisy, truth)
    assert "max abs error" in check(torch.tensor([1.0, float("nan"), 3.0]), noisy, truth)
    assert "1 of 2 integer values differ" in check(torch.tensor([1, 3]), torch.tensor([1, 2]), torch.tensor([1, 2]))


def test_error_pattern_locates_the_bad_elements():
    from qwen3x.testing import check, error_pattern

    truth = torch.zeros(2, 200, 4, 128)
    # a wrong second half of the head dim in the second 64-row tile, plus one unwritten element
    got = truth.clone()
    got[:, 64:128, :, 64:] = 1.0
    got[1, 5, 3, 7] = float("nan")
    text = error_pattern(got, truth, 0.5)
    assert text.startswith(f"{2 * 64 * 4 * 64 + 1} of {truth.numel()} elements bad")
    assert "1 NaN" in text and "dim 0: all" in text and "dim 2: all" in text
    assert "dim 1: 65 of 200: 5, 64-127" in text and "dim 3: 65 of 128: 7, 64-127" in text
    # a periodic pattern (every other 8-row group) is named by its period
    got = truth.clone()
    got[:, torch.arange(200) % 16 < 8] = 2.0
    assert "dim 1: 104 of 200: index mod 16 in 0-7" in error_pattern(got, truth, 0.5)
    assert error_pattern(truth, truth, 0.0) == "no element out of tolerance"
    # in the tolerance rule's messages, integer outputs included
    assert "dim 1: 104 of 200: index mod 16 in 0-7" in check(got.bfloat16(), truth.bfloat16(), truth)
    ints = check(torch.tensor([1, 3, 5, 6]), torch.tensor([1, 2, 5, 6]), torch.tensor([1, 2, 5, 6]))
    assert "at [1]: got 3, expected 2;" in ints and "at [0]" not in ints and "dim 0: 1 of 4: 1" in ints


def test_assert_identical_says_where():
    from qwen3x.testing import assert_identical

    a = torch.arange(64.0).reshape(8, 8)
    assert_identical(a, a.clone())
    b = a.clone()
    b[2:4, 6] = -1.0
    with pytest.raises(AssertionError, match=r"out differ: at \[3, 6\].*dim 0: 2 of 8: 2-3; dim 1: 1 of 8: 6"):
        assert_identical(b, a, "out")
    with pytest.raises(AssertionError, match="expected torch.float32"):
        assert_identical(a.double(), a)
    with pytest.raises(AssertionError, match="dim 0: 1 of 3: 1"):
        assert_identical(torch.tensor([1, 0, 3]), torch.tensor([1, 2, 3]))


def test_an_excused_failure_is_timed_with_its_note():
    """Case.excuse runs only on a failed check: accepted, the row is ok and timed with the excuse's
    note; refused, or raising, the row stays a wrong answer that says what the excuse found."""
    calls = []

    def excuse(fn, inputs, got, truth, tolerances):
        calls.append(fn.verdict)
        if fn.verdict == "raise":
            raise RuntimeError("routers not seen")
        return harness.Excuse(fn.verdict == "accept", f"excuse: {fn.verdict}")

    def build(verdict, offset):
        def b(x):
            def call():
                return x["x"] * 2 + offset, x["w"] + 1

            call.verdict = verdict
            return call

        return b

    providers = [Provider(v, build(v, offset)) for v, offset in
                 (("accept", 0.5), ("refuse", 0.5), ("raise", 0.5), ("passes", 0.0))]  # fmt: skip
    case = _toy_case(providers)
    case.excuse = excuse
    by, timer = run_cpu(case)
    assert calls == ["accept", "refuse", "raise"]  # never for an output that passes
    assert by["accept"]["status"] == "ok" and by["accept"]["note"] == "excuse: accept"
    assert by["accept"]["max_abs_err"][0] > by["accept"]["tolerance"][0]  # the errors stay in the row
    assert by["refuse"]["status"] == "failed" and by["refuse"]["note"].startswith("wrong answer: output 0")
    assert by["refuse"]["note"].endswith("; excuse: refuse")
    assert by["raise"]["status"] == "failed" and "not excused: RuntimeError: routers not seen" in by["raise"]["note"]
    assert by["passes"]["status"] == "ok" and by["passes"]["note"] == ""
    assert [fn.verdict for fn in timer.timed] == ["accept", "passes"]


def test_graph_request_falls_back_for_host_syncing_providers():
    providers = [Provider("reference", lambda x: lambda: (x["x"] * 2, x["w"] + 1), graphable=False)]
    by, _ = run_cpu(_toy_case(providers, cuda_graph=True))
    assert by["reference"]["status"] == "ok" and by["reference"]["cuda_graph"] is False
    assert "host sync" in by["reference"]["note"]


def test_capture_failure_names_the_first_error():
    from benchmarks.timing import capture_error

    assert capture_error(RuntimeError("no graph today")) == "RuntimeError: no graph today"
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        except RuntimeError:  # as torch.cuda.graph's exit raises when the capture was invalidated
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as exc:
        text = capture_error(exc)
    assert text == ("RuntimeError: CUDA error: operation failed due to a previous error during capture "
                    "(after RuntimeError: CUDA error: operation not permitted when stream is capturing)")  # fmt: skip


def test_a_failed_capture_lets_its_pool_go(monkeypatch):
    """The private pool of a capture that did not end is released by hand (torch leaves it); one
    that ended is the graph's own business; the allocator's complaints are no reason to fail."""
    from benchmarks import timing

    class Graph:
        def __init__(self, ended):
            self.ended = ended

        def pool(self):
            if not self.ended:
                raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
            return (1, 0)

    calls = []

    def binding(name, fail=False):
        def call(device, pool):
            calls.append((name, device, pool))
            if fail:
                raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

        return call

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", binding("end", fail=True), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", binding("release"), raising=False)
    timing.release_pool_of_failed_capture(Graph(ended=True), (0, 7))
    assert calls == []
    timing.release_pool_of_failed_capture(Graph(ended=False), (0, 7))
    assert calls == [("end", 0, (0, 7)), ("release", 0, (0, 7))]


class _Cyclic:
    """State in a reference cycle (as Liger's methods bound to module instances make of a model
    copy): only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


@pytest.mark.parametrize("each", [False, True], ids=["release_after_case", "release_each_provider"])
def test_providers_state_is_collected_before_the_next_provider_builds(each):
    """What a provider built is collected before the next provider is built when the case asks for
    it (whole-model cases), and after a failing provider in any case (the exception's traceback,
    which holds the failed build's frame, gone by then). Other cases end without a collection."""
    alive, seen = [], {}

    def build(name, fail=False):
        def b(x):
            seen[name] = [r() is not None for r in alive]
            state = _Cyclic()
            alive.append(weakref.ref(state))
            if fail:
                raise RuntimeError("out of memory")
            return lambda: (x["x"] * 2 if state else None, x["w"] + 1)

        return b

    case = _toy_case([Provider("a", build("a")), Provider("b", build("b", fail=True)), Provider("c", build("c"))])
    case.release_each_provider = each
    timer = lambda fn, cuda_graph=False, replay_check=None: Timing(1.0, 1.0, 1.0, 10)  # noqa: E731 (keeps no call alive)
    gc.disable()  # only the harness's own collections count
    try:
        out = harness.run_case(case, timer=timer, env=rows.environment(), device="cpu", log=lambda m: None)
    finally:
        gc.enable()
    assert [r["status"] for r in out] == ["ok", "failed", "ok"]
    assert seen == {"a": [], "b": [not each], "c": [False, False]}
    assert [r() is None for r in alive] == [True, True, each]
    gc.collect()


# ---------------------------------------------------------------------------------------------
# The suites' peers on tiny shapes (CPU): the checks pass for the providers that run on a CPU
# ---------------------------------------------------------------------------------------------
TINY_MOE = ModelDims("tiny-moe", 2, 64, 4, 2, 96, experts=8, topk=2, moe_inter=32)
TINY = ModelDims("tiny", 2, 64, 4, 2, 96)
CPU_PEERS = ["reference", "hf_eager", "hf_grouped_mm", "hf_batched_mm", "torch_grouped_mm", "sdpa_flash", "hf_sdpa"]


@pytest.mark.parametrize(
    "case",
    [
        norm.case(7, 64),
        rope.case(5, 4, 2),
        activation.case(3, 16),
        attention.prefill_case(1, 33, 4, 2),
        attention.decode_case(2, 40, 4, 2),
        attention.varlen_case((5, 17, 1, 9), 4, 2),
        attention.qk_norm_case(19, 4, 2),
        moe.router_case(TINY_MOE, 9),
        moe.permute_case(TINY_MOE, 9),
        moe.experts_case(TINY_MOE, 9),
        moe.layer_case(TINY_MOE, 9),
        model.prefill_case(TINY, 2, 16),
        model.decode_case(TINY, 3, 16, cuda_graph=True),
    ],
    ids=lambda c: c.op,
)
def test_suite_peers_pass_on_cpu(case):
    by, timer = run_cpu(case, providers=CPU_PEERS + (["qwen3x"] if case.op.startswith("model") else []))
    assert by, case.label
    for name, r in by.items():
        assert r["status"] in ("ok", "skipped"), f"{case.label}: {name}: {r['note']}"
    assert len(timer.timed) == sum(r["status"] == "ok" for r in by.values())


def test_decode_step_is_repeatable():
    case = model.decode_case(TINY, 2, 16, cuda_graph=False)
    with torch.inference_mode():
        torch.manual_seed(0)
        step = case.providers[0].build(case.make_inputs(torch.device("cpu")))
        first, second = step(), step()
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize(
    "spec, provider", [(TINY, "hf_eager"), (TINY, "qwen3x"), (TINY_MOE, "hf_eager")],
    ids=["tiny-hf_eager", "tiny-qwen3x", "tiny-moe-hf_eager"],
)  # fmt: skip
def test_chunked_cache_fill_gives_the_one_forward_fill_logits(monkeypatch, spec, provider):
    """The decode case fills its static cache PREFILL_CHUNK_TOKENS tokens per forward (here 5
    positions of 3 sequences: chunks of 5, 5, 5 and 1): in fp32 the timed step then gives the
    logits of a fill in one forward (and of a forward without a cache), and the same logits again
    when repeated. qwen3x writes every chunk after the first through its own cache path."""
    batch, context, positions = 3, 16, 5
    pool = model.ModelPool()
    torch.manual_seed(0)
    pool.base, pool.spec = model.build_model(spec, "cpu", dtype=torch.float32), spec
    monkeypatch.setattr(model, "POOL", pool)
    forwards = []
    pool.base.register_forward_pre_hook(lambda module, args: forwards.append(1))  # deepcopy keeps it
    case = model.decode_case(spec, batch, context, cuda_graph=False)
    build = next(p for p in case.providers if p.name == provider).build

    def decode(chunk_tokens):
        monkeypatch.setattr(model, "PREFILL_CHUNK_TOKENS", chunk_tokens)
        forwards.clear()
        step = build(inputs)
        fills = len(forwards)
        return fills, step(), step()

    with torch.inference_mode():
        torch.manual_seed(1)
        inputs = case.make_inputs(torch.device("cpu"))
        one_fill, want, _ = decode(batch * context)
        fills, got, again = decode(batch * positions)
        full = model._last_logits(pool.base, inputs["input_ids"])  # no cache at all
    assert (one_fill, fills) == (1, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_liger_moe_is_never_captured():
    """Liger's MoE experts sync with the host (model._graphable): its decode rows are timed
    eagerly, no capture attempted; the dense Liger model and the other providers are captured."""
    for spec, liger in ((TINY, True), (TINY_MOE, False)):
        case = model.decode_case(spec, 1, 16, cuda_graph=True)
        assert {p.name: p.graphable for p in case.providers} == {"hf_eager": True, "qwen3x": True, "liger": liger}


def test_model_pool_collects_the_previous_spec():
    """Another spec's models are built only once the previous spec's are gone, cycles included."""
    pool = model.ModelPool()
    base = pool.get(TINY, "cpu")
    truth = pool.fp32()
    base.__dict__["forward"] = base.forward  # a method bound to the instance, as Liger patches
    refs = [weakref.ref(base.lm_head.weight), weakref.ref(truth.lm_head.weight)]
    del base, truth
    gc.disable()  # only the pool's own collection counts
    try:
        assert pool.get(TINY_MOE, "cpu") is pool.base and pool.spec == TINY_MOE
    finally:
        gc.enable()
    assert all(r() is None for r in refs)
    assert pool._fp32 is None



@pytest.mark.parametrize("spec", [TINY, TINY_MOE], ids=lambda d: d.name)
def test_fp32_truth_attention_is_sdpa_without_its_gqa_fallback(spec):
    """The fp32 truth model runs its own attention (k/v expanded to q's heads, so that SDPA does not
    materialize the scores at 16k tokens): same logits as transformers' sdpa in fp32, padding too."""
    import copy

    torch.manual_seed(0)
    pool = model.ModelPool()
    base = pool.get(spec, "cpu")
    sdpa = copy.deepcopy(base).float()
    if hasattr(sdpa, "set_experts_implementation"):
        sdpa.set_experts_implementation("eager")
    truth = pool.fp32()
    assert truth.config._attn_implementation == model.TRUTH_ATTENTION
    ids = torch.randint(0, 96, (2, 21))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: the mask must reach the truth's attention
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got = truth(input_ids=ids, use_cache=False, **kwargs).logits
            want = sdpa(input_ids=ids, use_cache=False, **kwargs).logits
            torch.testing.assert_close(got[:, 6:], want[:, 6:], rtol=1e-5, atol=1e-5)

# ---------------------------------------------------------------------------------------------
# Whole MoE models: a routing flip at a near tie of the judged token is excused, nothing else
# ---------------------------------------------------------------------------------------------
# The last MoE layer's experts, scaled in every copy of the model: a token routed to another
# expert there then moves the logits by about 0.1 (as in Qwen3-30B-A3B at its real width, where
# random weights give experts of that weight), far out of the bf16 tolerance.
EXPERT_SCALE = 10.0
# The candidate's raise of one expert's router logit at the judged token: far above bf16's
# rounding of the logits (a few 1e-4 here), so that it breaks the exact tie the other way.
TIE_BREAK = 1e-3


def _moe_pool(monkeypatch):
    """model.POOL holding a fresh bf16 TINY_MOE whose last layer's experts are scaled."""
    pool = model.ModelPool()
    torch.manual_seed(0)
    pool.base, pool.spec = model.build_model(TINY_MOE, "cpu"), TINY_MOE
    with torch.no_grad():
        for name, p in pool.base.model.layers[-1].mlp.experts.named_parameters():
            if "down_proj" in name:
                p.mul_(EXPERT_SCALE)
    monkeypatch.setattr(model, "POOL", pool)
    return pool


def _case_and_judged_ids(op, batch):
    """A tiny whole-model case with two judged sequences and its input ids as run_case makes
    them (same seed), the judged ones: prefill judges every sequence, decode CHECK_ROWS."""
    case = model.prefill_case(TINY_MOE, batch, 16) if op == "prefill" else model.decode_case(TINY_MOE, batch, 16, False)
    torch.manual_seed(harness.SEED)
    ids = case.make_inputs(torch.device("cpu"))["input_ids"]
    return case, ids[: model.CHECK_ROWS]


def _router_inputs(net, ids):
    """[B, H] fp32: what the last MoE layer's router sees at the last position of each sequence."""
    seen = []
    gate = net.model.layers[-1].mlp.gate
    handle = gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(*ids.shape, -1)[:, -1]))
    try:
        net(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[0].float()


def _tie_broken_the_other_way(pool, judged_ids, seq):
    """Ties the last MoE layer's router exactly at the judged token of sequence ``seq`` in the
    pool's model (the router row of an expert that is not picked there becomes that of the k-th
    pick), and returns a PREPARE function whose copy breaks the tie the other way at that token:
    the one of the tied pair the truth leaves out gets its router row raised along that token's
    router input, made orthogonal to the other judged tokens' (whose routing it leaves alone)."""
    gate = pool.base.model.layers[-1].mlp.gate
    x = _router_inputs(pool.base, judged_ids)
    ranked = (x[seq] @ gate.weight.float().T).argsort(descending=True).tolist()
    kth, last = ranked[TINY_MOE.topk - 1], ranked[-1]
    with torch.no_grad():
        gate.weight[last] = gate.weight[kth]
    truth = router_probs(pool.fp32(), judged_ids, use_cache=False, logits_to_keep=1)[-1][seq, -1]
    truth_picks = truth.topk(TINY_MOE.topk).indices.tolist()
    left_out = last if kth in truth_picks else kth
    direction = x[seq].clone()
    for i in (i for i in range(len(x)) if i != seq):  # Gram-Schmidt against the other judged tokens
        direction -= (direction @ x[i]) / (x[i] @ x[i]) * x[i]
    raise_row = TIE_BREAK * direction / direction.abs().max()

    def prepare(base):
        candidate = copy.deepcopy(base)
        with torch.no_grad():
            candidate.model.layers[-1].mlp.gate.weight[left_out] += raise_row.to(torch.bfloat16)
        return candidate

    return prepare


@pytest.mark.parametrize("op, batch", [("prefill", 2), ("decode", 3)])
def test_a_routing_flip_at_a_near_tie_of_the_judged_token_is_excused(monkeypatch, op, batch):
    """A candidate routing the judged token of sequence 1 to the other expert of an exact tie of
    the truth's (which any bf16 model may do) misses the logits tolerance by far, and is reported
    ok and timed, the note saying so. Decode: the routing of the checked decode step itself."""
    pool = _moe_pool(monkeypatch)
    case, judged = _case_and_judged_ids(op, batch)
    monkeypatch.setitem(model.PREPARE, "qwen3x", _tie_broken_the_other_way(pool, judged, seq=1))
    by, timer = run_cpu(case, providers=["hf_eager", "qwen3x"])
    assert by["hf_eager"]["status"] == "ok" and "routing" not in by["hf_eager"]["note"]
    r = by["qwen3x"]
    assert r["max_abs_err"][0] > 2 * r["tolerance"][0]  # the check failed
    assert r["status"] == "ok", r["note"]
    assert ("routing flip at a near tie at the judged token of sequence 1 (1 of 2 MoE layers): "
            "logits not judged there") in r["note"]  # fmt: skip
    assert len(timer.timed) == 2


def _rotated_router(base):
    """Every expert's router row moved to the next expert in the last MoE layer: other experts
    than the truth's at decided gaps."""
    candidate = copy.deepcopy(base)
    gate = candidate.model.layers[-1].mlp.gate
    with torch.no_grad():
        gate.weight.copy_(gate.weight.roll(1, dims=0))
    return candidate


def _scaled_final_norm(base):
    """Logits out of tolerance with every token routed as the truth routes it."""
    candidate = copy.deepcopy(base)
    with torch.no_grad():
        candidate.model.norm.weight.mul_(1.5)
    return candidate


@pytest.mark.parametrize("op, batch", [("prefill", 2), ("decode", 3)])
@pytest.mark.parametrize(
    "prepare, found",
    [(_rotated_router, "other experts than the truth's at a decided gap at the judged token of sequence 0 (1 of 2"),
     (_scaled_final_norm, "no routing flip at the judged token of sequence 0, 1")],
    ids=["decisive-flip", "no-flip"],
)  # fmt: skip
def test_other_moe_errors_stay_wrong_answers(monkeypatch, op, batch, prepare, found):
    _moe_pool(monkeypatch)
    case, _ = _case_and_judged_ids(op, batch)
    monkeypatch.setitem(model.PREPARE, "qwen3x", prepare)
    by, timer = run_cpu(case, providers=["hf_eager", "qwen3x"])
    r = by["qwen3x"]
    assert r["status"] == "failed" and "wrong answer: output 0: max abs error" in r["note"], r["note"]
    assert found in r["note"]
    assert [r["status"] for r in by.values()] == ["ok", "failed"] and len(timer.timed) == 1


# ---------------------------------------------------------------------------------------------
# Plots and the command line
# ---------------------------------------------------------------------------------------------
def _sample_rows():
    env = {"device": "test", "git_sha": "0", "torch": "x", "cuda": None, "transformers": None}
    out = []
    for tokens in (1, 64, 4096):
        for provider, ms in (("qwen3x", 0.01), ("reference", 0.03)):
            out.append(rows.make_row(env, "rms_norm", {"tokens": tokens, "hidden": 1024}, provider, "ok",
                                     median_ms=ms * tokens, gbps=100.0 * tokens / 64))  # fmt: skip
    for provider, ms in (("hf_eager", 10.0), ("qwen3x", 8.0)):
        shape = {"model": "Qwen3-0.6B", "layers": 28, "batch": 1, "seqlen": 2048}
        out.append(rows.make_row(env, "model_prefill", shape, provider, "ok", median_ms=ms, tflops=100.0))
    out.append(rows.make_row(env, "rms_norm", {"tokens": 1, "hidden": 1024}, "liger", "skipped", "not installed"))
    return out


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    writer = rows.RowWriter(tmp_path / "rows.jsonl")
    for r in _sample_rows():
        writer.write(r)
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert "model_prefill-speedup.png" in names
    assert any(n.startswith("rms_norm-") for n in names)


def test_plot_axis_is_the_resource_the_op_is_bound_by():
    """Decode attention has both a FLOP and a byte count: it is drawn in GB/s (its share of the copy
    rate is the larger), prefill in TFLOP/s; without the run's ceilings TFLOP/s comes first."""
    from benchmarks import plot

    decode = [{"tflops": 0.7, "gbps": 4400.0}, {"tflops": 18.0, "gbps": 4500.0}]
    prefill = [{"tflops": 400.0, "gbps": 60.0}, {"tflops": 350.0, "gbps": 200.0}]
    assert plot._metric(decode, copy_gbps=4291.0, matmul_tflops=791.0) == ("gbps", "GB/s")
    assert plot._metric(prefill, copy_gbps=4291.0, matmul_tflops=791.0) == ("tflops", "TFLOP/s")
    assert plot._metric(decode) == ("tflops", "TFLOP/s")
    assert plot._metric([{"gbps": 1.0}]) == ("gbps", "GB/s")
    assert plot._metric([{"median_ms": 1.0}]) == ("median_ms", "median ms")


def test_plot_styles_keep_providers_apart():
    """qwen3x stands out, its own variants are dashed, and up to 20 other providers get distinct
    colours (the default cycle repeated at 10: flex and sdpa_flash once shared a colour)."""
    from benchmarks import plot

    styles = [plot.line_style(f"peer{i}", i) for i in range(20)]
    assert len({s["color"] for s in styles}) == 20
    assert plot.line_style("qwen3x (graph)", 3)["color"] == "black"
    assert plot.line_style("qwen3x_no_pdl", 4)["linestyle"] == "--"
    assert "linestyle" not in plot.line_style("sdpa_flash", 4)


def test_list_enumerates_every_op(monkeypatch, capsys):
    # `python -m benchmarks --list --model`, in this process (runpy runs benchmarks/__main__.py)
    monkeypatch.setattr(sys, "argv", ["benchmarks", "--list", "--model"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("benchmarks", run_name="__main__")
    assert exit_info.value.code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(ALL_OPS) <= listed
    assert set(ALL_OPS) == set(SUITES) | set(model.SUITE)


def test_shape_filter_and_quick():
    args = run.parse_args(["--ops", "rms_norm,moe_layer", "--shapes", "tokens=4096", "--quick"])
    cases = run.select_cases(args)
    assert cases and all(c.shape["tokens"] == 4096 for c in cases)
    assert {c.op for c in cases} == {"rms_norm", "moe_layer"}
    with pytest.raises(SystemExit):
        run.parse_args(["--ops", "no_such_op"])


def test_no_gpu_runs_the_demo(monkeypatch, capsys):
    called = []
    demo = types.ModuleType("qwen3x.demo")
    demo.main = lambda: called.append(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "qwen3x.demo", demo)
    assert run.main(["--quick"]) == 0
    assert "No CUDA GPU found" in capsys.readouterr().out
    assert called == [True]


def test_no_gpu_without_demo(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run.importlib, "import_module", missing)
    assert run.main([]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU found" in out and "unavailable" in out


def _fake_gpu_run(monkeypatch, git_sha="abc"):
    """run.main as on a GPU, with nothing timed: a fixed environment, ceilings measured by a stub
    (counted), and run_case replaced by one that records the providers it was asked for."""
    env = {"device": "fake", "git_sha": git_sha, "torch": "t", "cuda": "c", "transformers": "x",
           "prefill_mainloop": {"attention": "mma_sync", "moe": "mma_sync"}}
    calls = {"measure": 0, "cases": []}

    def measure(timer, run_env):
        calls["measure"] += 1
        peak = [rows.make_row(run_env, "peak_copy", {"bytes": 1}, "torch", "ok", gbps=3000.0),
                rows.make_row(run_env, "peak_matmul", {"m": 1}, "torch", "ok", tflops=800.0)]
        return ceilings.Ceilings(copy_gbps=3000.0, matmul_tflops=800.0), peak

    def run_case(case, *, timer, env, ceilings, providers, log):
        assert ceilings.copy_gbps == 3000.0 and ceilings.matmul_tflops == 800.0
        calls["cases"].append((case.label, list(providers)))
        return [rows.make_row(env, case.op, case.shape, name, "ok", median_ms=1.0) for name in providers]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run, "environment", lambda: dict(env))
    monkeypatch.setattr(ceilings, "measure", measure)
    monkeypatch.setattr("benchmarks.timing.CudaTimer", lambda **kw: None)
    monkeypatch.setattr(run, "run_case", run_case)
    return calls


def test_resume_runs_only_what_the_cut_short_run_lacks(monkeypatch, tmp_path, capsys):
    """--resume goes on with the newest rows file in --out: the provider-cases it has rows for are
    not run again, the rest are appended to that file, its ceilings are reused (not re-measured),
    and the summary covers all the rows; rows of other code are refused."""
    calls = _fake_gpu_run(monkeypatch)
    args = ["--ops", "rms_norm", "--quick", "--providers", "qwen3x,reference", "--out", str(tmp_path)]
    assert run.main([*args, "--shapes", "tokens=1"]) == 0  # the run that was cut short: its first case
    first = rows.read_rows(tmp_path / "rows.jsonl")
    assert calls["measure"] == 1 and [c[1] for c in calls["cases"]] == [["qwen3x", "reference"]]
    # ... and only part of the second case (one provider's row written before the cut)
    second = [c for c in run.select_cases(run.parse_args(args)) if c.shape["tokens"] != 1][0]
    rows.RowWriter(tmp_path / "rows.jsonl").write(rows.make_row({**first[0], "l2_flush": "clean"}, second.op,
                                                                second.shape, "reference", "ok", median_ms=2.0))
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write('{"op": "rms_norm", "sha')  # a row torn by the kill: dropped
    calls["cases"].clear()
    capsys.readouterr()
    assert run.main([*args, "--resume"]) == 0
    assert calls["measure"] == 1, "the resumed run's ceilings are reused"
    assert calls["cases"] == [(second.label, ["qwen3x"])]
    got = rows.read_rows(tmp_path / "rows.jsonl")
    assert not (tmp_path / "rows-2.jsonl").exists()
    assert len(got) == len(first) + 2
    out = capsys.readouterr().out
    assert f"for 2 cases and {len(got)} rows ({len(first) + 1} of them from earlier calls" in out
    # everything there: a second resume runs nothing
    calls["cases"].clear()
    assert run.main([*args, "--resume"]) == 0 and calls["cases"] == []

    _fake_gpu_run(monkeypatch, git_sha="other")
    assert run.main([*args, "--resume"]) == 2
    assert "git_sha" in capsys.readouterr().err
    assert run.main(["--ops", "rms_norm", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--resume"])  # needs --out


def test_precompile_leaves_the_runs_compiles_in_inductors_caches(tmp_path):
    """The run's torch.compile'd providers, compiled first in spawned worker processes, are then
    found in inductor's on-disk caches by a process that runs the same provider-cases (FX graph
    and AOTAutograd caches: hits, no misses); the items are the run's compiling providers only."""
    from benchmarks import precompile

    argv = ["--ops", "rms_norm,silu_and_mul", "--quick", "--providers", "qwen3x,torch_compile,reference"]
    cases = run.select_cases(run.parse_args(argv))
    items = precompile.items_to_compile(cases, lambda i, name: name in run.pending_providers(cases[i], None, set()))
    assert items == [(i, "torch_compile") for i in range(len(cases))] and len(items) == 4
    assert precompile.items_to_compile(cases, lambda i, name: i == 2) == [(2, "torch_compile")]
    env = {**os.environ, **ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def python(code):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines()

    logs = python("from functools import partial\n"
                  "from benchmarks import precompile\n"
                  "if __name__ == '__main__':  # spawned workers import this module again\n"
                  f"    run = partial(precompile.precompile, {argv!r}, device='cpu', log=print)\n"
                  f"    run({items!r}, min_items=5)\n"
                  "    run([(99, 'flex')], workers=1, min_items=1)\n"
                  f"    run({items[:2]!r}, workers=2, min_items=2)\n")
    # fewer items than min_items: nothing started (the first call); a worker that dies (no case 99)
    # is reported without waiting out the phase's time limit
    assert logs[0].startswith("precompiling 1") and "1 of 1 processes did not finish" in logs[1], logs
    assert int(logs[1].split()[0]) < precompile.TIMEOUT_S / 2, logs
    assert logs[2].startswith("precompiling 2") and "did not finish" not in logs[3] and "failed" not in logs[3], logs
    # each item's end is reported as it happens (a worker killed at the limit still tells its part)
    assert "2 of 2 compiled" in logs[3] and "0 of 1 compiled" in logs[1], logs
    assert "slowest:" in logs[4] and logs[4].count(": torch_compile ") == 2, logs
    counts = python("import json\n"  # the run's own first calls (harness.run_case), as run.main makes them
                    "from benchmarks import harness, rows, run\n"
                    "from benchmarks.timing import Timing\n"
                    "from torch._dynamo.utils import counters\n"
                    f"cases = run.select_cases(run.parse_args({argv!r}))\n"
                    f"for i in {[i for i, _ in items[:2]]!r}:\n"
                    "    out = harness.run_case(cases[i], timer=lambda fn, cuda_graph=False, replay_check=None: Timing(1, 1, 1, 10),\n"
                    "                           env=rows.environment(), device='cpu', providers=['torch_compile'],\n"
                    "                           log=lambda m: None)\n"
                    "    assert [r['status'] for r in out] == ['ok'], out\n"
                    "print(json.dumps([counters['inductor'], counters['aot_autograd']]))\n")
    inductor, aot = json.loads(counts[-1])
    assert inductor.get("fxgraph_cache_hit") == 2 and not inductor.get("fxgraph_cache_miss"), counts
    assert aot.get("autograd_cache_hit") == 2 and not aot.get("autograd_cache_miss"), counts


def test_newest_rows_file_follows_the_runs_numbering(tmp_path):
    for name in ("rows.jsonl", "rows-2.jsonl", "rows-10.jsonl", "rows-x.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("")
    assert run.newest_rows_file(tmp_path).name == "rows-10.jsonl"
    assert run.newest_rows_file(tmp_path / "missing") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--model", "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    got = rows.read_rows(tmp_path)
    assert {"peak_copy", "peak_matmul"} <= {r["op"] for r in got}
    assert set(ALL_OPS) <= {r["op"] for r in got}
    for r in got:
        assert set(rows.REQUIRED_KEYS) <= set(r)
    failed_refs = [r for r in got if r["provider"] == "reference" and r["status"] == "failed"]
    assert not failed_refs, failed_refs


def test_l2_flush_modes():
    """The timer's flush: 'clean' writes then reads the buffer back (the read is what leaves the L2
    without dirty lines), 'dirty' only writes it; the run's option takes either and records it."""
    from benchmarks.timing import L2_FLUSHES, flush_l2

    buffer = torch.full((4096,), 7, dtype=torch.uint8)
    for mode in L2_FLUSHES:
        sink = torch.tensor(-5, dtype=torch.int32)
        buffer.fill_(7)
        flush_l2(buffer, sink, mode)
        assert int(buffer.max()) == 0  # written
        assert int(sink) == (0 if mode == "clean" else -5)  # read back only when clean
    with pytest.raises(ValueError, match="l2_flush"):
        flush_l2(buffer, torch.tensor(0, dtype=torch.int32), "none")
    assert run.parse_args([]).l2_flush == "clean" and run.parse_args(["--l2-flush", "dirty"]).l2_flush == "dirty"
    with pytest.raises(SystemExit):
        run.parse_args(["--l2-flush", "none"])


def test_readme_table_from_rows(tmp_path):
    from benchmarks import readme

    env = {"device": "NVIDIA H100 80GB HBM3", "git_sha": "abc1234567", "timestamp": "2026-11-25T10:00:00",
           "torch": "2.11.0+cu130", "cuda": "13.0", "transformers": "5.17.0"}
    shape = {"tokens": 4096, "hidden": 2048}

    def row(op, provider, ms, **kw):
        return {**env, "op": op, "shape": shape if op == "rms_norm" else {}, "provider": provider,
                "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms, **kw}

    rows = [row("peak_copy", "torch", 1.0, gbps=3000.0), row("peak_matmul", "torch", 1.0, tflops=790.0),
            row("rms_norm", "qwen3x", 0.02, fraction_of_peak=0.91), row("rms_norm", "reference", 0.01),
            row("rms_norm", "hf_eager", 0.08), row("rms_norm", "liger", 0.04),
            row("rms_norm", "qwen3x_mma_sync", 0.03),  # our other mainloop: no peer either
            row("rms_norm", "qwen3x_no_fence", 0.021),  # nor any other qwen3x_<variant> A/B row
            row("copy", "torch", 0.0256, gbps=2621.0, bytes=64 * 2**20, fraction_of_peak=0.874, l2_flush="clean"),
            row("read", "torch", 0.5, gbps=4295.0, bytes=2**31, fraction_of_peak=1.43),
            row("launch_floor", "torch", 0.0048, cuda_graph=True)]
    body = readme.table(rows)
    assert "NVIDIA H100 80GB HBM3" in body and "3000 GB/s" in body and "790 TFLOP/s" in body
    # the short copy and the launch floor are measurements of the device and the timer, said beside
    # the ceilings, not cases of the table
    assert "64 MiB moved in 25.6 us (2621 GB/s, 87%)" in body and "'clean'" in body
    assert "does nothing times 4.8 us" in body
    assert "Reading alone (2 GiB reduced to one value): 4295 GB/s, 1.43x the copy rate" in body
    assert not any(l.startswith(("| copy", "| read", "| launch_floor")) for l in body.splitlines())
    line = next(l for l in body.splitlines() if l.startswith("| rms_norm"))
    assert "20.0 us" in line and "91%" in line and "liger" in line and "2.00x" in line  # the reference is no peer
    # a case where qwen3x answered wrongly says so (not "no kernel"), beside its peers' times
    wrong = {**row("rms_norm", "qwen3x", None), "shape": {"tokens": 1}, "status": "failed",
             "note": "wrong answer: output 0: max abs error 0.2 > tolerance 0.1"}
    peer = {**row("rms_norm", "liger", 0.04), "shape": {"tokens": 1}}
    failed_line = next(l for l in readme.table([*rows, wrong, peer]).splitlines() if "tokens=1 " in l)
    assert "| wrong answer |" in failed_line and "liger" in failed_line
    # peers timed as qwen3x was: a graph-replayed qwen3x against an eagerly timed peer only when no
    # graphed peer exists, and then marked, its speedup in brackets
    small = {"tokens": 2}
    graphed = [{**row("rms_norm", "qwen3x", 0.006, cuda_graph=True), "shape": small},
               {**row("rms_norm", "liger", 0.004, cuda_graph=False), "shape": small}]
    line = next(l for l in readme.table([*rows, *graphed]).splitlines() if "tokens=2 " in l)
    assert "| liger (eager) | (0.67x) |" in line
    graphed.append({**row("rms_norm", "hf_eager", 0.009, cuda_graph=True), "shape": small})
    line = next(l for l in readme.table([*rows, *graphed]).splitlines() if "tokens=2 " in l)
    assert "| hf_eager | 1.50x |" in line
    text = f"intro\n{readme.BEGIN}\nold\n{readme.END}\noutro\n"
    new = readme.update_readme(text, body)
    assert new.startswith("intro\n") and new.endswith("outro\n") and "old" not in new and "| rms_norm" in new


# ---------------------------------------------------------------------------------------------
# The issues' targets (benchmarks/targets.py)
# ---------------------------------------------------------------------------------------------
def test_targets_select_the_cases_they_judge():
    from benchmarks import targets

    cases = run.select_cases(run.parse_args(["--targets"]))
    by_op: dict[str, list[dict]] = {}
    for c in cases:
        assert targets.wanted(c.op, c.shape), c.label
        by_op.setdefault(c.op, []).append(c.shape)
    assert set(by_op) == targets.judged_ops()  # the whole-model ones included without --model
    assert all(s["tokens"] >= 16384 for s in by_op["rms_norm"])
    decode = {(s["batch"], s["context"]) for s in by_op["attention_decode"]}
    assert (1, 1024) in decode and (16, 32768) in decode and (1, 131072) not in decode
    assert all(b == 1 and 4096 <= s <= 16384 for b, s in ((x["batch"], x["seqlen"]) for x in by_op["attention_prefill"]))
    assert any(s["model"] == "Qwen3-235B-A22B" for s in by_op["moe_layer"])
    assert {s["tokens"] for s in by_op["moe_permute"]} == {1, 16, 64}  # issue 6: decode is 1 to 64 tokens
    with pytest.raises(SystemExit):
        run.parse_args(["--targets", "--quick"])
    # --ops narrows it
    assert {c.op for c in run.select_cases(run.parse_args(["--targets", "--ops", "rms_norm,moe_router"]))} == {
        "rms_norm", "moe_router"}


def test_target_verdicts():
    from benchmarks import targets

    env = {"device": "test", "git_sha": "0", "torch": "x", "cuda": None, "transformers": None}
    got = []

    def add(op, shape, provider, ms, status="ok", **kw):
        got.append(rows.make_row(env, op, shape, provider, status, median_ms=ms if status == "ok" else None, **kw))

    for hidden, frac in ((1024, 0.95), (4096, 0.85)):  # one case below 90%: FAIL, worst 85%
        add("rms_norm", {"tokens": 16384, "hidden": hidden}, "qwen3x", 0.1, fraction_of_peak=frac)
    add("rms_norm", {"tokens": 4096, "hidden": 1024}, "qwen3x", 0.1, fraction_of_peak=0.5)  # not judged
    qk = {"model": "Qwen3-4B", "tokens": 4096, "hq": 32, "hkv": 8}
    add("qk_norm_rope", qk, "qwen3x", 0.010)
    add("qk_norm_rope", qk, "hf_eager", 0.050)  # 5x: PASS
    add("qk_norm_rope", qk, "liger", None, status="skipped")  # no liger: NO DATA
    router = {"model": "Qwen3-30B-A3B", "tokens": 1, "hidden": 2048, "experts": 128, "topk": 8}
    add("moe_router", router, "qwen3x", 0.003)
    add("moe_permute", {**router, "row_align": 1}, "qwen3x", 0.004)  # 7 us together: PASS
    add("moe_router", {**router, "tokens": 16}, "qwen3x", 0.003)  # its permute was not run: not judged
    add("moe_route", {**router, "row_align": 16}, "qwen3x", 0.0095)  # 9.5 us < 10: PASS
    add("moe_route", {**router, "tokens": 16, "row_align": 16}, "qwen3x", 0.0105)  # 10.5 us: FAIL
    pre = {"model": "Qwen3-4B", "batch": 1, "seqlen": 8192, "hq": 32, "hkv": 8}
    for provider, ms in (("qwen3x", 1.0), ("sdpa_flash", 1.05), ("sdpa_cudnn", 0.8)):
        add("attention_prefill", pre, provider, ms)
    add("moe_layer", {"model": "Qwen3-235B-A22B", "tokens": 16}, "qwen3x", 0.2)

    verdicts = {v.target.text: v for v in targets.evaluate(got)}

    def verdict(prefix):
        return next(v for text, v in verdicts.items() if text.startswith(prefix))

    v = verdict("rms_norm moves")
    assert (v.status, v.judged, v.worst, v.worst_shape) == ("FAIL", 2, 0.85, "tokens=16384 hidden=4096")
    v = verdict("qk_norm_rope >= 4x")
    assert v.status == "PASS" and abs(v.worst - 5.0) < 1e-9
    assert verdict("qk_norm_rope >= 1.5x").status == "NO DATA" and verdict("qk_norm_rope >= 1.5x").missing == 1
    v = verdict("router + permutation as the two separate ops")
    assert (v.status, v.judged, v.missing) == ("INFO", 1, 1) and abs(v.worst - 7.0) < 1e-9
    v = verdict("router + permutation under 10 us")
    assert (v.status, v.judged) == ("FAIL", 2) and abs(v.worst - 10.5) < 1e-9
    assert v.worst_shape == "model=Qwen3-30B-A3B tokens=16 hidden=2048 experts=128 topk=8 row_align=16"
    v = verdict("prefill at 4k-16k tokens (4B")
    assert v.status == "FAIL" and abs(v.worst - 1.05) < 1e-9  # 1.05x < 1.1x
    v = verdict("prefill at 4k-16k tokens: speedup over SDPA's cuDNN")
    assert v.status == "INFO" and abs(v.worst - 0.8) < 1e-9
    assert verdict("235B-A22B layer shape").status == "PASS"
    assert verdict("patched model decode").status == "NO DATA"
    # a wrong answer from qwen3x fails its target, never "not judged"
    add("rms_norm", {"tokens": 32768, "hidden": 2048}, "qwen3x", None, status="failed")
    v = next(v for v in targets.evaluate(got) if v.target.text.startswith("rms_norm moves"))
    assert v.status == "FAIL" and "qwen3x failed at tokens=32768 hidden=2048" in v.worst_shape
    # "faster than" is strict: a tie fails
    tie = {"model": "Qwen3-4B", "layers": 36, "batch": 1, "seqlen": 2048}
    add("model_prefill", tie, "qwen3x", 5.0)
    add("model_prefill", tie, "hf_eager", 5.0)
    v = next(v for v in targets.evaluate(got) if v.target.text.startswith("patched Qwen3-0.6B and Qwen3-4B"))
    assert v.status == "FAIL" and v.worst == 1.0
    v = next(v for v in targets.evaluate(got) if v.target.text.startswith("patched model prefill no slower"))
    assert v.status == "PASS"
    table = targets.format_verdicts(list(verdicts.values()))
    assert "| #4 | rms_norm moves" in table and "85%" in table and "7.0 us" in table
    # a speedup compares like with like: a graph-replayed qwen3x against an eagerly timed peer (its
    # capture failed) is not judged; the graphed peer that remains is
    small = {"model": "Qwen3-4B", "tokens": 1, "hq": 32, "hkv": 8}
    add("qk_norm_rope", small, "qwen3x", 0.004, cuda_graph=True)
    add("qk_norm_rope", small, "hf_eager", 0.003, cuda_graph=False)
    v = next(v for v in targets.evaluate(got) if v.target.text.startswith("qk_norm_rope no slower"))
    assert (v.status, v.judged, v.missing) == ("NO DATA", 0, 1)
    add("qk_norm_rope", small, "liger", 0.006, cuda_graph=True)
    v = next(v for v in targets.evaluate(got) if v.target.text.startswith("qk_norm_rope no slower"))
    assert v.status == "PASS" and abs(v.worst - 1.5) < 1e-9


def test_readme_carries_the_target_verdicts(tmp_path):
    from benchmarks import readme

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sample_rows()))
    text = tmp_path / "README.md"
    text.write_text(f"intro\n{readme.BEGIN}\n{readme.END}\n")
    assert readme.main([str(run_dir), "--readme", str(text)]) == 0
    body = text.read_text()
    # the sample's model_prefill row: 0.6B patched 8 ms vs unpatched 10 ms
    assert "| #5 | patched Qwen3-0.6B and Qwen3-4B prefill faster than unpatched | PASS | 1.25x |" in body
    assert "| #4 | rms_norm moves >= 90%" in body and "NO DATA" in body
    assert "Plots of the same rows" not in body  # the run has none
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "rms_norm-hidden-1024.png").write_bytes(b"\x89PNG")
    assert readme.main([str(run_dir), "--readme", str(text)]) == 0
    assert "![rms_norm-hidden-1024](run/plots/rms_norm-hidden-1024.png)" in text.read_text()


def test_readme_takes_unmeasured_cases_from_earlier_runs(tmp_path):
    """A GPU session rarely has time for the whole suite: README shows the newest run, then each
    case only an earlier run measured under that run's own header; never one case twice."""
    from benchmarks import readme

    def row(sha, op, provider, ms, shape):
        return {"device": "H100", "git_sha": sha, "timestamp": "2026-11-26T10:00:00", "torch": "2.11",
                "cuda": "13.0", "transformers": "5.17.0", "op": op, "shape": shape, "provider": provider,
                "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms}

    def write(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    both, old_only = {"tokens": 16384, "hidden": 1024}, {"tokens": 16384, "hidden": 4096}
    write("2026-11-26-h100", [row("aaaaaaa", "peak_copy", "torch", 1.0, {}),
                              row("aaaaaaa", "rms_norm", "qwen3x", 0.050, both),
                              row("aaaaaaa", "rms_norm", "qwen3x", 0.090, old_only)])
    write("2026-11-26-h100-2", [row("bbbbbbb", "peak_copy", "torch", 1.0, {}),
                                row("bbbbbbb", "rms_norm", "qwen3x", 0.028, both)])
    write("2026-11-27-h100", [])  # no rows: not a run
    layers = readme.layered_rows(tmp_path / "2026-11-26-h100-2")
    assert [r.name for r, _ in layers] == ["2026-11-26-h100-2", "2026-11-26-h100"]
    assert [x["median_ms"] for x in layers[1][1] if x["op"] == "rms_norm"] == [0.090]
    text = tmp_path / "README.md"
    text.write_text(f"{readme.BEGIN}\n{readme.END}\n")
    assert readme.main([str(tmp_path / "2026-11-26-h100-2"), "--readme", str(text)]) == 0
    body = text.read_text()
    newest, earlier = body.split("from an earlier run")
    assert "git bbbbbbb" in newest and "28.0 us" in newest and "90.0 us" not in newest
    assert "git aaaaaaa" in earlier and "90.0 us" in earlier and "50.0 us" not in earlier


def test_kernel_times_lists_each_kernel_and_their_sum(capsys):
    from benchmarks import kernel_times

    rows = [("moe_expert_gemm_kernel<1>", 20.5, 1), ("moe_router_kernel", 1.25, 1)]
    text = kernel_times.format_times("moe_layer tokens=1 qwen3x", rows, 30.0)
    assert "20.50" in text and "moe_router_kernel" in text and "21.75" in text and "30.00 us wall" in text
    cold = kernel_times.format_times("moe_layer tokens=1 qwen3x", rows, None)  # flushed calls: no wall time
    assert "21.75" in cold and "wall" not in cold
    with pytest.raises(SystemExit):
        kernel_times.main(["--ops", "no_such_op"])
    if not torch.cuda.is_available():
        assert kernel_times.main(["--ops", "moe_layer", "--shapes", "tokens=1"]) == 0
        assert "No CUDA GPU" in capsys.readouterr().out


def test_kernel_times_warm_code_needs_the_flushed_timeline(capsys):
    """--warm-code warms the code between a flush and a replay: without --timeline there is no
    replay, and with --warm-l2 no flush, so either is refused rather than silently ignored."""
    from benchmarks import kernel_times

    for extra in (["--warm-code"], ["--warm-code", "--timeline", "--warm-l2"]):
        with pytest.raises(SystemExit):
            kernel_times.main(["--ops", "attention_decode", *extra])
        assert "--warm-code" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert kernel_times.main(["--ops", "attention_decode", "--timeline", "--warm-code"]) == 0


def test_kernel_times_timeline_places_each_kernel_of_a_replay():
    """--timeline: per kernel position, medians of start, duration and the gap before it (negative:
    overlap, as programmatic dependent launch allows), from each replay's first kernel start."""
    from benchmarks import kernel_times

    def replay(t0, gemm1_start):  # router GEMM, route, GEMM1 (starts before route ends), GEMM2
        return [("gemm2", t0 + 30.0, t0 + 40.0), ("router_gemm", t0, t0 + 3.0), ("route", t0 + 4.0, t0 + 6.0),
                ("gemm1", t0 + gemm1_start, t0 + 29.0)]

    rows, span = kernel_times.timeline([replay(100.0, 5.5), replay(500.0, 5.0), replay(900.0, 6.5)])
    assert [r[0] for r in rows] == ["router_gemm", "route", "gemm1", "gemm2"]
    assert rows[0] == ("router_gemm", 0.0, 3.0, 0.0)
    assert rows[1] == ("route", 4.0, 2.0, 1.0)
    assert rows[2] == ("gemm1", 5.5, 23.5, -0.5)  # medians: starts 5.5 / 5.0 / 6.5, ends at 29
    assert rows[3][1:] == (30.0, 10.0, 1.0) and span == 40.0
    text = kernel_times.format_timeline("moe_layer tokens=1 qwen3x", (rows, span))
    assert "-0.50  gemm1" in text and "40.00" in text and "span" in text
    # kernels the profiler did not see, or a replay that ran other kernels: no timeline, said so
    assert kernel_times.timeline([[], []]) is None
    assert kernel_times.timeline([replay(0.0, 5.0), replay(0.0, 5.0)[:3]]) is None
    assert "no timeline" in kernel_times.format_timeline("x", None)
    # one profiler session: marker kernels bracket each replay; the flushes (between the brackets)
    # are left out even where the op launches a kernel of the same name
    def flush(t):
        return [("fill", t, t + 40.0), ("reduce", t + 40.0, t + 80.0)]

    def marker(t):
        return [("void at::cuda::(anonymous namespace)::spin_kernel(long)", t, t + 0.5)]

    session = (flush(0.0) + marker(85.0) + replay(100.0, 5.0) + [("fill", 141.0, 142.0)] + marker(150.0)
               + flush(160.0) + marker(245.0) + replay(300.0, 6.0) + [("fill", 341.0, 342.0)] + marker(350.0))
    split = kernel_times.split_replays(session[::-1])
    assert [[k[0] for k in r] for r in split] == [["router_gemm", "route", "gemm1", "gemm2", "fill"]] * 2
    assert split[1][0] == ("router_gemm", 300.0, 303.0)


def test_kernel_times_plain_makes_the_calls_ncu_counts_on(monkeypatch):
    """--plain (for ncu's --launch-skip): the warm-up calls unflushed, then each profiled call right
    after a flush, in that order, and a sync at the end."""
    from benchmarks import kernel_times

    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    kernel_times.plain_calls(lambda: log.append("call"), 2, flush=lambda: log.append("flush"))
    assert log == ["call"] * kernel_times.WARMUP_CALLS + ["flush", "call"] * 2 + ["sync"]


def test_parity_probe_runs_each_part_and_counts_routing_flips():
    """benchmarks.parity (what tells a routing flip from a kernel fault in a patched MoE model) on
    the CPU references: a row per seed and part, errors of bf16 size, flips counted per token."""
    from benchmarks import parity

    out = parity.run(TINY_MOE, 2, 24, 2, device="cpu")
    assert [(r["seed"], r["part"]) for r in out] == [(s, p) for s in range(2) for p in parity.PARTS]
    for r in out:
        assert 0 < r["max_err"] < 0.05 and 0 < r["baseline_err"] < 0.05, r
        assert 0 <= r["last_token_flips"] <= r["flips"] <= 2 * 24 * TINY_MOE.layers, r
        assert 0 <= r["baseline_last_token_flips"] <= r["baseline_flips"] <= 2 * 24 * TINY_MOE.layers, r
    # On the CPU the patched MoE blocks run the MoE reference, HF's numerics to the bit: the same
    # logits and routing as the unpatched bf16 model.
    for r in (r for r in out if r["part"] == "moe"):
        assert r["max_err"] == r["baseline_err"] and r["flips"] == r["baseline_flips"], r


@pytest.fixture
def dynamo_config_restored():
    """compiled() turns torch.compile's automatic dynamic shapes off for the process; restored after
    the test (monkeypatch cannot: its undo deletes a torch config entry), caches emptied."""
    cfg = torch._dynamo.config
    with cfg.patch(automatic_dynamic_shapes=cfg.automatic_dynamic_shapes):
        yield
    torch._dynamo.reset()


def test_torch_compile_provider_compiles_once_per_configuration(monkeypatch, dynamo_config_restored):
    """torch_compile's token dim is symbolic: token counts 7, 83 and 4097 share one graph, a single
    token gets its own (0/1 specialization), each new hidden size its own with the hidden dim static
    (with automatic dynamic shapes, hidden 96 would reuse the graph that hidden 128 made symbolic);
    every answer is the reference's."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(providers, "_compiled", {})
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()

    def ref(x):
        v = x["x"].float().pow(2).mean(-1, keepdim=True)
        return (x["x"].float() * torch.rsqrt(v + 1e-6)) * x["weight"]

    provider = providers.torch_compile_provider(ref)
    assert provider.note == "token count symbolic, other dims static"
    graphs = []
    for tokens, hidden in ((7, 64), (83, 64), (4097, 64), (1, 64), (7, 128), (90, 128), (3, 96)):
        x = {"x": torch.randn(tokens, hidden), "weight": torch.randn(hidden)}
        torch.testing.assert_close(provider.build(x)(), ref(x))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2, 3, 3, 4], graphs


def test_flex_decode_compiles_once_per_head_layout_and_batch(monkeypatch, dynamo_config_restored):
    """flex at decode (no block mask): the context symbolic, the batch static (inductor's split-KV
    decoding kernel needs a static batch), so the decode cases of one head layout and batch share a
    graph; a new batch or layout compiles anew. Answers match SDPA's."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(providers, "_compiled", {})
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for batch, context, hq, hkv in ((2, 300, 8, 2), (2, 700, 8, 2), (3, 500, 8, 2), (3, 260, 8, 2), (1, 500, 8, 2),
                                    (2, 260, 8, 4)):
        x = {"q": torch.randn(batch, hq, 1, 128), "k": torch.randn(batch, hkv, context, 128),
             "v": torch.randn(batch, hkv, context, 128)}
        out = attention._flex(False)(x)()
        want = torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], scale=attention.SCALE,
                                                                enable_gqa=True)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 2, 2, 3, 4], graphs


def test_env_variant_providers_set_their_setting_only_during_the_call(monkeypatch):
    """qwen3x_mma_sync / qwen3x_no_fence / qwen3x_no_pdl / qwen3x_cluster / qwen3x_l2 / qwen3x_serial run qwen3x
    with one
    environment setting in
    force during each call (the C++ side reads it per call) and restore it afterwards; each says
    the setting in its note and why it is skipped where it cannot differ from qwen3x."""
    monkeypatch.delenv("QWEN3X_WGMMA_PROXY_FENCE", raising=False)
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", "auto")
    monkeypatch.delenv("QWEN3X_ATTENTION_COMBINE", raising=False)
    monkeypatch.delenv("QWEN3X_ATTENTION_OVERLAP", raising=False)
    monkeypatch.delenv("QWEN3X_SMOKE_FAILED", raising=False)
    seen = []
    call = lambda x: seen.append((os.environ.get("QWEN3X_WGMMA_PROXY_FENCE"),  # noqa: E731
                                  os.environ.get("QWEN3X_ATTENTION_MAINLOOP"), os.environ.get("QWEN3X_PDL"),
                                  os.environ.get("QWEN3X_ATTENTION_COMBINE"), os.environ.get("QWEN3X_ATTENTION_OVERLAP")))
    monkeypatch.setattr(providers, "wgmma_available", lambda: True)
    monkeypatch.setattr(providers, "pdl_available", lambda: True)
    fence = providers.no_fence_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=True)
    mma = providers.mma_sync_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=True)
    pdl = providers.no_pdl_provider(call, eligible=True)
    cluster = providers.cluster_combine_provider(call, eligible=True)
    l2 = providers.l2_combine_provider(call, eligible=True)
    serial = providers.serial_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=True)
    for p in (fence, mma, pdl, cluster, l2, serial):
        assert p.skip is None, (p.name, p.skip)
        p.build({})()
    assert seen == [("0", "auto", None, None, None), (None, "mma_sync", None, None, None),
                    (None, "auto", "0", None, None), (None, "auto", None, "cluster", None),
                    (None, "auto", None, "l2", None), (None, "auto", None, None, "0")]
    assert (l2.name, l2.note) == ("qwen3x_l2", "QWEN3X_ATTENTION_COMBINE=l2")
    assert "not a decode-sized case" in providers.l2_combine_provider(call, eligible=False).skip
    assert "QWEN3X_ATTENTION_COMBINE" not in os.environ and "QWEN3X_ATTENTION_OVERLAP" not in os.environ
    assert (serial.name, serial.note) == ("qwen3x_serial", "QWEN3X_ATTENTION_OVERLAP=0")
    assert "does not serve" in providers.serial_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=False).skip
    assert (cluster.name, cluster.note) == ("qwen3x_cluster", "QWEN3X_ATTENTION_COMBINE=cluster")
    assert "not a decode-sized case" in providers.cluster_combine_provider(call, eligible=False).skip
    monkeypatch.setattr(providers, "wgmma_available", lambda: False)
    assert "sm_90" in providers.cluster_combine_provider(call, eligible=True).skip
    assert "sm_90" in providers.l2_combine_provider(call, eligible=True).skip
    monkeypatch.setattr(providers, "wgmma_available", lambda: True)
    # a candidate make gpu's smoke step found failing is skipped, saying so; the other still runs
    monkeypatch.setenv("QWEN3X_SMOKE_FAILED", "QWEN3X_ATTENTION_COMBINE")
    assert "FAILED in the smoke run" in providers.cluster_combine_provider(call, eligible=True).skip
    assert providers.serial_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=True).skip is None
    monkeypatch.setenv("QWEN3X_SMOKE_FAILED", "QWEN3X_ATTENTION_COMBINE,QWEN3X_ATTENTION_OVERLAP")
    assert "FAILED in the smoke run" in providers.serial_provider("QWEN3X_ATTENTION_MAINLOOP", call, True).skip
    monkeypatch.delenv("QWEN3X_SMOKE_FAILED")
    assert "QWEN3X_WGMMA_PROXY_FENCE" not in os.environ and os.environ["QWEN3X_ATTENTION_MAINLOOP"] == "auto"
    assert (fence.name, fence.note) == ("qwen3x_no_fence", "QWEN3X_WGMMA_PROXY_FENCE=0")
    assert mma.note == "QWEN3X_ATTENTION_MAINLOOP=mma_sync" and pdl.note == "QWEN3X_PDL=0"
    assert "does not serve" in providers.no_fence_provider("QWEN3X_ATTENTION_MAINLOOP", call, eligible=False).skip
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", "mma_sync")
    assert "mma.sync here already" in providers.no_fence_provider("QWEN3X_ATTENTION_MAINLOOP", call, True).skip


def test_liger_module_globals_are_in_force_only_during_its_models_calls(monkeypatch):
    """model._restoring undoes Liger's module-level patches at once (they would otherwise reach
    every later model) and says what they were; model._in_force puts them back for the Liger
    model's own calls (transformers' attention looks apply_rotary_pos_emb up at every call)."""
    import sys
    import types

    mod = types.ModuleType("fake_modeling")
    original = lambda: "hf"  # noqa: E731
    mod.apply_rotary_pos_emb, mod.gone = original, 1
    monkeypatch.setitem(sys.modules, "fake_modeling", mod)
    liger_rope = lambda: "liger"  # noqa: E731
    with model._restoring(["fake_modeling"]) as changed:
        mod.apply_rotary_pos_emb, mod.added = liger_rope, 2
        del mod.gone
    assert mod.apply_rotary_pos_emb is original and mod.gone == 1 and not hasattr(mod, "added")
    assert changed[mod] == {"apply_rotary_pos_emb": liger_rope, "added": 2, "gone": model._ABSENT}
    with model._in_force(changed):
        assert mod.apply_rotary_pos_emb() == "liger" and mod.added == 2 and not hasattr(mod, "gone")
    assert mod.apply_rotary_pos_emb is original and mod.gone == 1 and not hasattr(mod, "added")
