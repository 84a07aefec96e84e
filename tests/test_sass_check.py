"""cmake/sass_check.py's rules on hand-written SASS (CI runs the script on the real build; this
checks that its rules can fail)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "cmake" / "sass_check.py"
_spec = importlib.util.spec_from_file_location("sass_check", _PATH)
sass_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("sass_check", sass_check)  # its dataclass looks its module up
_spec.loader.exec_module(sass_check)

PDL_KERNEL = "qwen3x::moe::moe_combine_kernel<__half>"  # one of sass_check.PDL_KERNELS
OTHER_KERNEL = "qwen3x::norm::rms_norm_scalar_kernel<float>"


def _kernel(arch: str, body: list[str], name: str):
    lines = [f"\tarch = {arch}", "\t\tFunction : _Z1kv"]
    lines += [f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate(body)]
    (k,) = sass_check.parse_sass("\n".join(lines)).values()
    k.name, k.reg, k.stack, k.local = name, 32, 0, 0
    return k


def _pdl_problems(arch, body, name=PDL_KERNEL):
    return [p for p in sass_check.problems_of(_kernel(arch, body, name)) if p.startswith("PDL")]


WAIT_FIRST = ["LDC R1, c[0x0][0x28]", "ACQBULK", "PREEXIT", "LDG.E R0, desc[UR4][R2.64]",
              "STG.E desc[UR4][R2.64], R5", "EXIT"]


def test_a_pdl_kernel_that_waits_first_passes():
    assert _pdl_problems("sm_90a", WAIT_FIRST) == []


@pytest.mark.parametrize("access", ["LDG.E R0, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R2.64], R4",
                                    "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]", "ATOMG.E.ADD.STRONG.GPU PT, R0, [R2.64], R5",
                                    "LD.E R0, [R2.64]"])
def test_a_global_access_before_the_wait_is_reported(access):
    body = ["LDC R1, c[0x0][0x28]", access, "ACQBULK", "PREEXIT", "EXIT"]
    assert _pdl_problems("sm_90a", body) == ["PDL: a global memory access before griddepcontrol.wait"]


def test_a_missing_wait_or_trigger_is_reported():
    assert _pdl_problems("sm_90a", ["PREEXIT", "LDG.E R0, desc[UR4][R2.64]", "EXIT"]) == [
        "PDL: no griddepcontrol.wait (ACQBULK)"]
    assert _pdl_problems("sm_90a", ["ACQBULK", "LDG.E R0, desc[UR4][R2.64]", "EXIT"]) == [
        "PDL: no griddepcontrol.launch_dependents (PREEXIT)"]


def test_pdl_is_required_only_of_pdl_kernels_on_sm90a():
    no_wait = ["LDG.E R0, desc[UR4][R2.64]", "EXIT"]
    assert _pdl_problems("sm_80", no_wait) == []  # never launched with PDL there
    assert _pdl_problems("sm_90a", no_wait, OTHER_KERNEL) == []  # launched plainly


def test_shared_and_constant_loads_are_not_global_accesses():
    body = ["LDC R1, c[0x0][0x28]", "LDS R0, [R2]", "STS [R2], R0", "LDSM.16.M88.4 R4, [R8]", "ACQBULK",
            "PREEXIT", "EXIT"]
    assert _pdl_problems("sm_90a", body) == []


GEMM2 = "qwen3x::moe::moe_expert_gemm_kernel<__half, qwen3x::moe::GemmConfig<16, 64, 1, 4, 6, (qwen3x::moe::GemmMainloop)0>, (qwen3x::moe::GemmKind)1>"


def test_gemm2_may_read_before_its_wait_but_not_write():
    reads = ["LDG.E.STRONG.GPU R0, desc[UR4][R2.64]", "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]", "ACQBULK",
             "PREEXIT", "STG.E desc[UR4][R2.64], R5", "EXIT"]
    assert _pdl_problems("sm_90a", reads, GEMM2) == []
    writes = ["LDG.E R0, desc[UR4][R2.64]", "STG.E desc[UR4][R2.64], R5", "ACQBULK", "PREEXIT", "EXIT"]
    assert _pdl_problems("sm_90a", writes, GEMM2) == ["PDL: a global memory write before griddepcontrol.wait"]
    gemm1 = GEMM2.replace("GemmKind)1>", "GemmKind)0>")  # GEMM1 waits first
    assert _pdl_problems("sm_90a", reads, gemm1) == ["PDL: a global memory access before griddepcontrol.wait"]


WGMMA_KERNEL = "qwen3x::attn::attention_fwd_kernel<__half, true, false>"  # one of sass_check.WGMMA_LOOP_KERNELS


def _loop(body: list[str]) -> list[str]:
    """body inside a loop: the last instruction branches back to the first."""
    return ["ACQBULK", "PREEXIT", *body, "@P0 BRA 0x20", "EXIT"]


def test_a_pipelined_wgmma_loop_passes_and_a_serialized_one_is_reported():
    issue = [f"HGMMA.64x64x16.F32.BF16 R88, R{120 + 4 * i}, gdesc[UR20], R88" for i in range(11)]
    pipelined = _loop([*issue, "HGMMA.64x64x16.F32.BF16 R88, R164, gdesc[UR20], R88, gsb0",
                       "WARPGROUP.DEPBAR.LE gsb0, 0x0"])
    assert sass_check.problems_of(_kernel("sm_90a", pipelined, WGMMA_KERNEL)) == []
    serialized = _loop([x for ins in issue + ["HGMMA.64x64x16.F32.BF16 R88, R164, gdesc[UR20], R88"]
                        for x in (ins + ", gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0")])
    assert sass_check.problems_of(_kernel("sm_90a", serialized, WGMMA_KERNEL)) == [
        "wgmma serialized: 12 waits for 12 HGMMA in the main loop"]


VECTOR_KERNEL = "qwen3x::rope::qk_norm_rope_kernel<__nv_bfloat16, false>"  # one of sass_check.VECTOR_KERNELS


OVERLAP_KERNEL = "qwen3x::attn::attention_fwd_kernel<__nv_bfloat16, true, true>(qwen3x::attn::Params)"


def _overlap_loop(softmax_after_the_wait: bool) -> list[str]:
    """The overlapped loop's shape: Q K^T and P V issued, `wait_group 1`, the tile's softmax, then
    (next tile) `wait_group 0`; or with the wait hoisted: the softmax behind `wait_group 0`."""
    issue = [f"HGMMA.64x64x16.F32.BF16 R88, R{120 + 4 * i}, gdesc[UR20], R88" for i in range(11)]
    issue.append("HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR24], R24, gsb0")
    exps = [f"MUFU.EX2 R{88 + i}, R{88 + i}" for i in range(sass_check.OVERLAP_MIN_EXPS)]
    waits = ["WARPGROUP.DEPBAR.LE gsb0, 0x1", "WARPGROUP.DEPBAR.LE gsb0, 0x0"]
    if softmax_after_the_wait:
        return _loop(["WARPGROUP.DEPBAR.LE gsb0, 0x0", *issue, waits[0], *exps])
    return _loop(["WARPGROUP.DEPBAR.LE gsb0, 0x0", *issue, *waits, *exps])


def test_an_overlapped_loop_whose_softmax_waits_for_p_v_is_reported():
    assert sass_check.problems_of(_kernel("sm_90a", _overlap_loop(True), OVERLAP_KERNEL)) == []
    assert sass_check.problems_of(_kernel("sm_90a", _overlap_loop(False), OVERLAP_KERNEL)) == [
        "overlap lost: 0 exponentials in the main loop between wgmma `wait_group 1` and the next "
        f"wait, expected >= {sass_check.OVERLAP_MIN_EXPS}"]
    # the serial loop (third template argument false) is not held to it
    serial = OVERLAP_KERNEL.replace("true, true", "true, false")
    assert sass_check.problems_of(_kernel("sm_90a", _overlap_loop(False), serial)) == []


@pytest.mark.parametrize("load", ["LDG.E.128 R4, desc[UR4][R2.64]", "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]"])
def test_a_vector_kernel_may_load_16_bytes_directly_or_by_cp_async(load):
    body = ["ACQBULK", "PREEXIT", load, "STG.E.128 desc[UR4][R2.64], R4", "EXIT"]
    assert [p for p in sass_check.problems_of(_kernel("sm_90a", body, VECTOR_KERNEL)) if "16-byte" in p] == []


def test_a_vector_kernel_without_16_byte_loads_is_reported():
    body = ["ACQBULK", "PREEXIT", "LDG.E.64 R4, desc[UR4][R2.64]", "LDGSTS.E.BYPASS [R3], desc[UR4][R4.64]",
            "STG.E.128 desc[UR4][R2.64], R4", "EXIT"]
    assert any("16-byte" in p for p in sass_check.problems_of(_kernel("sm_90a", body, VECTOR_KERNEL)))


def test_a_vector_load_kernel_needs_16_byte_loads_only():
    """moe_gate writes a few 2-byte logits a row: its 16-byte rule is on the loads."""
    gate = "qwen3x::moe::moe_gate_kernel<__nv_bfloat16>"
    body = ["ACQBULK", "PREEXIT", "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "STG.E.U16 desc[UR4][R2.64], R4", "EXIT"]
    assert [p for p in sass_check.problems_of(_kernel("sm_90a", body, gate)) if "16-byte" in p] == []
    narrow = ["ACQBULK", "PREEXIT", "LDG.E.64 R4, desc[UR4][R2.64]", "STG.E.U16 desc[UR4][R2.64], R4", "EXIT"]
    assert "no 16-byte loads" in sass_check.problems_of(_kernel("sm_90a", narrow, gate))
