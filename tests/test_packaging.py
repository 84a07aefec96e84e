"""The source distribution builds what a checkout builds: an sdist must carry the CUDA sources and
the CMake files setup.py compiles them with (without them `pip install qwen3x-*.tar.gz` would
quietly install the pure-Python package), and the tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

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
