"""MoE at the Qwen3-30B-A3B (H 2048, I 768) and Qwen3-235B-A22B (H 4096, I 1536) shapes, E 128, top-8.

- moe_gate:    the router's GEMM, hidden states -> router logits (torch's F.linear the peer)
- moe_router:  router logits -> (weights, expert ids, tokens per expert)
- moe_permute: expert ids -> stable grouping by expert (sorted rows, offsets, inverse)
- moe_route:   both, as the layer runs them (one launch up to 64 tokens), with its decode row_align
- moe_experts: SwiGLU experts + weighted combine, given the routing
- moe_layer:   a whole sparse block: router GEMM (qwen3x: moe_gate, as the patched layers; the
               others F.linear), routing, experts, combine

Routing inputs are drawn uniformly (each token's logits are a random permutation of distinct
bf16 values, so top-k has no ties); the byte formulas assume the same uniform routing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from qwen3x import ops, reference

from ..harness import Case, Provider
from ..providers import (liger_provider, mma_sync_provider, no_fence_provider, no_pdl_provider, over_budget, qwen3x_provider,
                         reference_provider, torch_compile_provider)
from ..shapes import MOE_MODELS, ModelDims
from .common import ELEM, graph_worthy, hf_module, randn

TOKENS = (1, 16, 64, 128, 1024, 4096, 16384, 32768)  # 64: the top of issue 6's decode range; 16384: its 1.5x-grouped_mm shape
ROW_ALIGN = 1  # moe_permute padding of each expert's segment (1: none, as HF's grouped_mm path)
ROUTE_ROW_ALIGN = 16  # moe_route: the expert GEMMs' decode row tile (BLOCK_M), what the moe op asks for
NORM_TOPK_PROB = True  # what the Qwen3-MoE checkpoints set


# ---------------------------------------------------------------------------------------------
# FLOP and byte formulas
# ---------------------------------------------------------------------------------------------
def experts_touched(tokens: int, experts: int, topk: int) -> float:
    """Expected number of distinct experts hit by ``tokens`` uniformly routed tokens."""
    return experts * (1 - (1 - topk / experts) ** tokens)


def moe_router_bytes(tokens: int, experts: int, topk: int, elem: int = ELEM) -> int:
    """Read the logits; write weights (dtype) and int32 ids per pick, and int32 counts per expert."""
    return tokens * experts * elem + tokens * topk * (elem + 4) + experts * 4


def moe_permute_bytes(tokens: int, experts: int, topk: int, row_align: int = ROW_ALIGN) -> int:
    """Read int32 ids; write int32 sorted_rows (padded worst case), offsets and inverse."""
    picks = tokens * topk
    return 4 * (picks + (picks + experts * (row_align - 1)) + (experts + 1) + picks)


def moe_experts_flops(tokens: int, topk: int, hidden: int, inter: int) -> int:
    """Per pick: gate_up (2 * H * 2I) + down (2 * I * H) = 6 * H * I."""
    return 6 * tokens * topk * hidden * inter


def moe_experts_bytes(tokens: int, experts: int, topk: int, hidden: int, inter: int, elem: int = ELEM,
                      touched: float | None = None) -> float:
    """Weights of the touched experts (3 * H * I each) once; read x and write out [T, H]; ids + weights.
    ``touched``: the distinct experts the inputs' routing hits (default: the uniform expectation)."""
    touched = experts_touched(tokens, experts, topk) if touched is None else touched
    return touched * 3 * hidden * inter * elem + 2 * tokens * hidden * elem + tokens * topk * (4 + elem)


def moe_layer_flops(tokens: int, experts: int, topk: int, hidden: int, inter: int) -> int:
    """The experts plus the router GEMM (2 * H * E per token)."""
    return moe_experts_flops(tokens, topk, hidden, inter) + 2 * tokens * hidden * experts


def moe_layer_bytes(tokens: int, experts: int, topk: int, hidden: int, inter: int, elem: int = ELEM,
                    touched: float | None = None) -> float:
    """The experts plus the router weight [E, H]."""
    return moe_experts_bytes(tokens, experts, topk, hidden, inter, elem, touched) + experts * hidden * elem


def _touched_fields(d: ModelDims, tokens: int, ids: torch.Tensor, layer: bool) -> dict:
    """The row fields of a case whose routing picked ``ids``: the experts touched and their bytes
    (at 16 tokens of Qwen3-30B-A3B the count varies by about +-4% around its expectation)."""
    touched = int(ids.unique().numel())
    nbytes = (moe_layer_bytes if layer else moe_experts_bytes)(tokens, d.experts, d.topk, d.hidden, d.moe_inter,
                                                               touched=touched)
    return {"experts_touched": touched, "bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def distinct_logits(tokens: int, experts: int, device) -> torch.Tensor:
    """[T, E] bf16 logits, each row a random permutation of distinct exact values (no top-k ties)."""
    ranks = torch.rand(tokens, experts, device=device).argsort(dim=-1)
    return ((ranks - experts // 2).float() / 8).to(torch.bfloat16)


def _weights(d: ModelDims, device) -> dict:
    H, I, E = d.hidden, d.moe_inter, d.experts
    return {
        "gate_up_proj": randn(E, 2 * I, H, device=device, scale=H**-0.5),  # [E, 2I, H]
        "down_proj": randn(E, H, I, device=device, scale=I**-0.5),  # [E, H, I]
    }


def _routed(tokens: int, d: ModelDims, device) -> dict:
    weights, ids, _ = reference.moe_router(distinct_logits(tokens, d.experts, device), d.topk, NORM_TOPK_PROB)
    return {"expert_ids": ids, "expert_weights": weights}


# ---------------------------------------------------------------------------------------------
# HF peers
# ---------------------------------------------------------------------------------------------
@functools.cache
def _moe_config(d: ModelDims):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=d.hidden,
        moe_intermediate_size=d.moe_inter,
        num_experts=d.experts,
        num_experts_per_tok=d.topk,
        norm_topk_prob=NORM_TOPK_PROB,
        hidden_act="silu",
    )


def hf_experts_functions() -> dict[str, object]:
    """name -> HF experts forward(module, hidden, top_k_index, top_k_weights), or a skip note (str)."""
    try:
        from transformers.integrations import moe as hf_moe
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError as exc:
        note = f"transformers has no Qwen3MoeExperts / integrations.moe ({exc})"
        return {"hf_eager": note, "hf_grouped_mm": note, "hf_batched_mm": note}
    return {
        "hf_eager": getattr(Qwen3MoeExperts.forward, "__wrapped__", Qwen3MoeExperts.forward),
        "hf_grouped_mm": getattr(hf_moe, "grouped_mm_experts_forward", "no grouped_mm_experts_forward"),
        "hf_batched_mm": getattr(hf_moe, "batched_mm_experts_forward", "no batched_mm_experts_forward"),
    }


def _hf_experts(d: ModelDims, x):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return hf_module(
        lambda: Qwen3MoeExperts(_moe_config(d)), gate_up_proj=x["gate_up_proj"], down_proj=x["down_proj"]
    )  # fmt: skip


def _hf_providers(d: ModelDims, tokens: int, with_router: bool) -> list[Provider]:
    """hf_eager / hf_grouped_mm / hf_batched_mm: HF's experts forwards on a Qwen3MoeExperts module
    (with HF's Qwen3MoeTopKRouter in front for the whole layer)."""
    gathered = tokens * d.topk * 3 * d.hidden * d.moe_inter * ELEM  # batched_mm gathers weights per pick
    providers = []
    for name, forward in hf_experts_functions().items():

        def build(x, forward=forward):
            experts = _hf_experts(d, x)
            if with_router:
                from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

                router = hf_module(lambda: Qwen3MoeTopKRouter(_moe_config(d)), weight=x["router"])

                def layer():
                    _, weights, ids = router(x["hidden_states"])
                    return forward(experts, x["hidden_states"], ids, weights)

                return layer
            ids = x["expert_ids"].long()  # HF's router returns int64 ids
            return lambda: forward(experts, x["hidden_states"], ids, x["expert_weights"])

        skip = forward if isinstance(forward, str) else None
        if name == "hf_batched_mm":
            skip = skip or over_budget(gathered, "gathering expert weights per token")
        providers.append(Provider(name, build, skip=skip, graphable=name != "hf_eager"))
    return providers


# ---------------------------------------------------------------------------------------------
# torch._grouped_mm directly: the grouped GEMMs alone
# ---------------------------------------------------------------------------------------------
def _torch_grouped_mm(x):
    """Timed: gather the rows in expert order, grouped GEMM, SwiGLU, grouped GEMM. The routing
    metadata (sort, offsets) is built untimed and the weighted combine is done untimed in canon,
    so this is a lower bound: the GEMMs a grouped-GEMM MoE cannot avoid."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    ids = x["expert_ids"].reshape(-1).long()
    T, k = x["expert_ids"].shape
    order = torch.sort(ids, stable=True).indices
    offsets = torch.bincount(ids, minlength=x["gate_up_proj"].shape[0]).cumsum(0).to(torch.int32)
    rows = order // k
    gate_up_t = x["gate_up_proj"].transpose(1, 2)  # [E, H, 2I]
    down_t = x["down_proj"].transpose(1, 2)  # [E, I, H]
    h = x["hidden_states"]

    def call():
        gate, up = grouped_mm(h[rows], gate_up_t, offs=offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, down_t, offs=offsets)  # [T*k, H], expert order

    def combine(y):  # as the reference: weight in the activation dtype, sum the k picks in fp32
        picks = torch.empty_like(y)
        picks[order] = y * x["expert_weights"].reshape(-1)[order, None].to(y.dtype)
        return picks.view(T, k, -1).float().sum(dim=1).to(y.dtype)

    call.combine = combine
    return call


_GROUPED_MM_MISSING = None if hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm") else "no grouped_mm"


def _torch_grouped_mm_provider() -> Provider:
    state = {}

    def build(x):
        state["call"] = _torch_grouped_mm(x)
        return state["call"]

    return Provider(
        "torch_grouped_mm",
        build,
        canon=lambda y: state["call"].combine(y),
        skip=_GROUPED_MM_MISSING,
        note="grouped GEMMs + gather + SwiGLU only (routing metadata and combine untimed)",
    )


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def _shape(d: ModelDims, tokens: int, **more) -> dict:
    return {"model": d.name, "tokens": tokens, "hidden": d.hidden, "experts": d.experts, "topk": d.topk} | more


GATE_TOKENS = (1, 16, 64, 4096)  # the kernel's decode sizes (up to 16), then torch's linear


def moe_gate_bytes(tokens: int, experts: int, hidden: int, elem: int = ELEM) -> int:
    """Read the router weight [E, H] and the hidden states [T, H], write the logits [T, E]."""
    return (experts * hidden + tokens * hidden + tokens * experts) * elem


def _gate_ref(x):
    return reference.moe_gate(x["hidden_states"], x["router"])


def gate_case(d: ModelDims, tokens: int) -> Case:
    return Case(
        op="moe_gate",
        shape=_shape(d, tokens),
        make_inputs=lambda device: {"hidden_states": randn(tokens, d.hidden, device=device),
                                    "router": randn(d.experts, d.hidden, device=device, scale=d.hidden**-0.5)},
        reference=_gate_ref,
        providers=[
            qwen3x_provider("moe_gate", lambda x: ops.moe_gate(x["hidden_states"], x["router"])),
            # what transformers' router runs (the reference, as a peer: the suites' targets name it)
            Provider("torch_linear", lambda x: lambda: F.linear(x["hidden_states"], x["router"]), note="F.linear (cuBLAS)"),
        ],
        flops=2 * tokens * d.hidden * d.experts,
        bytes=moe_gate_bytes(tokens, d.experts, d.hidden),
        cuda_graph=graph_worthy(tokens),
    )


def _gates(quick: bool) -> list[Case]:
    if quick:
        return [gate_case(MOE_MODELS[0], 1)]
    return [gate_case(d, t) for d in MOE_MODELS for t in GATE_TOKENS]


def _router_ref(x, topk):
    return reference.moe_router(x["router_logits"], topk, NORM_TOPK_PROB)


def router_case(d: ModelDims, tokens: int) -> Case:
    ref = functools.partial(_router_ref, topk=d.topk)
    return Case(
        op="moe_router",
        shape=_shape(d, tokens),
        make_inputs=lambda device: {"router_logits": distinct_logits(tokens, d.experts, device)},
        reference=ref,
        providers=[
            qwen3x_provider("moe_router", lambda x: ops.moe_router(x["router_logits"], d.topk, NORM_TOPK_PROB)),
            # (reference.moe_router has no host sync: replayed from a graph as qwen3x is at decode sizes)
            reference_provider(ref),
            torch_compile_provider(ref),
        ],
        bytes=moe_router_bytes(tokens, d.experts, d.topk),
        cuda_graph=graph_worthy(tokens),
    )


def _permute_ref(x, experts):
    return reference.moe_permute(x["expert_ids"], experts, ROW_ALIGN)


def permute_case(d: ModelDims, tokens: int) -> Case:
    ref = functools.partial(_permute_ref, experts=d.experts)
    return Case(
        op="moe_permute",
        shape=_shape(d, tokens, row_align=ROW_ALIGN),
        make_inputs=lambda device: {"expert_ids": _routed(tokens, d, device)["expert_ids"]},
        reference=ref,
        providers=[
            qwen3x_provider("moe_permute", lambda x: ops.moe_permute(x["expert_ids"], d.experts, ROW_ALIGN)),
            reference_provider(ref, graphable=False),
            torch_compile_provider(ref, graphable=False),
        ],
        bytes=moe_permute_bytes(tokens, d.experts, d.topk),
        cuda_graph=graph_worthy(tokens),
    )


def _route_ref(x, topk, experts):
    return reference.moe_route(x["router_logits"], topk, NORM_TOPK_PROB, ROUTE_ROW_ALIGN)


def route_case(d: ModelDims, tokens: int) -> Case:
    ref = functools.partial(_route_ref, topk=d.topk, experts=d.experts)
    return Case(
        op="moe_route",
        shape=_shape(d, tokens, row_align=ROUTE_ROW_ALIGN),
        make_inputs=lambda device: {"router_logits": distinct_logits(tokens, d.experts, device)},
        reference=ref,
        providers=[
            qwen3x_provider("moe_route", lambda x: ops.moe_route(x["router_logits"], d.topk, NORM_TOPK_PROB,
                                                                 ROUTE_ROW_ALIGN)),
            reference_provider(ref, graphable=False),
            torch_compile_provider(ref, graphable=False),
        ],
        bytes=moe_router_bytes(tokens, d.experts, d.topk) + moe_permute_bytes(tokens, d.experts, d.topk,
                                                                               ROUTE_ROW_ALIGN),
        cuda_graph=graph_worthy(tokens),
    )


def _experts_args(x):
    return x["hidden_states"], x["expert_ids"], x["expert_weights"], x["gate_up_proj"], x["down_proj"]


def _experts_ref(x):
    return reference.moe_experts(*_experts_args(x))


def _liger_experts(x):
    """Liger-Kernel's fused MoE (Triton grouped GEMM, transformers 5.x weight layout)."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    args = (x["hidden_states"], x["gate_up_proj"], x["down_proj"], x["expert_ids"].to(torch.int32), x["expert_weights"])
    return lambda: LigerFusedMoEFunction.apply(*args)


PREFILL_MIN_ROWS_PER_EXPERT = 64  # gemm_config.h kMidMaxRowsPerExpert: above it, the prefill regime


def _prefill_regime(d: ModelDims, tokens: int) -> bool:
    return tokens * d.topk > PREFILL_MIN_ROWS_PER_EXPERT * d.experts


def _mma_sync_provider(d: ModelDims, tokens: int, call) -> Provider:
    """qwen3x with the prefill regime's mma.sync mainloop, beside the default (wgmma on sm_90)."""
    return mma_sync_provider("QWEN3X_MOE_MAINLOOP", call, _prefill_regime(d, tokens))


def experts_case(d: ModelDims, tokens: int) -> Case:
    def make_inputs(device):
        return {"hidden_states": randn(tokens, d.hidden, device=device), **_routed(tokens, d, device), **_weights(d, device)}

    return Case(
        op="moe_experts",
        shape=_shape(d, tokens, inter=d.moe_inter),
        make_inputs=make_inputs,
        reference=_experts_ref,
        providers=[
            qwen3x_provider("moe_experts", lambda x: ops.moe_experts(*_experts_args(x))),
            _mma_sync_provider(d, tokens, lambda x: ops.moe_experts(*_experts_args(x))),
            reference_provider(_experts_ref, graphable=False),
            *_hf_providers(d, tokens, with_router=False),
            _torch_grouped_mm_provider(),
            liger_provider(_liger_experts, graphable=False, note="LigerFusedMoEFunction (Triton autotuned)"),
        ],
        flops=moe_experts_flops(tokens, d.topk, d.hidden, d.moe_inter),
        bytes=moe_experts_bytes(tokens, d.experts, d.topk, d.hidden, d.moe_inter),
        inputs_fields=lambda x: _touched_fields(d, tokens, x["expert_ids"], layer=False),
        cuda_graph=graph_worthy(tokens),
    )


def _layer_ref(x, topk):
    logits = F.linear(x["hidden_states"], x["router"])
    return reference.moe(x["hidden_states"], logits, x["gate_up_proj"], x["down_proj"], topk, NORM_TOPK_PROB)


def _layer_truth(x, topk):
    """fp32 experts on the routing every provider computes (router GEMM in bf16), so a near-tie
    that fp32 logits would break differently does not count against anyone."""
    logits = F.linear(x["hidden_states"], x["router"]).float()
    h, gu, dn = (x[n].float() for n in ("hidden_states", "gate_up_proj", "down_proj"))
    return reference.moe(h, logits, gu, dn, topk, NORM_TOPK_PROB)


def _layer_qwen3x(x, topk):
    """The patched layer's calls: the router's linear as moe_gate (its kernel up to 16 tokens; its
    logits are F.linear's up to the order of the sums, so a token at a near tie may route
    otherwise than the truth's F.linear logits: about one decode case in a hundred, estimated), then moe."""
    logits = ops.moe_gate(x["hidden_states"], x["router"])
    return ops.moe(x["hidden_states"], logits, x["gate_up_proj"], x["down_proj"], topk, NORM_TOPK_PROB)


def _layer_ids(x, topk) -> torch.Tensor:
    """The experts the layer's routing picks for these inputs (router GEMM in bf16, as every
    provider computes it)."""
    return reference.moe_router(F.linear(x["hidden_states"], x["router"]), topk, NORM_TOPK_PROB)[1]


def layer_case(d: ModelDims, tokens: int) -> Case:
    def make_inputs(device):
        return {
            "hidden_states": randn(tokens, d.hidden, device=device),
            "router": randn(d.experts, d.hidden, device=device, scale=d.hidden**-0.5),
            **_weights(d, device),
        }

    ref = functools.partial(_layer_ref, topk=d.topk)
    return Case(
        op="moe_layer",
        shape=_shape(d, tokens, inter=d.moe_inter),
        make_inputs=make_inputs,
        reference=ref,
        truth=functools.partial(_layer_truth, topk=d.topk),
        providers=[
            qwen3x_provider("moe", functools.partial(_layer_qwen3x, topk=d.topk), note="router GEMM: moe_gate"),
            no_pdl_provider(functools.partial(_layer_qwen3x, topk=d.topk), graph_worthy(tokens),
                            note="QWEN3X_PDL=0; router GEMM: moe_gate"),
            no_fence_provider("QWEN3X_MOE_MAINLOOP", functools.partial(_layer_qwen3x, topk=d.topk),
                              _prefill_regime(d, tokens), note="QWEN3X_WGMMA_PROXY_FENCE=0; router GEMM: moe_gate"),
            reference_provider(ref, graphable=False),
            *_hf_providers(d, tokens, with_router=True),
        ],
        flops=moe_layer_flops(tokens, d.experts, d.topk, d.hidden, d.moe_inter),
        bytes=moe_layer_bytes(tokens, d.experts, d.topk, d.hidden, d.moe_inter),
        inputs_fields=lambda x: _touched_fields(d, tokens, _layer_ids(x, d.topk), layer=True),
        cuda_graph=graph_worthy(tokens),
    )


def _grid(make, quick: bool) -> list[Case]:
    if quick:
        return [make(MOE_MODELS[0], 16), make(MOE_MODELS[0], 4096)]
    return [make(d, t) for d in MOE_MODELS for t in TOKENS]


SUITE = {
    "moe_gate": _gates,
    "moe_router": functools.partial(_grid, router_case),
    "moe_permute": functools.partial(_grid, permute_case),
    "moe_route": functools.partial(_grid, route_case),
    "moe_experts": functools.partial(_grid, experts_case),
    "moe_layer": functools.partial(_grid, layer_case),
}
