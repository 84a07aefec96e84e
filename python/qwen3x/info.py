"""``python -m qwen3x.info``: what this install of qwen3x runs, and on what.

Prints the torch / CUDA / transformers versions, the GPU, whether the CUDA extension ``qwen3x._C``
is built (and for which architectures), and for each op whether it runs a CUDA kernel or the
PyTorch reference.
"""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, _library
from ._library import runs_on


def collect() -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    gpu = gpu_arch = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu_arch = f"sm_{props.major}{props.minor}"
        gpu = f"{props.name} ({gpu_arch}, {props.total_memory / 2**30:.0f} GiB)"
    build = _library._C.build_info() if _library._C is not None else None
    ops = {}
    for op in _library.SCHEMAS:
        if _library.has_cuda_kernel(op):
            ops[op] = "CUDA kernel" if gpu else "CUDA kernel (built; no GPU here, runs the reference on CPU)"
        else:
            ops[op] = "PyTorch reference"
    return {
        "qwen3x": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": tf_version,
        "gpu": gpu,
        "extension": build,
        "extension_error": None if build else _library.C_LOAD_ERROR,
        "ops": ops,
        "arch_mismatch": bool(build and gpu_arch and not runs_on(build["archs"], gpu_arch)),
        "wgmma": _library.wgmma_available(),
        "pdl": _library.pdl_available(),
    }


def main() -> None:
    info = collect()
    print(f"qwen3x {info['qwen3x']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})"
          f"  transformers {info['transformers'] or 'not installed'}")
    print(f"GPU: {info['gpu'] or 'none visible'}")
    build = info["extension"]
    if build:
        print(f"qwen3x._C: built for {', '.join(build['archs'])} with CUDA {build['cuda_version']} "
              f"against torch {build['torch_version']}")
        if info["arch_mismatch"]:
            print("  WARNING: this GPU is not among the built architectures; the CUDA kernels cannot run "
                  "here. Rebuild with QWEN3X_CUDA_ARCHS set to it (e.g. QWEN3X_CUDA_ARCHS=8.0)")
    else:
        print(f"qwen3x._C: not loaded ({info['extension_error']}); every op runs its PyTorch reference")
    if info["wgmma"]:
        print("  Hopper (wgmma) mainloops: attention prefill and the MoE expert GEMMs' prefill regime "
              "(QWEN3X_ATTENTION_MAINLOOP / QWEN3X_MOE_MAINLOOP=mma_sync to compare)")
    if info["pdl"]:
        print("  programmatic dependent launch: router, expert GEMMs, qk_norm_rope, attention "
              "(QWEN3X_PDL=0 to compare)")
    if info["wgmma"]:
        where = {"cluster": "in a thread block cluster", "l2": "through global memory"}.get(
            os.environ.get("QWEN3X_ATTENTION_COMBINE") or "auto",
            "in a thread block cluster where the grid fits one wave (batch-1 decode), else through global memory")
        print(f"  split-KV attention's combine: {where} (QWEN3X_ATTENTION_COMBINE = auto | l2 | cluster)")
        loop = ("softmax, then P V" if os.environ.get("QWEN3X_ATTENTION_OVERLAP") == "0"
                else "each softmax beside the previous P V")
        print(f"  Hopper attention loop: {loop} (QWEN3X_ATTENTION_OVERLAP = 0 | 1)")
    width = max(map(len, info["ops"]))
    for op, status in info["ops"].items():
        print(f"  {op:<{width}}  {status}")


if __name__ == "__main__":
    main()
