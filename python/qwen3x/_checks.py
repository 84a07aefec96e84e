"""Input validation shared by every implementation of an op (reference, fake, fallback).

Each check raises ValueError with a message that names the op and what it expected, e.g.
``qwen3x.rms_norm: expected weight of shape [1024] (the last dim of input), got [512]``.
The CUDA kernels repeat the checks that guard their memory accesses in C++ (csrc/core).
"""

from __future__ import annotations

import math
import struct

import torch

_LOG2E = 1.4426950408889634  # csrc/attention/attention.cu's kLog2e
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def fail(op: str, message: str) -> None:
    raise ValueError(f"qwen3x.{op}: {message}")


def expect(cond: bool, op: str, message: str) -> None:
    if not cond:
        fail(op, message)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def floating(op: str, name: str, t: torch.Tensor) -> None:
    expect(t.dtype in _FLOATS, op, f"expected {name} to be a floating tensor (bf16/fp16/fp32/fp64), got {t.dtype}")


def integer(op: str, name: str, t: torch.Tensor) -> None:
    expect(t.dtype in _INTS, op, f"expected {name} to be int32 or int64, got {t.dtype}")


def same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        expect(device == first, op, f"expected all tensors on one device, got {name} on {device} and others on {first}")


def rms_norm(op: str, input: torch.Tensor, weight: torch.Tensor) -> None:
    floating(op, "input", input)
    floating(op, "weight", weight)
    expect(input.dim() >= 1, op, "expected input of shape [..., hidden]")
    expect(
        weight.dim() == 1 and weight.shape[0] == input.shape[-1],
        op,
        f"expected weight of shape [{input.shape[-1]}] (the last dim of input), got {_shape(weight)}",
    )
    same_device(op, input=input, weight=weight)


def add_rms_norm(op: str, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    rms_norm(op, input, weight)
    expect(
        residual.shape == input.shape and residual.dtype == input.dtype,
        op,
        f"expected residual like input ({_shape(input)}, {input.dtype}), got {_shape(residual)}, {residual.dtype}",
    )
    same_device(op, input=input, residual=residual)


def qk_norm_rope(op, q, k, q_weight, k_weight, positions, inv_freq) -> None:
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("inv_freq", inv_freq)):
        floating(op, name, t)
    integer(op, "positions", positions)
    expect(q.dim() >= 2 and k.dim() >= 2, op, "expected q [..., Hq, head_dim] and k [..., Hkv, head_dim]")
    d = q.shape[-1]
    expect(d % 2 == 0 and k.shape[-1] == d, op, f"expected q and k with one even head_dim, got {d} and {k.shape[-1]}")
    expect(
        q.shape[:-2] == k.shape[:-2],
        op,
        f"expected q and k to have the same leading (token) dimensions, got q {_shape(q)} and k {_shape(k)}",
    )
    expect(
        positions.shape == q.shape[:-2],
        op,
        f"expected positions of shape {_shape(q)[:-2]} (q's leading dims, one per token), got {_shape(positions)}",
    )
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        expect(w.shape == (d,), op, f"expected {name} of shape [{d}], got {_shape(w)}")
    expect(inv_freq.shape == (d // 2,), op, f"expected inv_freq of shape [{d // 2}], got {_shape(inv_freq)}")
    same_device(op, q=q, k=k, q_weight=q_weight, k_weight=k_weight, positions=positions, inv_freq=inv_freq)


# ---- memory written in place (the CUDA glue's check::writable / check::disjoint, csrc/core/checks.h) ----
def _collapsed_stride(t: torch.Tensor, end_dim: int, fallback: int) -> int | None:
    """The stride between rows when dims [0, end_dim) are flattened into one; None when they cannot be."""
    inner_stride, inner_extent = None, 0
    for d in range(end_dim - 1, -1, -1):
        if t.size(d) == 1:
            continue
        if inner_stride is None:
            inner_stride, inner_extent = t.stride(d), t.stride(d) * t.size(d)
        elif t.stride(d) != inner_extent:
            return None
        else:
            inner_extent *= t.size(d)
    return fallback if inner_stride is None else inner_stride


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(row stride, dense block) in elements: the trailing dims one dense block per row, the
    leading ones collapsed into one stride; None when they do not collapse."""
    block, d = 1, t.dim()
    while d > 0 and (t.size(d - 1) == 1 or t.stride(d - 1) == block):
        block *= t.size(d - 1)
        d -= 1
    stride = _collapsed_stride(t, d, block)
    return None if stride is None else (stride, block)


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share an element's memory, by the addresses they cover: rows of one
    stride meet only if their spans meet modulo that stride (q, k, v of a fused projection do not)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
        hi = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st >= 0)
        return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = span(a), span(b)
    if a_hi <= b_lo or b_hi <= a_lo:
        return False
    ra, rb = _rows(a), _rows(b)
    if ra and rb and ra[0] * a.element_size() == rb[0] * b.element_size():
        row, a_span, b_span = ra[0] * a.element_size(), ra[1] * a.element_size(), rb[1] * b.element_size()
        if row > 0 and a_span <= row and b_span <= row:
            delta = (b.data_ptr() - a.data_ptr()) % row
            return delta < a_span or delta + b_span > row
    return True


def written_in_place(op: str, written: dict, read: dict | None = None) -> None:
    """Tensors an op writes in place: each gives every element its own memory, and none shares
    memory with another written one or with one the op reads (real tensors; not for fake ones)."""
    for name, t in written.items():
        rows = _rows(t)
        broadcast = any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))
        shared = t.numel() > 1 and (broadcast or (rows is not None and t.numel() > rows[1] and rows[0] < rows[1]))
        expect(not shared, op, f"expected {name} to give every element its own memory (it is written in place; "
                               f"an expanded view is not), got strides {list(t.stride())}")
    names = list(written)  # pairs in the CUDA glue's order: each written one against the read, then the later written
    pairs = [(a, b) for i, a in enumerate(names) for b in [*(read or {}), *names[i + 1:]]]
    for a, b in pairs:
        ta, tb = written[a], written[b] if b in written else read[b]
        expect(not _may_overlap(ta, tb), op, f"expected {a} and {b} not to overlap in memory (the op writes one of them)")


def qk_norm_rope_cache(op, q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq):
    qk_norm_rope(op, q, k, q_weight, k_weight, positions, inv_freq)
    expect(q.dim() == 4, op, f"expected q of shape [batch, seqlen, Hq, head_dim], got {_shape(q)}")
    B, S, _, D = q.shape
    Hkv = k.shape[2]
    expect(v.shape == k.shape and v.dtype == k.dtype, op, f"expected v like k ({_shape(k)}, {k.dtype}), got {_shape(v)}, {v.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect(
            c.dim() == 4 and c.shape[0] == B and c.shape[1] == Hkv and c.shape[3] == D and c.dtype == q.dtype,
            op,
            f"expected {name} of shape [{B}, {Hkv}, max_cache_len, {D}] and dtype {q.dtype}, got {_shape(c)}, {c.dtype}",
        )
    expect(k_cache.shape == v_cache.shape, op, f"expected k_cache and v_cache of one shape, got {_shape(k_cache)} and {_shape(v_cache)}")
    integer(op, "cache_position", cache_position)
    expect(cache_position.shape == (S,), op, f"expected cache_position of shape [{S}] (q.shape[1]), got {_shape(cache_position)}")
    same_device(op, q=q, v=v, k_cache=k_cache, v_cache=v_cache, cache_position=cache_position)


def cache_position_values(op, cache_position, max_cache_len) -> None:
    """Slots in [0, max_cache_len). A host sync on CUDA: references only."""
    if cache_position.numel():
        lo, hi = int(cache_position.min()), int(cache_position.max())
        expect(lo >= 0 and hi < max_cache_len, op,
               f"expected cache_position in [0, {max_cache_len}) (the cache's {max_cache_len} slots), got values from "
               f"{lo} to {hi}")


def silu_and_mul(op: str, input: torch.Tensor) -> None:
    floating(op, "input", input)
    expect(
        input.dim() >= 1 and input.shape[-1] % 2 == 0,
        op,
        f"expected input [..., 2 * intermediate] with an even last dim, got {_shape(input)}",
    )


def softmax_scale(op: str, scale: float) -> None:
    """The CUDA kernel folds the scale into its exponent (csrc/attention/softmax.cuh), which keeps
    the max of the scaled scores and a masked -inf only for a positive finite scale, as the kernel
    holds it: scale * log2(e) in float32. Every device takes the same rule."""
    try:
        held = struct.unpack("f", struct.pack("f", scale * _LOG2E))[0]
    except OverflowError:
        held = math.inf
    expect(
        math.isfinite(held) and held > 0,
        op,
        f"expected a positive finite softmax scale (scale * log2(e) in float32), got {scale}",
    )


def attention(op, q, k, v, mask, key_lengths=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        floating(op, name, t)
        expect(t.dim() == 4, op, f"expected {name} of shape [batch, heads, seqlen, head_dim], got {_shape(t)}")
    B, Hq, Sq, D = q.shape
    expect(k.shape == v.shape, op, f"expected k and v of one shape, got {_shape(k)} and {_shape(v)}")
    expect(k.shape[0] == B and k.shape[3] == D, op, f"expected k of shape [{B}, Hkv, Skv, {D}], got {_shape(k)}")
    Hkv = k.shape[1]
    expect(Hkv > 0 and Hq % Hkv == 0, op, f"expected query heads ({Hq}) divisible by key-value heads ({Hkv})")
    expect(q.dtype == k.dtype == v.dtype, op, f"expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None:
        expect(mask.dtype == torch.bool, op, f"expected a bool mask (True = attend), got {mask.dtype}")
        ok = (
            mask.dim() == 4
            and mask.shape[0] in (1, B)
            and mask.shape[1] in (1, Hq)
            and mask.shape[2:] == (Sq, k.shape[2])
        )
        expect(ok, op, f"expected mask of shape [{B} or 1, 1 or {Hq}, {Sq}, {k.shape[2]}], got {_shape(mask)}")
    if key_lengths is not None:
        integer(op, "key_lengths", key_lengths)
        expect(
            key_lengths.numel() == 1 or key_lengths.shape == (B,),
            op,
            f"expected key_lengths of shape [{B}] or one value, got {_shape(key_lengths)}",
        )
    same_device(op, q=q, k=k, v=v, mask=mask, key_lengths=key_lengths)


def qk_norm_rope_attention(op, q, k, v, q_weight, k_weight, positions, inv_freq, mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect(t.dim() == 4, op, f"expected {name} of shape [batch, seqlen, heads, head_dim], got {_shape(t)}")
    qk_norm_rope(op, q, k, q_weight, k_weight, positions, inv_freq)
    expect(v.shape == k.shape, op, f"expected k and v of one shape, got {_shape(k)} and {_shape(v)}")
    attention(op, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)


def attention_varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        floating(op, name, t)
        expect(t.dim() == 3, op, f"expected {name} of shape [tokens, heads, head_dim], got {_shape(t)}")
    Tq, Hq, D = q.shape
    expect(k.shape == v.shape, op, f"expected k and v of one shape, got {_shape(k)} and {_shape(v)}")
    expect(k.shape[2] == D, op, f"expected k of shape [Tk, Hkv, {D}], got {_shape(k)}")
    Hkv = k.shape[1]
    expect(Hkv > 0 and Hq % Hkv == 0, op, f"expected query heads ({Hq}) divisible by key-value heads ({Hkv})")
    expect(q.dtype == k.dtype == v.dtype, op, f"expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        expect(t.dtype == torch.int32, op, f"expected {name} to have dtype torch.int32, got {t.dtype}")
        expect(t.dim() == 1 and t.shape[0] >= 1, op, f"expected {name} of shape [batch + 1], got {_shape(t)}")
    expect(
        cu_seqlens_q.shape == cu_seqlens_k.shape,
        op,
        f"expected cu_seqlens_q and cu_seqlens_k of one shape [batch + 1], got {_shape(cu_seqlens_q)} and "
        f"{_shape(cu_seqlens_k)}",
    )
    same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def cu_seqlens_values(op, name, cu_seqlens, total) -> None:
    """Values of a cu_seqlens vector: non-decreasing within [0, total]. A host sync on CUDA: references only."""
    values = cu_seqlens.tolist()
    ok = all(0 <= a <= b <= total for a, b in zip(values, values[1:])) and 0 <= values[0] <= total
    expect(ok, op, f"expected {name} non-decreasing within [0, {total}] (the tokens), got {values}")


def max_seqlen(op, cu_seqlens_q, max_seqlen_q) -> None:
    """max_seqlen_q >= the longest query sequence (the CUDA kernel's grid holds that many)."""
    longest = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    expect(
        max_seqlen_q >= longest,
        op,
        f"expected max_seqlen_q >= the longest query sequence ({longest}), got {max_seqlen_q}",
    )


def moe_gate(op, hidden_states, weight) -> None:
    floating(op, "hidden_states", hidden_states)
    expect(hidden_states.dim() == 2, op, f"expected hidden_states [tokens, hidden], got {_shape(hidden_states)}")
    H = hidden_states.shape[1]
    expect(weight.dim() == 2 and weight.shape[1] == H, op,
           f"expected weight [experts, {H}] (the router's linear weight), got {_shape(weight)}")
    expect(weight.dtype == hidden_states.dtype, op,
           f"expected weight of dtype {hidden_states.dtype} (hidden_states'), got {weight.dtype}")
    same_device(op, hidden_states=hidden_states, weight=weight)


def moe_router(op, router_logits, top_k) -> None:
    floating(op, "router_logits", router_logits)
    expect(router_logits.dim() == 2, op, f"expected router_logits [tokens, experts], got {_shape(router_logits)}")
    E = router_logits.shape[1]
    expect(1 <= top_k <= E, op, f"expected 1 <= top_k <= {E} (experts), got {top_k}")


def expert_ids(op, ids, num_experts) -> None:
    integer(op, "expert_ids", ids)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())  # a host sync on CUDA: references only
        expect(
            lo >= 0 and hi < num_experts,
            op,
            f"expected expert ids in [0, {num_experts}), got values in [{lo}, {hi}]",
        )


def padding_slots(op, num_picks, num_experts, row_align) -> None:
    """The permutation's int32 outputs (as the CUDA kernels): picks + padding slots < 2^31."""
    slots = num_picks + num_experts * (row_align - 1)
    expect(slots < 2**31, op, f"{num_picks} picks + {num_experts} experts x (row_align - 1 = {row_align - 1}) "
           "padding slots exceed the int32 range of the outputs")


def moe_permute(op, ids, num_experts, row_align) -> None:
    expect(ids.dim() == 2, op, f"expected expert_ids [tokens, top_k], got {_shape(ids)}")
    expect(num_experts > 0, op, f"expected num_experts > 0, got {num_experts}")
    expect(row_align >= 1, op, f"expected row_align >= 1, got {row_align}")
    padding_slots(op, ids.numel(), num_experts, row_align)
    expert_ids(op, ids, num_experts)


def moe_route(op, router_logits, top_k, row_align) -> None:
    moe_router(op, router_logits, top_k)
    expect(row_align >= 1, op, f"expected row_align >= 1, got {row_align}")
    padding_slots(op, router_logits.shape[0] * top_k, router_logits.shape[1], row_align)


def moe_weights(op, hidden_states, gate_up_proj, down_proj) -> None:
    floating(op, "hidden_states", hidden_states)
    expect(hidden_states.dim() == 2, op, f"expected hidden_states [tokens, hidden], got {_shape(hidden_states)}")
    H = hidden_states.shape[1]
    expect(
        gate_up_proj.dim() == 3 and gate_up_proj.shape[2] == H and gate_up_proj.shape[1] % 2 == 0,
        op,
        f"expected gate_up_proj [experts, 2 * intermediate, {H}] (transformers 5.x layout), got {_shape(gate_up_proj)}",
    )
    E, I2 = gate_up_proj.shape[0], gate_up_proj.shape[1]
    expect(
        down_proj.shape == (E, H, I2 // 2),
        op,
        f"expected down_proj [{E}, {H}, {I2 // 2}] (transformers 5.x layout), got {_shape(down_proj)}",
    )
    expect(
        gate_up_proj.dtype == down_proj.dtype == hidden_states.dtype,
        op,
        f"expected hidden_states and expert weights of one dtype, got {hidden_states.dtype}, "
        f"{gate_up_proj.dtype}, {down_proj.dtype}",
    )
    same_device(op, hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj)


def moe_experts(op, hidden_states, ids, weights, gate_up_proj, down_proj) -> None:
    moe_weights(op, hidden_states, gate_up_proj, down_proj)
    T = hidden_states.shape[0]
    expect(
        ids.dim() == 2 and ids.shape[0] == T and weights.shape == ids.shape,
        op,
        f"expected expert_ids and expert_weights of shape [{T}, top_k], got {_shape(ids)} and {_shape(weights)}",
    )
    floating(op, "expert_weights", weights)
    expert_ids(op, ids, gate_up_proj.shape[0])


def moe(op, hidden_states, router_logits, gate_up_proj, down_proj, top_k) -> None:
    moe_weights(op, hidden_states, gate_up_proj, down_proj)
    moe_router(op, router_logits, top_k)
    expect(
        router_logits.shape == (hidden_states.shape[0], gate_up_proj.shape[0]),
        op,
        f"expected router_logits [{hidden_states.shape[0]}, {gate_up_proj.shape[0]}], got {_shape(router_logits)}",
    )
