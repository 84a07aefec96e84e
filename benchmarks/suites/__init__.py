"""Op suites: op name -> cases(quick) for every op family (one module each)."""

from __future__ import annotations

from typing import Callable

from ..harness import Case
from . import activation, attention, moe, norm, rope

SUITES: dict[str, Callable[[bool], list[Case]]] = {
    **norm.SUITE,
    **rope.SUITE,
    **activation.SUITE,
    **attention.SUITE,
    **moe.SUITE,
}
