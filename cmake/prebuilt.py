"""A qwen3x._C built on one machine and used on another: the GPU machine's build, done here.

A GPU lease is 15 minutes, and building the extension there takes about two of them (2026-11-27,
H200). The module only needs nvcc and the headers and libraries of the torch it will be loaded
into, not a GPU, and it is abi3 (one file for every CPython >= 3.10), so the CPU machine can build
it for the GPU machine's torch and the lease carries it (`make prebuilt`, then carry .prebuilt).

    python cmake/prebuilt.py pack WHEEL DIR   the module and its torch stamp from a wheel built
                                              for that torch, with the hash of the sources
    python cmake/prebuilt.py use DIR          on the GPU machine: put them in python/qwen3x/ if
                                              they fit this tree and this torch, and load them;
                                              exit 0 if so, else 1 and nothing is left behind (the
                                              caller builds as usual)

A prebuilt module is used only where everything a build would look at is the same: the sources
it was built from (SOURCES below, hashed), the torch release it was built against (the full
version, local tag included), and the GPU it must run on (the module's own runs_on).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "_C.abi3.so"
STAMP = "_C_torch_version.txt"  # setup.py TORCH_VERSION_FILE
HASH_FILE = "sources.sha256"
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
    torch_version = (out_pkg / STAMP).read_text().strip()
    size_mb = (out_pkg / MODULE).stat().st_size / 2**20
    print(f"prebuilt: {out_pkg / MODULE} ({size_mb:.1f} MiB) for torch {torch_version}, "
          f"sources {(out / HASH_FILE).read_text().strip()[:12]}")


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
    hash_file = prebuilt / HASH_FILE
    if not (module.is_file() and stamp.is_file() and hash_file.is_file()):
        print(f"prebuilt: {prebuilt} holds no packed module; building")
        return False
    if hash_file.read_text().strip() != sources_hash(root):
        print(f"prebuilt: {prebuilt} was built from other sources than this tree's; building")
        return False
    import torch  # noqa: PLC0415  (only the use step needs it)

    built_for = stamp.read_text().strip()
    if built_for != torch.__version__:
        print(f"prebuilt: built against torch {built_for}, this is torch {torch.__version__}; building")
        return False
    # (a build of another Python's name would be imported before _C.abi3.so)
    for path in [*package.glob("_C.*.so"), package / STAMP]:
        path.unlink(missing_ok=True)
    (package / MODULE).write_bytes(module.read_bytes())
    (package / STAMP).write_text(stamp.read_text())
    code = LOAD_CHECK.replace("GPU_CHECK", GPU_CHECK if gpu else "")
    check = subprocess.run([sys.executable, "-c", code], cwd=package.parent, capture_output=True,
                           text=True)
    if check.returncode != 0:
        (package / MODULE).unlink(missing_ok=True)
        (package / STAMP).unlink(missing_ok=True)
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
