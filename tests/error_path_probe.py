"""Does a bad argument come back as an exception (ValueError), or does it take the process down?

On the first H100 run (2026-11-26; torch 2.11, the extension built there) every argument check
whose message streamed a number into c10::str's std::ostringstream (a size, a shape, top_k)
killed the Python process with SIGSEGV, while the checks whose messages held only text (a wrong
dtype, a CPU tensor) raised as they should. Neither this machine's compiler with torch 2.11's
headers and libraries nor the CPU emulator reproduces it. Since then qwen3x builds its messages
without iostreams (csrc/core/message.h). `make gpu` runs this before the tests, each case in a
process of its own:
- qwen3x's checks, text and numbers: do they raise now;
- torch's own numbered error: does the environment alone crash;
- the old mechanism in isolation: a tiny library compiled there with nvcc as qwen3x is (C++20,
  hidden visibility), formatting a number with c10::str and throwing TORCH_CHECK's error, called
  through ctypes after `import torch`, alone and after the imports pytest's plugins made (scipy,
  sklearn, pandas, pyarrow were loaded in the crashed workers);
- which library each of that library's stream symbols binds to (LD_DEBUG=bindings);
and for the first crash a cuda-gdb backtrace, plus the compilers and the libstdc++ / libgcc_s
the process maps.

Usage: python tests/error_path_probe.py   (prints its findings; exit 0 whatever they are)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

SETUP = "import torch, qwen3x\nfrom qwen3x import ops\n"
CASES = {
    # torch's own check, a number in the message: does the environment alone crash?
    "torch_number": "torch.zeros(2, 3, device='cuda').view(4)",
    # qwen3x checks with text only (raised fine on 2026-11-26)
    "qwen3x_text": "ops.rms_norm(torch.randn(4, 64, device='cuda'), torch.randn(64))",
    # qwen3x checks with numbers (crashed on 2026-11-26, before core/message.h)
    "qwen3x_number": "ops.moe_router(torch.zeros(4, 8, device='cuda'), 9)",
    "qwen3x_shape": "ops.moe_router(torch.zeros(8, device='cuda'), 2)",
}
# The crashed pytest workers had imported these (transformers' and pytest plugins' imports).
PYTEST_IMPORTS = ("scipy.stats", "scipy.optimize", "scipy.spatial", "sklearn.metrics", "pandas", "pyarrow")

# c10::str and TORCH_CHECK as qwen3x's glue used them before core/message.h.
STREAM_SOURCE = r"""
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <cstring>
#include <string>
static void copy_out(const std::string& s, char* out, int n) {
  std::strncpy(out, s.c_str(), n - 1);
  out[n - 1] = 0;
}
extern "C" __attribute__((visibility("default"))) int stream_format(long v, char* out, int n) {
  copy_out(c10::str("formatted ", v, " and ", 3, " via c10::str"), out, n);
  return 0;
}
extern "C" __attribute__((visibility("default"))) int stream_check(long v, char* out, int n) {
  try {
    TORCH_CHECK(v == 0, "probe: expected 0, got ", v);
  } catch (const c10::Error& e) {
    copy_out(e.what_without_backtrace(), out, n);
    return 1;
  }
  return 0;
}
"""
STREAM_CALLS = {
    "stream_format": "r = lib.stream_format(42, buf, len(buf))",
    "stream_check": "r = lib.stream_check(42, buf, len(buf))",
}

# A crashing case again with torch's C++ stack traces shown / without addr2line symbolizing them:
# whether the crash is in capturing or printing the backtrace rather than in the message.
VARIANTS = {"TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"}
TIMEOUT_S = 60
BUILD_TIMEOUT_S = 90
GDB_TIMEOUT_S = 100  # make gpu gives the whole probe PROBE_S (180 s)
STREAM_LIB = "/tmp/qwen3x_probe_stream.so"


def _program(call: str) -> str:
    return (SETUP + "try:\n    " + call + "\nexcept (RuntimeError, ValueError) as e:\n"
            "    print(type(e).__name__ + ':', str(e).splitlines()[0])\nelse:\n    print('no error raised')\n")


def _stream_program(call: str, imports: tuple[str, ...] = ()) -> str:
    pre = "".join(f"try:\n    import {m}\nexcept ImportError:\n    pass\n" for m in imports)
    return ("import ctypes, torch\n" + pre + f"lib = ctypes.CDLL({STREAM_LIB!r})\n"
            "buf = ctypes.create_string_buffer(256)\n" + call + "\nprint(r, buf.value.decode())\n")


def _run_program(program: str, extra_env: dict | None = None) -> str:
    env = dict(os.environ, **(extra_env or {}))
    try:
        r = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    if r.returncode < 0:
        return f"CRASHED (signal {-r.returncode})"
    lines = (r.stdout.strip() or r.stderr.strip() or "(no output)").splitlines()
    return f"exit {r.returncode}: {lines[-1]}"


def _run(call: str, extra_env: dict | None = None) -> str:
    return _run_program(_program(call), extra_env)


def _shell(command: str, timeout: float = TIMEOUT_S) -> str:
    r = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
    return (r.stdout + r.stderr).strip()


def _build_stream_lib() -> str | None:
    """STREAM_SOURCE compiled as qwen3x's CMake build compiles its .cu glue; None with the reason
    printed when it cannot be built."""
    import torch  # noqa: PLC0415
    from torch.utils import cpp_extension  # noqa: PLC0415

    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    src = "/tmp/qwen3x_probe_stream.cu"
    with open(src, "w") as f:
        f.write(STREAM_SOURCE)
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd = [nvcc, "-std=c++20", "-O3", "-shared", "-Xcompiler=-fPIC,-fvisibility=hidden,-fvisibility-inlines-hidden",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{d}" for d in cpp_extension.include_paths()], src, "-o", STREAM_LIB,
           f"-L{lib_dir}", "-lc10", f"-Xlinker=-rpath,{lib_dir}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"error path probe stream library: not built ({e})")
        return None
    if r.returncode != 0:
        print("error path probe stream library: not built:\n" + (r.stdout + r.stderr)[-2000:])
        return None
    return STREAM_LIB


def _bindings(program: str) -> str:
    """Which library each stream / locale symbol of the probe library and of qwen3x._C is bound
    to (all bound at load: LD_BIND_NOW)."""
    program = program.replace("import ctypes, torch\n", "import ctypes, torch, qwen3x._C\n", 1)
    env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT="/tmp/qwen3x_probe_ld", LD_BIND_NOW="1")
    for f in os.listdir("/tmp"):
        if f.startswith("qwen3x_probe_ld"):
            os.remove(os.path.join("/tmp", f))
    try:
        subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    return _shell("cat /tmp/qwen3x_probe_ld* | grep -E 'binding file [^ ]*(qwen3x_probe_stream|/_C\\.(abi3|cpython))' "
                  "| grep -E 'ostringstream|_M_insert|locale|num_put|numpunct|ios_base|basic_ios|_ZNSol' "
                  "| sed -E 's/^[[:space:]]*[0-9]+:[[:space:]]*//; s/^[[:space:]]+//' | sort -u | head -n 60")


def _environment() -> None:
    from qwen3x import _library  # noqa: PLC0415

    so = getattr(_library._C, "__file__", None)
    print("c++:", _shell("c++ --version | head -n 1"))
    print("nvcc:", _shell("nvcc --version | tail -n 2 | head -n 1"))
    print("nvcc host compiler (CUDAHOSTCXX):", os.environ.get("CUDAHOSTCXX", "(unset)"))
    if so:
        print("extension:", so)
        print(_shell(f"ldd {so} | grep -E 'stdc|gcc_s|libc10.so|libtorch_cpu'"))
        print(_shell(f"strings -a {so} | grep -m 3 -E '^GCC: '"))
    maps = _shell(f"{sys.executable} -c \"import torch, qwen3x._C; print(open('/proc/self/maps').read())\" "
                  "| grep -oE '/[^ ]*(libstdc\\+\\+|libgcc_s)[^ ]*' | sort -u")
    print("mapped by a process that imported torch and qwen3x._C:\n" + (maps or "(none found)"))


def _backtrace(program: str) -> None:
    gdb = shutil.which("cuda-gdb")
    if not gdb:
        print("(no cuda-gdb on PATH: no native backtrace)")
        return
    script = "/tmp/qwen3x_error_probe.py"
    with open(script, "w") as f:
        f.write(program)
    try:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, script],
                           capture_output=True, text=True, timeout=GDB_TIMEOUT_S)
        tail = (r.stdout + r.stderr).strip().splitlines()
        print("cuda-gdb backtrace of the first crash:\n" + "\n".join(tail[-60:]))
    except subprocess.TimeoutExpired:
        print(f"cuda-gdb: no backtrace within {GDB_TIMEOUT_S} s")


def main() -> int:
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("error path probe: no CUDA device; nothing to probe")
        return 0
    first_crash = None
    for name, call in CASES.items():
        verdict = _run(call)
        print(f"error path probe {name}: {verdict}")
        if verdict.startswith("CRASHED") and first_crash is None:
            first_crash = _program(call)
            for var, value in VARIANTS.items():
                print(f"error path probe {name} with {var}={value}: {_run(call, {var: value})}")
    if _build_stream_lib():
        for name, call in STREAM_CALLS.items():
            for imports, label in (((), ""), (PYTEST_IMPORTS, " after pytest's imports")):
                program = _stream_program(call, imports)
                verdict = _run_program(program)
                print(f"error path probe {name}{label}: {verdict}")
                if verdict.startswith("CRASHED") and first_crash is None:
                    first_crash = program
        print("stream symbols of the probe library bound to:\n" +
              _bindings(_stream_program(STREAM_CALLS["stream_check"], PYTEST_IMPORTS)))
    _environment()
    if first_crash is not None:
        _backtrace(first_crash)
    return 0


if __name__ == "__main__":
    sys.exit(main())
