"""Restatements of ops whose reference is the wrong program to differentiate.

The autograd formula of every qwen3x op is the vjp of its reference (_library.py), run in the
backward. Two kinds of reference would make training far worse than HF's own code:

Attention.  The attention references build the whole score matrix, [B, Hq, Sq, Skv] in fp32, and
their vjp holds it and its softmax: 34 GB each for one 16k-token sequence of Qwen3-4B, where HF's
default (SDPA) trains in memory linear in the length. Until qwen3x has a CUDA backward kernel,
the gradient of ``out`` goes through PyTorch's scaled_dot_product_attention instead (on a GPU its
flash / memory-efficient kernels, whose backward recomputes the scores tile by tile): the same
function of q, k and v, so the same gradients up to rounding, at HF's memory cost. When the
log-sum-exp output needs a gradient too (rare: nothing in a transformer consumes it), the
reference's vjp runs as before (also under torch.compile when lse leaves the compiled graph:
AOTAutograd then hands its gradient in as zeros, not None). These take their op's arguments and return ``out`` only (OUT_ONLY).

Experts. The moe_experts reference loops over the experts (a host sync and a few ops per expert):
its vjp launches about thirty kernels per expert, thousands per layer for Qwen3-30B-A3B, where HF's
default trains with two grouped GEMMs. moe_experts and moe are restated with grouped GEMMs
(torch.nn.functional.grouped_mm, as HF's grouped_mm experts implementation uses it) where PyTorch
serves them (bf16 on sm_80 / sm_90 GPUs; bf16 / fp16 / fp32 on the CPU), the same function, and keep the
reference elsewhere (fp64, other GPUs). These return everything the op returns (SAME_FUNCTION).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, D]
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:  # out [B, Sq, Hq, D]
    """reference.attention's ``out``: rows that see no key are 0, causality is bottom-right."""
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if Sq == 0 or Skv == 0:  # nothing to attend to: the reference's zeros, no scores to hold
        return reference.attention(q, k, v, mask, scale, causal, key_lengths)[0]
    # k and v repeated per query head (memory linear in Skv): every SDPA backend takes that, while
    # enable_gqa is not served by all of them (the math fallback would hold the scores again).
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    if mask is None and key_lengths is None and (not causal or Sq == Skv):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:  # SDPA's is_causal is top-left: spell out bottom-right causality, masks and key lengths
        allowed = reference.visible_keys(B, Sq, Skv, causal, mask, key_lengths, q.device)
        seen = allowed.any(dim=-1, keepdim=True)
        # a row that sees no key attends to all of them here and is zeroed after (no NaN, no gradient)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen, scale=scale)
        out = out.masked_fill(~seen, 0.0)
    return out.transpose(1, 2)


def qk_norm_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args) -> torch.Tensor:
    """reference.qk_norm_rope_attention's ``out`` [B, S, Hq, D] (the same arguments: q, k, v
    [B, S, H, D] from the projections, then qk_norm_rope's and attention's)."""
    *norm_rope_args, mask, scale, causal = args
    q, k = reference.qk_norm_rope(q, k, *norm_rope_args)  # fp32 norm weights promote q and k
    v = v.to(q.dtype)  # SDPA takes one dtype (the reference computes in the promoted one anyway)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, causal)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """reference.attention_varlen's ``out`` [Tq, Hq, D], one sequence at a time (as the reference)."""
    Tq, Hq, D = q.shape
    sequences, first, end = reference.packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k)
    outs = [attention(qb, kb, vb, None, scale, causal)[0] for qb, kb, vb in sequences]
    return torch.cat([q.new_zeros((first, Hq, D)), *outs, q.new_zeros((Tq - end, Hq, D))], dim=0)


def _grouped_mm_serves(x: torch.Tensor, weights: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype != weights.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # its traced form takes bf16 only
        return False
    if x.device.type == "cuda":
        # sm_100 gives empty groups nonzero weight gradients (pytorch/pytorch#172439, open): Ampere
        # and Hopper only until that is fixed
        return x.dtype == torch.bfloat16 and (8, 0) <= torch.cuda.get_device_capability(x.device) < (10, 0)
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def moe_experts(
    hidden_states: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, k]
    expert_weights: torch.Tensor,  # [T, k]
    gate_up_proj: torch.Tensor,  # [E, 2I, H]
    down_proj: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [T, H]
    """reference.moe_experts with the picks sorted by expert and each projection one grouped GEMM.
    A pick of an expert outside [0, E) contributes nothing (as in the CUDA kernel)."""
    T, H = hidden_states.shape
    k, E = expert_ids.shape[-1], gate_up_proj.shape[0]
    if T * k == 0 or not _grouped_mm_serves(hidden_states, gate_up_proj):
        return reference.moe_experts(hidden_states, expert_ids, expert_weights, gate_up_proj, down_proj)
    dtype = hidden_states.dtype
    flat = expert_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < E)
    flat = flat.clamp(0, E - 1)  # an invalid pick runs with some expert and weight 0
    order = torch.argsort(flat, stable=True)  # picks t * k + j by expert, in token order within one
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = counts.cumsum(0).to(torch.int32)  # no host sync, a fixed shape: traceable
    gate, up = F.grouped_mm(hidden_states[order // k], gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, -1)
    y = F.grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)  # [T k, H], sorted
    weights = (expert_weights.reshape(-1).to(dtype) * valid)[order]
    picks = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    y = (y * weights[:, None])[picks]  # back to pick order t * k + j
    return y.view(T, k, H).to(reference._compute_dtype(dtype)).sum(dim=1).to(dtype)


def moe(hidden_states, router_logits, gate_up_proj, down_proj, top_k, norm_topk_prob):
    """reference.moe with the experts as above."""
    weights, ids, _ = reference.moe_router(router_logits, top_k, norm_topk_prob)
    return moe_experts(hidden_states, ids, weights, gate_up_proj, down_proj)


# op -> its restatement (the ops whose first output is ``out`` and second the log-sum-exp)
OUT_ONLY = {
    "attention": attention,
    "qk_norm_rope_attention": qk_norm_rope_attention,
    "attention_varlen": attention_varlen,
}

# op -> the same function written for its vjp (all outputs)
SAME_FUNCTION = {
    "moe_experts": moe_experts,
    "moe": moe,
}
