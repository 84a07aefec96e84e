"""The tolerance rule, written once (../shared/DESIGN.md section 4).

A result is judged against a high-precision "truth" (the reference run in fp64): its error must be
at most RATIO x the error of the same-dtype PyTorch reference, plus a small floor. A failure
prints the worst elements, not just False.
"""

from __future__ import annotations

import torch

RATIO = 2.0
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _worst(out: torch.Tensor, truth: torch.Tensor, n: int = 5) -> str:
    err = (out.double() - truth.double()).abs().flatten()
    idx = torch.topk(err, min(n, err.numel())).indices
    rows = []
    for i in idx.tolist():
        pos = list(torch.unravel_index(torch.tensor(i), out.shape))
        rows.append(f"  at {[int(p) for p in pos]}: got {out.flatten()[i].item():.6g}, "
                    f"truth {truth.flatten()[i].item():.6g}, err {err[i].item():.3g}")
    return "\n".join(rows)


def assert_close_to_truth(out: torch.Tensor, same_dtype_ref: torch.Tensor, truth: torch.Tensor, floor=None):
    assert out.shape == truth.shape, f"shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in output:\n" + _worst(out.nan_to_num(1e30), truth)
    floor = FLOORS[out.dtype] if floor is None else floor
    err = (out.double() - truth.double()).abs().max().item()
    ref_err = (same_dtype_ref.double() - truth.double()).abs().max().item()
    bound = RATIO * ref_err + floor
    assert err <= bound, f"max error {err:.3g} > {RATIO} x reference error {ref_err:.3g} + {floor:g}\n" + _worst(out, truth)


def assert_rel_close(out: torch.Tensor, expected: torch.Tensor, rel: float):
    """max |out - expected| <= rel * max |expected| (the model-parity rule)."""
    err = (out.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x max |expected| {scale:.3g}\n" + _worst(out, expected)
