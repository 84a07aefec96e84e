"""rms_norm: Qwen3RMSNorm (variance in fp32, cast, then times weight) at every Qwen3 hidden size."""

from __future__ import annotations

from qwen3x import ops, reference

from ..harness import Case, Provider
from ..providers import liger_provider, qwen3x_provider, reference_provider, torch_compile_provider
from ..shapes import MODELS, RMS_EPS
from .common import ELEM, LONG_TOKENS, TOKENS, graph_worthy, hf_module, randn

HIDDEN = tuple(sorted({m.hidden for m in MODELS}))  # 1024, 2048, 2560, 4096


def rms_norm_bytes(tokens: int, hidden: int, elem: int = ELEM) -> int:
    """Read x and write y ([tokens, hidden]), read the weight once."""
    return 2 * tokens * hidden * elem + hidden * elem


def _reference(x):
    return reference.rms_norm(x["x"], x["weight"], RMS_EPS)


def _hf_eager(x):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = hf_module(lambda: Qwen3RMSNorm(x["x"].shape[-1], RMS_EPS), weight=x["weight"])
    return lambda: norm(x["x"])


def _liger(x):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    norm = hf_module(lambda: LigerRMSNorm(x["x"].shape[-1], eps=RMS_EPS), weight=x["weight"])
    return lambda: norm(x["x"])


def case(tokens: int, hidden: int) -> Case:
    def make_inputs(device):
        return {"x": randn(tokens, hidden, device=device), "weight": randn(hidden, device=device, scale=0.1) + 1}

    return Case(
        op="rms_norm",
        shape={"tokens": tokens, "hidden": hidden},
        make_inputs=make_inputs,
        reference=_reference,
        providers=[
            qwen3x_provider("rms_norm", lambda x: ops.rms_norm(x["x"], x["weight"], RMS_EPS)),
            reference_provider(_reference),
            torch_compile_provider(_reference),
            Provider("hf_eager", _hf_eager),
            liger_provider(_liger),
        ],
        bytes=rms_norm_bytes(tokens, hidden),
        cuda_graph=graph_worthy(tokens),
    )


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(1, 2048), case(4096, 2048)]
    # (at hidden 1024 a 16k-token call is about six waves of blocks on an H100: LONG_TOKENS)
    return [case(t, h) for h in HIDDEN for t in (*TOKENS, LONG_TOKENS)]


SUITE = {"rms_norm": cases}
