"""Build script for qwen3x: the Python package in python/ plus, when possible,
the CUDA extension module qwen3x._C built from csrc/ with CMake + Ninja.

Environment:
  QWEN3X_BUILD_CUDA     auto (default): build when nvcc is found and torch is
                        a CUDA build, else install the pure-Python package
                        (and say why, in one line);
                        0: never build (no compiler, no torch import);
                        1: build or fail loudly.
  QWEN3X_CUDA_ARCHS     ';' or ',' separated, e.g. "8.0;9.0a"; "9.0+PTX" also
                        embeds PTX (cmake/cuda_archs.cmake). Default: the visible
                        GPUs' architectures (sm_80 and newer; 9.0 as 9.0a, for the
                        Hopper mainloops), or "9.0a" when none is visible.
  MAX_JOBS              parallel compile jobs (ninja -j); default: ninja's.
  QWEN3X_PTXAS_VERBOSE  1: pass -Xptxas=-v (registers / spills per kernel).
  CUDA_HOME, CUDA_PATH, CUDACXX: where to find nvcc (else PATH).

Typical use on a GPU machine:
  pip install --no-build-isolation -e .        # editable, _C.abi3.so in python/qwen3x/
  pip install --no-build-isolation .
pip shows this script's output only with -v (or when the build fails).
CMake's build tree is build/cmake-torch-<torch version>/ and is reused between builds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "9.0a"
MIN_CAPABILITY = (8, 0)  # the kernels' mma.sync (bf16), ldmatrix and cp.async need sm_80


def log(msg: str) -> None:
    print(f"qwen3x: {msg}", file=sys.stderr, flush=True)


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return m.group(1) if m else "0.0.0"


def build_mode() -> str:
    raw = os.environ.get("QWEN3X_BUILD_CUDA", "auto").strip().lower()
    aliases = {"auto": "auto", "": "auto", "0": "0", "off": "0", "false": "0", "no": "0",
               "1": "1", "on": "1", "true": "1", "yes": "1"}
    if raw not in aliases:
        raise SystemExit(f"qwen3x: QWEN3X_BUILD_CUDA must be auto, 0 or 1, got {raw!r}")
    return aliases[raw]


def find_nvcc() -> str | None:
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and Path(cudacxx).is_file():
        return cudacxx
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def arch_names(archs: str) -> list[str]:
    """'8.0;9.0a' -> ['sm_80', 'sm_90a'] (display only; CMake does the real
    parsing and rejects bad entries, see cmake/cuda_archs.cmake)."""
    names = []
    for a in re.split(r"[;,]", archs):
        a = a.strip()
        if not a:
            continue
        ptx = a.lower().endswith("+ptx")
        a = re.sub(r"^(sm_|compute_)", "", a[:-4] if ptx else a).replace(".", "")
        names.append(f"sm_{a}" + ("+PTX" if ptx else ""))
    return names


def find_tool(module: str, attr: str, exe: str) -> str | None:
    """cmake / ninja from their PyPI wheels (build requirements), else PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.is_file():
            return str(path)
    except Exception:  # noqa: BLE001  (module missing or unusual: fall back to PATH)
        pass
    return shutil.which(exe)


def nvcc_archs(nvcc: str) -> set[tuple[int, int]] | None:
    """The compute capabilities this nvcc compiles for (nvcc --list-gpu-arch), None if unknown."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {(int(n) // 10, int(n) % 10) for n in re.findall(r"compute_(\d+)", out)} or None


def visible_gpu_archs(torch, compilable: set[tuple[int, int]] | None = None) -> str | None:
    """The visible GPUs' architectures in QWEN3X_CUDA_ARCHS spelling (those the kernels can run on,
    sm_80 and newer, and that nvcc compiles for, when `compilable` says), or None when there is
    none (then DEFAULT_ARCHS)."""
    try:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001  (no driver, no device: build the default)
        return None
    usable = sorted(c for c in caps if c >= MIN_CAPABILITY and (compilable is None or c in compilable))
    for major, minor in sorted(caps - set(usable)):
        log(f"not building for the visible sm_{major}{minor}: "
            + ("the kernels need sm_80 or newer" if (major, minor) < MIN_CAPABILITY else "this nvcc does not compile for it"))
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in usable) or None


class BuildPlan:
    """Decides once whether qwen3x._C is built, and why not."""

    def __init__(self) -> None:
        self.mode = build_mode()
        self.archs = os.environ.get("QWEN3X_CUDA_ARCHS", "").strip()
        self.archs_from = "QWEN3X_CUDA_ARCHS" if self.archs else None
        self.nvcc = self.cmake = self.ninja = None
        self.cuda_version = self.torch_version = None
        self.skip_reason = self._check()
        if self.skip_reason and self.mode == "1":
            raise SystemExit(f"qwen3x: QWEN3X_BUILD_CUDA=1 but the CUDA extension cannot be "
                             f"built: {self.skip_reason}")

    @property
    def build(self) -> bool:
        return self.skip_reason is None

    def _check(self) -> str | None:
        if self.mode == "0":
            return "QWEN3X_BUILD_CUDA=0"
        self.nvcc = find_nvcc()
        if self.nvcc is None:
            return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        self.cuda_version = nvcc_version(self.nvcc)
        if self.cuda_version is None:
            return f"could not run {self.nvcc} --version"
        try:
            import torch  # noqa: PLC0415  (only needed when building)
        except Exception as e:  # noqa: BLE001
            return f"torch is not importable ({type(e).__name__}: {e}); " \
                   "install torch first and use pip --no-build-isolation"
        self.torch_version = torch.__version__
        if not self.archs:
            visible = visible_gpu_archs(torch, nvcc_archs(self.nvcc))
            self.archs = visible or DEFAULT_ARCHS
            self.archs_from = "the visible GPUs" if visible else "the default: no usable GPU visible"
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build"
        if torch.version.cuda.split(".")[0] != self.cuda_version.split(".")[0]:
            return (f"nvcc {self.cuda_version} ({self.nvcc}) does not match torch's CUDA "
                    f"{torch.version.cuda}; point CUDA_HOME at a CUDA "
                    f"{torch.version.cuda.split('.')[0]}.x toolkit")
        self.cmake = find_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if self.cmake is None:
            return "cmake not found (pip install cmake)"
        self.ninja = find_tool("ninja", "BIN_DIR", "ninja")
        if self.ninja is None:
            return "ninja not found (pip install ninja)"
        return None


PLAN = BuildPlan()


# Beside the built module: the torch it was compiled against (qwen3x/_library.py reads it).
TORCH_VERSION_FILE = "_C_torch_version.txt"


# The module keeps to Python's stable ABI from this version on (CMakeLists.txt USE_SABI): one
# _C.abi3.so for every CPython >= 3.10, and wheels tagged cp310-abi3.
LIMITED_API_TAG = "cp310"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    """Configures and builds csrc/ with CMake + Ninja, then puts the module
    where setuptools expects it (build_ext copies it into python/qwen3x/ for
    editable installs)."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # One tree per torch release: `make prebuilt` builds against another torch than the
        # checkout's own build, and neither should reconfigure (and recompile) the other.
        build_dir = ROOT / "build" / f"cmake-torch-{PLAN.torch_version}"
        verbose_ptxas = os.environ.get("QWEN3X_PTXAS_VERBOSE", "0") not in ("", "0")
        configure = [
            PLAN.cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={PLAN.ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={PLAN.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DQWEN3X_CUDA_ARCHS={PLAN.archs}",
            f"-DQWEN3X_VERSION={project_version()}",
            f"-DQWEN3X_PTXAS_VERBOSE={'ON' if verbose_ptxas else 'OFF'}",
        ]
        build = [PLAN.cmake, "--build", str(build_dir)]
        jobs = os.environ.get("MAX_JOBS", "").strip()
        if jobs:
            build += ["-j", jobs]

        start = time.monotonic()
        subprocess.run(configure, check=True, cwd=ROOT)
        subprocess.run(build, check=True, cwd=ROOT)
        seconds = time.monotonic() - start

        built = build_dir / "_C.abi3.so"
        if not built.is_file():
            raise RuntimeError(f"qwen3x: CMake finished but {built} is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        remove_other_builds(target)
        # the torch it was built against, read before loading it (qwen3x/_library.py)
        self.torch_stamp = target.with_name(TORCH_VERSION_FILE)
        self.torch_stamp.write_text(PLAN.torch_version + "\n")
        log(f"built qwen3x._C for {', '.join(arch_names(PLAN.archs))} ({PLAN.archs_from}) with nvcc "
            f"{PLAN.cuda_version} (torch {PLAN.torch_version}) in {seconds:.1f} s")

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the module and its torch stamp, both into python/qwen3x/."""
        super().copy_extensions_to_source()
        stamp = getattr(self, "torch_stamp", None)
        if stamp is not None:
            source_dir = Path(self.get_finalized_command("build_py").get_package_dir("qwen3x"))
            self.copy_file(str(stamp), str(source_dir / TORCH_VERSION_FILE))
            remove_other_builds(source_dir / "_C.abi3.so")


def remove_other_builds(module: Path) -> None:
    """Deletes the other builds of _C beside `module`: one named for a Python version
    (_C.cpython-311-*.so, from before the module was abi3) would be imported before it."""
    for other in module.parent.glob("_C.*.so"):
        if other.name != module.name:
            other.unlink()
            log(f"removed {other}, an older build of qwen3x._C that would shadow {module.name}")


class BuildPy(build_py):
    """Says, once per build, that the native module was left out and why."""

    def run(self) -> None:
        if not PLAN.build:
            log(f"not building the CUDA extension qwen3x._C: {PLAN.skip_reason}; installing "
                "the pure-Python package (torch.ops.qwen3x.* use the reference implementations)")
        super().run()


setup(
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("qwen3x._C")] if PLAN.build else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}} if PLAN.build else {},
    zip_safe=False,
)
