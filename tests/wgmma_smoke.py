"""First contact of the Hopper (wgmma) mainloops with a GPU, each in a process of its own.

`make gpu` runs this before the test suite: a wgmma mainloop that faults (an illegal instruction
or address poisons the whole CUDA context) or answers wrongly would otherwise fail every test
that follows it in the same pytest process and waste a short GPU session. For each op family it
runs one small prefill-shaped call with <FAMILY>_MAINLOOP=wgmma in a subprocess and compares it
with the fp64 reference by the tolerance rule of qwen3x.testing. Prints one line per family and
writes ENV_FILE (argv[1]) with `QWEN3X_..._MAINLOOP=mma_sync` for each family that failed, so the
remaining steps still test everything else, and a failing family's whole stderr to
wgmma_smoke_<family>.log beside ENV_FILE; where wgmma cannot run at all (no extension, no sm_90
GPU, no sm_90a build) it writes nothing and says which.

The Hopper A/B candidates (QWEN3X_ATTENTION_OVERLAP=1: the overlapped attention loop, the
default; QWEN3X_ATTENTION_COMBINE=cluster: split-KV merged in a thread block cluster, which the
default runs at batch-1 decode) get runs of their own (AB_CASES; the overlapped loop only when the
attention family passed, else it counts as failed with it); a failing one is named in ENV_FILE's
QWEN3X_SMOKE_FAILED (comma-separated), which their GPU tests and benchmark providers read as "skip"
(qwen3x.testing.smoke_failed): a hang or a fault there would otherwise take a whole step with it;
a failed one also pins the setting's other value there (AB_PIN_ON_FAILURE: the serial loop, the L2
combine).

It also runs the decode chains launched with programmatic dependent launch (PDL, csrc/core/pdl.cuh:
the default where wgmma runs), eagerly and in a CUDA graph, against the same calls with
QWEN3X_PDL=0, bitwise; if that fails, ENV_FILE gets QWEN3X_PDL=0 and the later steps run without it.

Usage: python tests/wgmma_smoke.py OUT/mainloop.env
"""

from __future__ import annotations

import os
import subprocess
import sys

CASES = {
    "QWEN3X_ATTENTION_MAINLOOP": """
import torch
from qwen3x import ops, reference as R
from qwen3x.testing import assert_close_to_truth
torch.manual_seed(0)
q = torch.randn(2, 32, 200, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 8, 200, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(2, 8, 200, 128, device="cuda", dtype=torch.bfloat16)
out, lse = ops.attention(q, k, v, None, 128 ** -0.5, True)
torch.cuda.synchronize()
same, _ = R.attention(q, k, v, None, 128 ** -0.5, True)
truth, _ = R.attention(q.double(), k.double(), v.double(), None, 128 ** -0.5, True)
assert_close_to_truth(out, same, truth)
""",
    "QWEN3X_MOE_MAINLOOP": """
import torch
from qwen3x import ops, reference as R
from qwen3x.testing import assert_close_to_truth
torch.manual_seed(0)
T, E, k, H, I = 600, 8, 2, 2048, 768
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
gate_up = (torch.randn(E, 2 * I, H, device="cuda") * H ** -0.5).to(torch.bfloat16)
down = (torch.randn(E, H, I, device="cuda") * I ** -0.5).to(torch.bfloat16)
ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=-1)[:, :k].to(torch.int32)
w = torch.softmax(torch.rand(T, k, device="cuda"), -1).to(torch.bfloat16)
out = ops.moe_experts(x, ids, w, gate_up, down)
torch.cuda.synchronize()
same = R.moe_experts(x, ids, w, gate_up, down)
truth = R.moe_experts(x.double(), ids, w.double(), gate_up.double(), down.double())
assert_close_to_truth(out, same, truth)
""",
}
# The A/B candidates: setting -> (its value, a snippet run with it in force).
AB_CASES = {
    # the overlapped loop: the attention case above (208 CTAs of 64 rows, 4 key tiles each: one
    # prefetch in flight, the first and last tiles' blocks), then the serial loop: the same bits
    "QWEN3X_ATTENTION_OVERLAP": ("1", CASES["QWEN3X_ATTENTION_MAINLOOP"] + """
import os
os.environ["QWEN3X_ATTENTION_OVERLAP"] = "0"
serial, serial_lse = ops.attention(q, k, v, None, 128 ** -0.5, True)
assert torch.equal(out, serial) and torch.equal(lse, serial_lse), "the overlapped loop changed the answer"
"""),
    # the in-cluster combine: batch-1 decode, 8 kv heads x 4096 keys (8 CTAs: a cluster of 16 splits
    # each), eagerly and replayed in a CUDA graph
    "QWEN3X_ATTENTION_COMBINE": ("cluster", """
import torch
from qwen3x import ops, reference as R
from qwen3x.testing import assert_close_to_truth
torch.manual_seed(0)
q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
out, lse = ops.attention(q, k, v, None, 128 ** -0.5, False)
if torch.cuda.is_available():
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        g_out, g_lse = ops.attention(q, k, v, None, 128 ** -0.5, False)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, g_out) and torch.equal(lse, g_lse), "the graph replay changed the answer"
same, _ = R.attention(q, k, v, None, 128 ** -0.5, False)
truth, _ = R.attention(q.double(), k.double(), v.double(), None, 128 ** -0.5, False)
assert_close_to_truth(out, same, truth)
"""),
}
AB_NEEDS_WGMMA = {"QWEN3X_ATTENTION_OVERLAP"}  # candidates inside the attention wgmma mainloop
# Candidates that the defaults run (QWEN3X_ATTENTION_COMBINE=auto merges batch-1 decode in a
# cluster; QWEN3X_ATTENTION_OVERLAP=1 is the Hopper loop): a failed one also pins the setting to
# its other value in ENV_FILE, so the later steps' defaults do not run it.
SERIAL_LOOP = {"QWEN3X_ATTENTION_OVERLAP": "0"}
AB_PIN_ON_FAILURE = {"QWEN3X_ATTENTION_COMBINE": "l2", "QWEN3X_ATTENTION_OVERLAP": "0"}
# The decode chains (router -> GEMM1 -> GEMM2; qk_norm_rope -> attention -> split-KV combine)
# with PDL, then without (QWEN3X_PDL is read at each call): the same bits, eager and replayed.
PDL_CASE = """
import os
import torch
from qwen3x import ops
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
T, E, k, H, I = 1, 128, 8, 256, 128
x = torch.randn(T, H, device=dev, dtype=bf)
logits = torch.randn(T, E, device=dev, dtype=bf)
gate_up = (torch.randn(E, 2 * I, H, device=dev) * H ** -0.5).to(bf)
down = (torch.randn(E, H, I, device=dev) * I ** -0.5).to(bf)
q = torch.randn(1, 1, 32, 128, device=dev, dtype=bf)
kk = torch.randn(1, 1, 8, 128, device=dev, dtype=bf)
kc = torch.randn(1, 8, 1024, 128, device=dev, dtype=bf)
vc = torch.randn(1, 8, 1024, 128, device=dev, dtype=bf)
wq = torch.rand(128, device=dev, dtype=bf) + 0.5
wk = torch.rand(128, device=dev, dtype=bf) + 0.5
pos = torch.tensor([[1023]], device=dev)
inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128))

def step():
    y = ops.moe(x, logits, gate_up, down, k, True)
    qr, kr = ops.qk_norm_rope(q, kk, wq, wk, pos, inv_freq, 1.0, 1e-6)
    kc[:, :, 1023] = kr[0]
    out, lse = ops.attention(qr.transpose(1, 2), kc, vc, None, 128 ** -0.5, False)
    return y, out, lse

with_pdl = step()
if torch.cuda.is_available():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = step()
    g.replay()
    torch.cuda.synchronize()
os.environ["QWEN3X_PDL"] = "0"
plain = step()
for a, b in zip(with_pdl, plain):
    assert torch.equal(a, b), "eager: PDL changed the answer"
if torch.cuda.is_available():
    for a, b in zip(graphed, plain):
        assert torch.equal(a, b), "CUDA graph: PDL changed the answer"
"""
TIMEOUT_S = 60  # a healthy run: a few seconds of imports, milliseconds of GPU work


def _summary(returncode: int, stderr: str) -> str:
    """The exit status and the first line that names an error (torch's CUDA errors end with
    debugging advice, so the last line says little)."""
    lines = stderr.strip().splitlines()
    named = [line for line in lines if "Error" in line or "error" in line]
    return f"exit {returncode}: {(named or lines or ['(no output)'])[0].strip()}"


def _run(code: str, env: dict | None = None) -> tuple[bool, str, str]:
    """Runs a snippet in a process of its own: (passed, a one-line summary, its stderr)."""
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
        return r.returncode == 0, _summary(r.returncode, r.stderr), r.stderr
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return False, f"timed out after {TIMEOUT_S} s (a hang?)", stderr


def main() -> int:
    env_file = sys.argv[1]
    out_dir = os.path.dirname(os.path.abspath(env_file))
    from qwen3x import _library  # noqa: PLC0415
    from qwen3x.testing import SMOKE_FAILED_ENV, wgmma_available  # noqa: PLC0415

    open(env_file, "w").close()
    if not wgmma_available():
        why = ("the extension is not loaded" if _library._C is None
               else "no sm_90 GPU with an sm_90a build here")
        print(f"wgmma smoke: {why}; the mma.sync mainloops are the defaults")
        return 0
    fallbacks = []
    for var, code in CASES.items():  # (the attention family with its serial loop: the overlap is a candidate below)
        ok, detail, stderr = _run(code, dict(os.environ, **{var: "wgmma"}, **SERIAL_LOOP))
        print(f"wgmma smoke {var}: {'ok' if ok else 'FAILED, ' + detail}")
        if not ok:
            fallbacks.append(f"{var}=mma_sync")
            with open(os.path.join(out_dir, f"wgmma_smoke_{var}.log"), "w") as f:
                f.write(stderr)
    # Informational: the same calls without the per-stage proxy fence (benchmarks/NOTES.md asks
    # whether it costs time; this says whether these answers depend on it). Switches nothing.
    for var, code in CASES.items():
        if f"{var}=mma_sync" in fallbacks:
            continue
        ok, detail, _ = _run(code, dict(os.environ, **{var: "wgmma", "QWEN3X_WGMMA_PROXY_FENCE": "0"}, **SERIAL_LOOP))
        print(f"wgmma smoke {var} without the proxy fence (informational): {'ok' if ok else 'FAILED, ' + detail}")
    smoke_failed = []
    attention_failed = "QWEN3X_ATTENTION_MAINLOOP=mma_sync" in fallbacks
    for var, (value, code) in AB_CASES.items():
        if attention_failed and var in AB_NEEDS_WGMMA:  # a wgmma loop: failed with its family
            print(f"wgmma smoke {var}={value} (an A/B candidate): not run, the attention wgmma mainloop failed")
            smoke_failed.append(var)
            continue
        env = dict(os.environ, **{var: value}, **({"QWEN3X_ATTENTION_MAINLOOP": "wgmma"} if var in AB_NEEDS_WGMMA else {}))
        ok, detail, stderr = _run(code, env)
        print(f"wgmma smoke {var}={value} (an A/B candidate): {'ok' if ok else 'FAILED, ' + detail}")
        if not ok:
            smoke_failed.append(var)
            with open(os.path.join(out_dir, f"wgmma_smoke_{var}.log"), "w") as f:
                f.write(stderr)
    if smoke_failed:
        fallbacks.append(f"{SMOKE_FAILED_ENV}={','.join(smoke_failed)}")
        fallbacks += [f"{var}={AB_PIN_ON_FAILURE[var]}" for var in smoke_failed if var in AB_PIN_ON_FAILURE]
    # (under the settings pinned so far: its decode attention merges in a cluster by default)
    pinned = dict(line.split("=", 1) for line in fallbacks)
    ok, detail, stderr = _run(PDL_CASE, dict(os.environ, **pinned))
    print(f"PDL smoke (decode chains, eager and graphed, against QWEN3X_PDL=0): {'ok' if ok else 'FAILED, ' + detail}")
    if not ok:
        fallbacks.append("QWEN3X_PDL=0")
        with open(os.path.join(out_dir, "wgmma_smoke_QWEN3X_PDL.log"), "w") as f:
            f.write(stderr)
    with open(env_file, "w") as f:
        f.write("".join(line + "\n" for line in fallbacks))
    if fallbacks:
        print(f"wgmma smoke: the remaining steps run with {' '.join(fallbacks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
