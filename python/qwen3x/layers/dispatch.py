"""Which CUDA tensors the kernels serve; the layers send everything else to the reference.

The ops' CUDA kernels reject what they were not built for (fp64, head_dim other than 128, fp32
attention, a GPU the build has no machine code for) with a clear error. A patched model must
still run, so its layers ask ``reference_instead`` first and call the reference (with a one-time
warning) for such inputs.
"""

from __future__ import annotations

import torch

from .. import reference
from .._library import has_cuda_kernel, kernels_run_on, rebuild_hint, reference_with_gradient, warn_once

KERNEL_HEAD_DIM = 128  # the only head_dim the CUDA kernels are built for (Qwen3's)
DEFAULT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HALF_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = {"attention": HALF_DTYPES, "moe_experts": HALF_DTYPES, "moe": HALF_DTYPES}  # tensor-core ops
HEAD_DIM_OPS = frozenset({"attention", "qk_norm_rope", "qk_norm_rope_"})
# The expert GEMMs tile hidden and intermediate sizes (Qwen3: H 2048 / 4096, I 768 / 1536).
MOE_HIDDEN_MULTIPLE = 128
MOE_INTER_MULTIPLE = 64


def moe_shapes_served(hidden: int, inter: int) -> bool:
    return hidden % MOE_HIDDEN_MULTIPLE == 0 and inter % MOE_INTER_MULTIPLE == 0


def transforming() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) runs this call: the qwen3x ops have no
    functorch rules (their autograd is torch.library's) and packing reads ``.data``, which vmap
    forbids, so the patched layers use the PyTorch references and call the projections."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on x's device, or None where autocast is off (or
    unknown to the device type: meta)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def reference_instead(op: str, x: torch.Tensor, shapes_ok: bool = True, shapes: str = "",
                      dtype: torch.dtype | None = None) -> bool:
    """True for a CUDA tensor that ``op``'s kernel does not serve (dtype, head_dim, or shapes the
    caller checked: ``shapes_ok`` False, described by ``shapes``), and for any tensor under a
    torch.func transform (``transforming``). ``dtype``: the dtype the caller would cast x to
    first (default x's own)."""
    if transforming():
        return True
    if not (x.is_cuda and has_cuda_kernel(op)):
        return False
    if not kernels_run_on(x.device):
        major, minor = torch.cuda.get_device_capability(x.device)
        warn_once(f"arch:{x.device}", f"qwen3x: this build's CUDA kernels cannot run on {x.device} "
                  f"(sm_{major}{minor}): the patched layers run the PyTorch references there; "
                  f"{rebuild_hint(major, minor)}")
        return True
    dtype = x.dtype if dtype is None else dtype
    dtypes = KERNEL_DTYPES.get(op, DEFAULT_DTYPES)
    head_dim_ok = op not in HEAD_DIM_OPS or x.shape[-1] == KERNEL_HEAD_DIM
    if dtype in dtypes and head_dim_ok and shapes_ok:
        return False
    served = ", ".join(map(str, dtypes)) + (f", head_dim {KERNEL_HEAD_DIM}" if op in HEAD_DIM_OPS else "")
    what = f"{dtype}" + ("" if head_dim_ok else f", head_dim {x.shape[-1]}") + ("" if shapes_ok else f", {shapes}")
    warn_once(op, f"qwen3x.{op}: no CUDA kernel for {what} (it serves {served}); running the PyTorch reference")
    return True


def moe_reference_instead(op: str, x: torch.Tensor, hidden: int, inter: int, dtype: torch.dtype | None = None) -> bool:
    """reference_instead for the expert GEMM ops, which also need tileable hidden/intermediate sizes."""
    return reference_instead(op, x, moe_shapes_served(hidden, inter), f"hidden {hidden}, intermediate {inter}", dtype)


def run_reference(op: str, *args):
    """``op``'s reference, for a call ``reference_instead`` kept from the kernel. Where autograd
    records the call, with the op's own gradient formula (memory linear in the sequence length for
    attention: ``_library.reference_with_gradient``), except under torch.compile and torch.func
    transforms, which differentiate the reference as it is."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not transforming()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return reference_with_gradient(op)(*args)
    return getattr(reference, op)(*args)
