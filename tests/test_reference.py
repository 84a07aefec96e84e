"""The references against the Hugging Face code they replace (CPU; both transformers versions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import TF5, tiny_config, tiny_model
from qwen3x.testing import assert_rel_close

from qwen3x import reference as R
from qwen3x.rope import rope_parameters

if TF5:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb
else:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward, repeat_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 128), (2, 3, 1024)])
def test_rms_norm_matches_hf_bitwise(dtype, shape):
    norm = Qwen3RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape, dtype=dtype) * 3
    assert torch.equal(R.rms_norm(x, norm.weight, 1e-6), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_residual_then_norm(dtype):
    norm = Qwen3RMSNorm(256).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, res = torch.randn(5, 256, dtype=dtype), torch.randn(5, 256, dtype=dtype)
    out, summed = R.add_rms_norm(x, res, norm.weight, norm.variance_epsilon)
    assert torch.equal(summed, res + x)
    assert torch.equal(out, norm(res + x))


def _hf_rotary(config, positions):
    rotary = Qwen3RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    return rotary, rotary(x, positions)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_qk_norm_rope_matches_hf_chain(rope, pos_dtype):
    config = tiny_config(rope=rope, head_dim=128, max_position_embeddings=256)
    B, S, Hq, Hkv, D = 2, 9, 4, 2, 128
    q, k = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D)
    qn, kn = Qwen3RMSNorm(D), Qwen3RMSNorm(D)
    with torch.no_grad():
        qn.weight.normal_()
        kn.weight.normal_()
    positions = torch.stack([torch.arange(S), torch.arange(S) + 37])  # two sequences, one offset (padded/decode)
    rotary, (cos, sin) = _hf_rotary(config, positions)
    hq, hk = apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos, sin)
    params = rope_parameters(config)
    oq, ok = R.qk_norm_rope(q, k, qn.weight, kn.weight, positions.to(pos_dtype), params.inv_freq,
                            params.attention_scaling, 1e-6)
    torch.testing.assert_close(oq, hq.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(ok, hk.transpose(1, 2), rtol=0, atol=0)


def test_qk_norm_rope_accepts_strided_views_of_a_fused_projection():
    T, Hq, Hkv, D = 11, 4, 2, 128
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    w = torch.randn(D)
    pos = torch.arange(T)
    inv = rope_parameters(tiny_config(head_dim=D)).inv_freq
    oq, ok = R.qk_norm_rope(q, k, w, w, pos, inv, 1.0, 1e-6)
    eq, ek = R.qk_norm_rope(q.contiguous(), k.contiguous(), w, w, pos, inv, 1.0, 1e-6)
    assert torch.equal(oq, eq) and torch.equal(ok, ek)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_hf_mlp_activation(dtype):
    from transformers.activations import ACT2FN

    x = torch.randn(6, 2 * 48, dtype=dtype)
    gate, up = x[:, :48], x[:, 48:]
    assert torch.equal(R.silu_and_mul(x), ACT2FN["silu"](gate) * up)


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


def _eager(q, k, v, mask_bool, scale):
    groups = q.shape[1] // k.shape[1]
    additive = None
    if mask_bool is not None:
        additive = torch.zeros(mask_bool.shape, dtype=q.dtype).masked_fill(~mask_bool, torch.finfo(q.dtype).min)
    out, _ = eager_attention_forward(_Attn(groups), q, k, v, additive, scaling=scale)
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1), (6, 2)])
@pytest.mark.parametrize("sq,skv", [(13, 13), (1, 29), (5, 29)])
def test_attention_matches_hf_eager_causal_gqa(hq, hkv, sq, skv):
    B, D = 2, 32
    q, k, v = torch.randn(B, hq, sq, D), torch.randn(B, hkv, skv, D), torch.randn(B, hkv, skv, D)
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    mask = (j <= i + skv - sq).expand(B, 1, sq, skv)
    out, lse = R.attention(q, k, v, None, D**-0.5, True)
    torch.testing.assert_close(out, _eager(q, k, v, mask, D**-0.5), rtol=1e-5, atol=1e-6)
    # lse from first principles
    kk = repeat_kv(k, hq // hkv)
    scores = (q @ kk.transpose(-1, -2)) * D**-0.5
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)


def test_attention_padding_mask_and_fully_masked_rows():
    B, H, S, D = 2, 2, 7, 16
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)  # left padding in sequence 0
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    mask = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, S, S]
    out, lse = R.attention(q, k, v, mask, D**-0.5, False)
    real = pad[:, :, None].expand(B, S, H)  # rows of real tokens
    torch.testing.assert_close(out[real], _eager(q, k, v, mask, D**-0.5)[real], rtol=1e-5, atol=1e-6)
    assert torch.all(out[0, :2] == 0) and torch.all(torch.isinf(lse[0, :, :2]))  # pad queries see nothing


@pytest.mark.parametrize("causal", [True, False])
def test_attention_varlen_is_a_block_diagonal_mask(causal):
    # Packed sequences = one padded-free sequence with a block-diagonal (and per-block bottom-right
    # causal) mask: an independent route to the same numbers.
    Hq, Hkv, D = 4, 2, 16
    lq, lk = [3, 0, 5, 1], [4, 2, 5, 1]
    cu_q = torch.tensor([1, *(1 + torch.tensor(lq).cumsum(0)).tolist()], dtype=torch.int32)  # token 0 in no sequence
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    Tq, Tk = int(cu_q[-1]) + 2, int(cu_k[-1])  # two more tokens in no sequence
    q, k, v = torch.randn(Tq, Hq, D), torch.randn(Tk, Hkv, D), torch.randn(Tk, Hkv, D)
    mask = torch.zeros(Tq, Tk, dtype=torch.bool)
    for b in range(len(lq)):
        q0, k0 = int(cu_q[b]), int(cu_k[b])
        i = torch.arange(lq[b])[:, None]
        j = torch.arange(lk[b])[None, :]
        mask[q0 : q0 + lq[b], k0 : k0 + lk[b]] = (j <= i + lk[b] - lq[b]) if causal else True
    out, lse = R.attention_varlen(q, k, v, cu_q, cu_k, 5, 5, D**-0.5, causal)
    eo, el = R.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         mask[None, None], D**-0.5, False)
    assert out.shape == (Tq, Hq, D) and lse.shape == (Hq, Tq)
    torch.testing.assert_close(out, eo[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, el[0], rtol=1e-5, atol=1e-5)
    outside = [0, Tq - 2, Tq - 1]
    assert torch.all(out[outside] == 0) and torch.all(torch.isneginf(lse[:, outside]))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_moe_router_matches_hf(norm_topk_prob, top_k):
    T, E = 37, 16
    logits = torch.randn(T, E, dtype=torch.bfloat16)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    hw, hi = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        hw = hw / hw.sum(-1, keepdim=True)
    w, ids, counts = R.moe_router(logits, top_k, norm_topk_prob)
    assert ids.dtype == torch.int32 and torch.equal(w, hw.to(torch.bfloat16))
    # the same experts as HF except among exactly tied probabilities, where the lower index goes first
    assert torch.equal(probs.gather(-1, ids.long()), probs.gather(-1, hi))
    same_p = probs.gather(-1, ids.long())
    ties = same_p[:, :-1] == same_p[:, 1:]
    assert torch.all(~ties | (ids[:, :-1] < ids[:, 1:]))
    assert torch.equal(counts.long(), torch.bincount(ids.long().flatten(), minlength=E))


@pytest.mark.parametrize("row_align", [1, 4, 16])
def test_moe_permute_is_stable_padded_and_invertible(row_align):
    T, k, E = 53, 3, 8
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    ids[:20, 0] = 5  # one popular expert; expert 7 may get none
    ids[ids == 7] = 6 if (ids == 6).sum() == 0 else ids[ids == 7]
    rows, offsets, inverse = R.moe_permute(ids, E, row_align)
    flat = ids.flatten().long()
    n = flat.numel()
    assert rows.shape == (n + E * (row_align - 1),) and offsets.shape == (E + 1,) and inverse.shape == (n,)
    assert offsets[0] == 0 and torch.all(offsets[1:] >= offsets[:-1])
    for e in range(E):
        seg = rows[offsets[e] : offsets[e + 1]]
        real = seg[seg >= 0]
        assert (offsets[e + 1] - offsets[e]) % row_align == 0
        assert torch.equal(real.long(), torch.nonzero(flat == e).squeeze(-1))  # token order within expert
        assert torch.all(seg[len(real) :] == -1)  # padding at the end of the segment
    assert torch.equal(rows[inverse.long()].long(), torch.arange(n))
    assert torch.all(rows[offsets[-1] :] == -1)


def _hf_experts_eager(x, ids, w, gate_up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = F.linear(x[t], gate_up[e]).chunk(2, dim=-1)
            out[t] += F.linear(F.silu(g) * u, down[e]) * w[t, j]
    return out


def test_moe_experts_matches_a_per_token_loop():
    T, H, I, E, k = 19, 32, 24, 6, 2
    x = torch.randn(T, H, dtype=torch.float64)
    logits = torch.randn(T, E, dtype=torch.float64)
    w, ids, _ = R.moe_router(logits, k, True)
    gate_up, down = torch.randn(E, 2 * I, H, dtype=torch.float64), torch.randn(E, H, I, dtype=torch.float64)
    out = R.moe_experts(x, ids, w, gate_up, down)
    torch.testing.assert_close(out, _hf_experts_eager(x, ids, w, gate_up, down), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.moe(x, logits, gate_up, down, k, True), out, rtol=0, atol=0)


@pytest.mark.skipif(not TF5, reason="Qwen3MoeExperts exists in transformers 5.x")
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_moe_experts_matches_hf_experts_module(impl):
    model = tiny_model(moe=True)
    block = model.model.layers[0].mlp
    block.experts.config._experts_implementation = impl
    x = torch.randn(23, model.config.hidden_size)
    _, w, ids = block.gate(x)
    expected = block.experts(x, ids, w)
    out = R.moe_experts(x, ids, w, block.experts.gate_up_proj, block.experts.down_proj)
    assert_rel_close(out, expected, 1e-5)


# --- RoPE parameters -------------------------------------------------------------------------
ROPES = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.8,
     "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: "default" if r is None else "-".join(f"{v}" for v in r.values()))
def test_rope_parameters_match_hf(rope):
    config = tiny_config(rope=rope, head_dim=128)
    rope_type = "default" if rope is None else rope["rope_type"]
    if rope_type == "default":
        hf_inv, hf_scale = Qwen3RotaryEmbedding(config).inv_freq, 1.0
    else:
        hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    ours = rope_parameters(config)
    assert torch.equal(ours.inv_freq, hf_inv.float())
    assert ours.attention_scaling == pytest.approx(hf_scale, rel=1e-12)


def test_dynamic_rope_parameters_at_a_longer_length_match_hf():
    config = tiny_config(rope={"rope_type": "dynamic", "factor": 2.0}, head_dim=128)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=1000)
    assert torch.equal(rope_parameters(config, seq_len=1000).inv_freq, hf_inv)


def test_qwen3_yarn_numbers_from_the_design_card():
    config = tiny_config(
        rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        head_dim=128, max_position_embeddings=131072,
    )
    params = rope_parameters(config)
    assert params.attention_scaling == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    assert params.attention_scaling == pytest.approx(1.1386, abs=1e-4)
    base = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(params.inv_freq[:24], base[:24])  # up to low = 23: extrapolation (unchanged)
    torch.testing.assert_close(params.inv_freq[40:], base[40:] / 4)  # from 'high' = 40: interpolated
    assert torch.all(params.inv_freq[24:40] < base[24:40])  # the ramp blends the two


def test_unsupported_rope_type_is_a_clear_error():
    config = tiny_config()
    if TF5:
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e4}
    else:
        config.rope_scaling = {"rope_type": "llama3"}
    with pytest.raises(NotImplementedError, match="rope_type 'llama3' is not supported"):
        rope_parameters(config)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_key_lengths_equal_sliced_keys(causal):
    B, Hq, Hkv, Sq, Skv, D = 3, 4, 2, 3, 11, 16
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Skv, D), torch.randn(B, Hkv, Skv, D)
    lengths = torch.tensor([3, 7, 20])  # the last is clamped to Skv
    out, lse = R.attention(q, k, v, None, D**-0.5, causal, lengths)
    for b, n in enumerate([3, 7, 11]):
        eo, el = R.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], None, D**-0.5, causal)
        torch.testing.assert_close(out[b : b + 1], eo)
        torch.testing.assert_close(lse[b : b + 1], el)
    one, _ = R.attention(q, k, v, None, D**-0.5, causal, torch.tensor(5))  # one value for the batch
    torch.testing.assert_close(one, R.attention(q, k[:, :, :5], v[:, :, :5], None, D**-0.5, causal)[0])


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any floating tensor an op produced inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("case", ["causal", "decode_rows", "mask", "query_broadcast_mask", "key_lengths", "empty"])
def test_attention_takes_queries_in_blocks_of_bounded_scores(case, monkeypatch):
    # The reference holds at most SCORE_BLOCK_ELEMENTS scores at once (query rows a block at a
    # time), so a fallback to it runs in memory linear in the sequence length; the blocks give the
    # whole matrix's answer (fp64: each row's softmax is its own)
    B, Hq, Hkv, D = 2, 4, 2, 8
    Sq, Skv = {"decode_rows": (37, 101), "empty": (0, 50)}.get(case, (97, 97))
    q, k, v = (torch.randn(B, h, s, D, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    mask, lengths, causal = None, None, case in ("causal", "decode_rows", "key_lengths")
    if case == "mask":
        mask = torch.rand(B, Hq, Sq, Skv) > 0.3
    if case == "query_broadcast_mask":
        mask = torch.rand(B, 1, 1, Skv) > 0.3
    if case == "key_lengths":
        lengths = torch.tensor([40, 97])
    whole_out, whole_lse = R.attention(q, k, v, mask, D**-0.5, causal, lengths)
    monkeypatch.setattr(R, "SCORE_BLOCK_ELEMENTS", 3 * B * Hq * Skv)  # 3 rows a block: a short last block
    with _LargestTensor() as seen:
        out, lse = R.attention(q, k, v, mask, D**-0.5, causal, lengths)
    assert seen.largest <= max(3 * B * Hq * Skv, B * Hq * Skv * D, B * Hq * Sq * D)  # scores; k, v repeated; out
    torch.testing.assert_close(out, whole_out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-12, atol=1e-14)
    assert out.shape == (B, Sq, Hq, D) and lse.shape == (B, Hq, Sq)


def test_attention_compiles_once_for_every_length():
    # Under torch.compile the reference is one block (a loop over the traced query length would
    # specialize on it: a recompile per length, then eager past the recompile limit)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(R.attention, backend=counter, dynamic=True)
    for S in (17, 33, 70):
        q, k, v = torch.randn(1, 4, S, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
        out, lse = compiled(q, k, v, None, 0.3, True)
        expected_out, expected_lse = R.attention(q, k, v, None, 0.3, True)
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(lse, expected_lse)
    assert counter.frame_count == 1


def test_moe_experts_writes_the_picks_once():
    # The picks are scattered into the output once, not copied whole once per expert (an
    # out-of-place index_put per expert: 87% of a 128-expert prefill's time on the CPU)
    T, E, k, H, I = 33, 16, 4, 8, 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x, w = torch.randn(T, H), torch.rand(T, k)
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    written = []

    class Writes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.index_put, torch.ops.aten.index_put_):
                written.append(out.numel())
            return out

    with Writes():
        out = R.moe_experts(x, ids, w, gate_up, down)
    assert sum(written) <= T * k * H
    expected = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += w[t, j] * (down[e] @ (F.silu(g) * u))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_under_vmap_over_masks_and_key_lengths():
    # torch.func runs the references: a batched mask over unbatched scores (no in-place write) and
    # batched key lengths (no host sync to trim the keys)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    masks = torch.rand(3, 2, 1, 3, 5) > 0.3
    lengths = torch.tensor([[2, 3], [5, 1], [0, 4]])
    for fn, xs in ((lambda m: R.attention(q, k, v, m, 0.5, False)[0], masks),
                   (lambda n: R.attention(q, k, v, None, 0.5, True, n)[0], lengths)):
        torch.testing.assert_close(torch.func.vmap(fn)(xs), torch.stack([fn(x) for x in xs]))
