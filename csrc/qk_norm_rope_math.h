// Per-element math of the fused per-head RMSNorm + rotate-half RoPE, shared by the CPU build and the CUDA
// kernels so both paths compute the same function (the CPU path is what CI can test).
//
// One "row" is one head of one token: x[0..D). Rotate-half pairs are (i, i + D/2): with y = rmsnorm(x) * w,
//   out[i]       = y[i]       * cos(a[i])       - y[i + D/2] * sin(a[i])
//   out[i + D/2] = y[i + D/2] * cos(a[i + D/2]) + y[i]       * sin(a[i + D/2])
// which is x*cos(a) + rotate_half(x)*sin(a) for a full [D] angle row (upstream's table is [phi, phi]).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define MV_HD __host__ __device__ __forceinline__
#else
#define MV_HD inline
#endif

namespace mvkernels {

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.
template <typename acc_t>
MV_HD acc_t rms_inv(acc_t sum_sq, int D, acc_t eps) {
  return acc_t(1) / std::sqrt(sum_sq / acc_t(D) + eps);
}

// Forward rotation of one pair of normalised, weighted values.
template <typename acc_t>
MV_HD void rope_pair_fwd(acc_t y_lo, acc_t y_hi, acc_t c_lo, acc_t s_lo, acc_t c_hi, acc_t s_hi,
                         acc_t& o_lo, acc_t& o_hi) {
  o_lo = y_lo * c_lo - y_hi * s_lo;
  o_hi = y_hi * c_hi + y_lo * s_hi;
}

// Transpose of the rotation: gradient w.r.t. (y_lo, y_hi) from the gradient w.r.t. (o_lo, o_hi).
template <typename acc_t>
MV_HD void rope_pair_bwd(acc_t g_lo, acc_t g_hi, acc_t c_lo, acc_t s_lo, acc_t c_hi, acc_t s_hi,
                         acc_t& dy_lo, acc_t& dy_hi) {
  dy_lo = g_lo * c_lo + g_hi * s_hi;
  dy_hi = g_hi * c_hi - g_lo * s_lo;
}

// Gradient through xhat = x * r with r = rms_inv(sum x^2): dx = r * (dxhat - xhat * sum(dxhat * xhat) / D).
template <typename acc_t>
MV_HD acc_t rms_grad(acc_t dxhat, acc_t xhat, acc_t dot_over_d, acc_t r) {
  return r * (dxhat - xhat * dot_over_d);
}

}  // namespace mvkernels
