"""Pure-PyTorch references: the specification of every qwen3x op.

Each function reproduces the numerics of the Hugging Face Qwen3 / Qwen3-MoE code it replaces
(order of operations, where it upcasts to fp32 and where it rounds back). Called with float64
inputs they compute the "true" answer that kernels are judged against. They are also the CPU
implementation of ``torch.ops.qwen3x.*`` and the fallback for CUDA tensors without a kernel.

Shapes use: T tokens, H hidden, Hq / Hkv query / key-value heads, D head_dim (128 for Qwen3),
E experts, k experts per token, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "qk_norm_rope",
    "silu_and_mul",
    "attention",
    "moe_gate",
    "moe_router",
    "moe_permute",
    "moe_route",
    "moe_experts",
    "moe",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit inputs, fp64 for fp64 inputs (the 'truth' reference)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen3RMSNorm: variance and normalization in fp32, cast to the input dtype, then weight.

    input [..., H], weight [H] -> [..., H] (dtype: promotion of input and weight, as in HF).
    """
    dtype = input.dtype
    x = input.to(_compute_dtype(dtype))
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, as a Qwen3 decoder layer does between attention and MLP.

    Returns (rms_norm(input + residual), input + residual); the sum is rounded to the input dtype
    first, exactly like HF's ``hidden_states = residual + hidden_states``.
    """
    summed = residual + input
    return rms_norm(summed, weight, eps), summed


# --------------------------------------------------------------------------------------------
# RoPE (half rotation, NeoX style) and the fused QK-norm + RoPE
# --------------------------------------------------------------------------------------------
def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables as HF's rotary embedding builds them.

    positions [...] (int), inv_freq [D/2] -> cos, sin [..., D] in ``dtype``. The angle is computed
    in fp32 (fp64 when dtype is fp64), scaled by attention_scaling, then cast to ``dtype``.
    """
    cdt = _compute_dtype(dtype)
    freqs = positions.to(cdt)[..., None] * inv_freq.to(device=positions.device, dtype=cdt)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]), then RoPE at ``positions``.

    q [..., Hq, D], k [..., Hkv, D], positions [...] (the leading dims of q and k) int32/int64,
    inv_freq [D/2] fp32 -> (q_out [..., Hq, D], k_out [..., Hkv, D]).
    """
    qn = rms_norm(q, q_weight, eps)
    kn = rms_norm(k, k_weight, eps)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_scaling, qn.dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return apply_rope(qn, cos, sin), apply_rope(kn, cos.to(kn.dtype), sin.to(kn.dtype))


# --------------------------------------------------------------------------------------------
# Dense MLP activation
# --------------------------------------------------------------------------------------------
def silu_and_mul(input: torch.Tensor) -> torch.Tensor:
    """input [..., 2I] = [gate | up] -> silu(gate) * up [..., I] (HF: act_fn(gate) * up)."""
    gate, up = input.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def visible_keys(
    B: int,
    Sq: int,
    Skv: int,
    causal: bool,
    mask: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    device: torch.device,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Which keys each query of ``attention`` sees: bool [B, 1 or Hq, Sq, Skv] (True = attend); with
    ``rows`` = (first, end), those of queries first .. end-1 only ([B, 1 or Hq, end - first, Skv])."""
    first, end = rows if rows is not None else (0, Sq)
    lengths = torch.full((B,), Skv, device=device)
    if key_lengths is not None:
        lengths = key_lengths.to(device).reshape(-1).expand(B).clamp(0, Skv)
    n = lengths.view(B, 1, 1, 1)  # Skv_b
    i = torch.arange(first, end, device=device).view(1, 1, end - first, 1)
    j = torch.arange(Skv, device=device).view(1, 1, 1, Skv)
    allowed = j < n
    if causal:
        allowed = allowed & (j <= i + (n - Sq))
    if mask is not None:
        if mask.shape[-2] != 1:  # (a mask broadcast over the queries is every block's)
            mask = mask[..., first:end, :]
        allowed = allowed & mask.to(device=device, dtype=torch.bool)
    return allowed


# The most fp32 scores ``attention`` holds at once ([B, Hq, rows, keys]; 32 MB): it takes the queries
# a block of rows at a time (each row's softmax is its own), so a fallback to the reference (the
# CPU, fp32 or fp64 attention on a GPU, other head_dims) runs in memory linear in the sequence
# length, as HF's SDPA path does, where the whole matrix would be 34 GB for one 16k-token sequence
# of Qwen3-4B's 32 heads.
SCORE_BLOCK_ELEMENTS = 1 << 23


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    key_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with GQA, an optional boolean mask and bottom-right causality.

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] (Hq % Hkv == 0; query head h reads kv head h // (Hq/Hkv)),
    mask [B or 1, 1 or Hq, Sq, Skv] bool (True = attend) or None. With ``causal`` the queries are the
    last Sq positions of the keys: query i sees keys j <= i + Skv - Sq (prefill: Sq == Skv; decode
    against a cache: Sq new tokens at the end). Math in fp32 (fp64 for fp64 inputs).
    ``key_lengths`` ([B] or one value, int) limits sequence b to its first Skv_b = min(Skv,
    key_lengths[b]) keys (the filled part of a static cache); causality is then bottom-right
    against Skv_b.

    Returns out [B, Sq, Hq, D] in q's dtype (the layout HF's attention functions return) and the
    log-sum-exp of the scaled scores, lse [B, Hq, Sq] fp32. A row that sees no key gives 0 and -inf.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    compiling = torch.compiler.is_compiling()
    # (torch.func transforms: no host sync on the key lengths, no in-place write into a tensor a
    # batched mask would have to widen)
    transformed = not compiling and torch._C._functorch.peek_interpreter_stack() is not None
    # Keys no row can see are left out: past the longest key length (the empty rest of a static
    # cache; a host sync) and, block by block, past the last row's causal limit (the upper triangle)
    limit = Skv
    if key_lengths is not None and not (compiling or transformed) and key_lengths.numel() > 0:
        limit = max(0, min(Skv, int(key_lengths.max())))
    kf, vf = k[:, :, :limit].to(cdt), v[:, :, :limit].to(cdt)  # [B, Hkv, keys, D]
    qg = q.view(B, Hkv, groups, Sq, D)  # query heads by the kv head they read (no repeated k, v)
    if compiling:  # one block: a loop over a traced length would specialize on it
        blocks = [(0, Sq)]
    else:
        rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * Hq * limit))
        blocks = [(first, min(Sq, first + rows)) for first in range(0, Sq, rows)] or [(0, 0)]
    outs, lses = [], []
    for first, end in blocks:
        n, keys = end - first, limit
        if causal and not compiling:
            keys = max(0, min(limit, end + Skv - Sq))  # row end-1 sees keys j <= end-1 + Skv - Sq at most
        qb = qg[:, :, :, first:end].to(cdt).reshape(B, Hkv, groups * n, D)
        scores = torch.matmul(qb, kf[:, :, :keys].transpose(-1, -2)).view(B, Hkv, groups, n, keys).mul_(scale)
        allowed = visible_keys(B, Sq, Skv, causal, mask, key_lengths, q.device, (first, end))[..., :keys]
        heads = (Hkv, groups) if allowed.shape[1] == Hq else (1, 1)
        hidden = ~allowed.reshape(B, *heads, allowed.shape[2], keys)
        scores = scores.masked_fill(hidden, float("-inf")) if transformed else scores.masked_fill_(hidden, float("-inf"))
        # softmax in place, normalized after P V: m, the row's largest score (0 where it sees
        # nothing), is a constant to autograd (the lse and the output do not depend on it)
        if keys > 0:
            m = scores.detach().amax(dim=-1, keepdim=True)
            m = m.masked_fill(torch.isinf(m), 0.0)
        else:  # (no key for any row of the block: no maximum to take)
            m = scores.new_zeros((*scores.shape[:-1], 1))
        probs = scores.sub_(m).exp_()  # exp(-inf) = 0 on masked entries
        total = probs.sum(dim=-1, keepdim=True)  # >= 1 where the row sees a key (its largest gives 1), else 0
        out = torch.matmul(probs.view(B, Hkv, groups * n, keys), vf[:, :, :keys])  # [B, Hkv, groups n, D]
        total_or_1 = torch.where(total > 0, total, torch.ones_like(total))  # (rows that see nothing: 0 / 1)
        outs.append((out / total_or_1.view(B, Hkv, groups * n, 1)).view(B, Hq, n, D))
        lses.append((m + total.log()).view(B, Hq, n))  # -inf where a row sees nothing
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, dim=2), torch.cat(lses, dim=2))
    return out.transpose(1, 2).contiguous().to(q.dtype), lse.float()


def qk_norm_rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    eps: float,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 attention from the projections: qk_norm_rope on q [B, S, Hq, D] and k [B, S, Hkv, D],
    then attention with v [B, S, Hkv, D]. Returns out [B, S, Hq, D] and lse [B, Hq, S]."""
    q, k = qk_norm_rope(q, k, q_weight, k_weight, positions, inv_freq, attention_scaling, eps)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, causal)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` over packed variable-length sequences (FlashAttention's varlen layout).

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence b is tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1
    of q against tokens cu_seqlens_k[b] .. cu_seqlens_k[b+1]-1 of k/v (cu_seqlens int32 [B+1],
    non-decreasing within [0, T]); ``causal`` is bottom-right within each sequence. max_seqlen_q/k
    size the CUDA kernel's grid and split-KV plan and do not change the result here.

    Returns out [Tq, Hq, D] in q's dtype and lse [Hq, Tq] fp32. Tokens of q outside every
    sequence (before cu_seqlens_q[0] or from cu_seqlens_q[-1] on) give 0 and -inf.
    """
    Tq, Hq, D = q.shape
    sequences, first, end = packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k)
    results = [attention(qb, kb, vb, None, scale, causal) for qb, kb, vb in sequences]
    outs = [q.new_zeros((first, Hq, D)), *(o[0] for o, _ in results), q.new_zeros((Tq - end, Hq, D))]
    lses = [torch.full((Hq, first), float("-inf"), device=q.device), *(lse[0] for _, lse in results),
            torch.full((Hq, Tq - end), float("-inf"), device=q.device)]
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """The sequences of a packed batch (attention_varlen's layout) as a list of (q_b, k_b, v_b)
    views [1, H, S_b, D], and the first and end token of q they cover (a host sync)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()

    def seq(t, lo, hi):  # tokens [lo, hi) as [1, H, S, D]
        return t[lo:hi].transpose(0, 1).unsqueeze(0)

    sequences = [(seq(q, cq[b], cq[b + 1]), seq(k, ck[b], ck[b + 1]), seq(v, ck[b], ck[b + 1]))
                 for b in range(len(cq) - 1)]
    return sequences, cq[0], cq[-1]


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------
def moe_gate(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's GEMM, as transformers' Qwen3-MoE router computes it: F.linear without a bias.

    hidden_states [T, H], weight [E, H] -> router_logits [T, E] in their dtype (fp32 sums for
    16-bit inputs, rounded once; the order of the sums is the backend's own), also inside an
    autocast region (the op takes one dtype and keeps it; the patched routers call F.linear there).
    """
    with torch.autocast(hidden_states.device.type, enabled=False):
        return F.linear(hidden_states, weight)


def moe_router(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF Qwen3-MoE routing: softmax in fp32, top-k, renormalize when norm_topk_prob.

    router_logits [T, E] -> weights [T, k] (logits' dtype, as HF casts back), expert_ids [T, k]
    int32 (descending probability; exact ties to the lower expert index), tokens_per_expert [E] int32.

    Ties are common with bf16 logits (equal logits give equal probabilities: with E = 128 about one
    token in 16 has a tie at the k-th place). torch.topk leaves their order unspecified and orders
    them differently on CPU and CUDA, so this spec fixes it (a stable descending sort): the CUDA
    kernel does the same, and HF may pick another of the tied experts.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=_compute_dtype(router_logits.dtype))
    ranked = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = ranked.values[..., :top_k], ranked.indices[..., :top_k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = ids.flatten()
    counts = torch.zeros(router_logits.shape[-1], dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat))  # a bincount of fixed shape: traceable
    return weights.to(router_logits.dtype), ids.to(torch.int32), counts.to(torch.int32)


def moe_permute(
    expert_ids: torch.Tensor, num_experts: int, row_align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic token permutation for grouped expert GEMMs.

    expert_ids [T, k] -> with N = T * k (the flat index n = t * k + j names token t's j-th pick):
      sorted_rows [N + E * (row_align - 1)] int32: flat indices grouped by expert, in token order
        inside each expert (a stable sort), each expert's segment padded to a multiple of
        row_align with -1; the size is the worst case, so it is known without a host sync;
      expert_offsets [E + 1] int32: segment e is sorted_rows[offsets[e]:offsets[e+1]] (padded);
      inverse [N] int32: position in sorted_rows of flat index n.
    """
    flat = expert_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = expert_ids.device
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + row_align - 1) // row_align * row_align
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(padded, dim=0)
    order = torch.sort(flat, stable=True).indices  # flat indices, grouped by expert
    starts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    starts[1:] = torch.cumsum(counts, dim=0)[:-1]
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(n, device=device) - starts[sorted_experts]
    dest = offsets[sorted_experts] + rank_in_expert  # position of order[r] in sorted_rows
    sorted_rows = torch.full((n + num_experts * (row_align - 1),), -1, dtype=torch.int32, device=device)
    sorted_rows[dest] = order.to(torch.int32)
    inverse = torch.empty(n, dtype=torch.int32, device=device)
    inverse[order] = dest.to(torch.int32)
    return sorted_rows, offsets.to(torch.int32), inverse


def moe_route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, row_align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_router, then moe_permute of its expert ids (E = router_logits.shape[-1]): what an MoE
    layer needs before its expert GEMMs. -> weights, expert_ids, tokens_per_expert, sorted_rows,
    expert_offsets, inverse."""
    weights, ids, counts = moe_router(router_logits, top_k, norm_topk_prob)
    return (weights, ids, counts) + moe_permute(ids, router_logits.shape[-1], row_align)


def moe_experts(
    hidden_states: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts on transformers 5.x weights, weighted and combined in a fixed order.

    hidden_states [T, H], expert_ids [T, k] (int32/int64), expert_weights [T, k],
    gate_up_proj [E, 2I, H] ([gate; up]), down_proj [E, H, I] -> out [T, H].
    For each pick: y = down @ (silu(gate @ x) * (up @ x)) in the activation dtype, times its routing
    weight (rounded to the activation dtype, as HF does); the k picks of a token are summed in
    fp32 in pick order and rounded once.
    """
    T, H = hidden_states.shape
    k = expert_ids.shape[-1]
    E = gate_up_proj.shape[0]
    dtype = hidden_states.dtype
    flat = expert_ids.reshape(-1).to(torch.int64)
    weights = expert_weights.reshape(-1).to(dtype)
    counts = torch.bincount(flat, minlength=E).tolist()  # a host sync: fine for the reference
    rows_of, ys = [], []
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = torch.nonzero(flat == e).squeeze(-1)  # flat indices t * k + j, in token order
        x = hidden_states[rows // k]
        gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e])
        rows_of.append(rows)
        ys.append(y * weights[rows, None])
    # every pick's row once (each pick has one expert): one scatter, out of place (torch.func's
    # transforms, which run the references, refuse in-place writes of batched values into a plain tensor)
    picks = hidden_states.new_zeros(T * k, H)
    if ys:
        picks = picks.index_put((torch.cat(rows_of),), torch.cat(ys))
    return picks.view(T, k, H).to(_compute_dtype(dtype)).sum(dim=1).to(dtype)


def moe(
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
) -> torch.Tensor:
    """A whole sparse MoE block after the router GEMM: route, run the experts, combine.

    hidden_states [T, H], router_logits [T, E] -> [T, H].
    """
    weights, ids, _ = moe_router(router_logits, top_k, norm_topk_prob)
    return moe_experts(hidden_states, ids, weights, gate_up_proj, down_proj)
