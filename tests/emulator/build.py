"""Builds tests/emulator's runner: csrc/'s kernel headers and their host launchers, compiled for the CPU.

The kernel sources are used as they are, with mechanical rewrites of a copy (CUDA syntax that
host C++ has no spelling for): `kernel<<<grid, block, smem, stream>>>(args)` becomes
`::emu::Launch(grid, block, smem, stream).run(kernel, args)`, and `__shared__` variables
(`extern` arrays and fixed-size ones) become the running CTA's shared memory. Everything else
(the PTX wrappers included, under QWEN3X_EMULATOR) compiles as written. The runner is built with
AddressSanitizer (bounds) or ThreadSanitizer (races between the threads of a CTA:
include/emu/emu.h), or neither.

    python tests/emulator/build.py   # prints the runner's path; rebuilds only when a source changed

`build_ops()` compiles the .cu glue and torch_bindings.cpp the same way into a PyTorch extension
whose ops are `torch.ops.qwen3x_emu.*`: the schemas of `torch.ops.qwen3x.*`, served on CPU
tensors by the glue and the kernels' source (the CPU plays the GPU: csrc/core/checks.h).
"""

from __future__ import annotations

import contextlib
import fcntl
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
STATIC_SMEM = re.compile(r"__shared__\s+(\w+)\s+(\w+)((?:\[[^\]]+\])*);")


def transform(text: str) -> str:
    text = LAUNCH.sub(lambda m: f"::emu::Launch({m.group(2)}).run({m.group(1)}, ", text)
    text = DYNAMIC_SMEM.sub(lambda m: f"unsigned char* {m.group(1)} = ::emu::dynamic_smem();", text)
    # fixed-size shared variables: storage of the running CTA (fresh and poisoned for each CTA)
    return STATIC_SMEM.sub(
        lambda m: f"auto& {m.group(2)} = ::emu::cta_shared<{m.group(1)}{m.group(3)}>"
                  f"(__FILE__ \":{m.group(2)}\");", text)


GLUE_RENAMES = (  # torch_bindings.cpp: another library name, the CPU dispatch key
    ("TORCH_LIBRARY(qwen3x, m)", "TORCH_LIBRARY(qwen3x_emu, m)"),
    ("TORCH_LIBRARY_IMPL(qwen3x, CUDA, m)", "TORCH_LIBRARY_IMPL(qwen3x_emu, CPU, m)"),
)


HEADERS = (".cuh", ".h")
GLUE = (".cu", ".cpp")


def sources() -> list[Path]:
    kernel_sources = sorted(p for p in CSRC.rglob("*") if p.suffix in HEADERS + GLUE)
    emulator = sorted(p for p in HERE.rglob("*") if p.suffix in (".h", ".cpp", ".py"))
    return kernel_sources + emulator


@contextlib.contextmanager
def _exclusive():
    """Holds build/emulator's lock: test steps run side by side (make test) build here at once,
    and a build, its copy of csrc/ and its clean-up of older builds are one step for each."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _digest(*extra: str) -> str:
    """A key of every source (and of `extra`): a build is redone when one changes."""
    digest = hashlib.sha256()
    for p in sources():
        digest.update(str(p.relative_to(ROOT)).encode())
        digest.update(p.read_bytes())
    for e in extra:
        digest.update(e.encode())
    return digest.hexdigest()[:16]


def _copy_csrc(dst: Path, suffixes: tuple[str, ...], edits: tuple[tuple[str, str, str], ...] = ()) -> None:
    """csrc/'s files with these suffixes, transformed, under dst (.cu as .cpp); `edits` (file
    relative to csrc/, old text, new text) must each apply exactly once."""
    shutil.rmtree(dst, ignore_errors=True)
    for p in CSRC.rglob("*"):
        if p.suffix not in suffixes:
            continue
        rel = p.relative_to(CSRC)
        text = p.read_text()
        for file, old, new in edits:
            if Path(file) == rel:
                if text.count(old) != 1:
                    raise ValueError(f"{old!r} is not once in {file}")
                text = text.replace(old, new)
        out = dst / (rel.with_suffix(".cpp") if p.suffix == ".cu" else rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(transform(text))


SANITIZERS = ("address", "thread", "none")


def flags(sanitizer: str, debug_info: bool = True) -> list[str]:
    """The runner's compile flags; `debug_info` off for planted-bug runners (built once per bug,
    judged by what fails, not read in a debugger: a third less compile time)."""
    f = ["-std=c++20", "-O1", *(["-g"] if debug_info else []), "-fno-omit-frame-pointer", "-ffp-contract=off",
         "-DQWEN3X_EMULATOR", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    return f + ([f"-fsanitize={sanitizer}"] if sanitizer != "none" else [])


ONLY = ("attention", "experts", "others")  # kernels a runner can be built for alone (runner.cpp's EMU_ONLY_*)


def build(sanitizer: str = "address", verbose: bool = False,
          patches: tuple[tuple[str, str, str], ...] = (), only: str | None = None) -> Path:
    """The runner executable, (re)built if any source or flag changed. `patches` (file relative
    to csrc/, old text, new text) plant a bug in the copy: the tests that show a bug is caught.
    `only`: one of ONLY, a runner with that op's kernels alone (a fraction of the compile time;
    other ops are refused by name)."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer must be one of {SANITIZERS}, got {sanitizer!r}")
    if only is not None and only not in ONLY:
        raise ValueError(f"only must be one of {ONLY}, got {only!r}")
    cxx = os.environ.get("CXX", "g++")
    op_flags = [f"-DEMU_ONLY_{only.upper()}"] if only else []
    cxx_flags = flags(sanitizer, debug_info=not patches) + op_flags
    key = _digest(" ".join([cxx] + cxx_flags), repr(patches))
    name = (f"emu_runner-{sanitizer}" if not patches else "emu_planted") + (f"-{only}" if only else "")
    exe = OUT / f"{name}-{key}"
    with _exclusive():
        if exe.exists():
            return exe
        src = OUT / f"src-{key}"
        _copy_csrc(src, HEADERS, patches)
        cmd = [cxx, *cxx_flags, f"-I{HERE / 'include'}", f"-I{src}", str(HERE / "runner.cpp"), "-o", str(exe) + ".tmp"]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{r.stderr[-20000:]}")
        os.replace(str(exe) + ".tmp", exe)
        if not patches and not only:  # one build per sanitizer kept
            for old in OUT.glob(f"{name}-*"):
                if old != exe and not old.name.endswith(".tmp"):
                    old.unlink(missing_ok=True)
        shutil.rmtree(src, ignore_errors=True)
    return exe


def build_ops(verbose: bool = False) -> None:
    """Builds (if needed) and loads the torch.ops.qwen3x_emu library: csrc/'s .cu glue and
    bindings compiled as C++ over the emulator (no AddressSanitizer: it loads into Python)."""
    from torch.utils import cpp_extension

    key = _digest()
    src = OUT / f"glue-{key}"
    with _exclusive():
        if not (src / "done").exists():
            _copy_csrc(src, HEADERS + GLUE, tuple(("torch_bindings.cpp", old, new) for old, new in GLUE_RENAMES))
            (src / "done").write_text("")
            for old in OUT.glob("glue-*"):
                if old != src:
                    shutil.rmtree(old, ignore_errors=True)
    units = sorted(str(p) for p in src.rglob("*.cpp"))
    cpp_extension.load(  # (its own lock in build_directory: one process compiles, the others wait)
        name=f"qwen3x_emu_{key}", sources=units, is_python_module=False, verbose=verbose,
        build_directory=str(src),
        extra_include_paths=[str(HERE / "include"), str(src)],
        # -fno-gnu-unique: the static locals of csrc/'s inline helpers (per-device caches) stay
        # this library's own, not unified with a real qwen3x._C loaded in the same process
        extra_cflags=["-O1", "-ffp-contract=off", "-fno-gnu-unique", "-DQWEN3X_EMULATOR", "-DQWEN3X_HAS_SM90A",
                      '-DQWEN3X_VERSION=\\"emulator\\"', '-DQWEN3X_CUDA_ARCHS=\\"sm_90a\\"',
                      '-DQWEN3X_TORCH_VERSION=\\"any\\"', "-w"])


if __name__ == "__main__":
    print(build(verbose=True))
