"""qwen3x: fast, verified kernels for the Qwen3 model family, for Hugging Face transformers.

    import qwen3x
    model = qwen3x.patch(model)             # an already-built Qwen3 / Qwen3-MoE model
    qwen3x.patch_transformers()             # or: every Qwen3 model built from now on
    AutoModelForCausalLM.from_pretrained(path, attn_implementation="qwen3x",
                                         experts_implementation="qwen3x")   # transformers >= 5.7
    qwen3x.ops.rms_norm(x, w)               # or the ops themselves (torch.ops.qwen3x.*)
"""

from . import ops, reference
from ._library import has_cuda_kernel
from .patch import is_patched, patch, patch_transformers, register, unpatch, unpatch_transformers
from .rope import rope_parameters

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "has_cuda_kernel",
    "is_patched",
    "ops",
    "patch",
    "patch_transformers",
    "reference",
    "register",
    "rope_parameters",
    "unpatch",
    "unpatch_transformers",
]

register()  # attn_implementation / experts_implementation "qwen3x", when transformers is installed
