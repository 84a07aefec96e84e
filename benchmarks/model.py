"""Whole-model benchmark: Qwen3-0.6B and Qwen3-4B at their real dimensions, Qwen3-30B-A3B at its
real width with fewer layers; random bf16 weights (checkpoints cannot be downloaded here).

- model_prefill: one forward over batch x seqlen tokens, logits of the last position only (as
  generation does); tokens/s = batch * seqlen / time.
- model_decode: one decode step of ``batch`` sequences at context 2048 with a static cache, timed
  eagerly and as a CUDA-graph replay (where the model can be captured); tokens/s = batch / time.
  The untimed prefill fills the cache PREFILL_CHUNK_TOKENS tokens per forward. Every timed step
  writes the same cache slot (the cache's length is stepped back after it), so repetitions are
  identical.

Providers, each on its own copy of one randomly initialized model: ``hf_eager`` (unpatched
transformers: sdpa attention, its default experts implementation), ``qwen3x`` (qwen3x.patch),
``liger`` (apply_liger_kernel_to_qwen3*, when installed). Correctness: last-position logits against
an fp32 copy of the unpatched model (truth) and the unpatched bf16 model (baseline); decode checks
its first CHECK_ROWS sequences against a full forward over prompt + new token. In an MoE model a
judged token whose router probabilities nearly tie may go to other experts in any bf16 model,
which moves its logits by about 0.1: a failed check where every judged token out of tolerance was
routed otherwise only at near ties (qwen3x.testing's routing rule) is no kernel's fault, and the
row is reported ok, its note saying so (``_routing_excuse``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import importlib

import torch

from qwen3x.testing import RoutingAgreement, cache_keyword, compare_routing, recording_router_probs, router_probs

from .harness import Case, Excuse, Provider
from .providers import LIGER_MISSING
from .shapes import HEAD_DIM, QWEN3_0_6B, QWEN3_4B, QWEN3_30B_A3B, RMS_EPS, ROPE_THETA, VOCAB, ModelDims
from .suites.attention import attention_bytes, attention_flops
from .suites.common import ELEM
from .suites.moe import experts_touched

MOE_LAYERS = 4  # Qwen3-30B-A3B at full width, fewer layers
SPECS = (QWEN3_0_6B, QWEN3_4B, dataclasses.replace(QWEN3_30B_A3B, layers=MOE_LAYERS))
PREFILL = ((1, 2048), (8, 2048), (1, 16384))  # (batch, seqlen)
DECODE_BATCH = (1, 16, 64)
DECODE_CONTEXT = 2048
CHECK_ROWS = 2  # decode sequences compared against the fp32 truth
MAX_POSITIONS = 40960
# Tokens per forward of the untimed prefill that fills a decode case's static cache. One forward
# over all batch x context tokens (131k at batch 64) needed 2.38 GiB per MLP intermediate of
# Qwen3-4B and 4 GiB in HF's MoE of Qwen3-30B-A3B: out of memory on an 80 GB H100 on 2026-11-26.
# Half the largest prefill the suite times: 152 MiB per Qwen3-4B MLP intermediate, and batch 64
# fills in sixteen forwards instead of one (the same FLOPs).
PREFILL_CHUNK_TOKENS = 8192


# ---------------------------------------------------------------------------------------------
# FLOP and byte formulas
# ---------------------------------------------------------------------------------------------
def attention_params(d: ModelDims) -> int:
    """q, k, v and o projections of one layer."""
    return d.hidden * (d.hq + 2 * d.hkv) * d.head_dim + d.hq * d.head_dim * d.hidden


def active_layer_params(d: ModelDims) -> int:
    """Matmul weights one token multiplies in one layer (its top-k experts and the router for MoE)."""
    mlp = d.topk * 3 * d.hidden * d.moe_inter + d.hidden * d.experts if d.is_moe else 3 * d.hidden * d.inter
    return attention_params(d) + mlp


def prefill_flops(d: ModelDims, batch: int, seqlen: int) -> int:
    """2 FLOPs per active weight per token, causal attention per layer, the LM head on one position."""
    matmuls = 2 * batch * seqlen * d.layers * active_layer_params(d)
    return matmuls + d.layers * attention_flops(batch, d.hq, seqlen, seqlen) + 2 * batch * d.hidden * VOCAB


def decode_flops(d: ModelDims, batch: int, context: int) -> int:
    matmuls = 2 * batch * (d.layers * active_layer_params(d) + d.hidden * VOCAB)
    return matmuls + d.layers * attention_flops(batch, d.hq, 1, context)


def decode_bytes(d: ModelDims, batch: int, context: int, elem: int = ELEM) -> float:
    """Every weight the step touches, read once (MoE: the experts the batch is expected to hit),
    the LM head, and each layer's KV cache (norm weights and activations are negligible)."""
    if d.is_moe:
        mlp = experts_touched(batch, d.experts, d.topk) * 3 * d.hidden * d.moe_inter + d.hidden * d.experts
    else:
        mlp = 3 * d.hidden * d.inter
    weights = d.layers * (attention_params(d) + mlp) + d.hidden * VOCAB
    return elem * weights + d.layers * attention_bytes(batch, d.hq, d.hkv, 1, context)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def hf_config(d: ModelDims):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=d.hidden,
        intermediate_size=d.inter,
        num_hidden_layers=d.layers,
        num_attention_heads=d.hq,
        num_key_value_heads=d.hkv,
        head_dim=HEAD_DIM,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=d.tied,
    )
    if not d.is_moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common,
        moe_intermediate_size=d.moe_inter,
        num_experts=d.experts,
        num_experts_per_tok=d.topk,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def build_model(d: ModelDims, device, dtype=torch.bfloat16):
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    cls = Qwen3MoeForCausalLM if d.is_moe else Qwen3ForCausalLM
    with torch.device(device):
        model = cls._from_config(hf_config(d), attn_implementation="sdpa", dtype=dtype)
    return model.eval()


class ModelPool:
    """The models of one spec at a time: the unpatched bf16 base and its fp32 copy (the truth,
    twice the base's size: kept for the spec's cases, released with the base)."""

    def __init__(self):
        self.spec: ModelDims | None = None
        self.base = None
        self._fp32 = None

    def get(self, d: ModelDims, device):
        if self.spec != d:
            self.release()
            self.base = build_model(d, device)
            self.spec = d  # only once built: a failed build is retried by the next case
        return self.base

    def release(self) -> None:
        """Drop both models and hand their memory back before another spec's are built. The
        collection first: a model in a reference cycle (Liger binds methods to module instances)
        outlives its last reference until the cyclic collector runs, and empty_cache can only
        return segments with nothing alive in them. On 2026-11-26, 31.7 GiB were still allocated
        when Qwen3-30B-A3B was built after Qwen3-4B, and all its cases ran out of memory."""
        self.base = self._fp32 = self.spec = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def fp32(self):
        if self._fp32 is None:
            self._fp32 = copy.deepcopy(self.base).float()
            if hasattr(self._fp32, "set_experts_implementation"):  # grouped_mm serves bf16 only
                self._fp32.set_experts_implementation("eager")
            _use_truth_attention(self._fp32)
        return self._fp32


TRUTH_ATTENTION = "qwen3x_benchmark_fp32_truth"


def _truth_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' sdpa attention (same mask and causality rules) for the fp32 truth model, with
    k and v expanded to q's heads first. Given GQA in fp32, SDPA falls back to its math kernel,
    which materializes the [batch, heads, q, k] scores: 32 GiB for Qwen3-4B at 16k tokens (out of
    memory on an 80 GB H100, seen 2026-11-26). With as many k/v heads as q heads it runs the
    memory-efficient kernel, still in fp32. query [B, Hq, S, D], key/value [B, Hkv, S_k, D]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    return out.transpose(1, 2).contiguous(), None


def _use_truth_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(TRUTH_ATTENTION, _truth_attention)
    AttentionMaskInterface.register(TRUTH_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # sdpa's masks
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(TRUTH_ATTENTION)
    else:  # transformers releases before set_attn_implementation
        model.config._attn_implementation = TRUTH_ATTENTION


POOL = ModelPool()


_ABSENT = object()


@contextlib.contextmanager
def _restoring(module_names):
    """Undo module-level monkeypatching (Liger also replaces transformers' classes globally). Yields
    a dict that, on exit, holds what the body changed: module -> {name: the body's value, or _ABSENT
    for a name it deleted} (for _in_force)."""
    modules = [importlib.import_module(name) for name in module_names]
    saved = [dict(vars(m)) for m in modules]
    changed: dict = {}
    try:
        yield changed
    finally:
        for m, attrs in zip(modules, saved):
            now = vars(m)
            changed[m] = {n: now.get(n, _ABSENT) for n in set(now) | set(attrs)
                          if now.get(n, _ABSENT) is not attrs.get(n, _ABSENT)}
            for name in set(now) - set(attrs):
                delattr(m, name)
            now.update(attrs)


@contextlib.contextmanager
def _in_force(changed: dict):
    """The module globals of a _restoring body in force again for a while (a model patched by Liger
    looks some of them up at every call: transformers' attention calls the module's
    apply_rotary_pos_emb, which Liger replaces with its own)."""
    def assign(values: dict) -> None:
        for m, names in values.items():
            for n, v in names.items():
                if v is _ABSENT:
                    vars(m).pop(n, None)
                else:
                    setattr(m, n, v)

    saved = {m: {n: vars(m).get(n, _ABSENT) for n in names} for m, names in changed.items()}
    try:
        assign(changed)
        yield
    finally:
        assign(saved)


def _hf_eager(model):
    return copy.deepcopy(model)


def _qwen3x(model):
    import qwen3x

    return qwen3x.patch(copy.deepcopy(model))


def _liger(model):
    import liger_kernel.transformers as liger

    model = copy.deepcopy(model)
    moe = type(model).__name__.startswith("Qwen3Moe")
    apply = liger.apply_liger_kernel_to_qwen3_moe if moe else liger.apply_liger_kernel_to_qwen3
    with _restoring(["transformers.models.qwen3.modeling_qwen3", "transformers.models.qwen3_moe.modeling_qwen3_moe"]) \
            as changed:
        apply(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    forward = model.forward

    @functools.wraps(forward)
    def forward_with_liger_globals(*args, **kwargs):  # its RoPE, for this model's calls only
        with _in_force(changed):
            return forward(*args, **kwargs)

    model.forward = forward_with_liger_globals
    return model


PREPARE = {"hf_eager": _hf_eager, "qwen3x": _qwen3x, "liger": _liger}
NOTES = {
    "hf_eager": "unpatched transformers (sdpa attention, default experts implementation)",
    "qwen3x": "qwen3x.patch(model)",
    "liger": "apply_liger_kernel_to_qwen3* (its module-level RoPE in force during this model's calls)",
}


def _last_logits(model, ids):
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # [B, 1, V]


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------
def _prefill_build(name):
    def build(x):
        model, ids = PREPARE[name](POOL.base), x["input_ids"]

        def call():
            return _last_logits(model, ids)

        call.model = model  # for _routing_excuse
        return call

    return build


def prefill_case(d: ModelDims, batch: int, seqlen: int) -> Case:
    def make_inputs(device):
        POOL.get(d, device)
        return {"input_ids": torch.randint(0, VOCAB, (batch, seqlen), device=device)}

    return Case(
        op="model_prefill",
        shape={"model": d.name, "layers": d.layers, "batch": batch, "seqlen": seqlen},
        make_inputs=make_inputs,
        reference=lambda x: _last_logits(POOL.base, x["input_ids"]),
        truth=lambda x: _last_logits(POOL.fp32(), x["input_ids"]),
        providers=_providers(_prefill_build, d),
        flops=prefill_flops(d, batch, seqlen),
        tokens=batch * seqlen,
        release_each_provider=True,  # each provider builds its own copy of the model
        excuse=_routing_excuse(d, batch) if d.is_moe else None,
    )


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------
def _counts_on_device(cache) -> bool:
    """transformers 5.x static layers count their filled slots on the device (cumulative_length)
    and write there; 4.57's write where the cache_position the caller passes says."""
    return any(hasattr(layer, "cumulative_length") for layer in cache.layers)


def _fill(model, ids, cache) -> None:
    """The untimed prefill: ``ids`` [B, S] into slots 0..S-1 of the empty static ``cache``, in
    chunks of PREFILL_CHUNK_TOKENS tokens (max(1, that // B) positions), each forward attending to
    the slots the earlier ones wrote. Positions are passed explicitly, [1, S] as the model derives
    them itself (5.x from the layers' device counter, 4.57 from cache_position, which 4.57 also
    needs to know where to write), so the cache ends up as one forward leaves it."""
    batch, length = ids.shape
    step = max(1, PREFILL_CHUNK_TOKENS // batch)
    counted = _counts_on_device(cache)
    for start in range(0, length, step):
        end = min(start + step, length)
        positions = torch.arange(start, end, device=ids.device)
        extra = {} if counted else {"cache_position": positions}
        model(input_ids=ids[:, start:end], position_ids=positions[None], use_cache=True, logits_to_keep=1,
              **{cache_keyword(): cache}, **extra)  # fmt: skip


def _decode_build(name):
    def build(x):
        from transformers import StaticCache

        model, ids = PREPARE[name](POOL.base), x["input_ids"]
        batch, total = ids.shape
        context = total - 1
        cache = StaticCache(config=model.config, max_cache_len=total)
        _fill(model, ids[:, :context], cache)
        new_token = ids[:, context:].contiguous()
        position_ids = torch.full((batch, 1), context, dtype=torch.long, device=ids.device)
        # Every timed step must write the same cache slot. transformers 5.x static layers count
        # their length on the device (step it back after each call; the counters are read after
        # the fill, which moves them to the cache's device); 4.57 writes where cache_position says.
        lengths = [layer.cumulative_length for layer in cache.layers if hasattr(layer, "cumulative_length")]
        extra = {} if lengths else {"cache_position": position_ids[0]}

        def step():
            logits = model(
                input_ids=new_token, position_ids=position_ids, use_cache=True, **{cache_keyword(): cache}, **extra
            ).logits  # fmt: skip
            if lengths:
                torch._foreach_sub_(lengths, 1)
            return logits

        step.model = model  # for _routing_excuse
        return step

    return build


def decode_case(d: ModelDims, batch: int, context: int, cuda_graph: bool) -> Case:
    rows = min(batch, CHECK_ROWS)

    def make_inputs(device):
        POOL.get(d, device)
        return {"input_ids": torch.randint(0, VOCAB, (batch, context + 1), device=device)}

    providers = _providers(_decode_build, d)
    for p in providers:
        p.canon = lambda logits: logits[:rows]
    return Case(
        op="model_decode",
        shape={"model": d.name, "layers": d.layers, "batch": batch, "context": context, "cuda_graph": cuda_graph},
        make_inputs=make_inputs,
        reference=lambda x: _last_logits(POOL.base, x["input_ids"][:rows]),
        truth=lambda x: _last_logits(POOL.fp32(), x["input_ids"][:rows]),
        providers=providers,
        flops=decode_flops(d, batch, context),
        bytes=decode_bytes(d, batch, context),
        cuda_graph=cuda_graph,
        tokens=batch,
        release_each_provider=True,  # each provider builds its own copy of the model and its cache
        excuse=_routing_excuse(d, rows) if d.is_moe else None,
    )


# ---------------------------------------------------------------------------------------------
# Routing flips at near ties (MoE models)
# ---------------------------------------------------------------------------------------------
def _judged_routing(call, inputs, rows: int, topk: int) -> RoutingAgreement:
    """Routing of the judged tokens, the last position of each of the first ``rows`` sequences,
    per MoE layer: the provider's as its checked call routes them (called again, with the
    routers recorded: a decode step's one token per sequence, a prefill's every token), against
    the truth's and the unpatched bf16 model's in the forwards that gave the check's logits."""
    ids = inputs["input_ids"]
    with recording_router_probs(call.model) as recorded:
        call()
    candidate = [p.view(ids.shape[0], -1, p.shape[-1])[:rows, -1] for p in recorded]
    truth, baseline = ([p[:, -1] for p in router_probs(m, ids[:rows], use_cache=False, logits_to_keep=1)]
                       for m in (POOL.fp32(), POOL.base))  # fmt: skip
    return compare_routing(truth, baseline, candidate, topk)


def _sequences(mask: torch.Tensor, layers: torch.Tensor, moe_layers: int) -> str:
    """'0 (1 of 4 MoE layers), 1 (...)': the sequences in ``mask`` and their layer counts."""
    return ", ".join(f"{i} ({int(layers[i])} of {moe_layers} MoE layers)" for i in mask.nonzero().flatten().tolist())


def _routing_verdict(out_of_tolerance: torch.Tensor, routing: RoutingAgreement) -> Excuse:
    """Accepted when every judged token out of tolerance was routed otherwise at near ties only
    and no judged token was routed otherwise at a decided gap (a fault, whatever its logits)."""
    decisive = routing.decisive > 0
    if decisive.any():
        where = _sequences(decisive, routing.decisive, routing.layers)
        return Excuse(False, f"other experts than the truth's at a decided gap at the judged token of sequence {where}")
    unexplained = out_of_tolerance & ~routing.excused
    if unexplained.any():
        where = ", ".join(map(str, unexplained.nonzero().flatten().tolist()))
        return Excuse(False, f"no routing flip at the judged token of sequence {where}")
    where = _sequences(out_of_tolerance, routing.near_ties, routing.layers)
    return Excuse(True, f"routing flip at a near tie at the judged token of sequence {where}: logits not judged there")


def _routing_excuse(d: ModelDims, rows: int):
    """Case.excuse of an MoE model's cases, whose check compares the last-position logits
    [rows, 1, V] of ``rows`` sequences: judged per sequence against the one tolerance."""

    def excuse(call, inputs, got, truth, tolerances) -> Excuse | None:
        (logits,), (want,), (tol,) = got, truth, tolerances
        if logits.shape != want.shape or not torch.isfinite(logits).all():
            return None  # a shape or a NaN is no routing flip
        errors = (logits.double() - want.double()).abs().flatten(1).amax(dim=1)
        return _routing_verdict(errors > tol, _judged_routing(call, inputs, rows, d.topk))

    return excuse


def _graphable(name: str, d: ModelDims) -> bool:
    """Whether the provider's forward can be captured into a CUDA graph. Liger's MoE experts
    (liger_kernel.ops.fused_moe.compute_routing_metadata, 0.8.5) read the number of 64-row tiles
    the routing produced back to the host (``int(expert_tile_offset[-1].item())``) to size their
    buffers and the GEMM grids: a host sync in every MoE layer, which a capture cannot contain
    (it failed on 2026-11-26 with "operation failed due to a previous error during capture").
    Before transformers 5 Liger keeps HF's loop over the experts hit, whose nonzero() syncs too."""
    return not (name == "liger" and d.is_moe)


def _providers(build, d: ModelDims) -> list[Provider]:
    return [
        Provider(name, build(name), note=NOTES[name], skip=LIGER_MISSING if name == "liger" else None,
                 graphable=_graphable(name, d))
        for name in PREPARE
    ]  # fmt: skip


def prefill_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [prefill_case(SPECS[0], 1, 2048)]
    return [prefill_case(d, b, s) for d in SPECS for b, s in PREFILL]


def decode_cases(quick: bool = False) -> list[Case]:
    if quick:
        return [decode_case(SPECS[0], 16, DECODE_CONTEXT, g) for g in (False, True)]
    return [decode_case(d, b, DECODE_CONTEXT, g) for d in SPECS for b in DECODE_BATCH for g in (False, True)]


SUITE = {"model_prefill": prefill_cases, "model_decode": decode_cases}
