"""`make gpu-ampere`'s check that its tests will run the Ampere build's kernels, not another build
and not the references: qwen3x imports from the given directory, its extension is loaded, built
without sm_90a code and with PTX a newer GPU can compile. On a GPU it then says which mainloops the
host chooses (mma.sync, no programmatic dependent launch: what an A100 gets) and times the first
call of each kernel family, in which the driver compiles that module's PTX.

Usage: python tests/ampere_check.py SITE_DIR   (exit 1 when any check fails)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def check(site: Path) -> list[str]:
    """The problems found (empty: the tests that follow run the Ampere build)."""
    import qwen3x  # noqa: PLC0415
    from qwen3x import _library  # noqa: PLC0415

    problems = []
    where = Path(qwen3x.__file__).resolve()
    print(f"qwen3x from {where.parent}")
    if site.resolve() not in where.parents:
        problems.append(f"qwen3x imports from {where.parent}, not from {site}")
    if _library._C is None:
        return problems + [f"the extension did not load: {_library.C_LOAD_ERROR}"]
    archs = _library._C.build_info()["archs"]
    print(f"built for {archs}")
    if any(a.endswith("a") for a in archs):
        problems.append(f"an arch-specific (Hopper) target in {archs}: the host would choose Hopper code")
    if not any(a.startswith("compute_") for a in archs):
        problems.append(f"no PTX in {archs}: a Hopper GPU cannot run sm_80 machine code")
    return problems


def first_calls() -> None:
    """On a GPU: the host's choices, and each family's first call (the PTX compile) timed."""
    import torch  # noqa: PLC0415
    from qwen3x import _library, ops  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("no GPU here: nothing run")
        return
    print(f"device {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}); "
          f"wgmma: {_library.wgmma_available()}, programmatic dependent launch: {_library.pdl_available()}")
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(8, 1024, device=dev, dtype=bf)
    w = torch.ones(1024, device=dev, dtype=bf)
    q = torch.randn(1, 32, 200, 128, device=dev, dtype=bf)
    kv = torch.randn(1, 8, 200, 128, device=dev, dtype=bf)
    q1, kv_long = q[:, :, :1], torch.randn(1, 8, 4096, 128, device=dev, dtype=bf)
    hw = torch.ones(128, device=dev, dtype=bf)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    logits = torch.randn(4, 128, device=dev, dtype=bf)
    gate_up = torch.randn(128, 2 * 256, 1024, device=dev, dtype=bf) * 0.03
    down = torch.randn(128, 1024, 256, device=dev, dtype=bf) * 0.06
    # one call of each kernel family (its first launch compiles its PTX: later ones, the tests'
    # among them, find the driver's compute cache warm)
    calls = {
        "rms_norm": lambda: ops.rms_norm(x, w, 1e-6),
        "add_rms_norm": lambda: ops.add_rms_norm(x, x, w, 1e-6),
        "silu_and_mul": lambda: ops.silu_and_mul(x),
        "qk_norm_rope": lambda: ops.qk_norm_rope(q[0].transpose(0, 1), kv[0].transpose(0, 1), hw, hw,
                                                 torch.arange(200, device=dev), inv_freq),
        "attention (prefill)": lambda: ops.attention(q, kv, kv, None, 128 ** -0.5, True),
        "attention (split-KV decode)": lambda: ops.attention(q1, kv_long, kv_long, None, 128 ** -0.5, False),
        "moe_gate": lambda: ops.moe_gate(x[:4], gate_up[:, 0]),
        "moe_route": lambda: ops.moe_route(logits, 8, True, 16),
        "moe (4 tokens)": lambda: ops.moe(x[:4], logits, gate_up, down, 8, True),
        "moe (2048 tokens)": lambda: ops.moe(x.repeat(256, 1), logits.repeat(512, 1), gate_up, down, 8, True),
    }
    for name, call in calls.items():  # a family that fails is said; the tests say more
        start = time.perf_counter()
        try:
            call()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            print(f"first {name} call: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        print(f"first {name} call: {time.perf_counter() - start:.1f} s")


def main() -> int:
    problems = check(Path(sys.argv[1]))
    for p in problems:
        print(f"ampere check: {p}")
    if problems:
        return 1
    first_calls()
    print("ampere check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
