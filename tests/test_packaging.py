"""The source distribution builds what a checkout builds: an sdist must carry the CUDA sources and
the CMake files setup.py compiles them with (without them `pip install qwen3x-*.tar.gz` would
quietly install the pure-Python package), and the tests and benchmarks."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a checkout has that a user's source install does not need.
NOT_SHIPPED = {".ci/run", ".gitignore"}


def _tracked_files() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are the list to compare with)")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line and (ROOT / line).is_file()}


def test_sdist_carries_every_source_file(tmp_path):
    tracked = _tracked_files()
    # egg_info and sdist both write into tmp_path, never into the checkout
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)],
                   cwd=ROOT, capture_output=True, text=True, check=True,
                   env={"QWEN3X_BUILD_CUDA": "0", "PATH": "/usr/bin:/bin"})
    (archive,) = tmp_path.glob("qwen3x-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(tracked - NOT_SHIPPED - names)
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing}"
    assert {"CMakeLists.txt", "setup.py", "csrc/torch_bindings.cpp", "cmake/torch.cmake"} <= names
    compiled = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.startswith("build/"))
    assert not compiled, f"build products in the sdist: {compiled}"


def _setup_function(name, *constants):
    """A function of setup.py with the module constants it reads (setup.py runs setup() when
    imported, so it is not imported)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name == name)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in constants for t in n.targets))]
    namespace = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_default_archs_follow_the_visible_gpus():
    """Without QWEN3X_CUDA_ARCHS the build is for the GPUs it sees (an A100 user gets sm_80, not
    an sm_90a-only build that cannot run there); 9.0 becomes 9.0a (the Hopper mainloops); GPUs
    older than the kernels need are left out; no GPU: None (the default, 9.0a)."""
    visible_gpu_archs = _setup_function("visible_gpu_archs", "MIN_CAPABILITY")
    visible_gpu_archs.__globals__["log"] = lambda message: None

    def fake_torch(*caps):
        cuda = SimpleNamespace(device_count=lambda: len(caps), get_device_capability=lambda i: caps[i])
        return SimpleNamespace(cuda=cuda)

    assert visible_gpu_archs(fake_torch((8, 0))) == "8.0"
    assert visible_gpu_archs(fake_torch((9, 0), (9, 0))) == "9.0a"
    assert visible_gpu_archs(fake_torch((8, 9), (9, 0), (7, 5))) == "8.9;9.0a"
    assert visible_gpu_archs(fake_torch((10, 0), (8, 0))) == "8.0;10.0"  # in capability order
    # a GPU this nvcc cannot compile for is left out (the build would fail), not the whole build
    assert visible_gpu_archs(fake_torch((12, 0), (9, 0)), {(8, 0), (9, 0)}) == "9.0a"
    assert visible_gpu_archs(fake_torch((12, 0)), {(8, 0), (9, 0)}) is None
    assert visible_gpu_archs(fake_torch((7, 0))) is None
    assert visible_gpu_archs(fake_torch()) is None

    def no_driver():
        raise RuntimeError("no CUDA driver")

    assert visible_gpu_archs(SimpleNamespace(cuda=SimpleNamespace(device_count=no_driver))) is None


def _prebuilt():
    """cmake/prebuilt.py (a script beside the CMake files, not a package module)."""
    spec = importlib.util.spec_from_file_location("qwen3x_prebuilt", ROOT / "cmake" / "prebuilt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_build_inputs(dest: Path) -> Path:
    """The files a build reads and the Python package, without any build of _C."""
    for name in ("csrc", "cmake", "python"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns(
            "_C.*.so", "_C_torch_version.txt", "__pycache__", "*.egg-info"))
    for name in ("CMakeLists.txt", "setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_prebuilt_hash_covers_what_the_build_reads(tmp_path):
    """A module built elsewhere (make prebuilt) is used only for the sources it was built from:
    any change to a kernel, a CMake file or the build script is a different hash; the scripts
    beside the CMake files, which the build does not read, are not."""
    prebuilt = _prebuilt()
    tree = _copy_build_inputs(tmp_path)
    before = prebuilt.sources_hash(tree)
    assert before == prebuilt.sources_hash(_copy_build_inputs(tmp_path / "again"))
    edits = [
        lambda: (tree / "csrc/attention/softmax.cuh").write_text(
            (tree / "csrc/attention/softmax.cuh").read_text() + "\n"),
        lambda: (tree / "csrc/moe/new_kernel.cuh").write_text("// new\n"),
        lambda: (tree / "cmake/torch.cmake").write_text((tree / "cmake/torch.cmake").read_text() + "#\n"),
        lambda: (tree / "pyproject.toml").write_text(
            (tree / "pyproject.toml").read_text().replace('version = "', 'version = "9')),
    ]
    seen = {before}
    for edit in edits:
        edit()
        now = prebuilt.sources_hash(tree)
        assert now not in seen
        seen.add(now)
    (tree / "cmake/sass_check.py").write_text("# not a build input\n")
    assert prebuilt.sources_hash(tree) in seen


@pytest.mark.skipif(not (ROOT / "python/qwen3x/_C.abi3.so").is_file(),
                    reason="needs the built extension (python/qwen3x/_C.abi3.so)")
def test_prebuilt_module_is_used_only_where_it_fits(tmp_path, monkeypatch):
    """The GPU machine uses a carried module only if it was built from that tree's sources,
    against that torch exactly, for the architectures asked for, and loads there; otherwise the
    package is left as it was (the caller builds). Here the module is this checkout's own build
    (abi3: any CPython >= 3.10 loads it)."""
    import torch

    prebuilt = _prebuilt()
    tree = _copy_build_inputs(tmp_path / "tree")
    package = tree / "python" / "qwen3x"
    carried = tmp_path / "carried"
    (carried / "qwen3x").mkdir(parents=True)
    shutil.copy(ROOT / "python/qwen3x/_C.abi3.so", carried / "qwen3x")
    built_for = (ROOT / "python/qwen3x/_C_torch_version.txt").read_text().strip()
    if built_for != torch.__version__:
        pytest.skip(f"the checkout's build is for torch {built_for}, this is {torch.__version__}")

    def carry(torch_version: str, sources: str) -> None:
        (carried / "qwen3x" / "_C_torch_version.txt").write_text(torch_version + "\n")
        (carried / "sources.sha256").write_text(sources + "\n")
        (carried / "archs.txt").write_text("9.0a\n")

    def installed() -> set[str]:
        return {p.name for p in package.glob("_C*")}

    # an older build named for one Python would be imported before _C.abi3.so
    stale = package / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"not a module")
    carry(torch.__version__, "0" * 64)
    assert not prebuilt.use(carried, tree, gpu=False)  # other sources
    carry("2.0.0+cu118", prebuilt.sources_hash(tree))
    assert not prebuilt.use(carried, tree, gpu=False)  # another torch
    assert installed() == {stale.name}
    carry(torch.__version__, prebuilt.sources_hash(tree))
    monkeypatch.setenv("QWEN3X_CUDA_ARCHS", "8.0;9.0a")
    assert not prebuilt.use(carried, tree, gpu=False)  # other architectures asked for
    monkeypatch.setenv("QWEN3X_CUDA_ARCHS", " 9.0a")
    monkeypatch.setenv("QWEN3X_PTXAS_VERBOSE", "1")
    assert not prebuilt.use(carried, tree, gpu=False)  # the compiler's report asked for
    monkeypatch.delenv("QWEN3X_PTXAS_VERBOSE")
    assert installed() == {stale.name}
    if not torch.cuda.is_available():
        assert not prebuilt.use(carried, tree)  # its load check wants a GPU: the package as it was
        assert installed() == {stale.name} and stale.read_bytes() == b"not a module"
    assert prebuilt.use(carried, tree, gpu=False)
    assert installed() == {"_C.abi3.so", "_C_torch_version.txt"}
    assert (package / "_C.abi3.so").read_bytes() == (ROOT / "python/qwen3x/_C.abi3.so").read_bytes()
