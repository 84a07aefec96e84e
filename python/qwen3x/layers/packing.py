"""One weight buffer behind several HF parameters, so one GEMM can serve them all.

HF keeps q_proj / k_proj / v_proj, gate_proj and up_proj (and 4.57's per-expert MLPs) as separate
Linear weights; one GEMM wants them as one tensor ([(Hq + 2 Hkv) D, H] for attention's projections,
[2I, H] for the dense MLP, [E, 2I, H] / [E, H, I] for experts): the parameters one after another.
``packed`` copies the parameters once into a new buffer and re-points each parameter's ``.data``
at its slice, so memory is not doubled and the parameters (names, shapes, values, identity) stay
as they were. Every eager call checks that the parameters still are those slices; if anything
moved them (``model.to``, ``load_state_dict(assign=True)``) the buffer is rebuilt. Inside a
torch.compile trace (where storage addresses cannot be read) the buffer of the last eager call is
used as is, or the weights are stacked when there is none. The buffer is read without
autograd: where gradients must reach the parameters (``needs_grad``), callers call the projections
as HF does (one GEMM over a copy of the weights would copy them every step and keep the copy for
the backward).

Checkpoint writers (accelerate's save_model, safetensors' save_model) take parameters that share a
storage for tied copies and keep one of them, and pickle writes a parameter's whole storage, so
the owner's ``state_dict()``, pickling and ``copy.deepcopy`` first give every packed parameter its
own storage again (``release``; one module at a time, so the extra memory is one module's weights)
and the next eager forward packs again. ``load_state_dict`` (in place: the buffer stays valid),
``model.to(...)`` and the paths that do not pack (autograd, FSDP: ``release_stale``) drop the
buffers whose parameters are no longer theirs (``assign=True``, new storage, FSDP2's sharded
parameters), giving any parameter still on such a buffer its own storage. One owner per
parameter: 4.57's MoE block packs its expert MLPs' weights, and they then leave them to it. So a
``state_dict()`` taken before a forward that packs no longer aliases the parameters after it
(unpatched it would). Rebinding a packed parameter's ``.data`` yourself is seen by the next eager
call, not by a compiled one before it. ``torch.save`` of one packed parameter alone saves the
whole shared buffer.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .dispatch import autocast_dtype, transforming

ATTR = "_qwen3x_packed"  # owner.__dict__[ATTR]: key -> (buffer, the parameters packed into it)
HOOKS = "_qwen3x_packing_hooks"
MEMBER = "_qwen3x_packed_by_parent"  # module.__dict__[MEMBER]: its weights are packed by another owner
WATCH = "_qwen3x_packed_watch"  # owner.__dict__[WATCH]: a cheap recheck of what its last full check passed (moe.py)


def needs_grad(params: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _offsets(params: list[torch.Tensor]) -> list[int]:
    """Element offset of each parameter in the packed buffer (one after another)."""
    offsets, at = [], 0
    for p in params:
        offsets.append(at)
        at += p.numel()
    return offsets


def _is_view_of(buffer: torch.Tensor, params: list[torch.Tensor]) -> bool:
    first = params[0]
    if buffer.device != first.device or buffer.dtype != first.dtype or buffer.numel() != sum(p.numel() for p in params):
        return False
    base, size = buffer.data_ptr(), first.element_size()
    return all(p.data_ptr() == base + at * size and p.is_contiguous() for p, at in zip(params, _offsets(params)))


def distributed_state_in_use() -> bool:
    """Whether this process holds any module under torch.distributed's composable APIs (FSDP2's
    fully_shard above all): they keep parameters of their own and put them back on the modules
    for each forward, refilled, so a parameter packing re-pointed would keep the values it had when
    packed (2026-11-28: frozen q/k/v and gate/up weights in FSDP2 training after one no_grad eval)."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # no registry to ask: assume the worst
        return True
    return len(_module_state_mapping) > 0


def uniform(params: list[torch.Tensor]) -> bool:
    """One dtype and one device: what one GEMM over them needs (a cat would promote the dtypes, and
    a parameter re-pointed at the promoted buffer would change dtype; HF calls each as it is)."""
    first = params[0]
    return all(p.dtype == first.dtype and p.device == first.device for p in params)


def may_pack(params: list[torch.Tensor]) -> bool:
    """Whether ``packed`` may re-point these parameters' ``.data``: one dtype and device, the
    model's own, not views of a larger tensor someone else manages (FSDP1's flat parameter, during
    its forward), and no composable distributed API (FSDP2) manages parameters in this process.
    Where not, the callers run the projections one by one, or ``packed`` hands out a copy
    (``stacked``)."""
    if not uniform(params) or any(p._base is not None for p in params):
        return False
    return torch.compiler.is_compiling() or not distributed_state_in_use()


def stacked(params: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The packed layout, built with autograd (a copy per call). Outside autocast, which counts cat
    among its promoting ops and raises for half-precision tensors of the other half dtype (bf16
    weights under fp16 autocast); the GEMM that reads the layout casts as HF's projections would."""
    flat = [p.reshape(-1) for p in params]
    if autocast_dtype(flat[0]) is None:
        return torch.cat(flat).view(shape)
    with torch.autocast(flat[0].device.type, enabled=False):
        return torch.cat(flat).view(shape)


def packed(owner: nn.Module, key: str, params: list[torch.Tensor], shape: tuple[int, ...],
           members: tuple[nn.Module, ...] = ()) -> torch.Tensor:
    """A tensor of ``shape`` holding the parameters one after another (``params[i]`` is elements
    ``[offset_i, offset_i + params[i].numel())`` of its flat view), which they then are views of.
    ``members``: owners of some of these parameters in their own right (4.57's expert MLPs inside
    the MoE block that packs them all): they give theirs up and stop packing (``is_member``), so
    that no two buffers claim one parameter."""
    buffer, packed_params = owner.__dict__.get(ATTR, {}).get(key, (None, ()))
    if torch.compiler.is_compiling():  # (the last eager call's buffer, if it packed these very parameters)
        same = buffer is not None and len(packed_params) == len(params) and all(
            a is b and a.dtype == buffer.dtype and a.device == buffer.device for a, b in zip(packed_params, params))
        return buffer if same else stacked([p.detach() for p in params], shape)
    if buffer is not None and _is_view_of(buffer, params):
        return buffer
    if is_replica(owner):  # a copy per call: what it packed would be recorded in a throwaway copy
        return stacked([p.detach() for p in params], shape)
    if not may_pack(params):  # a copy per call, the parameters untouched
        release(owner, keys=(key,))
        return stacked([p.detach() for p in params], shape)
    for member in members:
        release(member)
        member.__dict__[MEMBER] = True
    # Never under inference mode: the parameters would become inference tensors for good.
    with torch.inference_mode(False), torch.no_grad():
        buffer = stacked([p.detach() for p in params], shape)
        flat = buffer.view(-1)
        for p, at in zip(params, _offsets(params)):
            p.data = flat[at : at + p.numel()].view(p.shape)
    # (a new dict, never the old one changed: DataParallel's replicas share their module's)
    owner.__dict__[ATTR] = {**owner.__dict__.get(ATTR, {}), key: (buffer, list(params))}
    if HOOKS not in owner.__dict__:
        owner.__dict__[HOOKS] = (owner.register_state_dict_pre_hook(_release_hook),
                                 owner.register_load_state_dict_post_hook(_release_stale_hook))
    return buffer


def is_member(module: nn.Module) -> bool:
    """Whether another owner packs this module's weights (``packed``'s ``members``)."""
    return MEMBER in module.__dict__


def release(owner: nn.Module, keys=None, keep_valid: bool = False) -> None:
    """Drop the owner's buffers (those of ``keys``; with ``keep_valid``, not those whose parameters
    still are the owner's and views of them), first giving each of the owner's parameters still
    on a dropped buffer a storage of its own (parameters no longer the owner's, replaced by
    ``load_state_dict(assign=True)`` or by FSDP2's sharding, are left as they are: copying them
    would only cost memory). Not inside a torch.compile trace (storage addresses are not
    traceable): the next eager call does it."""
    packs = owner.__dict__.get(ATTR)
    if not packs or torch.compiler.is_compiling() or is_replica(owner):
        return
    current = {id(p) for p in owner.parameters()}
    kept = {}
    with torch.inference_mode(False), torch.no_grad():
        for key, (buffer, params) in packs.items():
            if (keys is not None and key not in keys) or (
                    keep_valid and all(id(p) in current for p in params) and _is_view_of(buffer, params)):
                kept[key] = (buffer, params)
                continue
            storage = buffer.untyped_storage().data_ptr()
            for p in params:
                if id(p) in current and p.untyped_storage().data_ptr() == storage:
                    p.data = p.data.clone()
    if kept:  # (a new dict, as in packed)
        owner.__dict__[ATTR] = kept
    else:
        del owner.__dict__[ATTR]


def is_replica(owner: nn.Module) -> bool:
    """A DataParallel replica: made for one step from a shallow copy of the module's __dict__ (its
    records and hook dicts the module's own), on device 0 with the module's own parameters."""
    return getattr(owner, "_is_replica", False)


def release_stale(owner: nn.Module, key: str, params: list[torch.Tensor] | None = None) -> None:
    """For the paths that do not pack (autograd, hooks, FSDP): drop a buffer packed for other
    parameter objects than ``params`` (FSDP2's sharding replaces them without a move), which would
    otherwise hold the old, unsharded weights for the rest of the run. Without ``params`` (modules
    whose weights the caller does not read: wrapped, hooked), any that are not the owner's current
    parameters and views of the buffer."""
    record = owner.__dict__.get(ATTR, {}).get(key)
    if record is None:
        return
    if params is None:
        release(owner, keys=(key,), keep_valid=True)
    elif not (len(record[1]) == len(params) and all(a is b for a, b in zip(record[1], params))):
        release(owner, keys=(key,))


def _release_hook(owner: nn.Module, prefix: str, keep_vars: bool) -> None:  # module-level: picklable
    release(owner)


def _release_stale_hook(owner: nn.Module, incompatible_keys) -> None:
    release(owner, keep_valid=True)


class Owner:
    """Base of the patched classes that pack their weights (attention, the dense MLP, 4.57's MoE
    block): pickling and deepcopy see each parameter with its own storage (pickle would write the
    whole shared buffer once per parameter, deepcopy copy it beside the parameters' copies), and a
    move (``.to``, ``.half``, ...) drops the buffers it left behind."""

    def __getstate__(self):
        release(self)
        return super().__getstate__()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        release(self, keep_valid=True)
        return out


def unhook(owner: nn.Module) -> None:
    """``release``, and remove the hooks ``packed`` registered (unpatch)."""
    release(owner)
    owner.__dict__.pop(MEMBER, None)
    owner.__dict__.pop(WATCH, None)
    for handle in owner.__dict__.pop(HOOKS, ()):
        handle.remove()


def _aligns_devices_only(module: nn.Module) -> bool:
    """Whether the only thing beyond the forward of ``module`` is accelerate's device alignment
    (an AlignDevicesHook, as a device_map over several GPUs puts on every module holding weights)
    that cannot do anything here: no offloading (its weights stay where they are), no moving the
    output back, and the weights already on the device it moves the inputs to. Bypassing such a
    module with its weights, on that device, does what calling it does."""
    hook = getattr(module, "_hf_hook", None)
    forward = module.__dict__.get("forward")
    if (type(hook).__name__, type(hook).__module__) != ("AlignDevicesHook", "accelerate.hooks"):
        return False
    if getattr(getattr(forward, "func", None), "__qualname__", None) != "add_hook_to_module.<locals>.new_forward":
        return False  # the instance's forward is not (only) accelerate's wrapper
    if getattr(hook, "offload", True) or getattr(hook, "io_same_device", True) or getattr(hook, "no_grad", True):
        return False
    if not bound_to(module, type(module).forward, module.__dict__.get("_old_forward")):
        return False  # accelerate wraps something else than the module's own forward
    device = getattr(hook, "execution_device", None)
    tensors = [*module.parameters(), *module.buffers()]
    try:
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        return False
    return device is not None and bool(tensors) and all(t.device == device for t in tensors)


TP_REPLICATED_FORWARD = "ReplicatedWithGradAllReduce.install_forward.<locals>.tp_forward"


def _replicated_norm_without_autograd(module: nn.Module) -> bool:
    """Whether the only thing beyond the forward of ``module`` is the forward that transformers'
    tensor parallelism (5.24 and later) puts on a replicated module whose weights' gradients need an
    all-reduce (Qwen3's q_norm and k_norm, "replicated_with_grad_allreduce"), where autograd records
    nothing: it then only hooks those weights when autograd records, and calls the forward it wrapped
    (the module's own). Bypassing such a module then does what calling it does."""
    forward = module.__dict__.get("forward")
    if torch.is_grad_enabled() or hasattr(module, "_hf_hook"):
        return False
    if getattr(forward, "__qualname__", None) != TP_REPLICATED_FORWARD or \
            not getattr(forward, "__module__", "").startswith("transformers."):
        return False
    for cell in forward.__closure__ or ():
        try:
            if bound_to(module, type(module).forward, cell.cell_contents):
                return True
        except ValueError:  # a cell not yet filled
            continue
    return False


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's forward (user, PEFT or accelerate
    hooks, or a forward replaced on the instance, as transformers' tensor parallelism does): such a
    module is called, never bypassed by a fused path. accelerate's device alignment where it has
    nothing to do (``_aligns_devices_only``) does not count, nor, where autograd records nothing
    (``torch.is_grad_enabled()`` False), do backward hooks (calling the module would not install
    them, so they could never run) and the forward by which transformers >= 5.24 hooks the gradient
    all-reduce of a replicated norm's weights (``_replicated_norm_without_autograd``): transformers'
    tensor parallelism puts one or the other on q_norm and k_norm."""
    backward = module._backward_hooks or getattr(module, "_backward_pre_hooks", None)
    if module._forward_hooks or module._forward_pre_hooks or (backward and torch.is_grad_enabled()):
        return True
    forward = module.__dict__.get("forward")
    own = bound_to(module, type(module).forward, forward)  # (what a removed accelerate hook leaves)
    if (forward is not None and not own) or hasattr(module, "_hf_hook"):
        return not (_aligns_devices_only(module) or _replicated_norm_without_autograd(module))
    return False


def bound_to(module: nn.Module, forward, value) -> bool:
    """Whether value is ``forward`` bound to ``module`` (what ``module.forward`` gave when read)."""
    return isinstance(value, types.MethodType) and value.__self__ is module and value.__func__ is forward


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear without bias or hooks, its weight a plain tensor (not a quantized subclass): its
    weight may be used directly."""
    return (type(module) is nn.Linear and module.bias is None and not has_hooks(module)
            and not transforming() and type(module.weight.data) is torch.Tensor)
