"""A qwen3x._C built on one machine and used on another: the GPU machine's build, done here.

A GPU lease is 15 minutes, and building the extension there takes about two of them (2026-11-27,
H200). The module only needs nvcc and the headers and libraries of the torch it will be loaded
into, not a GPU, and it is abi3 (one file for every CPython >= 3.10), so the CPU machine can build
it for the GPU machine's torch and the lease carries it (`make prebuilt`, then carry .prebuilt).

    python cmake/prebuilt.py pack WHEEL DIR   the module and its torch stamp from a wheel built
                                              for that torch, with the hash of the sources and
                                              the architectures it was built for
                                              (QWEN3X_CUDA_ARCHS, which must be set)
    python cmake/prebuilt.py use DIR          on the GPU machine: put them in python/qwen3x/ if
                                              they fit this tree and this torch, and load them;
                                              exit 0 if so, else 1 with python/qwen3x/ as it was
                                              (the caller builds as usual)

A prebuilt module is used only where what a build there would compile from and against is the
same: the sources (SOURCES below, hashed), the torch release (the full version, local tag
included), the architectures where QWEN3X_CUDA_ARCHS asks for some, and the GPU it must run on
(the module's own runs_on); and not when QWEN3X_PTXAS_VERBOSE asks for the compiler's report.
nvcc and the host compiler may be other releases of the same CUDA major (build_info names the
CUDA the module was built with).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "_C.abi3.so"
STAMP = "_C_torch_version.txt"  # setup.py TORCH_VERSION_FILE
HASH_FILE = "sources.sha256"
ARCHS_FILE = "archs.txt"
# What the build reads: the kernels and their glue, the CMake files, and the build script with
# the version it compiles in (globs under the tree's root).
SOURCES = ("csrc/**/*", "cmake/*.cmake", "CMakeLists.txt", "setup.py", "pyproject.toml")


def sources_hash(root: Path = ROOT) -> str:
    """sha256 over the build's inputs, path and contents of each file in path order."""
    files = sorted({p for pattern in SOURCES for p in root.glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def pack(wheel: Path, out: Path, root: Path = ROOT) -> None:
    out_pkg = out / "qwen3x"
    out_pkg.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in (MODULE, STAMP):
            (out_pkg / name).write_bytes(zf.read(f"qwen3x/{name}"))
    (out / HASH_FILE).write_text(sources_hash(root) + "\n")
    (out / ARCHS_FILE).write_text(_archs(os.environ["QWEN3X_CUDA_ARCHS"]) + "\n")
    torch_version = (out_pkg / STAMP).read_text().strip()
    size_mb = (out_pkg / MODULE).stat().st_size / 2**20
    print(f"prebuilt: {out_pkg / MODULE} ({size_mb:.1f} MiB) for torch {torch_version}, "
          f"{(out / ARCHS_FILE).read_text().strip()}, sources {(out / HASH_FILE).read_text().strip()[:12]}")


def _archs(value: str) -> str:
    """QWEN3X_CUDA_ARCHS in one spelling: ';' or ',' separated, spaces ignored, in its order."""
    return ";".join(a.strip() for a in value.replace(",", ";").split(";") if a.strip())


# Run in a fresh interpreter, from the tree's python/, after the copy: the module loads from there,
# registers the kernels, and has machine code for this GPU.
LOAD_CHECK = """
import os, torch, qwen3x._library as lib
assert lib._C is not None, f"qwen3x._C did not load: {lib.C_LOAD_ERROR}"
here = os.path.join(os.getcwd(), "qwen3x")
assert os.path.dirname(lib._C.__file__) == here, f"loaded {lib._C.__file__}, not the one in {here}"
GPU_CHECK
print("built for", ", ".join(lib._C.build_info()["archs"]))
"""
GPU_CHECK = """
assert torch.cuda.is_available(), "no GPU visible"
major, minor = torch.cuda.get_device_capability()
assert lib._C.runs_on(major * 10 + minor), f"no machine code for sm_{major}{minor}"
"""


def use(prebuilt: Path, root: Path = ROOT, gpu: bool = True) -> bool:
    """Whether the module in `prebuilt` now stands in root's python/qwen3x/, loaded there (on
    the visible GPU unless not `gpu`: the tests on a CPU)."""
    package = root / "python" / "qwen3x"
    module, stamp = prebuilt / "qwen3x" / MODULE, prebuilt / "qwen3x" / STAMP
    hash_file, archs_file = prebuilt / HASH_FILE, prebuilt / ARCHS_FILE
    if not all(f.is_file() for f in (module, stamp, hash_file, archs_file)):
        print(f"prebuilt: {prebuilt} holds no packed module; building")
        return False
    if hash_file.read_text().strip() != sources_hash(root):
        print(f"prebuilt: {prebuilt} was built from other sources than this tree's; building")
        return False
    archs, wanted = archs_file.read_text().strip(), _archs(os.environ.get("QWEN3X_CUDA_ARCHS", ""))
    if wanted and wanted != archs:
        print(f"prebuilt: built for {archs}, QWEN3X_CUDA_ARCHS asks for {wanted}; building")
        return False
    if os.environ.get("QWEN3X_PTXAS_VERBOSE", "0") not in ("", "0"):
        print("prebuilt: QWEN3X_PTXAS_VERBOSE asks for the compiler's report; building")
        return False
    import torch  # noqa: PLC0415  (only the use step needs it)

    built_for = stamp.read_text().strip()
    if built_for != torch.__version__:
        print(f"prebuilt: built against torch {built_for}, this is torch {torch.__version__}; building")
        return False
    with tempfile.TemporaryDirectory() as aside:
        # What is there now (a build of another Python's name would also be imported before
        # _C.abi3.so) waits aside until the prebuilt module has passed its load check.
        there = [p for p in (*package.glob("_C.*.so"), package / STAMP) if p.exists()]
        for path in there:
            shutil.move(path, Path(aside) / path.name)
        shutil.copyfile(module, package / MODULE)
        shutil.copyfile(stamp, package / STAMP)
        code = LOAD_CHECK.replace("GPU_CHECK", GPU_CHECK if gpu else "")
        check = subprocess.run([sys.executable, "-c", code], cwd=package.parent,
                               capture_output=True, text=True)
        if check.returncode != 0:
            (package / MODULE).unlink()
            (package / STAMP).unlink()
            for path in there:
                shutil.move(Path(aside) / path.name, path)
            reason = (check.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"prebuilt: the module did not pass its load check ({reason}); building")
            return False
    print(f"prebuilt: using {module} (torch {built_for}, {check.stdout.strip()}); no build")
    return True


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pack":
        pack(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 2 and argv[0] == "use":
        return 0 if use(Path(argv[1])) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
