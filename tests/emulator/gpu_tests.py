"""`pytest --emulate-gpu`: the GPU test files' own tests, on the CPU, through the emulator.

With the option (tests/conftest.py), tests marked `gpu` are not skipped on a machine without a
GPU; instead, for each of them:
  - torch.ops.qwen3x.* on CPU tensors run csrc/'s glue and the kernels' source through
    torch.ops.qwen3x_emu (build.build_ops()), not the references;
  - the test module sees a `torch` whose factories make on the CPU what the test asks for on
    "cuda" (`Tensor.cuda()` is the tensor itself, `Tensor.to("cuda")` stays on the CPU, and so
    do modules moved there), a no-op `poison_allocator` (uninitialized
    memory is NaN-filled instead: torch.utils.deterministic.fill_uninitialized_memory) and the
    emulated device's answer to `wgmma_available()` (an sm_90 device with sm_90a code: yes).
Tests that need what only a GPU has (CUDA graphs, streams, memory statistics, the real device's
errors) are deselected, as are parametrizations with a size above --emulate-max-size (time).
The judgements are the GPU tests' own: a pass here means the glue and kernels satisfy the GPU
test suite on the CPU model of CUDA, and that the tests themselves hold together.
"""

from __future__ import annotations

import types

import pytest
import torch

# Tests that need a real GPU's runtime (graphs, streams, memory accounting, device errors), that
# check what only the real build answers (the mainloop setting against the real device), or that
# test PyTorch's GPU backward (SDPA, grouped_mm) rather than qwen3x's kernels.
NEEDS_A_GPU = {
    "test_cuda_graph_decode", "test_cuda_graph_decode_many_splits_back_to_back",
    "test_varlen_deterministic_and_graph_capturable",
    "test_cuda_graph_capture_and_replay", "test_router_and_permute_capture_in_a_cuda_graph",
    "test_moe_op_cuda_graph_at_decode", "test_route_capture_in_a_cuda_graph",
    "test_backward_memory_is_linear_in_length", "test_mainloop_setting_is_checked",
    "test_backward_of_out_is_as_accurate_as_hf_training", "test_backward_through_grouped_gemms",
    # bad inputs: among them tensors on another device, which the emulated device (the CPU) is not
    "test_bad_inputs", "test_varlen_bad_inputs", "test_bad_inputs_raise_naming_the_op",
}
# Parametrizations about another device (the emulated device is the CPU itself).
NEEDS_A_GPU_CASES = {("test_bad_cuda_inputs_are_clear_errors", "[weight_on_cpu]"),
                     ("test_gate_bad_inputs_are_clear_errors", "[weight_on_cpu]")}
# Sizes no parameter names (minutes each on the CPU model).
TOO_SLOW = {"test_decode_131072_keys", "test_prefill_long", "test_moe_experts_16k_tokens"}


def _on_cpu(device):
    if device is None:
        return device
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cuda" else d


class CpuTorch(types.ModuleType):
    """torch, but tensors asked for on "cuda" are made on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name == "cuda":
            return types.SimpleNamespace(synchronize=lambda *a, **k: None, is_available=lambda: True)
        if name == "autocast":  # autocast("cuda", ...): the CPU's
            return lambda device_type, *a, **k: attr(_on_cpu(device_type).type, *a, **k)
        if callable(attr) and not isinstance(attr, type):
            def call(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _on_cpu(kwargs["device"])
                return attr(*args, **kwargs)
            return call
        return attr


def too_large(item, max_size: int) -> bool:
    """A parametrization with an integer (or a list of integers) above max_size."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in params.values():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (list, tuple)):
                if any(isinstance(x, int) and not isinstance(x, bool) and x > max_size for x in v):
                    return True
            elif isinstance(v, int) and not isinstance(v, bool) and v > max_size:
                return True
    return False


def select(config, items, max_size: int) -> None:
    dropped = [i for i in items if "gpu" in i.keywords
               and (i.originalname in NEEDS_A_GPU | TOO_SLOW or too_large(i, max_size)
                    or any(i.originalname == n and i.name.endswith(tail) for n, tail in NEEDS_A_GPU_CASES))]
    if dropped:
        ids = {id(i) for i in dropped}
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if id(i) not in ids]


OPS = ("rms_norm", "add_rms_norm", "qk_norm_rope", "qk_norm_rope_", "qk_norm_rope_cache_", "silu_and_mul",
       "attention", "attention_varlen", "qk_norm_rope_attention", "moe_gate", "moe_router", "moe_permute", "moe_route",
       "moe_experts", "moe")


@pytest.fixture(scope="session")
def emulated_kernels():
    """torch.ops.qwen3x.* on CPU tensors -> the emulated glue and kernels, for the session."""
    from emulator import build

    build.build_ops()
    lib = torch.library.Library("qwen3x", "IMPL")
    for op in OPS:
        lib.impl(op, getattr(torch.ops.qwen3x_emu, op), "CPU", allow_override=True)
    yield
    lib._destroy()


def emulate(request, monkeypatch) -> None:
    """Per GPU test: its module's view of torch and of the device."""
    request.getfixturevalue("emulated_kernels")
    module = request.module
    monkeypatch.setattr(module, "torch", CpuTorch())
    for name, value in (("poison_allocator", lambda *a, **k: None), ("wgmma_available", lambda: True)):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):  # t.to("cuda", ...), t.to(device="cuda"): the CPU
        args = tuple(_on_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    request.addfinalizer(lambda: torch.use_deterministic_algorithms(was))
