"""Patched Qwen3 / Qwen3-MoE models on the GPU, in bf16, with every kernel in the loop. GPU only.

Small models at Qwen3's kernel-relevant dimensions (head_dim 128, GQA, MoE widths the expert GEMMs
tile) so that each layer runs qwen3x's CUDA kernels, not the references. The rule of DESIGN.md
for whole models: the patched bf16 model's error against the fp32 unpatched model (the truth) is
at most 2x the error of the unpatched bf16 model (HF sdpa, its default experts) plus the truth's
rounding and a floor (qwen3x.testing).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from models import CACHE, TF5, VOCAB, tiny_model
from qwen3x.testing import MAX_EXCUSED, assert_close_to_truth, compare_routing, router_probs, routing_agreement

import qwen3x
from qwen3x import _library

pytestmark = pytest.mark.gpu
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "dense": dict(moe=False, **DIMS),
    "dense-gqa8-yarn": dict(moe=False, rope=YARN, **(DIMS | dict(num_attention_heads=16, hidden_size=512))),
    "moe": dict(moe=True, moe_intermediate_size=128, **DIMS),
    "moe-top8": dict(moe=True, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=8, **DIMS),
}
KERNEL_OPS = ("rms_norm", "add_rms_norm", "qk_norm_rope", "attention", "silu_and_mul", "moe")


@pytest.fixture(autouse=True)
def _needs_kernels():
    missing = [op for op in KERNEL_OPS if not _library.has_cuda_kernel(op)]
    if missing:
        pytest.skip(f"no CUDA kernel for {', '.join(missing)} in this build")


@pytest.fixture(params=list(CASES), ids=list(CASES))
def models(request):
    """(truth fp32, baseline bf16, patched bf16): one model, three copies, on the GPU."""
    base = tiny_model(**CASES[request.param])
    truth = copy.deepcopy(base).cuda()
    baseline = copy.deepcopy(base).to("cuda", torch.bfloat16)
    patched = qwen3x.patch(copy.deepcopy(base).to("cuda", torch.bfloat16))
    return truth, baseline, patched


def _ids(batch, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).cuda()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def _checked_agreement(routing):
    decisive = routing.decisive_flips
    assert not decisive, f"other experts than the truth's at decided gaps, (batch, position): {decisive}"
    agrees = routing.agrees
    assert (~agrees).float().mean() <= MAX_EXCUSED, f"{int((~agrees).sum())} of {agrees.numel()} tokens routed otherwise"
    return agrees


def _routing_agrees(truth, baseline, patched, ids, **kw):
    """[B, S] False where the patched model routes a token to other experts than the truth in
    some MoE layer at a near tie (qwen3x.testing.routing_agreement): any bf16 implementation may
    route such a token either way, so the logits comparisons leave those tokens out. A different
    pick at a decided gap fails here, as do more than MAX_EXCUSED of the tokens routed otherwise.
    (Found by running these tests on the CPU emulator: one token in 48 took another expert at a
    10% gap.) All True for dense models."""
    return _checked_agreement(routing_agreement(truth, baseline, patched, ids, **kw))


def test_prefill_logits_with_left_padding(models):
    truth, baseline, patched = models
    ids = _ids(3, 77)
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    mask[2, :1] = 0
    real = mask.bool()
    kw = dict(attention_mask=mask)
    assert_close_to_truth(_logits(patched, ids, **kw)[real], _logits(baseline, ids, **kw)[real],
                          _logits(truth, ids, **kw)[real].double())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_logits_through_the_cache(models, cache):
    """Greedy generation of the patched model (prefill, then decode steps through HF's cache and
    the split-KV kernel): every step's logits against the unpatched models run teacher-forced over
    the same tokens."""
    truth, baseline, patched = models
    ids = _ids(2, 40)
    new = 24
    out = patched.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation=cache,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                           disable_compile=True)  # eager here; test_static_cache_generate_auto_compiled compiles
    steps = torch.stack(out.logits, dim=1).float()  # [B, new, V]: logits that chose tokens 40 .. 40 + new - 1
    seq = out.sequences
    positions = slice(ids.shape[1] - 1, seq.shape[1] - 1)
    agrees = _routing_agrees(truth, baseline, patched, seq)[:, positions]
    assert_close_to_truth(steps[agrees], _logits(baseline, seq)[:, positions][agrees],
                          _logits(truth, seq)[:, positions][agrees].double())


def test_static_cache_generate_auto_compiled():
    """generate() with a static cache on CUDA compiles the decode step by default (transformers 5.x):
    the patched model's ops (the cache-writing one mutates the cache) under torch.compile, as users
    get them, with the same logits rule as the eager test."""
    base = tiny_model(**CASES["dense"])
    truth = copy.deepcopy(base).cuda()
    baseline = copy.deepcopy(base).to("cuda", torch.bfloat16)
    patched = qwen3x.patch(copy.deepcopy(base).to("cuda", torch.bfloat16))
    ids = _ids(2, 40)
    new = 12
    out = patched.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(out.logits, dim=1).float()
    seq = out.sequences
    positions = slice(ids.shape[1] - 1, seq.shape[1] - 1)
    assert_close_to_truth(steps, _logits(baseline, seq)[:, positions], _logits(truth, seq)[:, positions].double())


@pytest.mark.skipif(CACHE != "cache", reason="assisted generation with a static cache: transformers 5.24 and later")
@pytest.mark.parametrize("case", ["dense", "moe"])
def test_assisted_generation_through_a_static_cache(case, monkeypatch):
    """Assisted (speculative) generation: each step verifies several drafted tokens in one forward
    into a non-empty static cache (qk_norm_rope_cache_ writes them, attention reads the filled
    slots), then crops the rejected ones (StaticLayer.crop steps the slot counter back). The logits
    of every generated token against the unpatched models teacher-forced over the same tokens."""
    base = tiny_model(**CASES[case])
    truth = copy.deepcopy(base).cuda()
    baseline = copy.deepcopy(base).to("cuda", torch.bfloat16)
    patched = qwen3x.patch(copy.deepcopy(base).to("cuda", torch.bfloat16))
    assistant = tiny_model(seed=5, **CASES[case]).to("cuda", torch.bfloat16)  # disagrees often: crops
    from transformers.cache_utils import StaticLayer

    from qwen3x import ops

    crops, writes = [], []
    crop, write = StaticLayer.crop, ops.qk_norm_rope_cache_
    monkeypatch.setattr(StaticLayer, "crop", lambda layer, n: crops.append(n) or crop(layer, n))
    monkeypatch.setattr(ops, "qk_norm_rope_cache_", lambda q, *a: writes.append(q.shape[1]) or write(q, *a))
    ids = _ids(1, 40)
    new = 16
    out = patched.generate(ids, assistant_model=assistant, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           cache_implementation="static", pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True, disable_compile=True)  # fmt: skip
    steps = torch.stack(out.logits, dim=1).float()
    seq = out.sequences
    assert steps.shape[1] == seq.shape[1] - ids.shape[1] == new
    assert crops, "no drafted token was rejected: the crop path did not run"
    assert any(n > 1 for n in writes), f"no multi-token verification pass wrote the cache directly: {writes}"
    positions = slice(ids.shape[1] - 1, seq.shape[1] - 1)
    agrees = _routing_agrees(truth, baseline, patched, seq)[:, positions]
    assert_close_to_truth(steps[agrees], _logits(baseline, seq)[:, positions][agrees],
                          _logits(truth, seq)[:, positions][agrees].double())


def test_packed_sequences_varlen(models):
    """Padding-free packing with HF's flash kwargs runs attention_varlen; each sequence's logits
    against the sequence run alone."""
    truth, baseline, patched = models
    lengths = [70, 1, 129, 64]
    seqs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    kw = dict(position_ids=torch.cat([torch.arange(n) for n in lengths])[None].cuda(), cu_seq_lens_q=cu,
              cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    got = _logits(patched, torch.cat(seqs)[None], **kw)

    def alone(model):
        return torch.cat([_logits(model, s[None]) for s in seqs], dim=1)

    assert_close_to_truth(got, alone(baseline), alone(truth).double())


def test_training_step_gradients(models):
    """loss.backward() through the patched model (the ops' autograd): gradients of the attention
    and MLP weights of the first layer against the truth's."""
    truth, baseline, patched = models
    ids = _ids(2, 50)
    grads = []
    for model in (patched, baseline, truth):
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        layer = model.model.layers[0]
        mlp = layer.mlp
        mlp_weight = mlp.experts.gate_up_proj if TF5 and hasattr(mlp, "experts") else None
        if mlp_weight is None:
            mlp_weight = mlp.experts[0].gate_proj.weight if hasattr(mlp, "experts") else mlp.gate_proj.weight
        grads.append([layer.self_attn.q_proj.weight.grad, layer.self_attn.k_norm.weight.grad, mlp_weight.grad])
    for got, base, want in zip(*grads):
        if want is None:  # an expert no token picked: no gradient anywhere
            assert got is None and base is None
            continue
        assert_close_to_truth(got.float(), base.float(), want.double())


def test_autocast_with_fp32_weights(models, monkeypatch):
    """Mixed-precision use (fp32 weights under torch.autocast, bf16 matmuls): QK-norm + RoPE runs
    its fp32 kernel (HF's norms promote bf16 q and k to their weights' fp32), attention the bf16
    kernel, 5.x's experts the bf16 kernel over the weights cast once (many picks); the logits
    against the truth, with the unpatched model under autocast as the baseline."""
    from qwen3x import ops

    truth = models[0]
    baseline, patched = copy.deepcopy(truth), qwen3x.patch(copy.deepcopy(truth))
    seen = collections.defaultdict(set)  # op -> the dtypes of its first argument
    for name in ("qk_norm_rope_", "attention", "moe_experts"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda x, *a, _f=original, _n=name, **k: seen[_n].add(x.dtype) or _f(x, *a, **k))
    ids = _ids(2, 24)
    want = _logits(truth, ids).double()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, base = _logits(patched, ids), _logits(baseline, ids)
        probs = [router_probs(m, ids) for m in (baseline, patched)]
    moe5 = TF5 and hasattr(truth.config, "num_experts")
    assert seen == {"qk_norm_rope_": {torch.float32}, "attention": {torch.bfloat16},
                    **({"moe_experts": {torch.bfloat16}} if moe5 else {})}
    k = getattr(truth.config, "num_experts_per_tok", 0)
    agrees = _checked_agreement(compare_routing(router_probs(truth, ids), *probs, k, shape=ids.shape))
    assert_close_to_truth(got[agrees], base[agrees], want[agrees])
