"""Does compute-sanitizer's kernel-name filter (make gpu's SANITIZER_FILTER) instrument qwen3x's
kernels? A filter that matches nothing makes every memcheck and racecheck run "clean" for free.

Run under `compute-sanitizer --tool initcheck <filter> --error-exitcode 9`: it reads an
uninitialized tensor with qwen3x's rms_norm kernel (a fresh process's first allocation, never
written), which initcheck reports when, and only when, it instruments that kernel. make gpu's
sanitizer steps drop the filter (instrumenting everything: slower, never vacuous) unless this
exits 9 under it.

Usage: compute-sanitizer --tool initcheck [--kernel-name ...] --error-exitcode 9 python tests/sanitizer_filter_probe.py
"""

import torch

from qwen3x import ops

x = torch.empty(4, 1024, device="cuda", dtype=torch.bfloat16)  # never written
weight = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
ops.rms_norm(x, weight, 1e-6)
torch.cuda.synchronize()
print("sanitizer filter probe: rms_norm ran")
