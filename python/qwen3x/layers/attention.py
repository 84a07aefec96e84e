"""Qwen3 attention: projections, fused QK-norm + RoPE, HF's KV cache, qwen3x attention, o_proj.

``Attention`` replaces Qwen3Attention.forward (and Qwen3MoeAttention's). ``attention_forward`` has
the signature of transformers' AttentionInterface and is registered as ``"qwen3x"``;
``mask_function`` is registered as its mask builder (HF's SDPA boolean masks: None when the
pattern is plain causal). Packed sequences described the way HF's flash-attention path reads them
(``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments) go to ``attention_varlen``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import ops, reference
from . import packing
from .dispatch import autocast_dtype, reference_instead, run_reference


def _hf_function(module, name: str):
    """HF's attention function ``name`` for this module (its own eager one, or the registry's)."""
    if name == "eager":
        for cls in type(module).__mro__:
            fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
            if fn is not None:
                return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _implementation_name(name: str | None) -> str | None:
    """The attention implementation HF runs for ``config._attn_implementation``: transformers 5.24
    dropped the ``paged|`` variants other than ``paged|eager`` and strips that prefix."""
    if name is not None and name.startswith("paged|") and name != "paged|eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if name not in ALL_ATTENTION_FUNCTIONS:
            return name.removeprefix("paged|")
    return name


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Skv, D]
    value: torch.Tensor,  # [B, Hkv, Skv, D]
    attention_mask: torch.Tensor | None,  # [B, 1, Sq, Skv] bool, or None for plain causal
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    key_lengths: torch.Tensor | None = None,  # qwen3x's layers: the filled slots of a static cache
    **kwargs,
) -> tuple[torch.Tensor, None]:  # out [B, Sq, Hq, D]
    bool_or_none = attention_mask is None or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
    )
    dtype = autocast_dtype(query)
    if dtype is not None:
        # What SDPA's autocast does with them: each floating tensor but fp64 in the autocast dtype (q
        # and k leave HF's norms in fp32, v leaves v_proj in bf16; a cache may have made v fp32 too),
        # so attention runs on the half-precision kernel instead of the fp32 reference
        query, key, value = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                             for t in (query, key, value))
    one_dtype = query.dtype == key.dtype == value.dtype
    if dropout > 0.0 or not bool_or_none or not one_dtype:
        # dropout, additive float masks, BlockMasks and mixed dtypes are HF SDPA's business, exactly as before
        return _hf_function(module, "sdpa")(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    packed = _packed_sequences(kwargs, q_len, kv_len)
    if packed is not None:
        window = kwargs.get("sliding_window")
        if window is not None and window < max(packed[2], packed[3]):  # (attention_varlen has no window)
            return _packed_window_forward(query, key, value, scaling, packed[0], window), None
        return _varlen_forward(query, key, value, scaling, *packed), None
    if attention_mask is not None and attention_mask.shape[-1] > kv_len:  # as HF's SDPA path: keep kv_len
        attention_mask = attention_mask[..., :kv_len]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Same decision as HF's SDPA path: causal only for several queries and no explicit mask. The
    # mask builder returns None with kv_len > q_len only for a prefill into an empty static cache,
    # whose valid keys are the first q_len (HF aligns causality top-left there): keep those.
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out, _ = _attention_op("attention", query, key, value, attention_mask, scaling, is_causal, key_lengths)
    return out, None


def _attention_op(op: str, query: torch.Tensor, *args):
    """ops.<op>(query, *args), or its reference where no kernel serves query's dtype / head_dim."""
    return run_reference(op, query, *args) if reference_instead("attention", query) else getattr(ops, op)(query, *args)


_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_sequences(kwargs, q_len: int, kv_len: int):
    """(cu_q, cu_k, max_q, max_k) when the caller packed sequences the way HF's flash-attention path
    reads them (``cu_seq_lens_q/k``, ``max_length_q/k``, e.g. from DataCollatorWithFlattening with
    return_flash_attn_kwargs=True) and the keys are the queries' own (no past; an empty cache, as a
    forward with use_cache=True makes, included: HF's flash path attends per sequence there too,
    where its SDPA mask builder, which looks for packing only without a cache, lets them attend
    across); else None."""
    values = [kwargs.get(name) for name in _VARLEN_KWARGS]
    if any(v is None for v in values) or q_len != kv_len:
        return None
    cu_q, cu_k, max_q, max_k = values
    return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)


def _varlen_forward(query, key, value, scaling, cu_q, cu_k, max_q, max_k):
    """Causal attention over the packed sequences of the flattened batch (as HF's flash path).
    query [B, Hq, S, D], key/value [B, Hkv, S, D] -> out [B, S, Hq, D]."""
    B, Hq, S, D = query.shape

    def tokens(t):  # [B, H, S, D] -> [B * S, H, D] (a view for HF's transposed projections)
        return t.transpose(1, 2).reshape(B * S, t.shape[1], D)

    args = (tokens(query), tokens(key), tokens(value), cu_q.to(query.device), cu_k.to(query.device), max_q, max_k,
            scaling, True)
    out, _ = _attention_op("attention_varlen", *args)
    return out.view(B, S, Hq, D)


def _packed_window_forward(query, key, value, scaling, cu_seqlens, window: int):
    """Packed sequences under a sliding window shorter than one of them, as HF's flash path attends:
    each token to the last ``window`` tokens of its own sequence, itself included. One boolean mask
    over the flattened batch (attention_varlen has no window). query [B, Hq, S, D], key/value
    [B, Hkv, S, D] -> out [B, S, Hq, D]."""
    B, Hq, S, D = query.shape

    def flat(t):  # [B, H, S, D] -> [1, H, B * S, D]
        return t.transpose(0, 1).reshape(1, t.shape[1], B * S, D)

    token = torch.arange(B * S, device=query.device)
    seq = torch.bucketize(token, cu_seqlens.to(query.device)[1:], right=True)  # each token's sequence
    i, j = token[:, None], token[None, :]
    mask = ((seq[:, None] == seq[None, :]) & (j <= i) & (i - j < window))[None, None]
    args = (flat(query), flat(key), flat(value), mask, scaling, False)
    out, _ = _attention_op("attention", *args)
    return out.view(B, S, Hq, D)


def mask_function(*args, **kwargs):
    """The mask builder for attn_implementation="qwen3x": HF's SDPA mask (bool, or None)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def _fused_norm_args(module, q, k, position_embeddings):
    """The arguments after (q, k) of the qk_norm_rope ops when the kernel can serve this call, else
    None. The op runs in the dtype HF's norms return, the promotion of the activations' and the
    weights' (fp32 under autocast, whose projections give bf16 and whose norm weights stay fp32):
    the weights come cast to it (exact, or no cast), and q and k are cast by the caller when theirs
    differs (_norm_rope)."""
    q_norm, k_norm = module.q_norm, module.k_norm
    eps = q_norm.variance_epsilon
    inv_freq = getattr(position_embeddings, "inv_freq", None)
    w_dtype = q_norm.weight.dtype  # (promote_types is a dispatcher call: none in the common case)
    dtype = q.dtype if w_dtype == q.dtype else torch.promote_types(q.dtype, w_dtype)
    fused = (
        inv_freq is not None
        and inv_freq.device == position_embeddings.positions.device == q.device
        and k_norm.variance_epsilon == eps
        and q.dtype == k.dtype and q_norm.weight.dtype == k_norm.weight.dtype
        and q_norm.weight.device == k_norm.weight.device == q.device  # (a hook would move them)
        and not (packing.has_hooks(q_norm) or packing.has_hooks(k_norm))  # hooked modules are called
        and not reference_instead("qk_norm_rope", q, dtype=dtype)
    )
    if not fused:
        return None
    positions = position_embeddings.positions  # [B, S]
    weights = q_norm.weight.to(dtype), k_norm.weight.to(dtype)
    return (*weights, positions, inv_freq, position_embeddings.attention_scaling, eps)


def _owns_q(module) -> bool:
    """q may be updated in place: a plain projection's fresh output, and no autograd to need it."""
    return packing.plain_linear(module.q_proj) and not torch.is_grad_enabled()


def _project_qkv(module, x: torch.Tensor):
    """q [B, S, Hq, D], k and v [B, S, Hkv, D] from hidden_states [B, S, H]. Plain projections
    without autograd: one GEMM over their weights packed one after another (packing.py; q, k, v are
    views of its output, which the qk_norm_rope ops update in place through their strides); else
    each projection as HF calls it (hooks, LoRA, biases, and training, which would copy the weights
    every step)."""
    projections = (module.q_proj, module.k_proj, module.v_proj)
    heads = (*x.shape[:-1], -1, module.head_dim)
    plain = all(map(packing.plain_linear, projections))
    params = [p.weight for p in projections] if plain else []
    if not plain or any(p.device != x.device for p in params) or packing.needs_grad(params):
        packing.release_stale(module, "qkv", params if plain else None)  # (of parameters FSDP2 replaced)
        return tuple(p(x).view(heads) for p in projections)
    if not packing.may_pack(params):  # (FSDP's parameters, mixed dtypes) and no buffer of before left in use
        packing.release(module)
        return tuple(p(x).view(heads) for p in projections)
    sizes = [p.out_features for p in projections]
    w = packing.packed(module, "qkv", params, (sum(sizes), module.q_proj.in_features))
    return tuple(t.view(heads) for t in F.linear(x, w).split(sizes, dim=-1))


def _norm_rope(module, q, k, position_embeddings):
    """Per-head RMSNorm of q [B, S, Hq, D] and k [B, S, Hkv, D], then RoPE. Returns (q, k)."""
    args = _fused_norm_args(module, q, k, position_embeddings)
    if args is not None:
        dtype = args[0].dtype
        if q.dtype != dtype:  # autocast: bf16 q and k, fp32 weights; fp32 out, as HF's norms give
            # (one rounding fewer than HF's, which rounds the normalized q to bf16 before the weight)
            q, k = q.to(dtype), k.to(dtype)
            return (ops.qk_norm_rope if torch.is_grad_enabled() else ops.qk_norm_rope_)(q, k, *args)
        # In place only on outputs nobody else can hold: plain projections, no hooks, no autograd.
        if _owns_q(module) and packing.plain_linear(module.k_proj):
            return ops.qk_norm_rope_(q, k, *args)
        return ops.qk_norm_rope(q, k, *args)
    # plain (cos, sin) from an unpatched rotary module, or a dynamic/unsupported case
    q_norm, k_norm = module.q_norm, module.k_norm
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, D] against [B, S, H, D]
    return (
        reference.apply_rope(q_norm(q), cos, sin),
        reference.apply_rope(k_norm(k), cos, sin),
    )


def _static_layer(cache, layer_idx: int):
    """HF's StaticLayer behind ``layer_idx`` (exactly that class, initialized, in a cache that neither
    offloads nor customizes update), or None."""
    from transformers.cache_utils import Cache, StaticLayer

    layers = getattr(cache, "layers", None)
    if (
        not isinstance(cache, Cache)
        or type(cache).update is not Cache.update
        or getattr(cache, "offloading", False)
        or layers is None
        or layer_idx >= len(layers)
    ):
        return None
    layer = layers[layer_idx]
    if type(layer) is not StaticLayer or not getattr(layer, "is_initialized", False):
        return None
    return layer


def _writable_static_layer(cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
    """The StaticLayer this call may write directly: on k's device, dtype and batch, and its values
    of v's dtype (transformers 5.24 gives them v's own at initialization), else None."""
    layer = _static_layer(cache, layer_idx)
    if layer is None:
        return None
    keys = layer.keys
    if keys.device != k.device or keys.dtype != k.dtype or keys.shape[0] != k.shape[0] or keys.shape[1] != k.shape[2]:
        return None
    if layer.values.dtype != v.dtype:
        return None
    return layer


def _filled_slots(layer, cache_position):
    """How many leading slots of a StaticLayer hold tokens after this call's write, as a device
    tensor (no host sync); the slots after it are masked for every query anyway (causality over
    cache positions), so attention can skip reading them. None when unknown."""
    counter = getattr(layer, "cumulative_length", None)  # transformers 5.x
    if isinstance(counter, torch.Tensor):
        return counter
    if cache_position is not None and cache_position.numel():  # 4.57: writes at cache_position
        return cache_position[-1:] + 1
    return None


def _cache_slots(layer, seqlen: int, cache_position, device) -> torch.Tensor:
    """The cache slots of the new tokens: transformers 5.x counts written tokens in
    ``cumulative_length`` (a device tensor; one decode token's slot is that counter itself, a view,
    so read it before _advance); 4.57 writes at the ``cache_position`` the model passes (0 .. S-1
    when it passes none)."""
    counter = getattr(layer, "cumulative_length", None)
    if isinstance(counter, torch.Tensor):
        return counter.reshape(1) if seqlen == 1 else torch.arange(seqlen, device=device) + counter
    return cache_position if cache_position is not None else torch.arange(seqlen, device=device)


def _advance(layer, seqlen: int) -> None:
    """The layer's bookkeeping after its slots were written, as its own update() would leave it."""
    counter = getattr(layer, "cumulative_length", None)
    if isinstance(counter, torch.Tensor):
        counter.add_(seqlen)


class Attention(packing.Owner):
    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, S, H]
        position_embeddings=None,  # (cos, sin) [B, S, D]; RopeEmbeddings when the rotary is patched
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,  # the cache, as transformers up to 5.23 names it
        cache_position: torch.Tensor | None = None,  # transformers 4.57 passes it to the cache
        cache=None,  # the cache, as transformers 5.24 and later name it
        **kwargs,
    ):
        if cache is not None and not self._qwen3x_takes_cache:
            # Before transformers 5.24 the layers' cache is past_key_values, and a `cache` keyword is
            # continuous batching's paged cache on its way to the paged attention function (which
            # updates it): pass it on.
            kwargs["cache"], cache = cache, None
        if cache is not None and past_key_values is not None:
            raise ValueError("qwen3x attention: got both `cache` and `past_key_values`; pass the cache once")
        # transformers >= 5.24 hands its cache the attention's keyword arguments (a paged cache
        # fills them in place for the attention call); earlier versions hand it none.
        new_cache_api = cache is not None
        past_key_values = cache if new_cache_api else past_key_values
        input_shape = hidden_states.shape[:-1]
        q, k, v = _project_qkv(self, hidden_states)  # [B, S, Hq, D], [B, S, Hkv, D] x 2

        # A static cache, past its first (initializing) write: normed, rotated k and v go straight
        # into their slots, one launch (qk_norm_rope_cache_) instead of three.
        static = _writable_static_layer(past_key_values, self.layer_idx, k, v) if past_key_values is not None else None
        args = _fused_norm_args(self, q, k, position_embeddings) if static is not None and _owns_q(self) else None
        if args is not None and args[0].dtype != q.dtype:  # (autocast: q and k need a cast first; HF writes)
            args = None
        key_lengths = None
        if args is not None:
            slots = _cache_slots(static, q.shape[1], cache_position, q.device)
            ops.qk_norm_rope_cache_(q, k, v, static.keys, static.values, slots, *args)
            _advance(static, q.shape[1])
            q, k, v = q.transpose(1, 2), static.keys, static.values
            key_lengths = _filled_slots(static, cache_position)
            past_key_values = None  # written
        else:
            q, k = _norm_rope(self, q, k, position_embeddings)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]

        if past_key_values is not None:
            if new_cache_api:
                k, v = past_key_values.update(k, v, self.layer_idx, kwargs=kwargs)
            elif cache_position is not None:  # transformers 4.57 cache API
                cos, sin = position_embeddings
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
                k, v = past_key_values.update(k, v, self.layer_idx, cache_kwargs)
            else:
                k, v = past_key_values.update(k, v, self.layer_idx)
            layer = _static_layer(past_key_values, self.layer_idx)
            if layer is not None and layer.keys is k:  # HF wrote a static cache: skip its empty tail
                key_lengths = _filled_slots(layer, cache_position)

        implementation = _implementation_name(self.config._attn_implementation)
        extra = {}
        if implementation in ("sdpa", "qwen3x", None):
            attention_fn = attention_forward
            extra = {"key_lengths": key_lengths}
        else:  # eager (attention weights), flash, flex, paged...: what the user chose
            attention_fn = _hf_function(self, implementation)
        attn_output, attn_weights = attention_fn(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self, "sliding_window", None),
            **extra,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights
