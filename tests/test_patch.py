"""Tiny Qwen3 / Qwen3-MoE models: patched vs unpatched from the same seed (fp32, CPU)."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import importlib.util
import inspect
import os
import pickle
import types

import pytest
import torch
from models import CACHE, EXPERTS_BY_NAME, TF5, VOCAB, tiny_model
from qwen3x.testing import assert_rel_close

import qwen3x

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
REL = 1e-5


def _ids(batch=2, seq=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


CASES = {
    "dense": dict(moe=False),
    "dense-yarn": dict(moe=False, rope=YARN),
    "dense-head128-gqa4": dict(moe=False, head_dim=128, num_attention_heads=8, num_key_value_heads=2),
    "moe": dict(moe=True),
    "moe-top1": dict(moe=True, num_experts_per_tok=1),
    "moe-top8-unnormalized": dict(moe=True, num_experts_per_tok=8, norm_topk_prob=False),
    "moe-mixed-layers": dict(moe=True, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2),
    "moe-yarn": dict(moe=True, rope=YARN),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def pair(request):
    """(unpatched, patched) copies of one model."""
    base = tiny_model(**CASES[request.param])
    return base, qwen3x.patch(copy.deepcopy(base))


def test_logits_match(pair):
    base, patched = pair
    ids = _ids()
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)
    assert qwen3x.is_patched(patched) and not qwen3x.is_patched(base)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_identical(pair, cache):
    base, patched = pair
    ids = _ids(seq=6)
    kw = dict(max_new_tokens=16, do_sample=False, cache_implementation=cache, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))


def test_left_padded_batch(pair):
    base, patched = pair
    ids = _ids(batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    out, ref = _logits(patched, ids, attention_mask=mask), _logits(base, ids, attention_mask=mask)
    real = mask.bool()
    assert_rel_close(out[real], ref[real], REL)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))


def test_decode_against_a_prefilled_cache_matches(pair):
    base, patched = pair
    ids = _ids(seq=12)
    with torch.no_grad():
        ob = base(ids[:, :8], use_cache=True)
        op = patched(ids[:, :8], use_cache=True)
        nb = base(ids[:, 8:], **{CACHE: getattr(ob, CACHE)}).logits
        np_ = patched(ids[:, 8:], **{CACHE: getattr(op, CACHE)}).logits
    assert_rel_close(np_, nb, REL)


def test_gradients_match(pair):
    base, patched = pair
    base.train()
    patched.train()
    ids = _ids()
    base(ids, labels=ids).loss.backward()
    patched(ids, labels=ids).loss.backward()
    _assert_same_grads(base, patched)


def _assert_same_grads(base, patched):
    grads = dict(base.named_parameters())
    for name, p in patched.named_parameters():
        ref = grads[name].grad
        assert (p.grad is None) == (ref is None), name  # e.g. an expert no token picked: no grad at all
        if ref is not None:
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_gradients_match_with_left_padding(pair):
    """Fine-tuning on a padded batch: padded query rows see no key (the attention backward's masked
    path, qwen3x._backward), and their labels are ignored."""
    base, patched = pair
    base.train()
    patched.train()
    ids = _ids(batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    base(ids, attention_mask=mask, labels=labels).loss.backward()
    patched(ids, attention_mask=mask, labels=labels).loss.backward()
    _assert_same_grads(base, patched)


@pytest.mark.parametrize("padded", [False, True])
def test_reference_fallback_trains_without_holding_the_score_matrix(padded, monkeypatch):
    # Where no kernel serves attention (on a GPU: fp32, fp64, other head_dims) the layers run the
    # reference; under autograd with the op's gradient formula, which keeps the inputs, not the
    # reference's own autograd, which kept the fp32 scores and softmax [B, Hq, S, S] of every layer
    # (fp32 fine-tuning ran out of memory where HF's SDPA trains)
    import qwen3x.layers.attention as attention_layer

    monkeypatch.setattr(attention_layer, "reference_instead", lambda *args, **kwargs: True)
    base = tiny_model(num_attention_heads=8, num_key_value_heads=2, head_dim=8).train()
    patched = qwen3x.patch(copy.deepcopy(base))
    B, S = 2, 48
    ids = _ids(batch=B, seq=S)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    largest = {}

    def loss_of(model):  # and the most elements of a floating tensor autograd keeps for the backward
        def pack(t):
            if t.is_floating_point():
                largest[model] = max(largest.get(model, 0), t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return model(ids, attention_mask=mask, labels=labels).loss

    loss_of(patched).backward()
    loss_of(base).backward()
    _assert_same_grads(base, patched)
    scores = B * base.config.num_attention_heads * S * S
    assert largest[patched] < scores and largest[base] < scores  # HF's SDPA keeps no [B, Hq, S, S] tensor either


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_training_keeps_no_more_for_the_backward_than_hf(moe):
    # What autograd keeps from a training forward (tensors other than the parameters, by storage):
    # no more than HF's. The dense MLP copied gate and up into one weight every step and kept the
    # copy for the backward (2/3 of the MLP's weights beyond HF's through full fine-tuning)
    base = tiny_model(moe=moe, hidden_size=128, intermediate_size=512, mlp_only_layers=[0] if moe else None).train()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(batch=1, seq=8)

    def saved_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss.backward()
        return sum(saved.values())

    mlp_weights = 2 * 512 * 128 * 4  # gate and up of one dense MLP, fp32
    assert saved_bytes(patched) < saved_bytes(base) + mlp_weights // 4
    _assert_same_grads(base, patched)


def test_backward_inside_activation_offloading(pair):
    # TRL's activation_offloading (and torch.autograd.graph.save_on_cpu around a whole step) runs the
    # backward with saved-tensor hooks active, where torch.func refuses to run: the ops' backward
    # formulas recompute under plain autograd
    base, patched = pair
    base.train()
    patched.train()
    ids = _ids()
    for model in (base, patched):
        with torch.autograd.graph.save_on_cpu():
            model(ids, labels=ids).loss.backward()
    _assert_same_grads(base, patched)


def test_state_dict_unchanged_and_unpatch_exact(pair):
    base, patched = pair
    ids = _ids()
    _logits(patched, ids)  # runs once, packing weights where it does
    sd_base, sd_patched = base.state_dict(), patched.state_dict()
    assert list(sd_base) == list(sd_patched)
    for name in sd_base:
        assert sd_base[name].shape == sd_patched[name].shape and torch.equal(sd_base[name], sd_patched[name]), name
    qwen3x.unpatch(patched)
    assert not qwen3x.is_patched(patched)
    for (n1, m1), (n2, m2) in zip(base.named_modules(), patched.named_modules()):
        assert n1 == n2 and type(m1) is type(m2), n1
    assert torch.equal(_logits(patched, ids), _logits(base, ids))


def test_patch_is_idempotent_and_rejects_other_models():
    model = tiny_model()
    qwen3x.patch(qwen3x.patch(model))
    assert all(type(m).__mro__.count(type(m).__mro__[1]) == 1 for m in model.modules())
    with pytest.raises(TypeError, match="qwen3x.patch: Linear holds no transformers Qwen3"):
        qwen3x.patch(torch.nn.Linear(2, 2))


def test_patch_transformers_patches_models_built_afterwards():
    base = tiny_model(moe=True)
    qwen3x.patch_transformers()
    try:
        built = tiny_model(moe=True)
        assert qwen3x.is_patched(built)
    finally:
        qwen3x.unpatch_transformers()
    assert not qwen3x.is_patched(tiny_model(moe=True))
    ids = _ids()
    assert_rel_close(_logits(built, ids), _logits(base, ids), REL)


def test_reinitialization_under_patch_transformers_reaches_every_module():
    # HF's _init_weights tests modules by the modeling module's class names (5.x: isinstance(module,
    # Qwen3MoeExperts)), which patch_transformers once rebound to qwen3x's classes: modules of a model
    # built before, or unpatched, must still be initialized (they were skipped: experts and router
    # kept their old weights)
    def reinitialized(model):
        torch.manual_seed(1)
        model.apply(model._init_weights)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    expected = reinitialized(tiny_model(moe=True))
    before = tiny_model(moe=True)
    qwen3x.patch_transformers()
    try:
        after = tiny_model(moe=True)
        unpatched = qwen3x.unpatch(tiny_model(moe=True))
        assert qwen3x.is_patched(after) and not qwen3x.is_patched(before) and not qwen3x.is_patched(unpatched)
        for model in (before, after, unpatched):
            got = reinitialized(model)
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                assert torch.equal(got[name], value), name
    finally:
        qwen3x.unpatch_transformers()


def test_patch_transformers_leaves_hf_names_to_hf_classes(tmp_path):
    # The names stay HF's: a model built before the call (or unpatched) still pickles (pickle looks
    # a class up by name: "not the same object" when the name held qwen3x's class), and re-creating
    # a module without constructor arguments (unpickling, copy, DataParallel's replicas) keeps its
    # class, patched or not
    import transformers.models.qwen3_moe.modeling_qwen3_moe as modeling

    hf_classes = {name: getattr(modeling, name) for name in dir(modeling) if name.startswith("Qwen3Moe")}
    before = tiny_model(moe=True)
    qwen3x.patch_transformers()
    try:
        assert {name: getattr(modeling, name) for name in hf_classes} == hf_classes
        after = tiny_model(moe=True)
        for model, patched in ((before, False), (after, True), (qwen3x.unpatch(tiny_model(moe=True)), False)):
            for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
                assert qwen3x.is_patched(clone) == patched
                assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
            torch.save(model, tmp_path / "model.pt")
            assert qwen3x.is_patched(torch.load(tmp_path / "model.pt", weights_only=False)) == patched
        attention = type(before.model.layers[0].self_attn)
        assert type(attention.__new__(attention)) is attention  # (what a replica starts from)
        assert qwen3x.is_patched(attention(before.config, 0))  # (a layer built by hand)
        assert list(inspect.signature(attention).parameters) == ["config", "layer_idx"]
        # models built in several threads at once: one qwen3x class per HF class (pickle finds it)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            built = list(pool.map(lambda seed: tiny_model(moe=True, seed=seed), range(4)))
        assert len({type(m.model.layers[0].self_attn) for m in built}) == 1
        pickle.dumps(built)
        # a patched model still pickles after another library rebinds an HF name (as Liger-Kernel does)
        norm = modeling.Qwen3MoeRMSNorm
        modeling.Qwen3MoeRMSNorm = type("OtherRMSNorm", (torch.nn.Module,), {})
        try:
            assert qwen3x.is_patched(pickle.loads(pickle.dumps(after)))
        finally:
            modeling.Qwen3MoeRMSNorm = norm
    finally:
        qwen3x.unpatch_transformers()
    assert not qwen3x.is_patched(tiny_model(moe=True))


def test_weights_moved_after_patch_are_repacked():
    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    _logits(patched, ids)
    patched.double()  # every parameter gets new storage: the packed views must be rebuilt
    base.double()
    if TF5:
        base.set_experts_implementation("eager")  # HF's grouped_mm has no fp64 kernel
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)  # fp64: HF keeps fp32 RoPE angles


def test_save_pretrained_roundtrip_with_attn_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    for moe in (False, True):
        base = tiny_model(moe=moe)
        base.save_pretrained(tmp_path / str(moe))
        kw = {"experts_implementation": "qwen3x"} if (moe and EXPERTS_BY_NAME) else {}
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(moe), attn_implementation="qwen3x", **kw).eval()
        assert loaded.config._attn_implementation == "qwen3x"
        ids = _ids(seq=5)
        assert_rel_close(_logits(loaded, ids), _logits(base, ids), REL)
        gen_kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids, **gen_kw), base.generate(ids, **gen_kw))
        # and the usual flow: load, patch, generate, unpatch
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / str(moe)).eval()
        qwen3x.patch(plain)
        assert torch.equal(plain.generate(ids, **gen_kw), base.generate(ids, **gen_kw))
        qwen3x.unpatch(plain)
        assert not qwen3x.is_patched(plain)


@pytest.mark.parametrize("moe", [False, True])
def test_save_pretrained_of_a_patched_model_that_ran(tmp_path, moe):
    """After a forward the q/k/v and gate/up parameters are views of packed buffers (packing.py):
    save_pretrained must still write each parameter as itself."""
    from transformers import AutoModelForCausalLM

    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    patched.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, p), (_, q) in zip(base.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    assert_rel_close(_logits(loaded, ids), _logits(base, ids), REL)


def _storages_shared(model) -> list[str]:
    seen, shared = {}, []
    for name, p in model.named_parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen:
            shared.append(f"{seen[ptr]} ~ {name}")
        seen.setdefault(ptr, name)
    return shared


@pytest.mark.parametrize("moe", [False, True])
def test_checkpoint_writers_see_separate_parameters_after_a_forward(tmp_path, moe):
    """accelerate's and safetensors' save_model take parameters sharing a storage for tied copies
    (accelerate keeps one, safetensors refuses): state_dict() gives packed parameters their own
    storage again, and the next forward packs again."""
    from safetensors.torch import load_model, save_model

    base = tiny_model(moe=moe, **({"num_experts_per_tok": 2} if moe else {}))
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    assert _storages_shared(patched), "the forward should have packed q/k/v and gate/up"
    save_model(patched, str(tmp_path / "m.safetensors"))
    assert not _storages_shared(patched)
    fresh = tiny_model(moe=moe, seed=5)
    load_model(fresh, str(tmp_path / "m.safetensors"))
    for (name, p), (_, q) in zip(base.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)  # packs again
    assert _storages_shared(patched)


def test_load_state_dict_with_assign_drops_the_packed_buffers():
    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    other = tiny_model(seed=3)
    patched.load_state_dict(other.state_dict(), assign=True)
    assert all(qwen3x.layers.packing.ATTR not in m.__dict__ for m in patched.modules())
    assert_rel_close(_logits(patched, ids), _logits(other, ids), REL)


def test_a_patched_model_that_ran_pickles_and_unpatch_gives_back_separate_storages():
    import pickle

    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    clone = pickle.loads(pickle.dumps(patched))
    assert_rel_close(_logits(clone, ids), _logits(base, ids), REL)
    qwen3x.unpatch(patched)
    assert not _storages_shared(patched)
    assert all(not m._state_dict_pre_hooks and not m._load_state_dict_post_hooks for m in patched.modules())
    assert torch.equal(_logits(patched, ids), _logits(base, ids))


@pytest.mark.parametrize("moe", [False, True])
def test_checkpoint_writers_after_load_state_dict_into_a_packed_model(tmp_path, moe):
    """load_state_dict into packed parameters copies into the buffer, which stays theirs: the
    checkpoint writers and unpatch must still find them (until 2026-11-28 the load dropped the
    buffers' record, so accelerate's save_model left q/k/v and gate/up out of the checkpoint and
    safetensors' refused, also after unpatch)."""
    from safetensors.torch import load_model, save_model

    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    other = tiny_model(moe=moe, seed=3)
    patched.load_state_dict(other.state_dict())
    assert_rel_close(_logits(patched, ids), _logits(other, ids), REL)
    save_model(patched, str(tmp_path / "m.safetensors"))
    fresh = tiny_model(moe=moe, seed=5)
    load_model(fresh, str(tmp_path / "m.safetensors"))
    for (name, p), (_, q) in zip(other.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
    _logits(patched, ids)  # packs again
    patched.load_state_dict(base.state_dict())
    qwen3x.unpatch(patched)
    assert not _storages_shared(patched)
    assert torch.equal(_logits(patched, ids), _logits(base, ids))


def _bytes_held(model) -> int:
    """Bytes of the distinct storages the model's parameters and qwen3x's packed buffers hold."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    for m in model.modules():
        for buffer, _ in m.__dict__.get(qwen3x.layers.packing.ATTR, {}).values():
            storages[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("moe", [False, True])
def test_pickle_and_deepcopy_of_a_packed_model_are_the_models_size(moe):
    """pickle writes a parameter's whole storage, once per parameter (4.57's experts: the packed
    buffer of all experts, once per expert weight), and deepcopy copied the buffers beside the
    parameters' own copies: both see each parameter with its own storage now."""
    import pickle

    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    _logits(patched, ids)
    assert _storages_shared(patched)
    size = len(pickle.dumps(base))
    assert len(pickle.dumps(patched)) < 1.05 * size
    _logits(patched, ids)
    clone = copy.deepcopy(patched)
    assert _bytes_held(clone) == _bytes_held(base)
    assert_rel_close(_logits(clone, ids), _logits(base, ids), REL)
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)


def test_compiled_model_after_a_dtype_round_trip_uses_the_new_weights():
    """A move gives the parameters new storage, as the same objects: the compiled forward (which
    cannot read storage addresses) used the buffer packed before it."""
    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    _logits(patched, ids)  # eager first: weights packed
    for model in (base, patched):
        model.to(torch.bfloat16).float()  # the weights rounded to bf16, back in fp32
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    assert_rel_close(out, _logits(base, ids), REL)


def test_compiled_forward_over_projections_it_may_not_pack():
    """Projections that are views of a tensor someone else manages (FSDP1's flat parameter, during
    its forward) are not packed; under torch.compile the buffer of an earlier eager forward is left
    for the next eager call to let go (storage addresses cannot be traced: fullgraph failed)."""
    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    _logits(patched, ids)  # eager first: weights packed
    for layer in patched.model.layers:
        projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        flat = torch.cat([p.weight.detach().reshape(-1) for p in projections])
        at = 0
        for p in projections:
            shape, n = p.weight.shape, p.weight.numel()
            del p.weight
            p.weight = flat[at : at + n].view(shape)  # a plain view, as FSDP1 sets it
            at += n
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    assert_rel_close(out, _logits(base, ids), REL)


class _Negated(torch.nn.Module):
    def forward(self, w):
        return -w


@pytest.mark.skipif(TF5, reason="4.57's MoE block (a list of expert MLPs)")
@pytest.mark.parametrize("change", ["none", "hook", "pre_hook", "instance_forward", "new_linear", "bias",
                                    "new_data", "new_weight", "new_expert", "inference_then_grad", "new_list",
                                    "hook_dict_replaced", "class_swapped", "parametrized"])
def test_moe_block_rechecks_its_experts_cheaply_and_sees_every_change(change, monkeypatch):
    # After its first packed call, 4.57's block rechecks its 3E expert linears in C-level passes
    # (the full check's module lookups took milliseconds a layer at decode); whatever the full
    # check would have seen since must still send the call to HF's loop or repack
    from qwen3x.layers import moe as moe_layer

    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    x = torch.randn(2, 5, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    blocks = (base.model.layers[0].mlp, patched.model.layers[0].mlp)
    with torch.no_grad():
        blocks[1](x)
    full_checks = []
    check = moe_layer._plain_expert
    monkeypatch.setattr(moe_layer, "_plain_expert", lambda e: full_checks.append(e) or check(e))
    calls = collections.Counter()  # side -> calls of the hook or forward put on expert 3
    for side, block in enumerate(blocks):  # the same change on both sides
        expert = block.experts[3]
        if change == "hook":
            expert.up_proj.register_forward_hook(lambda m, i, o, side=side: calls.update([side]) or o * 2)
        elif change == "pre_hook":
            expert.register_forward_pre_hook(lambda m, i, side=side: calls.update([side]) or (i[0] * 3,))
        elif change == "instance_forward":
            expert.down_proj.forward = lambda t, m=expert.down_proj, side=side: (
                calls.update([side]) or torch.nn.Linear.forward(m, t) + 1)
        elif change == "new_linear":
            torch.manual_seed(5)
            expert.gate_proj = torch.nn.Linear(expert.gate_proj.in_features, expert.gate_proj.out_features, bias=False)
        elif change == "bias":
            torch.manual_seed(5)
            expert.up_proj.bias = torch.nn.Parameter(torch.randn(expert.up_proj.out_features))
        elif change == "new_data":
            with torch.no_grad():
                expert.down_proj.weight.data = expert.down_proj.weight.data * 2
        elif change == "new_weight":
            expert.gate_proj.weight = torch.nn.Parameter(expert.gate_proj.weight.detach() * -1)
        elif change == "new_expert":
            torch.manual_seed(5)
            block.experts[1] = type(expert)(base.config, intermediate_size=base.config.moe_intermediate_size)
        elif change == "new_list":
            with torch.no_grad():
                block.experts = torch.nn.ModuleList(copy.deepcopy(e) for e in block.experts)
                block.experts[2].up_proj.weight.mul_(-1)
        elif change == "hook_dict_replaced":
            expert.up_proj._forward_hooks = collections.OrderedDict()
            expert.up_proj.register_forward_hook(lambda m, i, o: o * 2)
        elif change == "class_swapped":
            expert.down_proj.__class__ = type("Doubled", (torch.nn.Linear,), {"forward": lambda m, t: 2 * t @ m.weight.T})
        elif change == "parametrized":
            torch.nn.utils.parametrize.register_parametrization(expert.gate_proj, "weight", _Negated())
    context = torch.enable_grad() if change == "inference_then_grad" else torch.no_grad()
    with context:
        out, ref = blocks[1](x)[0], blocks[0](x)[0]
    assert_rel_close(out, ref, REL)
    if change in ("hook", "pre_hook", "instance_forward"):
        assert calls[0] == calls[1] == 1  # (expert 3 gets tokens: HF calls it once)
    assert bool(full_checks) == (change != "none")  # the recheck alone where nothing changed


@pytest.mark.skipif(TF5, reason="4.57's MoE block packs the weights of its expert MLPs")
def test_compiled_moe_block_after_its_experts_ran_on_their_own():
    """4.57's block packs all experts' weights; where it falls back to HF's loop (autocast here) its
    expert MLPs ran qwen3x's MLP, which packed their own pair again, leaving the block's buffer behind
    while the compiled path (same parameter objects) still used it: the experts now leave their
    weights to the block."""
    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    _logits(patched, ids)  # the block packs its experts
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        patched(ids)  # HF's expert loop
    with torch.no_grad():  # an optimizer-like update, in place
        for model in (base, patched):
            for name, p in model.named_parameters():
                if "experts" in name:
                    p.mul_(1.5)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    assert_rel_close(out, _logits(base, ids), REL)
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)
    qwen3x.unpatch(patched)
    assert not _storages_shared(patched)
    assert not any(k.startswith("_qwen3x") for m in patched.modules() for k in m.__dict__)


def test_data_parallel_replicas_leave_the_module_as_it_was():
    """nn.DataParallel makes a replica of each module every step, from a shallow copy of its
    __dict__ (its records and hook dicts the module's own), the one on device 0 with the module's own
    parameters: a replica that packed re-pointed them at a buffer only it recorded (so checkpoint
    writers could not find it) and added hooks to the module's dicts each step. Simulated on the
    CPU, as replicate() builds the device-0 replica."""
    def replica_of(root):
        made = {}
        for m in root.modules():
            replica = m._replicate_for_data_parallel()
            replica._parameters = dict(m._parameters)  # (device 0: the module's own parameters)
            made[m] = replica
        for m, replica in made.items():
            replica._modules = {k: made[c] if c is not None else None for k, c in m._modules.items()}
        return made[root]

    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    hooks = [len(m._state_dict_pre_hooks) for m in patched.modules()]
    for _ in range(2):
        assert_rel_close(_logits(replica_of(patched), ids), _logits(base, ids), REL)
    assert [len(m._state_dict_pre_hooks) for m in patched.modules()] == hooks
    assert not _storages_shared(patched)


@pytest.mark.parametrize("where", ["k_proj", "up_proj"])
def test_projections_of_two_dtypes_are_not_packed(where):
    """One GEMM over weights of two dtypes would promote them, and packing would re-point the
    parameter at the promoted buffer: its dtype changed for good. HF calls each as it is (and F.linear
    raises for the mismatch); so does the patched model."""
    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(seq=5)
    for model in (base, patched):
        layer = model.model.layers[0]
        getattr(layer.self_attn if where == "k_proj" else layer.mlp, where).to(torch.bfloat16)
    with pytest.raises(RuntimeError) as hf_error:
        _logits(base, ids)
    with pytest.raises(RuntimeError) as error:
        _logits(patched, ids)
    assert str(error.value) == str(hf_error.value)
    assert {n: p.dtype for n, p in patched.named_parameters()} == {n: p.dtype for n, p in base.named_parameters()}


@pytest.mark.skipif(not TF5, reason="ExpertsInterface is transformers 5.x")
def test_experts_implementation_qwen3x_routes_to_the_op(monkeypatch):
    calls = []
    from qwen3x import ops

    original = ops.moe_experts
    monkeypatch.setattr(ops, "moe_experts", lambda *a: calls.append(1) or original(*a))
    model = tiny_model(moe=True)
    ref = _logits(model, _ids())
    if not EXPERTS_BY_NAME:  # transformers 5.0 to 5.6 take only their own names (README says so)
        with pytest.raises(ValueError, match="qwen3x"):
            model.set_experts_implementation("qwen3x")
        return
    model.set_experts_implementation("qwen3x")
    assert_rel_close(_logits(model, _ids()), ref, REL)
    assert calls, "experts_implementation='qwen3x' did not call qwen3x.ops.moe_experts"


@pytest.mark.skipif(not TF5, reason="ExpertsInterface is transformers 5.x")
def test_experts_implementation_qwen3x_leaves_other_expert_layouts_to_their_own_forward(monkeypatch):
    """experts_implementation="qwen3x" is registered for every model: GPT-OSS's experts (transposed,
    interleaved gate/up with biases, a clamped gate) must run their own code, not Qwen3's SwiGLU."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from qwen3x import ops
    from qwen3x.layers import moe as qmoe

    monkeypatch.setattr(ops, "moe_experts", lambda *a: pytest.fail("qwen3x's experts op ran on GPT-OSS experts"))
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          vocab_size=VOCAB)  # fmt: skip
    torch.manual_seed(0)
    experts = GptOssExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, weights = torch.randn(5, 32), torch.rand(5, 2)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    config._experts_implementation = "eager"
    want = experts(x, ids, weights)
    config._experts_implementation = "qwen3x"
    with pytest.warns(UserWarning, match="GptOssExperts is not an expert layout qwen3x"):
        got = experts(x, ids.int(), weights)
    assert torch.equal(got, want)
    # transformers 5.24's flag for a norm after each expert: not Qwen3-MoE's layout either
    qwen_experts = tiny_model(moe=True).model.layers[0].mlp.experts
    assert qmoe._swiglu_experts(qwen_experts)
    qwen_experts.has_post_expert_norm = True
    assert not qmoe._swiglu_experts(qwen_experts)
    # weights of a tensor subclass (torchao's quantized ones, say): not storage the kernels can read
    qwen_experts = tiny_model(moe=True).model.layers[0].mlp.experts

    class Wrapped(torch.Tensor):
        pass

    qwen_experts.down_proj = torch.nn.Parameter(qwen_experts.down_proj.detach().as_subclass(Wrapped))
    assert not qmoe._swiglu_experts(qwen_experts)
    patched_experts = qwen3x.patch(tiny_model(moe=True)).model.layers[0].mlp.experts  # (the same seed's)
    patched_experts.down_proj = torch.nn.Parameter(patched_experts.down_proj.detach().as_subclass(Wrapped))
    x, weights, ids = torch.randn(5, 64), torch.rand(5, 2), torch.randint(0, 8, (5, 2))
    with torch.no_grad():
        qwen_experts.config._experts_implementation = patched_experts.config._experts_implementation = "eager"
        assert torch.equal(patched_experts(x, ids, weights), qwen_experts(x, ids, weights))  # HF's forward ran


def _fp8_shaped(model):
    """``model`` with transformers' fine-grained FP8 modules in place of its linears and (5.x) its
    experts, as a quantized checkpoint such as Qwen3-30B-A3B-FP8 loads (replace_with_fp8_linear),
    holding the original weights unquantized: FP8Linear and FP8Experts then compute in their dtype,
    on the CPU too (their FP8 kernels are CUDA's). Scales are ones."""
    import inspect

    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from transformers import FineGrainedFP8Config

    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = {"pre_quantized": False} if "pre_quantized" in inspect.signature(fp8.replace_with_fp8_linear).parameters else {}
    model = fp8.replace_with_fp8_linear(model, quantization_config=FineGrainedFP8Config(weight_block_size=(32, 32)),
                                        **kwargs)  # fmt: skip
    for module_name, module in model.named_modules():
        if not type(module).__name__.startswith("FP8"):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            value = weights.get(f"{module_name}.{name}")
            value = torch.ones(p.shape) if value is None else value  # (a scale)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    if TF5:
        model.config._experts_implementation = "eager"  # (FP8Experts' grouped_mm kernels are CUDA's)
    return model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp8_checkpoint_modules_run_their_own_forward(moe, monkeypatch):
    """A quantized checkpoint's FP8Linear projections and (5.x) FP8Experts stay HF's code: the patched
    layers call them, and the patched router hands the experts int64 ids, as HF's does (FP8Experts'
    eager forward one-hot encodes them: with qwen3x's int32 ids it raised). With
    experts_implementation="qwen3x" the FP8 experts run their own forward (a KeyError before: the
    FP8 experts' interface did not know the name)."""
    ran = _spy_on_ops(monkeypatch, ("moe_router", "qk_norm_rope"))
    base = tiny_model(moe=moe)
    model = _fp8_shaped(copy.deepcopy(base))
    ids = _ids()
    want = _logits(base, ids)
    assert_rel_close(_logits(model, ids), want, REL)  # (the unpatched FP8-shaped model: the setup is right)
    qwen3x.patch(model)
    assert_rel_close(_logits(model, ids), want, REL)
    assert ran["qk_norm_rope"] == len(model.model.layers)  # (FP8Linear q/k projections: out of place)
    if moe and TF5:
        experts = model.model.layers[0].mlp.experts
        assert type(experts).__name__ == "FP8Experts" and ran["moe_router"] == len(model.model.layers)
        model.config._experts_implementation = "qwen3x"
        with pytest.warns(UserWarning, match="FP8Experts is not an expert layout qwen3x"):
            got = _logits(qwen3x.unpatch(model), ids)
        assert_rel_close(got, want, REL)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_layers_match_unpatched(cache):
    """Qwen3 configs may use sliding-window attention (use_sliding_window, max_window_layers): the
    window reaches qwen3x's attention through HF's mask (5.x: a sliding static cache layer of its
    own class, which the fused cache write leaves to HF). A window shorter than the prompt."""
    base = tiny_model(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    want = _logits(base, ids)
    assert (want - _logits(tiny_model(), ids)).abs().max() > 0.1  # (the window changes the answer)
    assert_rel_close(_logits(patched, ids), want, REL)
    static = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        tokens = [m.generate(ids, max_new_tokens=6, do_sample=False, **static) for m in (base, patched)]
    assert torch.equal(tokens[1], tokens[0])


def test_a_paged_prefix_on_a_plain_implementation_runs_like_unpatched():
    """transformers 5.24 no longer registers paged|sdpa and strips the prefix itself (a config may still
    carry the old name); the patched layers must resolve it the same way, not index the registry."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not TF5 or "paged|sdpa" in ALL_ATTENTION_FUNCTIONS:
        pytest.skip("paged|sdpa is unknown to 4.57 and a paged cache's own attention up to 5.23")
    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    for model in (base, patched):
        model.config._attn_implementation = "paged|sdpa"
    ids = _ids()
    assert_rel_close(_logits(patched, ids, use_cache=False), _logits(base, ids, use_cache=False), REL)


def test_attention_with_eager_implementation_keeps_attention_weights():
    base = tiny_model()
    base.set_attn_implementation("eager") if hasattr(base, "set_attn_implementation") else None
    base.config._attn_implementation = "eager"
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    with torch.no_grad():
        out = patched(ids, output_attentions=True)
        ref = base(ids, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions)
    assert_rel_close(out.attentions[0], ref.attentions[0], REL)


class _LoRALinear(torch.nn.Module):
    """A stand-in for PEFT's LoRA wrapper: base Linear + trainable low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _add_lora(model):
    for module in list(model.modules()):
        for name in ("q_proj", "v_proj", "gate_proj", "up_proj"):
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, _LoRALinear(child))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


@pytest.mark.parametrize("moe", [False, True])
def test_lora_wrapped_projections_train_like_unpatched(moe):
    base = _add_lora(tiny_model(moe=moe))
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    for m in (base, patched):
        m.train()
        m(ids, labels=ids).loss.backward()
    ref = dict(base.named_parameters())
    n = 0
    for name, p in patched.named_parameters():
        if "lora_" in name:
            n += 1
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert p.grad is None, name
    assert n > 0


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_autocast_keeps_hf_numerics(moe, monkeypatch):
    """Under autocast (fp32 weights, bf16 matmuls) the ops run in the dtypes HF's code computes in:
    QK-norm + RoPE in fp32 (HF's norms promote bf16 q and k to their fp32 weights'; the op, not the
    eager chain), attention on q, k and v in the autocast dtype, as SDPA's autocast casts them (on a
    GPU the bf16 kernel: with q/k fp32 from the norms and, through a transformers <= 5.23 cache, v
    fp32 too, it ran the fp32 reference, scores materialized), 5.x's experts in bf16 as autocast's
    F.linear would (the kernel; was the per-expert reference loop); 4.57's MoE block runs HF's own
    loop wherever autocast would cast its experts (bitwise HF's)."""
    seen = collections.defaultdict(list)  # op -> its calls' first arguments' dtypes
    _spy_on_ops(monkeypatch, ("attention", "qk_norm_rope", "qk_norm_rope_", "moe_experts"), seen)
    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    layers = base.config.num_hidden_layers
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = base(ids).logits, patched(ids).logits
        if moe and not TF5:
            h = torch.randn(2, 7, base.config.hidden_size)
            blocks = (base.model.layers[0].mlp, patched.model.layers[0].mlp)
            assert torch.equal(blocks[1](h)[0], blocks[0](h)[0])
    assert out.dtype == ref.dtype
    assert_rel_close(out.float(), ref.float(), 2e-2)
    assert seen["attention"] == [torch.bfloat16] * layers
    assert seen["qk_norm_rope_"] == [torch.float32] * layers and not seen["qk_norm_rope"]
    assert seen["moe_experts"] == ([torch.bfloat16] * layers if moe and TF5 else [])
    if moe and TF5:  # fewer picks than experts: autocast's per-expert loop, which casts only those touched
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            few = ids[:1, :3]  # 3 tokens x top-2 < 8 experts
            assert_rel_close(patched(few).logits.float(), base(few).logits.float(), 2e-2)
        assert not seen["moe_experts"]
    # training: the same ops (QK-norm + RoPE out of place); fp32 gradients, each as far from the
    # fp32 model's (no autocast) as at most twice HF's under autocast, plus 1%
    seen.clear()
    truth = copy.deepcopy(base)
    for m in (base, patched, truth):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=m is not truth):
            m(ids, labels=ids).loss.backward()
    assert seen["qk_norm_rope"] == [torch.float32] * layers and not seen["qk_norm_rope_"]
    assert seen["moe_experts"] == ([torch.bfloat16] * layers if moe and TF5 else [])
    hf, exact = dict(base.named_parameters()), dict(truth.named_parameters())
    for name, p in patched.named_parameters():
        if hf[name].grad is None:  # (4.57: an expert no token picked)
            assert p.grad is None, name
            continue
        assert p.grad.dtype == torch.float32, name
        if ".experts." in name and not TF5:
            continue  # (HF's own loop, patched or not; a token near a bf16 routing tie changes them wholesale)
        g = exact[name].grad
        err, err_hf = (p.grad - g).norm(), (hf[name].grad - g).norm()
        assert err <= 2 * err_hf + 1e-2 * g.norm(), (name, err, err_hf, g.norm())
    # autocast leaves fp64 alone (q, k and v cast to bf16 met an fp64 o_proj), and a device autocast
    # knows nothing of (meta: shape inference) must not be asked about it
    if not (moe and TF5):  # (5.x's default grouped_mm experts refuse fp64, unpatched too)
        base64, patched64 = base.double().eval(), patched.double().eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert_rel_close(patched64(ids).logits, base64(ids).logits, REL)
    if TF5:  # (4.57's own rotary cannot run on meta)
        with torch.no_grad():
            assert patched.eval().to("meta")(ids.to("meta")).logits.shape == (*ids.shape, VOCAB)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_autocast_into_the_other_half_dtype(moe):
    """bf16 weights (norms kept fp32) under fp16 autocast, training and inference: autocast casts
    every matmul's operands to fp16, and the patched model ran into two refusals HF's code does not
    meet: packing's cat (autocast raises for bf16 tensors among its promoting ops under fp16) and
    the experts' op (fp32 hidden states, bf16 weights; now cast like autocast's F.linear, or HF's
    loop on 4.57)."""
    base = tiny_model(moe=moe).to(torch.bfloat16)
    for module in base.modules():
        if "RMSNorm" in type(module).__name__:
            module.float()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    for grad in (False, True):
        out = []
        for m in (base, patched):
            m.train(grad)
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.float16):
                result = m(ids, labels=ids)
            if grad:
                result.loss.backward()
            out.append(result.logits.float())
        assert_rel_close(out[1], out[0], 2e-2)
    for (name, p), q in zip(patched.named_parameters(), base.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or p.grad.dtype == p.dtype), name


def test_autocast_qk_norm_rope_is_fp32_accurate():
    """Under autocast the fused QK-norm + RoPE computes in fp32 from the bf16 projections (HF's
    chain rounds the normalized q to bf16 before its fp32 weight): against fp64, its q and k carry
    fp32's rounding, HF's bf16's."""
    from qwen3x import reference
    from qwen3x.layers import attention as patched_attention

    model = qwen3x.patch(tiny_model())
    with torch.no_grad():
        for norm in (model.model.layers[0].self_attn.q_norm, model.model.layers[0].self_attn.k_norm):
            norm.weight.normal_(1.0, 0.5)  # (ones would be exact in bf16)
    attn = model.model.layers[0].self_attn
    B, S, D = 2, 9, attn.head_dim
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, 4, D, generator=g).bfloat16() * 3
    k = torch.randn(B, S, 2, D, generator=g).bfloat16() * 3
    positions = torch.arange(S).expand(B, S)
    x = torch.zeros(B, S, model.config.hidden_size)
    with torch.no_grad():
        pe = model.model.rotary_emb(x, positions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = patched_attention._norm_rope(attn, q, k, pe)
            cos, sin = (t.unsqueeze(2) for t in pe)  # HF's chain: its norms, then its rotation
            hf = [reference.apply_rope(norm(t), cos, sin) for norm, t in ((attn.q_norm, q), (attn.k_norm, k))]
        cos64, sin64 = (t.double() for t in reference.rope_cos_sin(positions, pe.inv_freq, pe.attention_scaling,
                                                                      torch.float64))
        for t_ours, t_hf, t, norm in zip(ours, hf, (q, k), (attn.q_norm, attn.k_norm)):
            assert t_ours.dtype == t_hf.dtype == torch.float32
            exact = reference.apply_rope(reference.rms_norm(t.double(), norm.weight.double(), norm.variance_epsilon),
                                         cos64.unsqueeze(2), sin64.unsqueeze(2))
            err_ours, err_hf = ((t_ours.double() - exact).abs().max(), (t_hf.double() - exact).abs().max())
            assert err_ours <= err_hf / 100, (err_ours, err_hf)


@pytest.mark.parametrize("moe", [False, True])
def test_non_silu_activation_keeps_hf_mlp(moe):
    base = tiny_model(moe=moe, hidden_act="gelu", **({"mlp_only_layers": [0]} if moe else {}))
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)


def test_hooks_see_what_they_see_unpatched():
    def record(model):
        seen = {}
        layer = model.model.layers[0]
        for name in ("self_attn.q_proj", "self_attn.k_norm", "mlp.gate_proj", "post_attention_layernorm"):
            layer.get_submodule(name).register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, o.detach().clone())
            )
        return seen

    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    seen_base, seen_patched = record(base), record(patched)
    ids = _ids()
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)
    assert set(seen_patched) == set(seen_base)  # every hooked module still runs
    for name in seen_base:
        assert_rel_close(seen_patched[name], seen_base[name], REL)  # and hands out HF's tensors


def _wrap_like_accelerate(module, calls):
    """accelerate's add_hook_to_module (a multi-GPU device_map hooks every decoder layer): the class
    forward kept as `_old_forward`, the instance's forward a partial that calls it."""
    module._old_forward = module.forward

    def new_forward(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return module._old_forward(*args, **kwargs)

    module.forward = functools.update_wrapper(functools.partial(new_forward, module), module._old_forward)


def _remove_like_accelerate(module):
    """accelerate's remove_hook_from_module: the kept forward becomes the instance's forward."""
    module.forward = module._old_forward
    del module._old_forward


def _wrap_like_tensor_parallel(module, calls):
    """transformers' tensor-parallel install_forward: the class forward kept in a closure."""
    original_forward = module.forward

    def tp_forward(*args, **kwargs):
        calls.append(type(module).__name__)
        return original_forward(*args, **kwargs)

    module.forward = tp_forward


def _spy_on_ops(monkeypatch, names=("add_rms_norm", "moe_experts", "moe"), dtypes=None) -> collections.Counter:
    """Counts the calls of the qwen3x ops ``names`` (by default those that only the patched decoder
    layer, add_rms_norm, and the patched experts, moe_experts or 4.57's block's moe, make); with
    ``dtypes`` (a defaultdict(list)), also records each call's first argument's dtype there."""
    from qwen3x import ops

    ran = collections.Counter()

    def spy(*a, _f, _n, **k):
        ran.update([_n])
        if dtypes is not None:
            dtypes[_n].append(a[0].dtype)
        return _f(*a, **k)

    for name in names:
        monkeypatch.setattr(ops, name, functools.partial(spy, _f=getattr(ops, name), _n=name))
    return ran


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_patch_reaches_forwards_wrapped_on_the_instance(moe, monkeypatch):
    """Wrappers that replace a module's forward on the instance call the forward of the class they
    wrapped. patch re-points them, so patched layers run qwen3x inside accelerate's hooks and
    transformers' tensor-parallel forward (which wraps the experts); unpatch points them back, also
    where accelerate's hook was removed in between (its forward is left on the instance)."""
    ran = _spy_on_ops(monkeypatch)
    base = tiny_model(moe=moe)
    model = copy.deepcopy(base)
    calls = []
    layers = model.model.layers
    for layer in layers:
        _wrap_like_accelerate(layer, calls)
        if moe:
            _wrap_like_tensor_parallel(layer.mlp.experts if TF5 else layer.mlp, calls)
    ids = _ids()
    want = _logits(base, ids)
    assert not ran

    qwen3x.patch(model)
    assert_rel_close(_logits(model, ids), want, REL)
    assert len(calls) == len(layers) * (2 if moe else 1)  # the wrappers still run
    assert ran["add_rms_norm"] == len(layers)  # the patched decoder layer, inside accelerate's hook
    if moe:
        assert ran["moe_experts"] + ran["moe"] == len(layers)  # the patched experts, inside the TP forward

    for layer in layers[: len(layers) // 2]:
        _remove_like_accelerate(layer)
    ran.clear()
    assert_rel_close(_logits(model, ids), want, REL)
    assert ran["add_rms_norm"] == len(layers)
    qwen3x.unpatch(model)
    ran.clear()
    assert torch.equal(_logits(model, ids), want)
    assert not ran, f"qwen3x ops ran after unpatch: {dict(ran)}"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_projections_with_a_forward_of_their_own_are_called(moe):
    """A projection whose forward is replaced on the instance (a user's wrapper; transformers' tensor
    parallelism) is called, not fused past by reading its weight (attention's packed q/k/v GEMM,
    the MLP's packed gate/up, 4.57's packed experts)."""
    def double(module):
        forward = module.forward
        module.forward = lambda x: 2 * forward(x)

    base = tiny_model(moe=moe, mlp_only_layers=[0] if moe else [])
    for layer in base.model.layers:
        double(layer.self_attn.k_proj)
        mlp = layer.mlp
        if hasattr(mlp, "up_proj"):  # dense
            double(mlp.up_proj)
        elif not TF5:  # 4.57's experts: a list of MLPs (5.x's hold their weights as parameters)
            double(mlp.experts[0].up_proj)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    assert_rel_close(_logits(patched, ids), _logits(base, ids), REL)


# (CI's venv has it: there a missing accelerate fails these tests instead of skipping them)
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None or bool(os.environ.get("CI"))


@pytest.mark.skipif(not HAS_ACCELERATE, reason="needs accelerate (make test installs it)")
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", ["device_map", "cpu_offload"])
def test_patch_runs_under_accelerate_hooks(placement, moe, monkeypatch, tmp_path):
    """A model placed by accelerate (from_pretrained's device_map across devices or with offloading
    calls dispatch_model, which hooks every module holding weights; cpu_offload likewise): patched
    after that, its layers run qwen3x inside the hooks and answer as HF does. accelerate moves each
    layer's inputs, the rotary's (cos, sin) and what the fused op needs with it (rebuilding the
    tuple was once a TypeError). Where a hook only aligns devices and has nothing to do (the layers
    on "cpu" here, as every layer of a device_map over several GPUs), the fused paths bypass it;
    offloaded weights (the layer on "disk", everything under cpu_offload) are loaded by calling
    each module."""
    from accelerate import cpu_offload, dispatch_model

    ran = _spy_on_ops(monkeypatch, ("attention", "rms_norm", "moe_experts", "qk_norm_rope", "qk_norm_rope_",
                                    "add_rms_norm"))
    base = tiny_model(moe=moe)
    model = copy.deepcopy(base)
    if placement == "device_map":  # a layer on "disk" makes dispatch_model hook the model on a CPU
        device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
        device_map |= {f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(len(model.model.layers))}
        dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    else:
        cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(hasattr(layer.self_attn.q_norm, "_hf_hook") for layer in model.model.layers)
    ids = _ids()
    want = _logits(base, ids)
    qwen3x.patch(model)
    assert_rel_close(_logits(model, ids), want, REL)
    layers = len(model.model.layers)
    assert ran["attention"] == layers
    assert ran["rms_norm"] >= 2 * layers + 1  # at least the layers' two norms and the final one
    assert ran["moe_experts"] == (layers if moe and TF5 else 0)  # (4.57's hooked expert MLPs: HF's loop)
    fused = layers - 1 if placement == "device_map" else 0  # all but the offloaded layers
    assert ran["qk_norm_rope"] + ran["qk_norm_rope_"] == fused
    assert ran["add_rms_norm"] == fused
    qwen3x.unpatch(model)
    ran.clear()
    assert torch.equal(_logits(model, ids), want)
    assert not ran, f"qwen3x ops ran after unpatch: {dict(ran)}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("units", ["layers", "projections"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fsdp2_training_sees_its_updates_after_a_no_grad_forward(moe, units, tmp_path):
    """FSDP2 (fully_shard, as Trainer and accelerate use it) puts its own unsharded parameters back
    on the modules for each forward, refilled. A no_grad forward (an evaluation) must not pack
    them: packing re-pointed them at a copy, and every later forward, training included, computed
    with the values they had then while the optimizer updated FSDP's (silently: the loss still
    fell). One process, a one-rank gloo group on the CPU: the same unsharded parameters.
    Patched before sharding and after it (fully_shard gives each sharded layer a class of its own,
    FSDP<HF name>, which patch must see through), and unpatched after training from either."""
    import gc

    import torch.distributed as dist
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from qwen3x.layers import DecoderLayer
    calls = importlib.import_module("qwen3x.patch")._calls

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    models, optimizers = [], []
    try:
        mesh = init_device_mesh("cpu", (1,))

        def sharded(model):
            for layer in model.model.layers:
                if units == "projections":  # (units of their own: FSDP's hooks on them, no plain Linear)
                    attn, mlp = layer.self_attn, layer.mlp
                    for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                        fully_shard(linear, mesh=mesh)
                    for expert in (mlp.experts if isinstance(getattr(mlp, "experts", None), torch.nn.ModuleList)
                                   else [mlp] if hasattr(mlp, "up_proj") else []):
                        fully_shard(expert.up_proj, mesh=mesh)
                if hasattr(layer.mlp, "gate"):  # a sparse MoE block: a unit of its own (an FSDP class too)
                    fully_shard(layer.mlp, mesh=mesh)
                fully_shard(layer, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        base = tiny_model(moe=moe, **({"mlp_only_layers": [1]} if moe else {}))
        patched = qwen3x.patch(copy.deepcopy(base))
        _logits(patched, _ids())  # packs, before sharding: that buffer must not outlive it
        models.extend([sharded(copy.deepcopy(base)), sharded(patched)])
        del patched
        fsdp_classes = [type(layer) for layer in models[0].model.layers]
        models.append(qwen3x.patch(sharded(copy.deepcopy(base))))  # patched after sharding

        def check_classes(model, patched):  # (a function: no local keeps a module past the test)
            for layer, fsdp_class in zip(model.model.layers, fsdp_classes, strict=True):
                assert isinstance(layer, FSDPModule) and type(layer).__name__ == fsdp_class.__name__
                assert calls(type(layer).forward, DecoderLayer.forward) == patched  # the residual-fused norm

        check_classes(models[2], patched=True)
        # the very classes fully_shard made for the model patched first: FSDP's own, over qwen3x's
        # (5.x's sparse blocks stay HF's, their router and experts patched; 4.57's are patched)
        for kind in (lambda layer: layer, lambda layer: layer.mlp):
            assert [type(kind(layer)) for layer in models[2].model.layers] == \
                   [type(kind(layer)) for layer in models[1].model.layers]
        optimizers.extend([torch.optim.SGD(m.parameters(), lr=0.1) for m in models])
        ids = _ids()

        from qwen3x.layers import packing

        def train_and_compare(rounds, released=False):
            for _ in range(rounds):
                for model, optimizer in zip(models, optimizers):
                    model(ids, labels=ids).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                if released:  # training alone lets go of the (unsharded) buffers packed before sharding
                    assert not any(packing.ATTR in m.__dict__ for m in models[1].modules())
                want, *got = (_logits(m, ids) for m in models)
                for g in got:
                    assert_rel_close(g, want, REL)

        train_and_compare(3, released=True)
        assert not any(packing.ATTR in layer.self_attn.__dict__ for m in models[1:] for layer in m.model.layers)
        # unpatched: sharded after patch (a class of FSDP's over qwen3x's) and before (FSDP's own back)
        check_classes(models[1], patched=True)
        for i in (1, 2):
            qwen3x.unpatch(models[i])
            assert not qwen3x.is_patched(models[i])
            check_classes(models[i], patched=False)
            assert [type(layer) for layer in models[i].model.layers] == fsdp_classes  # FSDP's own, over HF's
        train_and_compare(1)
    finally:
        models.clear()
        optimizers.clear()
        gc.collect()
        dist.destroy_process_group()
    assert not _module_state_mapping  # later tests see no distributed state


def test_backward_hooks_block_fusion_only_where_autograd_records(monkeypatch):
    """A module with only backward hooks (as transformers <= 5.23's tensor parallelism leaves on
    q_norm and k_norm) may be fused past where autograd records nothing (its call would not install
    them); where it records, the module is called and its hooks run in the backward."""
    ran = _spy_on_ops(monkeypatch, ("qk_norm_rope", "qk_norm_rope_"))
    base = tiny_model()
    model = qwen3x.patch(copy.deepcopy(base))
    fired = []
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.register_full_backward_hook(lambda *_: fired.append(1))
    ids = _ids()
    assert_rel_close(_logits(model, ids), _logits(base, ids), REL)
    layers = len(model.model.layers)
    assert sum(ran.values()) == layers  # fused past the hooked norms

    ran.clear()
    model(ids).logits.sum().backward()
    assert not ran and len(fired) == 2 * layers  # called, and their hooks ran


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_torch_func_transforms_run_like_unpatched(moe):
    """torch.func over a patched model (per-sample gradients, model ensembling): the ops have no
    functorch rules and packing reads .data, which vmap forbids; both raised. Under a transform the
    layers use the references and call the projections: gradients and (dense) vmapped logits equal
    the unpatched model's."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    params = {name: p.detach() for name, p in base.named_parameters()}

    def loss(model):
        return lambda p: functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss

    want, got = grad(loss(base))(params), grad(loss(patched))(params)
    for name in params:
        assert_rel_close(got[name], want[name], REL)
    if not moe:  # (an MoE's expert dispatch is data-dependent: vmap cannot batch it, patched or not)
        stacked, buffers = stack_module_state([tiny_model(seed=s) for s in (0, 1)])

        def ensemble(model):
            return vmap(lambda p, b: functional_call(model, (p, b), (), {"input_ids": ids}).logits)(stacked, buffers)

        with torch.no_grad():
            assert_rel_close(ensemble(patched), ensemble(base), REL)


TP_WORLD = 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_tensor_parallel_two_ranks(tmp_path):
    """transformers' tensor parallelism (tp_plan="auto", two gloo processes on the CPU): q/k/v and
    the MLP's projections are sharded DTensors, so the patched attention and MLP call them as HF
    does; what the patch fuses must still give the unsharded model's answer. Per rank and model:
    the patched logits equal the unpatched TP model's, greedy tokens equal, unpatch restores it, and
    QK-norm + RoPE runs fused (TP's only hook on q_norm / k_norm, a gradient all-reduce, cannot run
    without autograd), with attention, the add + norm and (MoE, transformers 5.x) the experts on
    qwen3x's ops; in a training step the norms' weight gradients are the unpatched TP model's, and on
    5.x the unsharded model's (their all-reduce ran)."""
    import json
    import subprocess
    import sys
    import time

    for name, moe in (("dense", False), ("moe", True)):  # vocabulary and heads divisible by the ranks
        tiny_model(moe=moe, vocab_size=96, num_attention_heads=4, num_key_value_heads=2).save_pretrained(
            tmp_path / name)
    worker = os.path.join(os.path.dirname(__file__), "tensor_parallel_worker.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    logs = [tmp_path / f"rank{rank}.log" for rank in range(TP_WORLD)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:  # (a file each: a pipe drained after the other rank's could block it)
            procs.append(subprocess.Popen([sys.executable, worker, str(rank), str(TP_WORLD), str(tmp_path)],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    try:  # a rank that fails leaves the other waiting in a collective: stop it then
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            assert time.monotonic() < deadline, "the tensor-parallel ranks did not finish in 600 s"
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    for rank in range(TP_WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in report.items():
            what = f"rank {rank}, {name}"
            local, rows = r["sharded"]
            assert local[0] * TP_WORLD == rows, f"{what}: q_proj not sharded: {r['sharded']}"
            tol = REL * r["scale"]
            assert r["tp_vs_full"] <= tol, f"{what}: the unpatched TP model is off: {r}"
            assert r["patched_vs_tp"] <= tol, f"{what}: patched logits off by {r['patched_vs_tp']} (tolerance {tol})"
            assert r["unpatched_again_vs_tp"] == 0.0, f"{what}: unpatch left {r['unpatched_again_vs_tp']}"
            assert r["tokens"]["patched"] == r["tokens"]["tp"] == r["tokens"]["full"], f"{what}: {r['tokens']}"
            g = r["norm_grads"]  # (a norm fused past under autograd: its gradient only this rank's heads')
            assert g["patched_vs_tp"] <= REL * g["scale"], f"{what}: norm gradients {g}"
            if TF5:  # (4.57's TP does not all-reduce them, unpatched either)
                assert g["patched_vs_full"] <= REL * g["scale"], f"{what}: norm gradients {g}"
            ran, layers = r["forward_ops"], r["layers"]
            assert ran.get("qk_norm_rope", 0) + ran.get("qk_norm_rope_", 0) == layers, f"{what}: {ran}"
            assert ran.get("attention") == layers and ran.get("add_rms_norm") == layers, f"{what}: {ran}"
            if name == "moe" and TF5:  # (4.57's experts, a list of MLPs of sharded projections: HF's loop)
                assert ran.get("moe_experts", 0) + ran.get("moe", 0) == layers, f"{what}: {ran}"


def test_rope_embeddings_rebuilt_from_items_are_a_plain_pair():
    """type(t)(items), as tuple copies go, gives (cos, sin) alone: the attributes would be on the
    old device; copies, pickles and .to (accelerate's send_to_device calls it) keep them."""
    from qwen3x.layers.rotary import RopeEmbeddings

    cos, sin, inv_freq, positions = torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.rand(4), torch.arange(3)[None]
    emb = RopeEmbeddings(cos, sin, inv_freq, 1.5, positions)
    rebuilt = type(emb)(t.clone() for t in emb)
    assert type(rebuilt) is tuple and len(rebuilt) == 2 and torch.equal(rebuilt[1], sin)
    for copied in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb)), copy.copy(emb), emb.to("cpu")):
        assert type(copied) is RopeEmbeddings and torch.equal(copied[0], cos)
        assert torch.equal(copied.inv_freq, inv_freq) and copied.attention_scaling == 1.5
        assert torch.equal(copied.positions, positions)


def test_a_forward_bound_on_the_instance_is_no_hook():
    """accelerate's remove_hook_from_module leaves the class's own forward bound on the instance:
    that is no hook (the fused paths may bypass the module again); any other forward there is."""
    from qwen3x.layers import packing

    linear = torch.nn.Linear(4, 4, bias=False)
    linear.forward = linear.forward
    assert not packing.has_hooks(linear) and packing.plain_linear(linear)
    linear.forward = lambda x: 2 * x
    assert packing.has_hooks(linear) and not packing.plain_linear(linear)


def test_patch_leaves_a_read_only_wrapper_as_it_was():
    """A wrapper whose kept forward cannot be replaced (here a read-only __wrapped__) keeps running
    what it ran, every place patch had already re-pointed is put back, a warning says so, and the
    model still answers like HF. A wrapper made with functools.wraps and bound on the instance is
    re-pointed (its function's __wrapped__ and closure)."""

    class Frozen:
        __slots__ = ("_target",)

        def __init__(self, target):
            self._target = target

        @property
        def __wrapped__(self):
            return self._target

        def __call__(self, *args, **kwargs):
            return self._target(*args, **kwargs)

    base = tiny_model()
    model = copy.deepcopy(base)
    frozen_layer, wraps_layer = model.model.layers[:2]
    original = frozen_layer._old_forward = frozen_layer.forward
    frozen_layer.forward = Frozen(original)

    kept = wraps_layer.forward

    @functools.wraps(kept)
    def wrapper(self, *args, **kwargs):
        return kept(*args, **kwargs)

    wraps_layer.forward = types.MethodType(wrapper, wraps_layer)
    with pytest.warns(UserWarning, match="qwen3x's forward does not run there") as caught:
        qwen3x.patch(model)
    assert len(caught) == 1
    assert frozen_layer._old_forward is original  # put back
    assert wrapper.__wrapped__.__func__ is type(wraps_layer).forward  # re-pointed
    ids = _ids()
    assert_rel_close(_logits(model, ids), _logits(base, ids), REL)


def test_patch_warns_about_a_wrapper_it_cannot_reach():
    """A wrapper that keeps the wrapped forward where patch cannot find it (here in a list) leaves
    that module running HF's forward: patch says so instead of claiming it."""
    base = tiny_model()
    model = copy.deepcopy(base)
    layer = model.model.layers[0]
    kept = [layer.forward]
    layer.forward = lambda *args, **kwargs: kept[0](*args, **kwargs)
    with pytest.warns(UserWarning, match="qwen3x's forward does not run there"):
        qwen3x.patch(model)
    ids = _ids()
    assert_rel_close(_logits(model, ids), _logits(base, ids), REL)


def test_first_forward_under_inference_mode_keeps_parameters_trainable():
    model = qwen3x.patch(tiny_model(moe=True))
    ids = _ids()
    with torch.inference_mode():
        model(ids)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(ids, labels=ids).loss.backward()


def test_compile_fullgraph_after_an_eager_forward():
    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids()
    ref = _logits(base, ids)
    _logits(patched, ids)  # eager first: weights packed
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    assert_rel_close(out, ref, REL)


def test_patched_classes_keep_hf_names_and_pickle():
    import pickle

    base = tiny_model(moe=True)
    patched = qwen3x.patch(copy.deepcopy(base))
    for m1, m2 in zip(base.modules(), patched.modules()):
        assert type(m1).__name__ == type(m2).__name__
    ids = _ids()
    _logits(patched, ids)
    clone = pickle.loads(pickle.dumps(patched))
    assert qwen3x.is_patched(clone)
    assert_rel_close(_logits(clone, ids), _logits(base, ids), REL)


def test_unpatch_drops_packed_buffers():
    model = qwen3x.patch(tiny_model())
    _logits(model, _ids())
    assert any("_qwen3x_packed" in m.__dict__ for m in model.modules())
    qwen3x.unpatch(model)
    assert not any("_qwen3x_packed" in m.__dict__ for m in model.modules())


def test_attention_function_slices_a_longer_4d_mask_like_hf():
    from qwen3x.layers import attention_forward

    class Module(torch.nn.Module):
        is_causal = True

    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 2, 6, 32)
    mask = torch.ones(2, 1, 6, 9, dtype=torch.bool).tril(diagonal=0)
    out, _ = attention_forward(Module(), q, k, k, mask, scaling=32**-0.5)
    expected, _ = qwen3x.reference.attention(q, k, k, mask[..., :6], 32**-0.5, False)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("moe", [False, True])
def test_packed_sequences_with_flash_kwargs_match_separate_sequences(moe, window):
    """HF's padding-free packing (cu_seq_lens_q/k, max_length_q/k, restarting position_ids): each
    packed sequence's logits equal those of the sequence run alone through unpatched HF, also under a
    sliding window shorter than a sequence (a mask over the packed tokens then: attention_varlen has
    no window; before, the window was dropped there)."""
    windowed = dict(use_sliding_window=True, sliding_window=window, max_window_layers=0) if window else {}
    base = tiny_model(moe=moe, **windowed)
    patched = qwen3x.patch(copy.deepcopy(base))
    lengths = [5, 1, 9]
    seqs = [_ids(batch=1, seq=n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
              max_length_k=max(lengths))
    calls = []
    real = qwen3x.ops.attention_varlen
    qwen3x.ops.attention_varlen = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = _logits(patched, ids, **kw)
    finally:
        qwen3x.ops.attention_varlen = real
    # every layer took the varlen kernel path, or with the window the masked one
    assert len(calls) == (0 if window else base.config.num_hidden_layers)
    want = torch.cat([_logits(base, s[None]) for s in seqs], dim=1)
    assert_rel_close(got, want, REL)


@pytest.mark.parametrize("moe", [False, True])
def test_static_cache_decode_writes_the_cache_in_one_op(moe, monkeypatch):
    """With HF's StaticCache, decode steps store k and v through qk_norm_rope_cache_ (the prefill
    initializes the cache through HF's own update); generations stay identical, left padding too."""
    base = tiny_model(moe=moe)
    patched = qwen3x.patch(copy.deepcopy(base))
    calls = []
    real = qwen3x.ops.qk_norm_rope_cache_
    monkeypatch.setattr(qwen3x.ops, "qk_norm_rope_cache_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _ids(batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    new = 8
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              cache_implementation="static", pad_token_id=0)
    lengths = []
    real_attention = qwen3x.ops.attention
    monkeypatch.setattr(  # the value when called (5.x passes its live counter tensor)
        qwen3x.ops, "attention",
        lambda *a, **k: lengths.append(a[6] if a[6] is None else int(a[6].reshape(-1)[0])) or real_attention(*a, **k),
    )
    assert torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))
    assert len(calls) == (new - 1) * base.config.num_hidden_layers
    # every step (prefill included) tells attention how many cache slots hold tokens: 7, 8, ..., 14
    layers = base.config.num_hidden_layers
    assert lengths[::layers] == list(range(7, 7 + new))
    calls.clear()
    lengths.clear()
    kw["cache_implementation"] = "dynamic"
    assert torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))
    assert not calls and set(lengths) == {None}  # a dynamic cache holds exactly its keys


def test_static_cache_decode_compiles_fullgraph():
    """Decode steps through HF's StaticCache under torch.compile(fullgraph=True) with AOT
    functionalization (the cache-writing op mutates its inputs): the logits of the eager HF model."""
    from transformers import StaticCache

    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    ids = _ids(batch=2, seq=6)

    def decode(model, backend=None):
        try:
            cache = StaticCache(config=model.config, max_cache_len=32)
        except TypeError:  # transformers 4.57
            cache = StaticCache(config=model.config, max_batch_size=2, max_cache_len=32)
        step = torch.compile(model.forward, fullgraph=True, backend=backend) if backend else model.forward
        with torch.no_grad():
            tok = model(ids, **{CACHE: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            logits = []
            for i in range(3):
                pos = torch.tensor([ids.shape[1] + i])
                out = step(tok, **{CACHE: cache}, use_cache=True, cache_position=pos,
                           position_ids=pos[None].expand(2, 1))
                tok = out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    assert_rel_close(decode(patched, "aot_eager"), decode(base), REL)


# ---- how many kernels a decode step launches (eager decode is launch-bound) ---------------------
# Ops that launch no kernel on a GPU (views, metadata, allocation): not counted.
_NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
              "permute", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "reshape",
              "_reshape_alias", "view_as", "unflatten", "flatten", "narrow", "expand_as", "lift_fresh", "empty",
              "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "item"}


def _decode_step_ops(model, cache: str):
    """Counter of the kernel-launching ops (aten / qwen3x, seen at the dispatcher) of one decode step
    after an 8-token prefill."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import StaticCache

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_KERNEL:
                self.ops[f"{func.namespace}::{func.overloadpacket.__name__}"] += 1
            return func(*args, **(kwargs or {}))

    ids = _ids(batch=1, seq=8)
    with torch.no_grad():
        kw = {CACHE: StaticCache(config=model.config, max_cache_len=32)} if cache == "static" else {}
        out = model(ids, use_cache=True, **kw)
        with Count() as counted:
            model(out.logits[:, -1:].argmax(-1), **{CACHE: getattr(out, CACHE)}, use_cache=True)
    return counted.ops


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_decode_step_launches_a_third_of_hfs_kernels(cache):
    """Per layer, one GEMM for q/k/v, o_proj, one for gate/up, down_proj; the norms, RoPE and the
    activation one kernel each: eager decode (launch-bound) issues at most a third of HF's kernels."""
    dims = dict(hidden_size=256, intermediate_size=512, head_dim=128, num_attention_heads=4, num_key_value_heads=2)
    base = tiny_model(**dims)
    patched = qwen3x.patch(copy.deepcopy(base))
    layers = base.config.num_hidden_layers
    hf, ours = _decode_step_ops(base, cache), _decode_step_ops(patched, cache)
    assert ours["aten::mm"] + ours["aten::addmm"] == 4 * layers + 1, ours  # + lm_head
    assert 3 * sum(ours.values()) <= sum(hf.values()), (sum(ours.values()), sum(hf.values()), ours)


def test_attention_takes_the_cache_under_either_name_and_refuses_both():
    """transformers 5.24 renamed the layers' cache argument past_key_values -> cache; an attention
    forward that missed the new name would run every decode step without its past (wrong tokens)."""
    from transformers import DynamicCache

    model = qwen3x.patch(tiny_model())
    attn = model.model.layers[0].self_attn
    ids = _ids(batch=1, seq=5)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        pos = torch.arange(5)[None]
        emb = model.model.rotary_emb(x, pos)
        lengths = []
        # (5.24's layers hand Cache.update kwargs, which 4.57's takes none of; before 5.24, a `cache`
        # keyword is continuous batching's, for the attention function)
        names = ("cache", "past_key_values") if CACHE == "cache" else ("past_key_values",)
        for name in names:
            cache = DynamicCache(config=model.config)
            attn(x[:, :3], position_embeddings=tuple(t[:, :3] for t in emb), attention_mask=None, **{name: cache})
            attn(x[:, 3:], position_embeddings=tuple(t[:, 3:] for t in emb), attention_mask=None, **{name: cache})
            lengths.append(cache.get_seq_length())
        assert lengths == [5] * len(names)
        if CACHE != "cache":
            return
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            attn(x, position_embeddings=emb, attention_mask=None, cache=DynamicCache(config=model.config),
                 past_key_values=DynamicCache(config=model.config))  # fmt: skip


@pytest.mark.skipif(not TF5, reason="continuous batching on the CPU: transformers 5.x")
def test_continuous_batching_generates_what_unpatched_generates():
    """generate_batch's paged cache fills the attention's keyword arguments in place when the
    layer hands them to cache.update (transformers >= 5.24): the patched layer must hand them too.
    Before 5.24 the paged cache travels as a `cache` keyword to the paged attention function, which
    updates it: the patched layer took it for its own cache (and generated nothing)."""
    from transformers import GenerationConfig

    base = tiny_model()
    patched = qwen3x.patch(copy.deepcopy(base))
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def tokens(model):
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        return sorted((k, list(v.generated_tokens)) for k, v in out.items())

    want = tokens(base)
    assert [len(t) for _, t in want] == [6, 6]
    assert tokens(patched) == want
