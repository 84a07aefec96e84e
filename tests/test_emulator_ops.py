"""csrc/'s torch glue and bindings, with the kernels' source, run on the CPU (tests/emulator).

tests/emulator/build.py's build_ops() compiles the .cu glue (attention.cu, moe.cu, rope.cu,
norm.cu, activation.cu), qk_norm_attention.cpp and torch_bindings.cpp as C++ over the CUDA
execution model, into torch.ops.qwen3x_emu.*: the schemas of torch.ops.qwen3x.*, served on CPU
tensors (the CPU plays the GPU). So the path a CUDA call takes from the dispatcher down (input
checks, copies of unaddressable views, workspaces, the split-KV plan, the regime and mainloop
choice, dtype dispatch, launches) runs here, judged by the GPU tests' rules; and a patched model
whose qwen3x ops are served by it is compared with Hugging Face's, end to end.
No AddressSanitizer here (the library loads into Python); test_emulator.py runs the kernels under it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from models import tiny_model
from qwen3x import reference as R
from qwen3x.testing import assert_close_to_truth, assert_identical

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")

D = 128


@pytest.fixture(scope="module")
def emu():
    from emulator import build
    build.build_ops()  # ~40 s on two cores the first time, then cached
    return torch.ops.qwen3x_emu


def _truth(fn, *args):
    return fn(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])


# ---- ops -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mainloop", ["mma_sync", "wgmma"])
def test_attention_views_mask_key_lengths(emu, monkeypatch, mainloop):
    """q a transposed view of a [B, S, H, D] projection, k/v slices of a static cache (a view the
    glue must copy: an odd element offset), a mask broadcast over heads, one key length for all."""
    import test_attention_gpu as gpu
    monkeypatch.setenv("QWEN3X_ATTENTION_MAINLOOP", mainloop)
    torch.manual_seed(1)
    B, Hq, Hkv, Sq, Smax = 2, 4, 2, 70, 160
    q = torch.randn(B, Sq, Hq, D, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B * Hkv * Smax * D + 1, dtype=torch.bfloat16)[1:].view(B, Hkv, Smax, D)
    v = torch.randn(B, Hkv, Smax, D, dtype=torch.bfloat16)
    mask = torch.rand(B, 1, Sq, Smax) > 0.2
    n = torch.tensor([150], dtype=torch.int32)
    out, lse = emu.attention(q, k, v, mask, D**-0.5, True, n)
    k_n, v_n, m_n = k[:, :, :150], v[:, :, :150], mask[..., :150]
    gpu._judge(out, lse, q, k_n, v_n, m_n, D**-0.5, True)


def test_attention_varlen_and_fused_entry(emu):
    import test_attention_gpu as gpu
    torch.manual_seed(2)
    lq, Hq, Hkv = [17, 70, 1], 4, 2
    T = sum(lq)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=torch.float16)
    q, k, v = (qkv[:, a * D : b * D].view(T, -1, D) for a, b in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)))
    cu = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    out, lse = emu.attention_varlen(q, k, v, cu, cu, max(lq), max(lq), D**-0.5, True)
    gpu._judge_varlen(out, lse, q, k, v, cu, cu, True)

    # the fused entry point: un-normed, un-rotated q/k [B, S, H, D] straight from the projections
    from test_emulator import _rope
    q, k, v, wq, wk, pos, inv_freq, scaling = _rope(2 * 40, 4, 2, torch.bfloat16, seed=3)
    q4, k4, v4 = (t.reshape(2, 40, -1, D) for t in (q, k, v))
    pos2 = pos.view(2, 40)
    args = (q4, k4, v4, wq, wk, pos2, inv_freq, scaling, 1e-6, None, D**-0.5, True)
    out, lse = emu.qk_norm_rope_attention(*args)
    same, _ = R.qk_norm_rope_attention(*args)
    truth, _ = _truth(R.qk_norm_rope_attention, *args)
    assert_close_to_truth(out, same, truth)


def test_qk_norm_rope_ops(emu):
    from test_emulator import _rope
    q, k, v, wq, wk, pos, inv_freq, scaling = _rope(9, 8, 2, torch.bfloat16, seed=4)
    args = (q, k, wq, wk, pos, inv_freq, scaling, 1e-6)
    want_q, want_k = R.qk_norm_rope(*args)
    truth_q, truth_k = _truth(R.qk_norm_rope, *args)
    got_q, got_k = emu.qk_norm_rope(*args)
    assert_close_to_truth(got_q, want_q, truth_q)
    assert_close_to_truth(got_k, want_k, truth_k)
    q2, k2 = q.clone(), k.clone()  # in place, on views of one buffer
    buf = torch.cat([q2.flatten(1), k2.flatten(1)], dim=1)
    qv, kv = buf[:, : q.shape[1] * D].view_as(q), buf[:, q.shape[1] * D :].view_as(k)
    emu.qk_norm_rope_(qv, kv, wq, wk, pos, inv_freq, scaling, 1e-6)
    assert_identical(qv, got_q, "in-place q vs out-of-place q")
    assert_identical(kv, got_k, "in-place k vs out-of-place k")


def test_in_place_rope_overlap_checks(emu):
    """Strided views ATen cannot judge (get_overlap_status: TooHard): heads of one buffer that
    meet are refused, heads that do not (a fused projection's q and k) are served. Found by
    running test_kernels_gpu.py on the emulator: q[:, :2] given as both q and k was served."""
    from test_emulator import _rope
    q, k, _, wq, wk, pos, inv_freq, scaling = _rope(4, 4, 2, torch.bfloat16, seed=8)
    q = q.contiguous()
    args = (wq, wk, pos, inv_freq, scaling, 1e-6)
    for qv, kv in ((q[:, :2], q[:, :2]), (q[:, :2], q[:, 1:3]), (q[:, 1:3], q[:, :2])):
        with pytest.raises(ValueError, match="qwen3x.qk_norm_rope_: expected q and k not to overlap"):
            emu.qk_norm_rope_(qv, kv, *args)
    emu.qk_norm_rope_(q[:, :2], q[:, 2:], *args)  # disjoint heads of every token
    rows = torch.empty(8 * 128, dtype=torch.bfloat16).as_strided((4, 2, 128), (128, 128, 1))  # rows meet
    with pytest.raises(ValueError, match="expected q to give every element its own memory"):
        emu.qk_norm_rope_(rows, k.contiguous(), *args)

def test_norms_and_silu(emu):
    torch.manual_seed(5)
    x = torch.randn(6, 2560 + 64, dtype=torch.bfloat16)[:, :2560]
    r = torch.randn(6, 2560, dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2560, dtype=torch.bfloat16)
    assert_close_to_truth(emu.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), _truth(R.rms_norm, x, w, 1e-6))
    normed, summed = emu.add_rms_norm(x, r, w, 1e-6)
    want = R.add_rms_norm(x, r, w, 1e-6)
    truth = _truth(R.add_rms_norm, x, r, w, 1e-6)
    assert_close_to_truth(normed, want[0], truth[0])
    assert_close_to_truth(summed, want[1], truth[1])
    g = torch.randn(5, 2 * 768, dtype=torch.float16) * 3
    assert_close_to_truth(emu.silu_and_mul(g), R.silu_and_mul(g), _truth(R.silu_and_mul, g))


@pytest.mark.parametrize("mainloop", ["mma_sync", "wgmma"])
def test_moe_ops(emu, monkeypatch, mainloop):
    """Router, permutation (exact), experts and the whole moe op at a prefill-regime size."""
    monkeypatch.setenv("QWEN3X_MOE_MAINLOOP", mainloop)
    g = torch.Generator().manual_seed(6)
    T, E, k, H, I = 300, 4, 2, 128, 64
    hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=g)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(torch.bfloat16)
    w, ids, counts = emu.moe_router(logits, k, True)
    rw, rids, rcounts = R.moe_router(logits, k, True)
    assert_identical(ids, rids, "expert ids")
    assert_identical(counts, rcounts, "tokens per expert")
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=0)
    for got, want, what in zip(emu.moe_permute(ids, E, 128), R.moe_permute(ids, E, 128),
                               ("sorted_rows", "offsets", "inverse")):
        assert_identical(got, want, what)
    out = emu.moe_experts(hidden, ids, w, gate_up, down)
    assert_close_to_truth(out, R.moe_experts(hidden, ids, w, gate_up, down),
                          _truth(R.moe_experts, hidden, ids, w, gate_up, down))
    whole = emu.moe(hidden, logits, gate_up, down, k, True)
    assert_close_to_truth(whole, R.moe(hidden, logits, gate_up, down, k, True),
                          _truth(R.moe, hidden, logits, gate_up, down, k, True))


def test_bad_inputs_name_the_op(emu):
    q = torch.randn(1, 4, 8, D, dtype=torch.bfloat16)
    k = torch.randn(1, 3, 8, D, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"qwen3x\.attention: .*"):
        emu.attention(q, k, k, None, 1.0, True)  # 4 query heads over 3 kv heads
    with pytest.raises(ValueError, match=r"qwen3x\.moe_experts: .*multiple of 128"):
        x = torch.randn(2, 96, dtype=torch.bfloat16)
        emu.moe_experts(x, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1), torch.randn(2, 128, 96).bfloat16(),
                        torch.randn(2, 96, 64).bfloat16())


def test_every_check_builds_its_message_without_iostreams():
    """csrc/ checks through QWEN3X_CHECK only: a bare TORCH_CHECK would format its message with
    c10::str's ostringstream, the path that crashed on the H100 (core/message.h)."""
    from pathlib import Path
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    bare = [f"{p.relative_to(csrc)}:{i}" for p in sorted(csrc.rglob("*")) if p.suffix in {".h", ".cuh", ".cu", ".cpp"}
            and p.name != "message.h" for i, line in enumerate(p.read_text().splitlines(), 1)
            if "TORCH_CHECK" in line and not line.lstrip().startswith("//")]
    assert not bare, f"bare TORCH_CHECK (use QWEN3X_CHECK) at {bare}"


@pytest.mark.parametrize("call,message", [
    (lambda emu: emu.moe_router(torch.zeros(4, 8), 9, True),
     "qwen3x.moe_router: expected 1 <= top_k <= min(experts, 16) = 8, got 9"),
    (lambda emu: emu.moe_router(torch.zeros(8), 2, True),
     "qwen3x.moe_router: expected router_logits [tokens, experts], got shape [8]"),
    (lambda emu: emu.rms_norm(torch.randn(3, 64), torch.randn(()), 1e-6),
     "qwen3x.rms_norm: expected weight to have shape [64], got []"),
    (lambda emu: emu.rms_norm(torch.randn(3, 64), torch.randn(64, 2)[:, 0], 1e-6),
     "qwen3x.rms_norm: expected weight to be contiguous, got stride [2]"),
    (lambda emu: emu.qk_norm_rope_(torch.randn(1, 2, D)[:, :1].expand(4, 2, D), torch.randn(4, 1, D),
                                   torch.ones(D), torch.ones(D), torch.arange(4), torch.rand(D // 2), 1.0, 1e-6),
     "qwen3x.qk_norm_rope_: expected q to give every element its own memory (it is written in place; "
     "an expanded view is not), got strides [0, 0, 1]"),
], ids=["int", "shape", "empty_shape", "stride", "strides"])
def test_numbers_in_messages(emu, call, message):
    """The checks' messages with numbers, shapes and strides in them, as qwen3x formats them
    (core/message.h, without iostreams): word for word, torch's [2, 3] style."""
    with pytest.raises(ValueError) as info:
        call(emu)
    assert str(info.value).splitlines()[0] == message


# ---- a patched model, its qwen3x ops served by the emulated kernels ------------------------------
@pytest.fixture
def kernels_on_cpu(emu):
    """torch.ops.qwen3x.* on CPU tensors run the glue and kernels (not the references) meanwhile."""
    lib = torch.library.Library("qwen3x", "IMPL")
    calls: dict[str, int] = {}

    def counted(op):
        kernel = getattr(emu, op)

        def run(*args):
            calls[op] = calls.get(op, 0) + 1
            return kernel(*args)
        return run

    from emulator.gpu_tests import OPS
    for op in OPS:
        lib.impl(op, counted(op), "CPU", allow_override=True)
    yield calls
    lib._destroy()


@pytest.mark.parametrize("moe", [False, True])
def test_patched_model_on_the_kernels(kernels_on_cpu, moe):
    """A tiny bf16 Qwen3 / Qwen3-MoE (head_dim 128, widths the kernels tile) patched, its ops on the
    emulated kernels: logits within the rule of the unpatched bf16 model's error against fp64,
    and the same greedy tokens as HF's with a static cache (qk_norm_rope_cache_, key lengths)."""
    import qwen3x
    kw = dict(hidden_size=128, head_dim=D, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)
    if moe:
        kw |= dict(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    hf = tiny_model(moe=moe, seed=3, **kw).to(torch.bfloat16)
    # fp64 truth; fp32 for MoE (transformers 5's grouped_mm experts take no fp64)
    truth_model = tiny_model(moe=moe, seed=3, **kw).to(torch.float32 if moe else torch.float64)
    patched = tiny_model(moe=moe, seed=3, **kw).to(torch.bfloat16)
    qwen3x.patch(patched)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth = truth_model(ids).logits
        assert_close_to_truth(patched(ids).logits, hf(ids).logits, truth)
        want = hf.generate(ids[:1, :9], max_new_tokens=6, do_sample=False, cache_implementation="static")
        got = patched.generate(ids[:1, :9], max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert_identical(got, want, "greedy tokens")
    ran = set(kernels_on_cpu)
    assert {"rms_norm", "add_rms_norm", "qk_norm_rope_", "qk_norm_rope_cache_", "attention"} <= ran, ran
    if moe:  # transformers 5.x: router, then the experts; 4.57: the whole block in one op
        assert {"moe_router", "moe_experts"} <= ran or "moe" in ran, ran
    else:
        assert "silu_and_mul" in ran, ran
