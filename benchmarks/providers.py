"""Providers shared by several suites: qwen3x, reference, torch_compile, and optional libraries.

Suite-specific peers (HF layer code, SDPA backends, flex, grouped GEMMs) live in their suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable

import qwen3x
import torch
from qwen3x._library import pdl_available, wgmma_available
from qwen3x.testing import smoke_failed

from .harness import Inputs, Provider

MEM_BUDGET_BYTES = 24 * 2**30  # temporaries a provider may need (beyond its inputs) before it is skipped
COMPILE_RECOMPILE_LIMIT = 1024  # one compiled reference serves every shape of its suite
# Inputs whose dim 0 is the token count. torch_compile compiles that dim symbolic and every other
# dim static: one compile per op configuration (hidden size, head layout, experts, dtype) and one
# for a single token (0/1 specialization), not one per token count. Per token count, 104 cases
# would each compile in the suite's own time (about 5-10 s a compile on a GPU machine: more than
# the suite's 10-minute budget by itself), and a server with varying batch sizes sees the symbolic
# kernel too (torch.compile's automatic dynamic shapes).
TOKEN_INPUTS = ("x", "residual", "q", "k", "positions", "router_logits", "expert_ids", "expert_weights",
                "hidden_states")


def missing(module: str) -> str | None:
    """A skip note when ``module`` is not installed, else None."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not installed"


def over_budget(nbytes: float, what: str) -> str | None:
    """A skip note when a provider would need more than MEM_BUDGET_BYTES of temporaries."""
    if nbytes <= MEM_BUDGET_BYTES:
        return None
    return f"{what} needs about {nbytes / 2**30:.0f} GiB (budget {MEM_BUDGET_BYTES / 2**30:.0f} GiB)"


def qwen3x_provider(kernel_op: str, call: Callable[[Inputs], Any], **kw) -> Provider:
    """``call(inputs)`` runs the qwen3x op; skipped when this build has no CUDA kernel for it
    (it would only time the reference again)."""
    skip = kw.pop("skip", None)
    if skip is None and not qwen3x.has_cuda_kernel(kernel_op):
        skip = f"no CUDA kernel for qwen3x.{kernel_op} in this build (it runs the reference)"
    return Provider("qwen3x", lambda x: lambda: call(x), skip=skip, **kw)


@contextlib.contextmanager
def env_setting(name: str, value: str):
    """os.environ[name] = value for the calls inside (the C++ side reads it per call)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _wgmma_skip(env_name: str, eligible: bool) -> str | None:
    """Why a variant of qwen3x's Hopper mainloop cannot be timed here (None: it can): the shape is
    not one the wgmma mainloop serves, or qwen3x runs mma.sync here anyway."""
    if not eligible:
        return "the Hopper mainloop does not serve this shape"
    if not wgmma_available() or os.environ.get(env_name) == "mma_sync":
        return f"qwen3x runs mma.sync here already ({env_name}={os.environ.get(env_name, 'auto')})"
    return None


def _env_variant(name: str, setting: tuple[str, str], call: Callable[[Inputs], Any], **kw) -> Provider:
    """qwen3x called with one environment setting (name, value) in force, e.g. a mainloop choice."""

    def build(x):
        def run():
            with env_setting(*setting):
                return call(x)
        return run

    kw.setdefault("note", "=".join(setting))
    return Provider(name, build, **kw)


def mma_sync_provider(env_name: str, call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x with its sm_80 mainloop (mma.sync) where the default is wgmma (env_name =
    mma_sync): the measurement that decides whether a Hopper mainloop pays. Skipped where both
    would run the same kernel."""
    return _env_variant("qwen3x_mma_sync", (env_name, "mma_sync"), call, skip=_wgmma_skip(env_name, eligible),
                        graphable=False, **kw)


def no_fence_provider(env_name: str, call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x's wgmma mainloop without the fence.proxy.async after each stage's cp.async wait
    (QWEN3X_WGMMA_PROXY_FENCE=0): what the fence costs (benchmarks/NOTES.md, "A suspect to check
    first"), in the same run. The PTX memory model asks for the fence; an A/B, not a setting."""
    return _env_variant("qwen3x_no_fence", ("QWEN3X_WGMMA_PROXY_FENCE", "0"), call,
                        skip=_wgmma_skip(env_name, eligible), graphable=False, **kw)


def serial_provider(env_name: str, call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x's Hopper attention loop with each tile's softmax after its P V wait
    (QWEN3X_ATTENTION_OVERLAP=0) instead of beside the previous tile's P V (the default, FA3's
    intra-warpgroup overlap): the A/B kept for one more run (benchmarks/NOTES.md), in the same run.
    Same bits either way."""
    return _env_variant("qwen3x_serial", ("QWEN3X_ATTENTION_OVERLAP", "0"), call,
                        skip=_wgmma_skip(env_name, eligible) or smoke_failed("QWEN3X_ATTENTION_OVERLAP"),
                        graphable=False, **kw)


def _decode_variant(name: str, setting: tuple[str, str], call: Callable[[Inputs], Any], eligible: bool,
                    unavailable: str | None, **kw) -> Provider:
    """An environment-setting variant of qwen3x for decode-sized cases (graph-capturable: the C++
    side reads the setting while the launches are captured); `unavailable`: why the setting
    changes nothing on this machine (the skip note), or None."""
    skip = "not a decode-sized case" if not eligible else unavailable
    return _env_variant(name, setting, call, skip=skip, **kw)


def no_pdl_provider(call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x with plain launches (QWEN3X_PDL=0) where its decode chains use programmatic
    dependent launch (an sm_90 GPU, sm_90a build): what the launch overlap saves, in the same run."""
    unavailable = None if pdl_available() else "qwen3x launches plainly here already (no sm_90 + sm_90a, or QWEN3X_PDL=0)"
    return _decode_variant("qwen3x_no_pdl", ("QWEN3X_PDL", "0"), call, eligible, unavailable, **kw)


def cluster_combine_provider(call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x with split-KV's splits always merged inside a thread block cluster, through distributed
    shared memory (QWEN3X_ATTENTION_COMBINE=cluster: at most 16 splits, no workspace, no device-wide
    marks), also where qwen3x's default (auto) merges through L2 (grids of more than one wave):
    where the boundary lies, in the same run. Skipped off sm_90 + sm_90a, where the setting
    changes nothing."""
    unavailable = (smoke_failed("QWEN3X_ATTENTION_COMBINE") if wgmma_available()
                   else "thread block clusters need an sm_90 GPU and a build with sm_90a")
    return _decode_variant("qwen3x_cluster", ("QWEN3X_ATTENTION_COMBINE", "cluster"), call, eligible, unavailable, **kw)


def l2_combine_provider(call: Callable[[Inputs], Any], eligible: bool, **kw) -> Provider:
    """qwen3x with split-KV's splits always merged through L2 by the last split to arrive
    (QWEN3X_ATTENTION_COMBINE=l2), also where qwen3x's default (auto) merges them in a cluster
    (batch-1 decode on sm_90): what the cluster merge saves, in the same run. Skipped off
    sm_90 + sm_90a, where qwen3x merges through L2 anyway."""
    unavailable = None if wgmma_available() else "qwen3x merges through L2 here already (no sm_90 + sm_90a)"
    return _decode_variant("qwen3x_l2", ("QWEN3X_ATTENTION_COMBINE", "l2"), call, eligible, unavailable, **kw)


def reference_provider(fn: Callable[[Inputs], Any], **kw) -> Provider:
    """qwen3x.reference, called directly (no op registry, no validation)."""
    return Provider("reference", lambda x: lambda: fn(x), **kw)


_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), once per fn, with the recompile limits raised for many shapes. Dims are
    static unless marked (mark_token_dims): no automatic dynamic shapes, so a new hidden size
    compiles a new static kernel rather than turning the hidden dim symbolic."""
    if fn not in _compiled:
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), COMPILE_RECOMPILE_LIMIT))
        cfg.automatic_dynamic_shapes = False
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def mark_token_dims(x: Inputs) -> None:
    """Dim 0 of the TOKEN_INPUTS tensors of x: symbolic for torch.compile (a size of 1 stays
    specialized)."""
    for name in TOKEN_INPUTS:
        t = x.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def torch_compile_provider(fn: Callable[[Inputs], Any], **kw) -> Provider:
    """torch.compile of the reference (compiled on the correctness call, so never timed), the
    token dim symbolic (TOKEN_INPUTS)."""

    def build(x):
        compiled_fn = compiled(fn)
        mark_token_dims(x)
        return lambda: compiled_fn(x)

    kw.setdefault("note", "token count symbolic, other dims static")
    return Provider("torch_compile", build, **kw)


LIGER_MISSING = missing("liger_kernel")


def liger_provider(build: Callable[[Inputs], Callable[[], Any]], **kw) -> Provider:
    return Provider("liger", build, skip=LIGER_MISSING, **kw)
