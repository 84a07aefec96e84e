"""The Hopper wgmma encodings (core/wgmma.cuh, attention/mainloop.cuh, moe/grouped_gemm.cuh) against
NVIDIA CUTLASS's CuTe, on the CPU (tests/cutlass_check/):

  - wgmma_layouts.cu, compiled by nvcc and run on the host: every descriptor the two kernels build
    (MoE A per warpgroup and B, attention Q, K and V; every k16 step and stage, several shared-memory
    bases, bf16 and fp16) bit for bit against CuTe's make_gmma_desc / DescriptorIterator, every tile
    element's shared address against CuTe's swizzled layout, and the accumulator / register-A
    thread-value maps against CLayout_64xN / ALayout_64x16;
  - wgmma_asm.cu, compiled to PTX for sm_90a (not run): our inline-PTX wgmma wrappers and CuTe's
    SM90 atoms, fed the same values, must give the same PTX (operand order, scale / transpose
    immediates, accumulator order);
  - the kernel lines wgmma_layouts.cu restates ("MIRRORS <file>: <text>") must still be in the kernels.

The CUTLASS headers come from the `nvidia-cutlass` wheel (cutlass_library/source/include; the Makefile
installs it) or from QWEN3X_CUTLASS_INCLUDE (a directory holding cute/ and cutlass/). The compiled
program is cached in the temp directory under a hash of its inputs, so the suite's second run
(transformers 4.57) does not compile again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_DIR = ROOT / "tests" / "cutlass_check"
LAYOUTS_SRC = CHECK_DIR / "wgmma_layouts.cu"
ASM_SRC = CHECK_DIR / "wgmma_asm.cu"
COMPILE_TIMEOUT_S = 600
NVCC_FLAGS = ["-std=c++17", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc")]


def _find_nvcc() -> str | None:
    """setup.py's find_nvcc: CUDACXX, then CUDA_HOME / CUDA_PATH, then PATH."""
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and Path(cudacxx).is_file():
        return cudacxx
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cutlass_include() -> tuple[Path | None, str]:
    """The directory holding cute/ and cutlass/, and where it was looked for."""
    env = os.environ.get("QWEN3X_CUTLASS_INCLUDE")
    if env:
        candidates = [Path(env)]
        where = f"QWEN3X_CUTLASS_INCLUDE={env}"
    else:
        spec = importlib.util.find_spec("cutlass_library")  # locates, does not import
        locations = list(spec.submodule_search_locations or []) if spec else []
        candidates = [Path(p) / "source" / "include" for p in locations]
        where = ("the installed cutlass_library package (pip install nvidia-cutlass==4.2.0.0)"
                 if spec else "cutlass_library: not installed (pip install nvidia-cutlass==4.2.0.0, "
                 "or set QWEN3X_CUTLASS_INCLUDE)")
    for path in candidates:
        if (path / "cute" / "tensor.hpp").is_file() and (path / "cutlass" / "cutlass.h").is_file():
            return path, where
    return None, where


@pytest.fixture(scope="module")
def toolchain() -> tuple[str, Path]:
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDACXX, CUDA_HOME, CUDA_PATH or PATH): cannot compile the CuTe cross-check")
    include, where = _cutlass_include()
    if include is None:
        pytest.skip(f"CUTLASS headers (cute/, cutlass/) not found via {where}")
    return nvcc, include


def _inputs_key(nvcc: str, include: Path, *parts: str) -> str:
    """A hash of everything a compile reads: the source, the project's headers, nvcc, CUTLASS."""
    h = hashlib.sha256()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    for item in (nvcc, version, str(include), *parts):
        h.update(item.encode() + b"\0")
    for cutlass_version in (include / "cutlass" / "version.h",):
        if cutlass_version.is_file():
            h.update(cutlass_version.read_bytes())
    for path in sorted(CHECK_DIR.glob("*.cu")) + sorted((ROOT / "csrc").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


def _compile(nvcc: str, include: Path, src: Path, out_name: str, extra: list[str]) -> Path:
    """Compiles src (cached by input hash) and returns the output's path."""
    cmd_flags = NVCC_FLAGS + ["-I", str(include)] + extra
    key = _inputs_key(nvcc, include, src.name, " ".join(cmd_flags))
    cache = Path(tempfile.gettempdir()) / "qwen3x-cutlass-check" / key
    out = cache / out_name
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{out_name}.{os.getpid()}.tmp"
    r = subprocess.run([nvcc, *cmd_flags, str(src), "-o", str(tmp)], capture_output=True, text=True,
                       timeout=COMPILE_TIMEOUT_S)
    assert r.returncode == 0, f"nvcc failed on {src.name}:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    os.replace(tmp, out)
    return out


def test_layouts_match_cute(toolchain):
    """Descriptors, shared-memory element addresses and register fragments: zero mismatches."""
    nvcc, include = toolchain
    exe = _compile(nvcc, include, LAYOUTS_SRC, "wgmma_layouts", [])
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    print(r.stdout)
    summary = re.search(r"^mismatches: (\d+)$", r.stdout, re.MULTILINE)
    assert summary is not None, f"no summary line (exit {r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    if r.returncode != 0 or summary.group(1) != "0":
        lines = r.stdout.splitlines()
        table = [line for line in lines if re.match(r"(desc|ldsm|layout|frag)\.|compared:|mismatches:", line)]
        details = [line for line in lines if line.startswith("  ")][:60]
        pytest.fail(f"our wgmma encodings disagree with CuTe ({summary.group(1)} mismatches):\n"
                    + "\n".join(table) + "\nfirst mismatches:\n" + "\n".join(details), pytrace=False)
    families = re.findall(r"^(desc|ldsm|layout|frag)\.\S+\s+compared\s+(\d+)", r.stdout, re.MULTILINE)
    assert len(families) == 9 and all(int(n) > 0 for _, n in families), r.stdout


def _ptx_bodies(ptx: str) -> dict[str, str]:
    """Kernel name -> its PTX (from .entry to the closing brace), comments and whitespace removed,
    the kernel's own name replaced by a placeholder."""
    bodies = {}
    for m in re.finditer(r"^\.visible \.entry (\S+?)\((.*?)^\}", ptx, re.MULTILINE | re.DOTALL):
        mangled, text = m.group(1), m.group(2)
        length = re.match(r"_Z(\d+)", mangled)  # _Z<length><name><parameter types>
        name = mangled[length.end():length.end() + int(length.group(1))] if length else mangled
        text = re.sub(r"//[^\n]*", "", text).replace(mangled, "KERNEL")
        bodies[name] = re.sub(r"\s+", "", text)
    return bodies


def test_asm_operand_order_matches_cute(toolchain):
    """Our wgmma_ss / wgmma_rs inline PTX == CuTe's SM90 SS / RS atoms' (sm_90a PTX)."""
    nvcc, include = toolchain
    ptx = _compile(nvcc, include, ASM_SRC, "wgmma_asm.ptx", ["-arch=sm_90a", "-ptx"]).read_text()
    bodies = _ptx_bodies(ptx)
    cases = sorted(name[len("ours_"):] for name in bodies if name.startswith("ours_"))
    assert cases == ["rs128_bf16", "rs128_fp16", "rs64k_bf16", "rs64k_fp16", "ss128_bf16", "ss128_fp16",
                     "ss64_bf16", "ss64_fp16"], bodies.keys()
    differ = []
    for case in cases:
        ours, cute = bodies[f"ours_{case}"], bodies[f"cute_{case}"]
        assert "wgmma.mma_async" in ours and "wgmma.mma_async" in cute, case
        if ours != cute:
            i = next((i for i, (a, b) in enumerate(zip(ours, cute)) if a != b), min(len(ours), len(cute)))
            differ.append(f"{case}: first difference (whitespace removed): ours ...{ours[max(i - 60, 0):i + 40]}... "
                          f"CuTe ...{cute[max(i - 60, 0):i + 40]}...\n  ours: {_wgmma_line(ptx, 'ours_' + case)}\n"
                          f"  CuTe: {_wgmma_line(ptx, 'cute_' + case)}")
    if differ:
        pytest.fail("our wgmma PTX differs from CuTe's SM90 atoms:\n" + "\n".join(differ), pytrace=False)


def _wgmma_line(ptx: str, kernel: str) -> str:
    start = ptx.index(kernel)
    line = re.search(r"wgmma\.mma_async[^;]*;", ptx[start:], re.DOTALL)
    return " ".join(line.group(0).split()) if line else "(no wgmma)"


def _normalize(text: str) -> str:
    return " ".join(text.split())


def test_mirrored_kernel_lines_are_current():
    """Each kernel line wgmma_layouts.cu restates must still be in its file (no compiler needed):
    a change to the kernels' wgmma address arithmetic fails here until the restatement follows."""
    mirrors = re.findall(r"^\s*// MIRRORS (\S+): (.+)$", LAYOUTS_SRC.read_text(), re.MULTILINE)
    assert len(mirrors) >= 20, mirrors
    stale = []
    for rel, text in mirrors:
        source = ROOT / rel
        assert source.is_file(), f"MIRRORS names a missing file: {rel}"
        if _normalize(text) not in _normalize(source.read_text()):
            stale.append(f"{rel}: {text}")
    assert not stale, ("kernel lines restated by tests/cutlass_check/wgmma_layouts.cu are no longer in "
                       "the kernels; update the restatement (and its MIRRORS comment):\n  " + "\n  ".join(stale))
