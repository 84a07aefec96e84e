// Accurate sin and cos of an fp32 angle without local memory.
//
// Why not sincosf: libdevice's accurate sincosf is fine numerically, but its
// Payne-Hanek slow path (taken for |x| > ~1e5, which RoPE reaches: position
// 131071 x inv_freq[0] = 1 rad) keeps a small array on the stack, so every
// kernel that calls it gets a stack frame and LDL/STL traffic. And __sincosf
// is useless past a few radians. Here the argument is reduced modulo pi/2 in
// fp64 (exact enough for any |x| < 2^31, far past 131072 positions), then
// sin/cos of the reduced argument |r| <= pi/4 come from fp32 polynomials.
//
// Accuracy: the reduction error is ~1e-16 rad; the polynomials (Taylor series
// of sin to r^9 and cos to r^10, truncation < 3e-9 relative) evaluated with
// fp32 FMAs stay within 1.5 ulp of fp64 sin/cos (emulated on the host over all
// 131072 positions x 64 Qwen3 frequencies plus random angles in +-3e5; numpy's
// fp32 sin/cos measure the same), like sincosf (documented 2 ulp max).
// NaN/inf inputs give NaN.
#pragma once

#include <cuda_runtime.h>

namespace qwen3x {

namespace trig_detail {
constexpr double kTwoOverPi = 0.63661977236758134308;
// pi/2 = kPiOver2Hi + kPiOver2Lo, each a double.
constexpr double kPiOver2Hi = 1.5707963267948966192;
constexpr double kPiOver2Lo = 6.123233995736766036e-17;
// Taylor coefficients: sin r = r + r^3 (S3 + r^2 (S5 + r^2 (S7 + r^2 S9)))
constexpr float kS3 = -1.0f / 6.0f;
constexpr float kS5 = 1.0f / 120.0f;
constexpr float kS7 = -1.0f / 5040.0f;
constexpr float kS9 = 1.0f / 362880.0f;
// cos r = 1 + r^2 (C2 + r^2 (C4 + r^2 (C6 + r^2 (C8 + r^2 C10))))
constexpr float kC2 = -0.5f;
constexpr float kC4 = 1.0f / 24.0f;
constexpr float kC6 = -1.0f / 720.0f;
constexpr float kC8 = 1.0f / 40320.0f;
constexpr float kC10 = -1.0f / 3628800.0f;
constexpr int kQuadrantMask = 3;
}  // namespace trig_detail

__device__ __forceinline__ void sincos_accurate(float x, float* sin_out, float* cos_out) {
  using namespace trig_detail;
  // x = k * pi/2 + r, |r| <= pi/4 (+ rounding), k's low bits pick the quadrant.
  const double xd = static_cast<double>(x);
  const double k = rint(xd * kTwoOverPi);
  const double rd = fma(-k, kPiOver2Lo, fma(-k, kPiOver2Hi, xd));
  const float r = static_cast<float>(rd);
  const int quadrant = static_cast<int>(__double2ll_rn(k) & kQuadrantMask);

  const float r2 = r * r;
  const float sin_r = fmaf(r * r2, fmaf(r2, fmaf(r2, fmaf(r2, kS9, kS7), kS5), kS3), r);
  const float cos_r =
      fmaf(r2, fmaf(r2, fmaf(r2, fmaf(r2, fmaf(r2, kC10, kC8), kC6), kC4), kC2), 1.0f);

  // sin(k pi/2 + r), cos(k pi/2 + r) for k mod 4 = 0, 1, 2, 3.
  const bool swap = quadrant & 1;
  const float s = swap ? cos_r : sin_r;
  const float c = swap ? sin_r : cos_r;
  *sin_out = (quadrant & 2) ? -s : s;
  *cos_out = (quadrant == 1 || quadrant == 2) ? -c : c;
}

}  // namespace qwen3x
