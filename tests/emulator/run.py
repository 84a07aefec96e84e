"""Python side of tests/emulator: write a job, run the CPU-built kernels on it, read the outputs.

    outs = run("attention", params, inputs, outputs={"out": (torch.bfloat16, shape), ...})

`inputs` are torch CPU tensors, written as their bytes (contiguous) or, for a strided view, the
bytes of the storage span the view covers (pass its strides in `params`, in elements).
Each run picks the emulation: async ("early" | "late" | "both": when cp.async copies and wgmma
touch shared memory), order ("forward" | "reverse": thread scheduling inside a CTA), how many CTAs
of a launch without clusters run side by side (coschedule; 1: one after another), where the
dynamic shared memory starts, the device's limits (DEVICES: an H100 by default, an A100, an
RTX 4090) and the runner's sanitizer ("address" | "thread" | "none").
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import torch

from . import build as _build

_RUNNERS: dict[str, Path] = {}


class EmulatorError(RuntimeError):
    """The emulator (or a launch it checked) failed: the message is the runner's stderr."""


def runner(sanitizer: str = "address") -> Path:
    if sanitizer not in _RUNNERS:
        _RUNNERS[sanitizer] = _build.build(sanitizer)
    return _RUNNERS[sanitizer]


def storage_span(t: torch.Tensor) -> torch.Tensor:
    """The elements of t's storage from its first to its last addressed element, as a 1-D tensor
    (the view's strides then address it from element 0)."""
    if t.numel() == 0:
        return t.new_empty(0)
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided((last + 1,), (1,))


def bank_stats(stdout: str) -> dict[str, dict[str, int]]:
    """The runner's shared-memory bank report (emu.h count_banks): per instruction, the warp
    requests, the wavefronts they took, the conflict-free minimum and unpaired cp.async issues."""
    stats = {}
    for line in stdout.splitlines():
        if line.startswith("banks "):
            _, what, *counts = line.split()
            stats[what] = dict(zip(("requests", "wavefronts", "ideal", "unpaired"), map(int, counts)))
    return stats


# The devices a runner can play (emu.h Device; the default is an H100 SXM): compute capability,
# SMs, the most dynamic shared memory a kernel may opt in to, shared memory, threads and resident
# CTAs per SM.
DEVICES = {
    "h100": dict(EMU_CC=90, EMU_SMS=132, EMU_SMEM_OPTIN=227 * 1024, EMU_SMEM_PER_SM=228 * 1024,
                 EMU_THREADS_PER_SM=2048, EMU_CTAS_PER_SM=32),
    "a100": dict(EMU_CC=80, EMU_SMS=108, EMU_SMEM_OPTIN=163 * 1024, EMU_SMEM_PER_SM=164 * 1024,
                 EMU_THREADS_PER_SM=2048, EMU_CTAS_PER_SM=32),
    "rtx4090": dict(EMU_CC=89, EMU_SMS=128, EMU_SMEM_OPTIN=99 * 1024, EMU_SMEM_PER_SM=100 * 1024,
                    EMU_THREADS_PER_SM=1536, EMU_CTAS_PER_SM=24),
}


def run(op: str, params: dict, inputs: dict[str, torch.Tensor],
        outputs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        async_mode: str = "early", order: str = "forward", device: str = "h100",
        dyn_smem_offset: int | None = None, exe: Path | None = None,
        sanitizer: str = "address", sms: int | None = None, coschedule: int = 1) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="qwen3x-emu-") as d:
        job = Path(d)
        lines = [f"op {op}"] + [f"{k} {int(v) if isinstance(v, bool) else v}" for k, v in params.items()]
        (job / "params.txt").write_text("\n".join(lines) + "\n")
        for name, t in inputs.items():
            span = storage_span(t).contiguous()
            (job / f"{name}.bin").write_bytes(span.view(torch.uint8).numpy().tobytes())
        env = dict(os.environ, EMU_ASYNC=async_mode, EMU_ORDER=order,
                   **{k: str(v) for k, v in DEVICES[device].items()},
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=3",
                   TSAN_OPTIONS="halt_on_error=1:exitcode=4:report_signal_unsafe=0")
        if dyn_smem_offset is not None:
            env["EMU_DYN_SMEM_OFFSET"] = str(dyn_smem_offset)
        if sms is not None:  # fewer SMs than the device: grids that cap at a few blocks per SM
            env["EMU_SMS"] = str(sms)  # reach their loops at small sizes
        if coschedule > 1:  # launches without clusters run this many CTAs side by side
            env["EMU_COSCHEDULE"] = str(coschedule)
        r = subprocess.run([str(exe or runner(sanitizer)), str(job)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            err = r.stderr if len(r.stderr) <= 8000 else r.stderr[:6000] + "\n...\n" + r.stderr[-2000:]
            raise EmulatorError(f"{op} (async={async_mode}, order={order}, sanitizer={sanitizer}) "
                                f"failed with status {r.returncode}:\n{err}")
        result = {"stdout": r.stdout, "banks": bank_stats(r.stdout)}
        for name, (dtype, shape) in outputs.items():
            raw = (job / f"{name}.out").read_bytes()
            result[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()
        return result
