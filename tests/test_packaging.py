"""The source distribution builds what a checkout builds: an sdist must carry the CUDA sources and
the CMake files setup.py compiles them with (without them `pip install qwen3x-*.tar.gz` would
quietly install the pure-Python package), and the tests and benchmarks."""

from __future__ import annotations

import ast
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
