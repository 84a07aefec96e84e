"""Does a bad argument come back as a RuntimeError, or does it take the process down?

On the first H100 run (2026-11-26; torch 2.11, the extension built there) every argument check
whose message formats a number (a size, a shape, top_k) killed the Python process with SIGSEGV,
while the checks whose messages hold only text (a wrong dtype, a CPU tensor) raised as they
should. Neither this machine's compiler with torch 2.11's headers and libraries nor the CPU
emulator reproduces it. `make gpu` runs this before the tests: each case in a process of its own,
then the first crashing one again under cuda-gdb for a native backtrace (the device image has
cuda-gdb, no gdb), and what could differ there: the compilers, and which libstdc++ / libgcc_s the
process maps.

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
    # qwen3x checks with numbers (crashed on 2026-11-26)
    "qwen3x_number": "ops.moe_router(torch.zeros(4, 8, device='cuda'), 9)",
    "qwen3x_shape": "ops.moe_router(torch.zeros(8, device='cuda'), 2)",
}
# The numbered case again with torch's C++ stack traces shown / without addr2line symbolizing
# them: whether the crash is in capturing or printing the backtrace rather than in the message.
VARIANTS = {"TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"}
TIMEOUT_S = 90
GDB_TIMEOUT_S = 100  # make gpu gives the whole probe PROBE_S (150 s)


def _program(call: str) -> str:
    return (SETUP + "try:\n    " + call + "\nexcept (RuntimeError, ValueError) as e:\n"
            "    print(type(e).__name__ + ':', str(e).splitlines()[0])\nelse:\n    print('no error raised')\n")


def _run(call: str, extra_env: dict | None = None) -> str:
    env = dict(os.environ, **(extra_env or {}))
    try:
        r = subprocess.run([sys.executable, "-c", _program(call)], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    if r.returncode < 0:
        return f"CRASHED (signal {-r.returncode})"
    lines = (r.stdout.strip() or r.stderr.strip() or "(no output)").splitlines()
    return f"exit {r.returncode}: {lines[-1]}"


def _shell(command: str) -> str:
    r = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=TIMEOUT_S)
    return (r.stdout + r.stderr).strip()


def _environment() -> None:
    from qwen3x import _library  # noqa: PLC0415

    so = getattr(_library._C, "__file__", None)
    print("c++:", _shell("c++ --version | head -n 1"))
    print("nvcc host compiler (CUDAHOSTCXX):", os.environ.get("CUDAHOSTCXX", "(unset)"))
    if so:
        print("extension:", so)
        print(_shell(f"ldd {so} | grep -E 'stdc|gcc_s|libc10.so|libtorch_cpu'"))
        print(_shell(f"strings -a {so} | grep -m 3 -E '^GCC: '"))
    maps = _shell(f"{sys.executable} -c \"import torch, qwen3x._C; print(open('/proc/self/maps').read())\" "
                  "| grep -oE '/[^ ]*(libstdc\\+\\+|libgcc_s)[^ ]*' | sort -u")
    print("mapped by a process that imported torch and qwen3x._C:\n" + (maps or "(none found)"))


def main() -> int:
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("error path probe: no CUDA device; nothing to probe")
        return 0
    first_crash = None
    for name, call in CASES.items():
        verdict = _run(call)
        print(f"error path probe {name}: {verdict}")
        if verdict.startswith("CRASHED") and first_crash is None and name.startswith("qwen3x"):
            first_crash = call
    if first_crash is not None:
        for var, value in VARIANTS.items():
            print(f"error path probe qwen3x_number with {var}={value}: {_run(first_crash, {var: value})}")
        _environment()
        gdb = shutil.which("cuda-gdb")
        if gdb:
            script = "/tmp/qwen3x_error_probe.py"
            with open(script, "w") as f:
                f.write(_program(first_crash))
            try:
                r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, script],
                                   capture_output=True, text=True, timeout=GDB_TIMEOUT_S)
                tail = (r.stdout + r.stderr).strip().splitlines()
                print("cuda-gdb backtrace of the first crash:\n" + "\n".join(tail[-60:]))
            except subprocess.TimeoutExpired:
                print(f"cuda-gdb: no backtrace within {GDB_TIMEOUT_S} s")
        else:
            print("(no cuda-gdb on PATH: no native backtrace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
