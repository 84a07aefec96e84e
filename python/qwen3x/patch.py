"""Patching Hugging Face Qwen3 / Qwen3-MoE models onto qwen3x.

- ``patch(model)`` / ``unpatch(model)``: an existing model instance (loaded or built). Each Qwen3
  module's class is swapped for a subclass whose ``forward`` comes from qwen3x.layers; parameters,
  buffers, names and state_dict are untouched, and unpatch swaps the original classes back.
- ``patch_transformers()`` / ``unpatch_transformers()``: transformers' Qwen3 layer classes build
  those subclasses when called, so models built afterwards (from_pretrained included) come up
  patched; the classes and their names stay HF's.
- ``register()``: makes ``attn_implementation="qwen3x"`` (with its mask builder) and, on
  transformers 5.x, ``experts_implementation="qwen3x"`` available (5.0 to 5.6 check the experts
  name against a fixed list of their own, so there only ``patch`` runs qwen3x's experts);
  ``import qwen3x`` calls it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
import types
import warnings

from torch import nn

from . import layers
from .layers.packing import bound_to

# HF class name -> the qwen3x mixin that supplies its forward
_MIXINS: dict[str, type] = {
    "Qwen3RMSNorm": layers.RMSNorm,
    "Qwen3MoeRMSNorm": layers.RMSNorm,
    "Qwen3RotaryEmbedding": layers.RotaryEmbedding,
    "Qwen3MoeRotaryEmbedding": layers.RotaryEmbedding,
    "Qwen3Attention": layers.Attention,
    "Qwen3MoeAttention": layers.Attention,
    "Qwen3MLP": layers.MLP,
    "Qwen3MoeMLP": layers.MLP,
    "Qwen3DecoderLayer": layers.DecoderLayer,
    "Qwen3MoeDecoderLayer": layers.DecoderLayer,
    "Qwen3MoeTopKRouter": layers.TopKRouter,  # transformers 5.x
    "Qwen3MoeExperts": layers.Experts,  # transformers 5.x
    "Qwen3MoeSparseMoeBlock": layers.SparseMoeBlock,  # only the 4.57 block (ModuleList experts)
}
_MODELING_MODULES = (
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
)
_ORIGINAL = "_qwen3x_original_class"
_patched_classes: dict[type, type] = {}
_patched_classes_lock = threading.Lock()  # one class per HF class, also when threads build models


def _is_hf_qwen3_class(cls: type) -> bool:
    return cls.__name__ in _MIXINS and cls.__module__ in _MODELING_MODULES


_PREFIX = "Qwen3x"


def _patched_class(cls: type) -> type:
    """The (cached) subclass of HF class ``cls`` with qwen3x's forward.

    Its ``__name__`` stays HF's (Trainer/FSDP, accelerate and ``_no_split_modules`` find layers by
    class name); its ``__qualname__`` names it in this module, so pickling a patched model works
    (``__getattr__`` below rebuilds the class in a fresh process).
    """
    with _patched_classes_lock:
        if cls not in _patched_classes:
            _patched_classes[cls] = _make_patched_class(cls)
        return _patched_classes[cls]


def _make_patched_class(cls: type) -> type:
    mixin = _MIXINS[cls.__name__]
    # (whether HF's forward names its cache `cache`, transformers >= 5.24, or past_key_values: read
    # by the attention layer, a constant to torch.compile)
    takes_cache = "cache" in inspect.signature(cls.forward).parameters
    patched = type(cls.__name__, (mixin, cls), {_ORIGINAL: cls, "__module__": __name__,
                                                "_qwen3x_takes_cache": takes_cache})
    patched.__qualname__ = _PREFIX + cls.__name__
    return patched


# FSDP2's fully_shard (and replicate, its subclass) gives each module it wraps a class of its own:
# FSDP<Name>(FSDPModule, the module's class), made once per class and kept in torch's map. patch and
# unpatch swap the class inside: FSDP's class over qwen3x's, or back over HF's.
_wrapper_classes: dict[type, dict[type, type]] = {}  # wrapper base (not FSDPModule) -> inner -> class


def _fsdp_split(cls: type) -> tuple[type, type] | None:
    """(FSDP's base, the wrapped class) for a class fully_shard made, else None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (no FSDP class exists before it is imported)
    module_cls = getattr(fsdp, "FSDPModule", None)
    bases = cls.__bases__
    if module_cls is None or len(bases) != 2 or not issubclass(bases[0], module_cls):
        return None
    return bases


def _calls(forward, target) -> bool:
    """Whether ``forward`` is ``target`` or wraps it (functools.wraps' ``__wrapped__``, followed all
    the way: transformers 5.x's layers wrap the forward of every subclass, FSDP's ones included)."""
    while forward is not None:
        if forward is target:
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


def _rewrapped(cls: type, inner: type) -> type:
    """The class FSDP would have made for ``inner``: cls's wrapper base over ``inner``, from torch's
    own map where it has one (so FSDP, and dynamo's guards that look its classes up, know it), else
    made as FSDP makes it: cls's name and attributes, less the forward transformers 5.x wrapped for
    that subclass (the new class gets its own wrapper of inner's)."""
    base, wrapped = cls.__bases__
    fsdp = sys.modules["torch.distributed.fsdp"]
    get_map = getattr(sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard"), "get_cls_to_fsdp_cls", None)
    known = get_map() if base is fsdp.FSDPModule and get_map is not None else _wrapper_classes.setdefault(base, {})
    if inner not in known:
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        if _calls(body.get("forward"), wrapped.forward):
            del body["forward"]
        known[inner] = type(cls.__name__, (base, inner), body)
    return known[inner]


def _target(cls: type, patching: bool) -> type | None:
    """The class a module of class ``cls`` gets from patch (``patching``) or unpatch, or None when it
    keeps its own: HF's classes and qwen3x's, and FSDP's classes over either."""
    split = _fsdp_split(cls)
    if split is not None:
        inner = _target(split[1], patching)
        forward_kept = _calls(cls.forward, split[1].forward)  # FSDP adds methods, not a forward
        return _rewrapped(cls, inner) if inner is not None and forward_kept else None
    if patching:
        return _patched_class(cls) if _is_hf_qwen3_class(cls) else None
    return cls.__dict__.get(_ORIGINAL)


def __getattr__(name: str):
    """``qwen3x.patch.Qwen3x<HFClass>``: the patched class, for unpickling."""
    hf_name = name[len(_PREFIX):]
    if name.startswith(_PREFIX) and hf_name in _MIXINS:
        for patched in list(_patched_classes.values()):  # this process's (the HF name may be rebound since)
            if patched.__qualname__ == name:
                return patched
        for mod in _modeling_modules():
            cls = getattr(mod, hf_name, None)
            if isinstance(cls, type) and _is_hf_qwen3_class(cls):  # (not another library's class under the name)
                return _patched_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _applies(module: nn.Module) -> bool:
    if type(module).__name__.endswith("Qwen3MoeSparseMoeBlock"):  # 5.x blocks stay HF's (router+experts patched)
        return isinstance(getattr(module, "experts", None), nn.ModuleList)
    return True


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads if config is not None else None
    )
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and head_dim is not None and head_dim != layers.dispatch.KERNEL_HEAD_DIM:
        warnings.warn(
            f"qwen3x.patch: head_dim {head_dim} is not Qwen3's {layers.dispatch.KERNEL_HEAD_DIM}: the CUDA attention "
            "kernels do not serve it; on a GPU its attention runs the PyTorch reference",
            stacklevel=3,
        )


def _forward_refs(module: nn.Module, forward) -> list[tuple[object, str]]:
    """Where `module` keeps `forward` (its class's) bound to itself outside the class: as an
    instance attribute (accelerate's hooks keep the forward they wrap as `_old_forward`, and leave
    it as `forward` when removed), as the `__wrapped__` that functools.update_wrapper gives an
    instance-level `forward` wrapper, or in that wrapper's closure (transformers' tensor-parallel
    forward keeps it in a local). Each place as (holder, attribute name), a closure cell's being
    "cell_contents". One wrapper deep: a wrapper of a wrapper is not looked into."""
    refs = [(module, name) for name, value in vars(module).items() if bound_to(module, forward, value)]
    wrapper = module.__dict__.get("forward")
    if wrapper is None or bound_to(module, forward, wrapper):
        return refs
    if isinstance(wrapper, types.MethodType):  # a function bound on the instance: its attributes and cells
        wrapper = wrapper.__func__
    if bound_to(module, forward, getattr(wrapper, "__wrapped__", None)):
        refs.append((wrapper, "__wrapped__"))
    func = wrapper.func if isinstance(wrapper, functools.partial) else wrapper
    for cell in getattr(func, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        if bound_to(module, forward, value):
            refs.append((cell, "cell_contents"))
    return refs


def _swap_class(module: nn.Module, cls: type) -> None:
    """module.__class__ = cls, and the forward that instance-level wrappers of module.forward
    call (accelerate's hooks, e.g. from a multi-GPU device_map; transformers' tensor-parallel
    forward) is cls's too: they keep the forward of the class they wrapped, which a class swap
    alone would leave running. A wrapper that keeps it where qwen3x cannot find or change it gets
    a warning (and keeps what it had)."""
    old = type(module)
    refs = _forward_refs(module, old.forward)
    changed = []
    try:
        for holder, name in refs:
            value = getattr(holder, name)
            setattr(holder, name, types.MethodType(cls.forward, module))
            changed.append((holder, name, value))
    except (AttributeError, TypeError):  # a read-only place: leave every one as it was
        for holder, name, value in reversed(changed):
            setattr(holder, name, value)
        refs = []
    module.__class__ = cls
    if "forward" in module.__dict__ and not refs and cls.forward is not old.forward:
        wrapper = module.__dict__["forward"]
        patching = getattr(cls, _ORIGINAL, None) is not None
        warnings.warn(
            f"qwen3x: the {old.__name__} module's forward is replaced on the instance by "
            f"{getattr(wrapper, '__qualname__', type(wrapper).__name__)}, which does not call its "
            "class's forward where qwen3x can re-point it: "
            + ("qwen3x's forward does not run there (qwen3x.patch_transformers() before building the "
               "model avoids this)" if patching else "it may still run qwen3x's forward"),
            stacklevel=3,
        )


def patch(model: nn.Module) -> nn.Module:
    """Route an existing Qwen3 / Qwen3-MoE model (Qwen3ForCausalLM, Qwen3Model, Qwen3MoeForCausalLM,
    Qwen3MoeModel, or any model holding their layers) through qwen3x. Returns the model."""
    found = 0
    for module in model.modules():
        cls = type(module)
        if getattr(cls, _ORIGINAL, None) is not None:
            found += 1  # already patched (patch is idempotent)
            continue
        target = _target(cls, patching=True) if _applies(module) else None
        if target is not None:
            _swap_class(module, target)
            found += 1
    if not found:
        raise TypeError(
            f"qwen3x.patch: {type(model).__name__} holds no transformers Qwen3 / Qwen3-MoE layers "
            "(expected e.g. Qwen3ForCausalLM, Qwen3Model, Qwen3MoeForCausalLM, Qwen3MoeModel)"
        )
    _check_model(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Give every module of ``model`` its original transformers class back. Returns the model."""
    for module in model.modules():
        original = _target(type(module), patching=False)
        if original is not None:
            _swap_class(module, original)
            layers.packing.unhook(module)  # each parameter gets its own storage back
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` (or ``patch_transformers``) replaced any of the model's modules. A model
    that only names qwen3x as its attention / experts implementation is not patched: its layers
    stay HF's and call qwen3x's attention or experts (``python -m qwen3x.info`` and
    ``qwen3x.ops.kernel_status()`` say what runs where)."""
    return any(getattr(type(m), _ORIGINAL, None) is not None for m in model.modules())


def _modeling_modules():
    for name in _MODELING_MODULES:
        yield importlib.import_module(name)


_building: set[type] = set()  # the HF classes that build qwen3x's subclasses (patch_transformers)


def _building_patched(hf_cls: type):
    """A ``__new__`` for HF class ``hf_cls`` that, while patch_transformers is in effect, builds
    qwen3x's subclass of it when the class is called with its constructor's arguments (a model being
    built). Without arguments (pickle, copy and DataParallel's replicas re-create a module so, then
    fill its __dict__) the class stays the one asked for: an unpatched module stays unpatched. HF's
    names keep naming HF's classes, which its own code tests modules against (5.x's _init_weights:
    isinstance(module, Qwen3MoeExperts)) and pickle finds classes by. It stays on the class once
    set, passing through after unpatch_transformers (CPython cannot take an assigned __new__ back:
    object.__new__ would then refuse the constructor's arguments)."""

    def __new__(cls, *args, **kwargs):
        if cls is hf_cls and hf_cls in _building and (args or kwargs):
            cls = _patched_class(hf_cls)
        return super(hf_cls, cls).__new__(cls)

    __new__.__signature__ = inspect.signature(hf_cls.__init__)  # (what inspect.signature(hf_cls) gave)
    return staticmethod(__new__)


def patch_transformers() -> None:
    """Models of Qwen3 / Qwen3-MoE built after this call come up patched: modules of transformers'
    own Qwen3 layer classes (subclasses of them, a user's or another library's, build as they are;
    ``patch`` leaves them alone too)."""
    for mod in _modeling_modules():
        for name in _MIXINS:
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and _is_hf_qwen3_class(cls):
                if name == "Qwen3MoeSparseMoeBlock" and not _block_has_module_list(mod):
                    continue
                _patched_class(cls)  # (made here, not by whichever thread builds a model first)
                if "__new__" not in cls.__dict__:
                    cls.__new__ = _building_patched(cls)
                _building.add(cls)


def unpatch_transformers() -> None:
    """Undo patch_transformers (models already built keep their classes; unpatch them one by one)."""
    _building.clear()


def _block_has_module_list(mod) -> bool:
    """transformers 4.57's Qwen3MoeSparseMoeBlock (ModuleList experts) vs 5.x's (Experts module)."""
    return not hasattr(mod, "Qwen3MoeExperts")


_registered = False


def register() -> bool:
    """Register "qwen3x" with transformers' attention, mask and (5.x) experts interfaces.

    Returns False when transformers is not installed.
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register("qwen3x", layers.attention_forward)
    AttentionMaskInterface.register("qwen3x", layers.mask_function)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # transformers 4.57 has no experts interface
        pass
    else:
        ExpertsInterface.register("qwen3x", layers.experts_forward)
        try:  # a quantized checkpoint's FP8 experts look their implementation up in an interface of their own
            from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
        except ImportError:
            pass
        else:  # (qwen3x has no FP8 kernels: experts_forward runs theirs, with a warning)
            FP8ExpertsInterface.register("qwen3x", layers.experts_forward)
    _registered = True
    return True
