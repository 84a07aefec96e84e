"""Builds tests/emulator's runner: csrc/'s kernel headers and their host launchers, compiled for the CPU.

The kernel sources are used as they are, with two mechanical rewrites of a copy (CUDA syntax
that host C++ has no spelling for): `kernel<<<grid, block, smem, stream>>>(args)` becomes
`::emu::Launch(grid, block, smem, stream).run(kernel, args)`, and
`extern __shared__ __align__(N) unsigned char name[];` becomes a pointer to the CTA's dynamic
shared memory. Everything else (the PTX wrappers included, under QWEN3X_EMULATOR) compiles as
written. AddressSanitizer is on unless QWEN3X_EMU_ASAN=0.

    python tests/emulator/build.py   # prints the runner's path; rebuilds only when a source changed
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
OUT = ROOT / "build" / "emulator"

LAUNCH = re.compile(r"(\b[\w:]+(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned char\s+(\w+)\[\];")


def transform(text: str) -> str:
    text = LAUNCH.sub(lambda m: f"::emu::Launch({m.group(2)}).run({m.group(1)}, ", text)
    return DYNAMIC_SMEM.sub(lambda m: f"unsigned char* {m.group(1)} = ::emu::dynamic_smem();", text)


def sources() -> list[Path]:
    kernel_headers = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cuh", ".h"))
    emulator = sorted(p for p in HERE.rglob("*") if p.suffix in (".h", ".cpp", ".py"))
    return kernel_headers + emulator


def flags(asan: bool) -> list[str]:
    f = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
         "-DQWEN3X_EMULATOR", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    return f + (["-fsanitize=address"] if asan else [])


def build(asan: bool | None = None, verbose: bool = False,
          patches: tuple[tuple[str, str, str], ...] = ()) -> Path:
    """The runner executable, (re)built if any source or flag changed. `patches` (file relative
    to csrc/, old text, new text) plant a bug in the copy: the tests that show a bug is caught."""
    if asan is None:
        asan = os.environ.get("QWEN3X_EMU_ASAN", "1") != "0"
    cxx = os.environ.get("CXX", "g++")
    digest = hashlib.sha256()
    for p in sources():
        digest.update(str(p.relative_to(ROOT)).encode())
        digest.update(p.read_bytes())
    digest.update(" ".join([cxx] + flags(asan)).encode())
    digest.update(repr(patches).encode())
    key = digest.hexdigest()[:16]
    name = "emu_runner" if not patches else "emu_planted"
    exe = OUT / f"{name}-{key}"
    if exe.exists():
        return exe
    src = OUT / f"src-{key}"
    if src.exists():
        shutil.rmtree(src)
    for p in CSRC.rglob("*"):
        if p.suffix in (".cuh", ".h"):
            dst = src / p.relative_to(CSRC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = p.read_text()
            for file, old, new in patches:
                if Path(file) == p.relative_to(CSRC):
                    if text.count(old) != 1:
                        raise ValueError(f"planted bug: {old!r} is not once in {file}")
                    text = text.replace(old, new)
            dst.write_text(transform(text))
    cmd = [cxx, *flags(asan), f"-I{HERE / 'include'}", f"-I{src}", str(HERE / "runner.cpp"),
           "-o", str(exe) + ".tmp"]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{r.stderr[-20000:]}")
    os.replace(str(exe) + ".tmp", exe)
    if not patches:  # one build kept
        for old in OUT.glob("emu_runner-*"):
            if old != exe and not old.name.endswith(".tmp"):
                old.unlink(missing_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    return exe


if __name__ == "__main__":
    print(build(verbose=True))
