#!/usr/bin/env python3
"""Static check of the machine code in a built qwen3x._C module (no GPU needed).

For every kernel in the .so (per embedded architecture) prints:
  LDG128 / STG128  16-byte global loads / stores (LDG.E.128, LDGSTS...128 = cp.async, STG.E.128, ...)
  LDG / STG        all global loads / stores
  LDL / STL        local-memory loads / stores (spills or stack arrays)
  REG / STACK      registers per thread and stack frame bytes (cuobjdump -res-usage)

Exit status 1 when any kernel touches local memory (LDL/STL, STACK or LOCAL > 0)
or when a kernel that must be vectorized (see VECTOR_KERNELS) lacks 16-byte
loads or stores (VECTOR_LOAD_KERNELS: loads), or a tensor-core kernel (see MMA_KERNELS) has no HMMA, or has
fewer HMMA inside its main loop (the address range of a backward branch) than
MMA_LOOP_KERNELS asks, or a Hopper kernel (see WGMMA_LOOP_KERNELS) fewer
warpgroup HGMMA in its main loop (on sm_90a; built for another architecture it
is a stub that must hold no HGMMA) or a main loop that waits after every
wgmma, or an overlapped attention loop (see OVERLAP_KERNELS) without its
softmax between a `wait_group 1` and the next wait, or a kernel the glue may launch with
programmatic dependent launch (see PDL_KERNELS) lacks, on sm_90a, the grid
dependency wait (ACQBULK) before its first global memory access or the trigger
of its dependents (PREEXIT); 2 when the inputs cannot be found.

Usage:
  python cmake/sass_check.py [path/to/_C.so] [--cuobjdump PATH]
Without a path, the newest _C*.so under python/qwen3x/ or build/ is used.
cuobjdump is looked up in --cuobjdump, $CUOBJDUMP, $CUDA_HOME/bin, PATH, and
finally the copy that ships with Triton's NVIDIA backend.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Kernels (demangled-name substrings) whose fast path must move 16-byte
# vectors both ways.
VECTOR_KERNELS = ("rms_norm_vec_kernel", "qk_norm_rope_kernel", "silu_and_mul_vec_kernel")
# Kernels that must read with 16-byte vectors (their outputs are a few scalars a row).
VECTOR_LOAD_KERNELS = ("moe::moe_gate_kernel",)

# Tensor-core kernels (demangled-name substrings) -> the fewest HMMA their main
# loop (a backward branch's range) must hold per iteration body.
MMA_LOOP_KERNELS = {
    # csrc/attention: per K/V tile and warp, Q K^T 8 k16 x 8 n8 + P V 4 k16 x 16 n8 = 128.
    "attn::attention_fwd_kernel": 128,
    # csrc/moe/grouped_gemm.cuh: per k tile and warp, 4 k16 x kMmaM x kMmaN (decode config 1 x 2).
    "moe::moe_expert_gemm_kernel": 8,
}
# Kernels whose main loop must run on the tensor cores (HMMA or HGMMA in the SASS).
MMA_KERNELS = ("moe_expert_gemm_kernel",)
# Hopper kernels (demangled-name substrings) -> the fewest HGMMA (wgmma) their
# main loop must hold; MMA_LOOP_KERNELS does not apply to them.
WGMMA_LOOP_KERNELS = {
    # csrc/moe/grouped_gemm.cuh kWgmma mainloop: per k tile, 4 k16 steps of m64n128k16.
    "(qwen3x::moe::GemmMainloop)1>": 4,
    # csrc/attention kWgmma mainloops (serial, and overlapped: the third template argument):
    # per K/V tile, Q K^T 8 k16 steps + P V 4 k16 steps.
    "attn::attention_fwd_kernel<__nv_bfloat16, true,": 12,
    "attn::attention_fwd_kernel<__half, true,": 12,
}
# The overlapped Hopper attention loops (csrc/attention/attention_fwd.cuh, kOverlap): the point
# of the loop is a softmax that runs while P V is in flight, i.e. in SASS a `wait_group 1`
# (WARPGROUP.DEPBAR.LE gsb0, 0x1: Q K^T done, P V not) followed by the tile's exponentials before
# the next wgmma wait. ptxas may hoist a wait above the softmax and serialize it without a
# warning (benchmarks/NOTES.md); this rule sees that. At least half of a 64 x 64 tile's
# exponentials per thread (64 * 64 / 128 threads = 32) there: a few scheduled past the next wait
# still leave the overlap.
OVERLAP_KERNELS = ("attn::attention_fwd_kernel<__nv_bfloat16, true, true>",
                   "attn::attention_fwd_kernel<__half, true, true>")
OVERLAP_MIN_EXPS = 64 * 64 // 128 // 2
WGMMA_WAIT_ONE = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1\b")
EX2 = re.compile(r"\bMUFU\.EX2\b")
# Kernels (demangled-name substrings) that core/pdl.cuh's launch_kernel may launch with
# programmatic dependent launch on an sm_90 device: on sm_90a each must wait for the previous
# grid (griddepcontrol.wait = ACQBULK) before touching global memory, and trigger its dependents
# (griddepcontrol.launch_dependents = PREEXIT).
PDL_KERNELS = ("attn::attention_fwd_kernel", "qk_norm_rope_kernel",
               "moe::moe_router_kernel", "moe::moe_permute_count_kernel", "moe::moe_permute_scatter_kernel",
               "moe::moe_expert_gemm_kernel", "moe::moe_combine_kernel", "moe::moe_gate_kernel")
# Of those, kernels that read inputs finished two launches back before their wait (GEMM2: its tile
# and weights, csrc/moe/grouped_gemm.cuh): they may load before the wait, never store.
PDL_READS_FIRST = ("(qwen3x::moe::GemmKind)1>",)
HOPPER_ARCH = "sm_90a"  # the only architecture the WGMMA_LOOP_KERNELS run on
HMMA = re.compile(r"\bHMMA\b")
HGMMA = re.compile(r"\bHGMMA\b")
# wgmma.wait_group. ptxas serializes a pipeline it cannot prove safe (its C7515 / C7520 notes: a
# wgmma on a conditional path, accumulators written between issue and wait): a wait after every
# HGMMA. A main loop must wait fewer times than half its HGMMA (the kernels wait once or twice a
# tile for 4 to 12).
WGMMA_WAIT = re.compile(r"\bWARPGROUP\.DEPBAR\b")

LDG128 = re.compile(r"\bLDG(STS)?(\.[A-Z0-9_]+)*\.128\b")  # LDGSTS: cp.async into shared memory
STG128 = re.compile(r"\bSTG(\.[A-Z0-9_]+)*\.128\b")
LDG = re.compile(r"\bLDG(STS)?\b")
STG = re.compile(r"\bSTG\b")
LDL = re.compile(r"\bLDL\b")
BRA_TARGET = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+)\s*;")
ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/")
STL = re.compile(r"\bSTL\b")
ACQBULK = re.compile(r"\bACQBULK\b")
PREEXIT = re.compile(r"\bPREEXIT\b")
# Instructions that touch global (or generic) memory: none may come before a PDL kernel's wait.
GLOBAL_ACCESS = re.compile(r"\b(LDG|STG|LDGSTS|LD|ST|ATOM|ATOMG|RED|UBLKCP|UTMALDG|UTMASTG)\b")
GLOBAL_WRITE = re.compile(r"\b(STG|ST|ATOM|ATOMG|RED|UTMASTG)\b")


@dataclass
class Kernel:
    arch: str
    mangled: str
    ldg128: int = 0
    stg128: int = 0
    ldg: int = 0
    stg: int = 0
    ldl: int = 0
    stl: int = 0
    hmma: int = 0
    hgmma: int = 0
    reg: int = -1
    stack: int = -1
    local: int = -1
    name: str = ""
    loop_hmma: int = 0  # HMMA between a backward branch and its target
    loop_hgmma: int = 0
    loop_wgmma_waits: int = 0
    wait_addrs: list = None
    wait_one_addrs: list = None  # WARPGROUP.DEPBAR.LE gsb0, 0x1
    ex2_addrs: list = None
    overlap_exps: int = 0  # most MUFU.EX2 in a main loop between a `wait_group 1` and the next wait
    hmma_addrs: list = None
    hgmma_addrs: list = None
    back_edges: list = None  # (target, branch) addresses of backward branches
    acqbulk_at: int = -1  # address of the first ACQBULK (-1: none)
    first_global_at: int = -1  # address of the first global memory access (-1: none)
    first_write_at: int = -1  # address of the first global memory write (-1: none)
    preexit: int = 0


def find_cuobjdump(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("CUOBJDUMP")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton  # noqa: PLC0415  (optional, only for its bundled binary)

        candidates.append(
            str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:  # noqa: BLE001  (triton missing or broken: just skip it)
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_module() -> Path | None:
    found = list((ROOT / "python" / "qwen3x").glob("_C*.so")) + list((ROOT / "build").rglob("_C*.so"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def parse_sass(text: str) -> dict[tuple[str, str], Kernel]:
    kernels: dict[tuple[str, str], Kernel] = {}
    arch, cur = "?", None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            cur = kernels.setdefault((arch, m.group(1)), Kernel(arch, m.group(1)))
            cur.hmma_addrs, cur.hgmma_addrs, cur.back_edges, cur.wait_addrs = [], [], [], []
            cur.wait_one_addrs, cur.ex2_addrs = [], []
        elif cur is not None and "/*" in line:
            ins = line.split("*/", 1)[-1]  # drop the /*addr*/ prefix
            if a := ADDR.search(line):
                addr = int(a.group(1), 16)
                if HMMA.search(ins):
                    cur.hmma_addrs.append(addr)
                if HGMMA.search(ins):
                    cur.hgmma_addrs.append(addr)
                if WGMMA_WAIT.search(ins):
                    cur.wait_addrs.append(addr)
                if WGMMA_WAIT_ONE.search(ins):
                    cur.wait_one_addrs.append(addr)
                if EX2.search(ins):
                    cur.ex2_addrs.append(addr)
                if (b := BRA_TARGET.search(ins)) and int(b.group(1), 16) < addr:
                    cur.back_edges.append((int(b.group(1), 16), addr))
                if ACQBULK.search(ins) and cur.acqbulk_at < 0:
                    cur.acqbulk_at = addr
                if GLOBAL_ACCESS.search(ins) and cur.first_global_at < 0:
                    cur.first_global_at = addr
                if GLOBAL_WRITE.search(ins) and cur.first_write_at < 0:
                    cur.first_write_at = addr
            cur.preexit += bool(PREEXIT.search(ins))
            cur.ldg128 += bool(LDG128.search(ins))
            cur.stg128 += bool(STG128.search(ins))
            cur.ldg += bool(LDG.search(ins))
            cur.stg += bool(STG.search(ins))
            cur.ldl += bool(LDL.search(ins))
            cur.stl += bool(STL.search(ins))
            cur.hmma += bool(HMMA.search(ins))
            cur.hgmma += bool(HGMMA.search(ins))

    def in_loops(k, addrs):
        return sum(1 for a in (addrs or []) if any(lo <= a <= hi for lo, hi in (k.back_edges or [])))

    for k in kernels.values():
        k.loop_hmma = in_loops(k, k.hmma_addrs)
        k.loop_hgmma = in_loops(k, k.hgmma_addrs)
        k.loop_wgmma_waits = in_loops(k, k.wait_addrs)
        k.overlap_exps = overlap_exps(k)
    return kernels


def overlap_exps(k: Kernel) -> int:
    """The most MUFU.EX2 that follow a `wait_group 1` in a main loop before the loop's next wgmma
    wait or its back edge: the softmax a loop runs beside its last wgmma group."""
    best = 0
    for lo, hi in k.back_edges or []:
        waits = sorted(a for a in k.wait_addrs if lo <= a <= hi)
        for w in (a for a in k.wait_one_addrs if lo <= a <= hi):
            end = next((a for a in waits if a > w), hi)
            best = max(best, sum(1 for a in k.ex2_addrs if w < a < end))
    return best


def parse_res_usage(text: str, kernels: dict[tuple[str, str], Kernel]) -> None:
    arch, name = "?", None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif name and (m := re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", line)):
            k = kernels.setdefault((arch, name), Kernel(arch, name))
            k.reg, k.stack, k.local = (int(g) for g in m.groups())
            name = None


def strip_parameters(name: str) -> str:
    """'void f<A, (E)1>(P<T>)' -> 'void f<A, (E)1>': drop the trailing parameter list (template
    arguments may hold parentheses of their own, such as enum casts)."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def demangle(kernels: list[Kernel]) -> None:
    cxxfilt = shutil.which("c++filt")
    names = [k.mangled for k in kernels]
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True,
                             text=True).stdout.splitlines()
        if len(out) == len(names):
            names = out
    for k, n in zip(kernels, names):
        k.name = strip_parameters(n).removeprefix("void ")


def is_stub(k: Kernel) -> bool:
    """A Hopper-mainloop kernel built for another architecture is a stub (core/wgmma.cuh:
    __trap), which the host never launches there (core/mainloop_choice.h)."""
    return any(sub in k.name for sub in WGMMA_LOOP_KERNELS) and k.arch != HOPPER_ARCH


def problems_of(k: Kernel) -> list[str]:
    """What is wrong with one kernel's machine code (empty: nothing), by the rules above."""
    problems = []
    if k.ldl or k.stl or k.stack > 0 or k.local > 0:
        problems.append("local memory")
    if any(v in k.name for v in VECTOR_KERNELS) and not (k.ldg128 and k.stg128):
        problems.append("no 16-byte vectors")
    if any(v in k.name for v in VECTOR_LOAD_KERNELS) and not k.ldg128:
        problems.append("no 16-byte loads")
    wgmma = [need for sub, need in WGMMA_LOOP_KERNELS.items() if sub in k.name]
    if is_stub(k):
        if k.hgmma:
            problems.append(f"HGMMA outside {HOPPER_ARCH}")
    else:
        for need in wgmma:
            if k.loop_hgmma < need:
                problems.append(f"{k.loop_hgmma} HGMMA in the main loop, expected >= {need}")
        if wgmma and 2 * k.loop_wgmma_waits >= k.loop_hgmma > 0:
            problems.append(f"wgmma serialized: {k.loop_wgmma_waits} waits for {k.loop_hgmma} HGMMA "
                            "in the main loop")
        if any(sub in k.name for sub in OVERLAP_KERNELS) and k.overlap_exps < OVERLAP_MIN_EXPS:
            problems.append(f"overlap lost: {k.overlap_exps} exponentials in the main loop between "
                            f"wgmma `wait_group 1` and the next wait, expected >= {OVERLAP_MIN_EXPS}")
        for sub, need in MMA_LOOP_KERNELS.items():
            if sub in k.name and not wgmma and k.loop_hmma < need:
                problems.append(f"{k.loop_hmma} HMMA in the main loop, expected >= {need}")
        if any(v in k.name for v in MMA_KERNELS) and not (k.hmma or k.hgmma):
            problems.append("no HMMA / HGMMA")
    if k.arch == HOPPER_ARCH and any(sub in k.name for sub in PDL_KERNELS):
        if k.acqbulk_at < 0:
            problems.append("PDL: no griddepcontrol.wait (ACQBULK)")
        elif any(sub in k.name for sub in PDL_READS_FIRST):
            if 0 <= k.first_write_at < k.acqbulk_at:
                problems.append("PDL: a global memory write before griddepcontrol.wait")
        elif 0 <= k.first_global_at < k.acqbulk_at:
            problems.append("PDL: a global memory access before griddepcontrol.wait")
        if not k.preexit:
            problems.append("PDL: no griddepcontrol.launch_dependents (PREEXIT)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", nargs="?", help="built _C*.so (default: newest in python/ or build/)")
    ap.add_argument("--cuobjdump", help="path to cuobjdump")
    args = ap.parse_args()

    module = Path(args.module) if args.module else find_module()
    if module is None or not module.is_file():
        print("sass_check: no built _C*.so found (build first, or pass its path)", file=sys.stderr)
        return 2
    tool = find_cuobjdump(args.cuobjdump)
    if tool is None:
        print("sass_check: cuobjdump not found (set CUOBJDUMP or CUDA_HOME)", file=sys.stderr)
        return 2

    kernels = parse_sass(run([tool, "-sass", str(module)]))
    parse_res_usage(run([tool, "-res-usage", str(module)]), kernels)
    rows = sorted(kernels.values(), key=lambda k: (k.arch, k.mangled))
    demangle(rows)
    if not rows:
        print(f"sass_check: no kernels in {module}", file=sys.stderr)
        return 2

    print(f"{module}")
    width = max(len(k.name) for k in rows)
    header = (f"{'arch':8} {'kernel':{width}} {'LDG128':>6} {'STG128':>6} {'LDG':>4} {'STG':>4} "
              f"{'LDL':>4} {'STL':>4} {'REG':>4} {'STACK':>5}  verdict")
    print(header)
    print("-" * len(header))
    failures = 0
    for k in rows:
        problems = problems_of(k)
        stub = is_stub(k)
        failures += bool(problems)
        tc = ", ".join(f"{n} {op}, {loop} in a loop" for op, n, loop in
                       (("HMMA", k.hmma, k.loop_hmma), ("HGMMA", k.hgmma, k.loop_hgmma)) if n)
        verdict = "; ".join(problems) or ("ok" + (f" ({tc})" if tc else "") +
                                          (f" (a stub: its mainloop is {HOPPER_ARCH}'s)" if stub else ""))
        print(f"{k.arch:8} {k.name:{width}} {k.ldg128:6} {k.stg128:6} {k.ldg:4} {k.stg:4} "
              f"{k.ldl:4} {k.stl:4} {k.reg:4} {k.stack:5}  {verdict}")
    print(f"{len(rows)} kernels, {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
