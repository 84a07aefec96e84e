"""silu_and_mul: SwiGLU activation on [gate | up] at every Qwen3 MLP / expert width.

For the MoE widths, ``tokens`` counts token-expert pairs (rows). HF computes exactly the
reference's formula (act_fn(gate) * up), so there is no separate hf_eager peer.
"""

from __future__ import annotations

from qwen3x import ops, reference

from ..harness import Case
from ..providers import liger_provider, qwen3x_provider, reference_provider, torch_compile_provider
from ..shapes import MODELS
from .common import ELEM, TOKENS, graph_worthy, randn

INTER = tuple(dict.fromkeys(m.mlp_inter for m in MODELS))  # 3072, 9728, 768, 1536


def silu_and_mul_bytes(tokens: int, inter: int, elem: int = ELEM) -> int:
    """Read [tokens, 2 * inter], write [tokens, inter]."""
    return 3 * tokens * inter * elem


def _reference(x):
    return reference.silu_and_mul(x["x"])


def _liger(x):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    gate, up = (t.contiguous() for t in x["x"].chunk(2, dim=-1))  # Liger takes two contiguous tensors
    return lambda: LigerSiLUMulFunction.apply(gate, up)


def case(tokens: int, inter: int) -> Case:
    return Case(
        op="silu_and_mul",
        shape={"tokens": tokens, "inter": inter},
        make_inputs=lambda device: {"x": randn(tokens, 2 * inter, device=device)},
        reference=_reference,
        providers=[
            qwen3x_provider("silu_and_mul", lambda x: ops.silu_and_mul(x["x"])),
            reference_provider(_reference),
            torch_compile_provider(_reference),
            liger_provider(_liger, note="gate and up split into contiguous tensors untimed"),
        ],
        bytes=silu_and_mul_bytes(tokens, inter),
        cuda_graph=graph_worthy(tokens),
    )


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(1, 3072), case(4096, 9728)]
    return [case(t, i) for i in INTER for t in TOKENS]


SUITE = {"silu_and_mul": cases}
