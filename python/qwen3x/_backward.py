"""Restatements of the attention ops used for their backward when only ``out`` needs a gradient.

The autograd formula of every qwen3x op is the vjp of its reference (_library.py), run in the
backward. The attention references build the whole score matrix, [B, Hq, Sq, Skv] in fp32, and
their vjp holds it and its softmax: 34 GB each for one 16k-token sequence of Qwen3-4B, where HF's
default (SDPA) trains in memory linear in the length. Until qwen3x has a CUDA backward kernel,
the gradient of ``out`` goes through PyTorch's scaled_dot_product_attention instead (on a GPU its
flash / memory-efficient kernels, whose backward recomputes the scores tile by tile): the same
function of q, k and v, so the same gradients up to rounding, at HF's memory cost. When the
log-sum-exp output needs a gradient too (rare: nothing in a transformer consumes it), the
reference's vjp runs as before.

Each function here takes its op's arguments and returns ``out`` only, in the op's layout.
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
    q, k = reference.qk_norm_rope(q, k, *norm_rope_args)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, causal)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    """reference.attention_varlen's ``out`` [Tq, Hq, D], one sequence at a time (as the reference)."""
    Tq, Hq, D = q.shape
    sequences, first, end = reference.packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k)
    outs = [attention(qb, kb, vb, None, scale, causal)[0] for qb, kb, vb in sequences]
    return torch.cat([q.new_zeros((first, Hq, D)), *outs, q.new_zeros((Tq - end, Hq, D))], dim=0)


# op -> its restatement (the ops whose first output is ``out`` and second the log-sum-exp)
OUT_ONLY = {
    "attention": attention,
    "qk_norm_rope_attention": qk_norm_rope_attention,
    "attention_varlen": attention_varlen,
}
