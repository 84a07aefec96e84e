"""fp32 operations as the GPU performs them, for the element-wise kernel models (rope, norm, silu,
router). Values are float32 numpy arrays; numpy's float32 arithmetic rounds every operation to
nearest even, like CUDA code built without fast math.

  fma32            fmaf / a contracted FFMA, correctly rounded
  rsqrtf, expf     correctly rounded stand-ins for the GPU's (rsqrtf <= 2 ulp, expf <= 2 ulp per the
                   CUDA guide); RSQRT_ULP_SHIFT moves rsqrtf's result to test a model's sensitivity
  sincos_accurate  csrc/core/trig.cuh sincos_accurate, operation by operation
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def fma32(a, b, c):
    """Correctly rounded fp32 fma(a, b, c). a * b is exact in fp64; p + c is rounded to fp64
    with round-to-odd (TwoSum error as a sticky bit), then to fp32: exact, as 53 >= 24 + 2."""
    a = np.asarray(a, np.float32).astype(np.float64)
    b = np.asarray(b, np.float32).astype(np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a * b
        s = p + c
        bp = s - c
        err = (p - bp) + (c - (s - bp))
        finite = np.isfinite(s) & np.isfinite(err)
        even = (np.atleast_1d(s).view(np.uint64).reshape(np.shape(s)) & 1) == 0
        to_odd = finite & (err != 0) & even
        s = np.where(to_odd, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


# ulps by which rsqrtf's result is moved (toward +inf if > 0); a model's checks should pass for
# any value in [-2, 2], the GPU's documented error.
RSQRT_ULP_SHIFT = 0


def rsqrtf(x):
    x = np.asarray(x, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (1.0 / np.sqrt(x.astype(np.float64))).astype(np.float32)
    for _ in range(abs(RSQRT_ULP_SHIFT)):
        r = np.nextafter(r, np.float32(np.inf if RSQRT_ULP_SHIFT > 0 else 0)).astype(np.float32)
    return r


def expf(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- core/trig.cuh
_TWO_OVER_PI = 0.63661977236758134308
_PI_OVER_2_HI = 1.5707963267948966192
_PI_OVER_2_LO = 6.123233995736766036e-17
# The coefficients are fp32 divisions of fp32 constants, as in trig_detail.
_S3 = np.float32(-1.0) / np.float32(6.0)
_S5 = np.float32(1.0) / np.float32(120.0)
_S7 = np.float32(-1.0) / np.float32(5040.0)
_S9 = np.float32(1.0) / np.float32(362880.0)
_C2 = np.float32(-0.5)
_C4 = np.float32(1.0) / np.float32(24.0)
_C6 = np.float32(-1.0) / np.float32(720.0)
_C8 = np.float32(1.0) / np.float32(40320.0)
_C10 = np.float32(-1.0) / np.float32(3628800.0)

_reduced: dict[float, tuple[float, int]] = {}


def _fma64(a: float, b: float, c: float) -> float:
    """Correctly rounded fp64 fma, through exact rationals."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _reduce(x: float) -> tuple[float, int]:
    """x = k pi/2 + r in fp64 (rint, two fmas): (r, k mod 4). Memoized: rope reuses angles."""
    hit = _reduced.get(x)
    if hit is None:
        if not np.isfinite(x):
            hit = (float("nan"), 0)
        else:
            k = float(np.rint(x * _TWO_OVER_PI))
            hit = (_fma64(-k, _PI_OVER_2_LO, _fma64(-k, _PI_OVER_2_HI, x)), int(k) & 3)
        _reduced[x] = hit
    return hit


def sincos_accurate(x):
    """trig.cuh sincos_accurate on an fp32 array: (sin, cos), NaN for NaN / inf."""
    x = np.asarray(x, np.float32)
    reduced = [_reduce(float(v)) for v in x.reshape(-1)]
    r = np.array([rd for rd, _ in reduced], np.float64).astype(np.float32).reshape(x.shape)
    quadrant = np.array([q for _, q in reduced], np.int64).reshape(x.shape)
    r2 = (r * r).astype(np.float32)
    r3 = (r * r2).astype(np.float32)
    sin_r = fma32(r3, fma32(r2, fma32(r2, fma32(r2, _S9, _S7), _S5), _S3), r)
    cos_r = fma32(r2, fma32(r2, fma32(r2, fma32(r2, fma32(r2, _C10, _C8), _C6), _C4), _C2), np.float32(1.0))
    swap = (quadrant & 1).astype(bool)
    s = np.where(swap, cos_r, sin_r)
    c = np.where(swap, sin_r, cos_r)
    sin_out = np.where(quadrant & 2, -s, s).astype(np.float32)
    cos_out = np.where((quadrant == 1) | (quadrant == 2), -c, c).astype(np.float32)
    return sin_out, cos_out
