"""Sparse MoE on qwen3x's router and experts ops.

transformers 5.x: Qwen3MoeSparseMoeBlock calls ``self.gate`` (Qwen3MoeTopKRouter) and
``self.experts`` (Qwen3MoeExperts, weights gate_up_proj [E, 2I, H] / down_proj [E, H, I]); both are
patched, the block is not (so HF's router-logit recording keeps working). ``experts_forward`` is
also what ``experts_implementation="qwen3x"`` runs.

transformers 4.57: the block holds an nn.ModuleList of Qwen3MoeMLP experts; the patched block
packs their weights once into the 5.x layout (packing.py: the parameters become views into the
packed buffers, so memory is not doubled) and runs the whole-layer ``moe`` op.
"""

from __future__ import annotations

import inspect
import operator
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from .._library import has_cuda_kernel, kernels_run_on, warn_once
from . import packing
from .dispatch import HALF_DTYPES, autocast_dtype, moe_reference_instead, reference_instead, transforming
from .mlp import is_silu


def gate_logits(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's linear (no bias), [T, H] -> [T, E]: the moe_gate op for bf16/fp16 where autograd
    records nothing and autocast casts nothing (the op takes one dtype; on CUDA at decode sizes one
    kernel instead of a cuBLAS GEMM, other sizes torch's linear; on the CPU its reference, F.linear),
    else F.linear as HF calls it."""
    device_ok = hidden_states.is_cpu or (hidden_states.is_cuda and has_cuda_kernel("moe_gate")
                                         and kernels_run_on(hidden_states.device))
    if (device_ok and hidden_states.dtype in HALF_DTYPES and weight.dtype == hidden_states.dtype
            and weight.device == hidden_states.device and not torch.is_grad_enabled()
            and autocast_dtype(hidden_states) is None and not transforming()
            and type(weight.data) is torch.Tensor and type(hidden_states) is torch.Tensor):
        return ops.moe_gate(hidden_states, weight)
    return F.linear(hidden_states, weight)


class TopKRouter:
    def forward(self, hidden_states: torch.Tensor):  # [..., H] -> logits [T, E], weights [T, k], ids [T, k]
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = gate_logits(hidden_states, self.weight)
        router = reference.moe_router if reference_instead("moe_router", router_logits) else ops.moe_router
        weights, ids, _ = router(router_logits, self.top_k, self.norm_topk_prob)
        # int64 as HF's router gives them: the block may hold experts other than qwen3x's (FP8Experts
        # of a quantized checkpoint, whose eager forward one-hot encodes them) and hooks may read them
        return router_logits, weights, ids.long()


_HF_EXPERTS_MODULE = "transformers.integrations.moe"  # where HF's default _apply_gate lives


def _swiglu_experts(module: nn.Module) -> bool:
    """True for the expert layout the qwen3x ops implement (Qwen3-MoE's: concatenated [gate; up]
    projections without biases, silu(gate) * up, no norm after each expert) in floats of 16 bits or
    more, plain tensors (not a quantized checkpoint's FP8 experts, nor a tensor subclass such as torchao's
    quantized weights: the kernels read storage)."""
    apply_gate = getattr(type(module), "_apply_gate", None)  # a model's own gate (e.g. GPT-OSS's clamped one)
    weights = [getattr(module, name, None) for name in ("gate_up_proj", "down_proj")]
    return (
        all(isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor and w.is_floating_point()
            and w.element_size() >= 2 for w in weights)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)  # transformers >= 5.24
        and (apply_gate is None or getattr(apply_gate, "__module__", None) == _HF_EXPERTS_MODULE)
        and is_silu(module.config)
    )


def _own_forward(module: nn.Module):
    """The experts class's own (eager) forward, which HF's use_experts_implementation wraps: as many
    times as it was applied to the class (transformers' FP8 quantizer applies it to FP8Experts once
    per layer it replaces), so the innermost."""
    for cls in type(module).__mro__:
        forward = cls.__dict__.get("forward")
        if getattr(forward, "__wrapped__", None) is not None:
            return inspect.unwrap(forward)
    return None


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface signature: hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H].
    Registered as experts_implementation="qwen3x" for every model (and for transformers' FP8 experts);
    experts of another layout (quantized weights, biases, transposed or interleaved weights, another
    gate, a post-expert norm) run their own forward."""
    if not _swiglu_experts(self):
        own = _own_forward(self)
        if own is None:
            raise ValueError(f"qwen3x experts: {type(self).__name__} is not a Qwen3-MoE expert layout "
                             "(gate_up_proj [E, 2I, H], down_proj [E, H, I] in bf16/fp16/fp32, silu) and has no "
                             "forward of its own to fall back to; use another experts_implementation")
        warn_once(f"experts:{type(self).__name__}", f"qwen3x experts: {type(self).__name__} is not an expert layout "
                  "qwen3x's kernels serve (Qwen3-MoE's, in bf16/fp16/fp32; not quantized weights), so "
                  "experts_implementation='qwen3x' runs its own forward")
        return own(self, hidden_states, top_k_index.long(), top_k_weights)
    gate_up, down = self.gate_up_proj, self.down_proj
    hidden, inter = down.shape[1], down.shape[2]
    dtype = _autocast_half(hidden_states, gate_up, down)
    if dtype is not None:
        # Autocast computes the experts' matmuls in its dtype: transformers' eager experts, and the
        # reference here, call F.linear per expert, which casts that expert's weights at each call.
        # The kernel takes all experts' weights in one dtype: one cast of every expert a call. With
        # as many picks (tokens x top_k) as experts, uniform routing touches 63% of them (more past
        # it): the cast and the kernel's reads move ~1.4x the loop's bytes (its casts and its GEMMs'
        # reads of the touched experts; 1.1x at twice the picks), without the loop's launches (about
        # ten per touched expert) and host syncs (one per touched expert). Fewer picks touch few
        # experts: the loop, which casts only those.
        if (top_k_index.numel() >= gate_up.shape[0]
                and not moe_reference_instead("moe_experts", hidden_states, hidden, inter, dtype=dtype)):
            out = ops.moe_experts(hidden_states.to(dtype), top_k_index, top_k_weights, gate_up.to(dtype), down.to(dtype))
            return out.to(hidden_states.dtype)
        return reference.moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)
    if moe_reference_instead("moe_experts", hidden_states, hidden, inter):
        return reference.moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)
    return ops.moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)


def _autocast_half(*tensors: torch.Tensor) -> torch.dtype | None:
    """Autocast's half dtype where it is on and would cast some of ``tensors`` to it (fp32, or the
    other half dtype: bf16 weights under fp16 autocast), else None. (fp64 it leaves alone.)"""
    dtype = autocast_dtype(tensors[0])
    dtypes = {t.dtype for t in tensors}
    return dtype if dtype in HALF_DTYPES and dtypes <= {*HALF_DTYPES, torch.float32} and dtypes != {dtype} else None


class Experts:
    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not _swiglu_experts(self):
            return super().forward(hidden_states, top_k_index.long(), top_k_weights)
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _plain_expert(expert: nn.Module) -> bool:
    linears = (expert.gate_proj, expert.up_proj, expert.down_proj)
    return is_silu(expert.config) and not packing.has_hooks(expert) and all(map(packing.plain_linear, linears))


_LINEARS = ("gate_proj", "up_proj", "down_proj")


class _ExpertsWatch:
    """What the full check of 4.57's experts passed (plain, hook-free modules whose weights the block
    packed), kept for a recheck in C-level passes over lists: the same expert and linear modules,
    still without forward hooks or a forward on the instance (accelerate's), the same weights and no
    biases, still views of the same buffers. For 128 experts a fraction of the full check's time,
    which (hundreds of module attribute lookups) took milliseconds a layer: longer than a decode
    step's GPU work for the layer. Autograd, autocast, torch.compile and torch.func take the full
    check."""

    def __init__(self, experts: nn.ModuleList, buffers: tuple[torch.Tensor, torch.Tensor]):
        self.module_list = experts
        self.container = experts._modules
        self.experts = list(self.container.values())
        self.children = [e._modules for e in self.experts for _ in _LINEARS]
        self.names = list(_LINEARS) * len(self.experts)
        self.linears = list(map(operator.getitem, self.children, self.names))
        self.dicts = [m.__dict__ for m in self.experts + self.linears]
        self.parameters = [m._parameters for m in self.linears]
        self.weights = list(map(operator.methodcaller("get", "weight"), self.parameters))
        self.pointers = list(map(torch.Tensor.data_ptr, self.weights))
        self.buffers = buffers

    @staticmethod
    def _same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(map(operator.is_, a, b))

    def unchanged(self, block: nn.Module) -> bool:
        records = block.__dict__.get(packing.ATTR, {})
        buffers = (records.get("gate_up_proj", (None,))[0], records.get("down_proj", (None,))[0])
        return (
            self._same(buffers, self.buffers)
            and block._modules.get("experts") is self.module_list
            and self._same(list(self.container.values()), self.experts)
            and self._same(list(map(operator.getitem, self.children, self.names)), self.linears)
            and all(map(operator.is_, map(type, self.linears), repeat(nn.Linear)))
            # (the hook dicts read afresh: a module's may have been replaced)
            and not any(map(operator.itemgetter("_forward_hooks"), self.dicts))
            and not any(map(operator.itemgetter("_forward_pre_hooks"), self.dicts))
            and not any(map(operator.contains, self.dicts, repeat("forward")))
            and not any(map(operator.contains, self.dicts, repeat("_hf_hook")))
            and self._same(list(map(operator.methodcaller("get", "weight"), self.parameters)), self.weights)
            and all(map(operator.is_, map(operator.methodcaller("get", "bias"), self.parameters), repeat(None)))
            and list(map(torch.Tensor.data_ptr, self.weights)) == self.pointers
        )


class SparseMoeBlock(packing.Owner):
    """transformers 4.57's block (ModuleList of experts); returns (out, router_logits) like HF.

    Training runs HF's own loop: stacking all experts for autograd would give the experts no token
    picked zero gradients instead of none, and optimizers treat the two differently. So does
    autocast where it would cast the experts (its F.linear per expert; the op takes one dtype).
    """

    def forward(self, hidden_states: torch.Tensor):
        buffers = self._packed_as_before(hidden_states)
        if buffers is not None:
            return self._moe(hidden_states, *buffers)
        experts = self.experts
        # (the weights by name: FSDP1 takes them out of the modules' parameters during its forward)
        plain = isinstance(experts, nn.ModuleList) and all(_plain_expert(e) for e in experts)
        gate_up_params = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)] if plain else []
        down_params = [e.down_proj.weight for e in experts] if plain else []
        weights = gate_up_params + down_params
        if (
            not plain
            or packing.needs_grad(weights)
            or not packing.may_pack(weights)  # (else a copy of every expert a call)
            or _autocast_half(hidden_states, *weights) is not None  # (HF's loop, F.linear casting each expert)
        ):
            # (a buffer of parameters FSDP2 has since replaced: let it go)
            packing.release_stale(self, "gate_up_proj", gate_up_params if plain else None)
            packing.release_stale(self, "down_proj", down_params if plain else None)
            self.__dict__.pop(packing.WATCH, None)
            return super().forward(hidden_states)
        H = hidden_states.shape[-1]
        E, I = len(experts), experts[0].gate_proj.out_features
        gate_up = packing.packed(self, "gate_up_proj", gate_up_params, (E, 2 * I, H), members=tuple(experts))
        down = packing.packed(self, "down_proj", down_params, (E, H, I))
        if not (torch.compiler.is_compiling() or packing.is_replica(self)):
            self.__dict__[packing.WATCH] = _ExpertsWatch(experts, (gate_up, down))
        return self._moe(hidden_states, gate_up, down)

    def _packed_as_before(self, hidden_states: torch.Tensor):
        """The packed (gate_up, down) buffers when the full check would pass again and reuse them
        (_ExpertsWatch), else None."""
        watch = self.__dict__.get(packing.WATCH)
        if (watch is None or torch.is_grad_enabled() or torch.compiler.is_compiling() or transforming()
                or autocast_dtype(hidden_states) is not None or packing.is_replica(self)
                or packing.distributed_state_in_use() or not is_silu(watch.experts[0].config)):
            return None
        return watch.buffers if watch.unchanged(self) else None

    def _moe(self, hidden_states: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        gate = self.gate
        router_logits = gate_logits(x, gate.weight) if packing.plain_linear(gate) else gate(x)  # [T, E]
        moe = reference.moe if moe_reference_instead("moe", x, H, down.shape[2]) else ops.moe
        # (HF 4.57 rounds the routing weights to the hidden states' dtype, the op to the logits')
        out = moe(x, router_logits.to(x.dtype), gate_up, down, self.top_k, self.norm_topk_prob)
        return out.reshape(B, S, H), router_logits

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(packing.WATCH, None)  # (lists of this process's modules and storage addresses)
        return state
