"""Typed Python API over ``torch.ops.qwen3x``.

Every function here is one call into the op registry (python/qwen3x/_library.py): a CUDA kernel
from csrc/ where one exists for the inputs' device, otherwise the pure-PyTorch reference. All ops
take and return ordinary tensors, work under autograd (except the in-place ``qk_norm_rope_``) and
under torch.compile. Shapes: T tokens, H hidden, Hq / Hkv heads, D head_dim, E experts, k picks.
"""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (registers the ops)

_ops = torch.ops.qwen3x


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm with HF's order of operations. input [..., H], weight [H] -> [..., H]."""
    return _ops.rms_norm(input, weight, eps)


def add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = input + residual, then (rms_norm(s), s). input/residual [..., H], weight [H]."""
    return _ops.add_rms_norm(input, residual, weight, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then half-rotation RoPE at ``positions``; new tensors.

    q [..., Hq, D], k [..., Hkv, D] (strided views allowed), q_weight/k_weight [D],
    positions [...] int32/int64 (one per token: q's leading dims), inv_freq [D/2] fp32
    (see qwen3x.rope.rope_parameters) -> (q_out, k_out) of the input shapes.
    """
    return _ops.qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)


def qk_norm_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place ``qk_norm_rope`` on q and k (e.g. views of the projection outputs); returns them.

    Not differentiable: use ``qk_norm_rope`` when gradients are needed.
    """
    _ops.qk_norm_rope_(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)
    return q, k


def qk_norm_rope_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``qk_norm_rope_`` on q, and k (normed, rotated) and v stored straight into a static KV cache.

    q [B, S, Hq, D] (updated in place), k/v [B, S, Hkv, D] (not modified), k_cache/v_cache
    [B, Hkv, max_cache_len, D] (HF's StaticCache layout): k_cache[b, :, cache_position[s]] = the
    normed, rotated k[b, s] and v_cache[b, :, cache_position[s]] = v[b, s]. positions [B, S] are
    the RoPE positions (they differ from the slots under left padding). One launch instead of
    qk_norm_rope_ plus two index_copy_. Slots must lie in [0, max_cache_len): the reference
    raises on others, the CUDA kernel skips them. A slot named twice gets one of its tokens, which
    one unspecified (as with index_copy_). Not differentiable. Returns q.
    """
    _ops.qk_norm_rope_cache_(
        q, k, v, k_cache, v_cache, cache_position, q_weight, k_weight, positions, inv_freq, attention_scaling, eps
    )
    return q


def silu_and_mul(input: torch.Tensor) -> torch.Tensor:
    """input [..., 2I] = [gate | up] -> silu(gate) * up [..., I]."""
    return _ops.silu_and_mul(input)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    key_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA attention. q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], mask [B|1, 1|Hq, Sq, Skv] bool or None.

    ``causal``: the Sq queries are the last Sq key positions (bottom-right). ``scale`` defaults to
    D ** -0.5 and must be positive and finite (in float32, times log2 e: every attention op
    checks). ``key_lengths`` ([B] or one value, int32/int64, read on the device): sequence b
    attends to its first min(Skv, key_lengths[b]) keys only and the kernel never reads the rest
    (the unfilled tail of a static cache). Returns out [B, Sq, Hq, D] and lse [B, Hq, Sq] fp32.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.attention(q, k, v, mask, scale, causal, key_lengths)


def qk_norm_rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 attention from the projections' outputs: per-head RMSNorm and RoPE of q and k, then
    GQA attention. q [B, S, Hq, D], k/v [B, S, Hkv, D] (views of the projections are fine; none is
    modified), positions [B, S], mask [B|1, 1|Hq, S, S] bool or None -> out [B, S, Hq, D] and lse
    [B, Hq, S]. Differentiable. The CUDA kernels serve bf16 and fp16 (others: the reference). For
    decode against a static cache: ``qk_norm_rope_cache_``, then ``attention`` over the cache.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.qk_norm_rope_attention(
        q, k, v, q_weight, k_weight, positions, inv_freq, attention_scaling, eps, mask, scale, causal
    )


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA attention over packed variable-length sequences (FlashAttention's varlen layout).

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; cu_seqlens_q/k int32 [B + 1], non-decreasing: sequence b is
    tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 of q and cu_seqlens_k[b] .. cu_seqlens_k[b+1]-1
    of k/v. ``causal`` is bottom-right within each sequence. Returns out [Tq, Hq, D] and lse
    [Hq, Tq] fp32; tokens outside every sequence give 0 and -inf.

    ``max_seqlen_q`` (the longest query sequence) sizes the CUDA grid: rows of a longer sequence
    come back NaN from the kernel, and the reference raises. ``max_seqlen_k`` only plans split-KV
    (any value is correct). None reads them from cu_seqlens, one host sync: pass them under
    CUDA-graph capture.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5

    def longest(cu: torch.Tensor) -> int:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    if max_seqlen_q is None:
        max_seqlen_q = longest(cu_seqlens_q)
    if max_seqlen_k is None:
        max_seqlen_k = longest(cu_seqlens_k)
    return _ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)


def moe_gate(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H] @ weight [E, H].T -> router_logits [T, E] (the MoE router's linear).
    On CUDA at decode sizes (bf16/fp16, up to 16 tokens) one kernel that reads the weight once and
    overlaps the launch before it; other sizes run torch's linear."""
    return _ops.moe_gate(hidden_states, weight)


def moe_router(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] in the logits' dtype, expert_ids [T, k] int32,
    tokens_per_expert [E] int32). Softmax in fp32, top-k, renormalized when norm_topk_prob."""
    return _ops.moe_router(router_logits, top_k, norm_topk_prob)


def moe_permute(
    expert_ids: torch.Tensor, num_experts: int, row_align: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of the T * k picks by expert; see qwen3x.reference.moe_permute.

    expert_ids [T, k] -> (sorted_rows [T*k + E*(row_align-1)] int32, expert_offsets [E+1] int32,
    inverse [T*k] int32).
    """
    return _ops.moe_permute(expert_ids, num_experts, row_align)


def moe_route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, row_align: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_router then moe_permute of its ids: (weights, expert_ids, tokens_per_expert,
    sorted_rows, expert_offsets, inverse), as those two ops return them. On CUDA: one kernel up
    to 64 tokens when tokens x top_k <= 512 (decode); above, the router's kernel and then the
    permutation's."""
    return _ops.moe_route(router_logits, top_k, norm_topk_prob, row_align)


def moe_experts(
    hidden_states: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts + weighted combine. hidden_states [T, H], expert_ids / expert_weights [T, k],
    gate_up_proj [E, 2I, H], down_proj [E, H, I] (transformers 5.x layout) -> [T, H].

    Expert ids must lie in [0, E): the reference raises on others; the CUDA kernels, which cannot
    check values without a host sync, drop such picks (they add nothing) and never read out of bounds.
    """
    return _ops.moe_experts(hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj)


def moe(
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
) -> torch.Tensor:
    """Router + experts + combine. hidden_states [T, H], router_logits [T, E] -> [T, H]."""
    return _ops.moe(hidden_states, router_logits, gate_up_proj, down_proj, top_k, norm_topk_prob)


def kernel_status() -> dict[str, str]:
    """For each op: 'cuda kernel' when this build has one, else 'reference'."""
    return {op: ("cuda kernel" if _library.has_cuda_kernel(op) else "reference") for op in _library.SCHEMAS}
