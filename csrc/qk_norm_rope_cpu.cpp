// CPU build of the fused QK-RMSNorm + RoPE op: the same per-element math as the CUDA kernels
// (qk_norm_rope_math.h), looping over rows. Used for CPU tensors and by CI to test that math.
#include <cstring>
#include <vector>

#include "qk_norm_rope.h"
#include "qk_norm_rope_math.h"

namespace mvkernels {
namespace {

struct bf16_t { uint16_t bits; };

inline float to_acc(bf16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(_Float16 v) { return float(v); }
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

template <typename T> inline T from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline _Float16 from_acc<_Float16>(float v) { return _Float16(v); }
template <> inline bf16_t from_acc<bf16_t>(float v) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}
template <typename T> inline T from_acc(double v) { return from_acc<T>(float(v)); }
template <> inline double from_acc<double>(double v) { return v; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// One row (one head of one token). Forward when gy == nullptr, else backward (dw accumulated into dw[D]).
template <typename T>
void row(const T* x, const T* gy, T* out, const typename Acc<T>::type* w, const float* ang, int64_t D, float eps,
         typename Acc<T>::type* dw, typename Acc<T>::type* scratch) {
  using acc_t = typename Acc<T>::type;
  const int64_t half = D / 2;
  acc_t sum_sq = 0;
  for (int64_t i = 0; i < D; ++i) { acc_t v = to_acc(x[i]); sum_sq += v * v; }
  const acc_t r = rms_inv<acc_t>(sum_sq, int(D), acc_t(eps));
  if (gy == nullptr) {
    for (int64_t i = 0; i < half; ++i) {
      acc_t y_lo = to_acc(x[i]) * r * acc_t(w[i]), y_hi = to_acc(x[i + half]) * r * acc_t(w[i + half]);
      acc_t c_lo = std::cos(acc_t(ang[i])), s_lo = std::sin(acc_t(ang[i]));
      acc_t c_hi = std::cos(acc_t(ang[i + half])), s_hi = std::sin(acc_t(ang[i + half]));
      acc_t o_lo, o_hi;
      rope_pair_fwd<acc_t>(y_lo, y_hi, c_lo, s_lo, c_hi, s_hi, o_lo, o_hi);
      out[i] = from_acc<T>(o_lo);
      out[i + half] = from_acc<T>(o_hi);
    }
    return;
  }
  acc_t dot = 0;  // sum(dxhat * xhat)
  for (int64_t i = 0; i < half; ++i) {
    acc_t c_lo = std::cos(acc_t(ang[i])), s_lo = std::sin(acc_t(ang[i]));
    acc_t c_hi = std::cos(acc_t(ang[i + half])), s_hi = std::sin(acc_t(ang[i + half]));
    acc_t dy_lo, dy_hi;
    rope_pair_bwd<acc_t>(to_acc(gy[i]), to_acc(gy[i + half]), c_lo, s_lo, c_hi, s_hi, dy_lo, dy_hi);
    acc_t xh_lo = to_acc(x[i]) * r, xh_hi = to_acc(x[i + half]) * r;
    dw[i] += dy_lo * xh_lo;
    dw[i + half] += dy_hi * xh_hi;
    scratch[i] = dy_lo * acc_t(w[i]);
    scratch[i + half] = dy_hi * acc_t(w[i + half]);
    dot += scratch[i] * xh_lo + scratch[i + half] * xh_hi;
  }
  const acc_t dot_over_d = dot / acc_t(D);
  for (int64_t i = 0; i < D; ++i) out[i] = from_acc<T>(rms_grad<acc_t>(scratch[i], to_acc(x[i]) * r, dot_over_d, r));
}

template <typename T>
void run(const QKNormRopeArgs& a, bool backward) {
  using acc_t = typename Acc<T>::type;
  const int64_t n_tokens = a.B * a.S, D = a.D, H = a.H;
  const int64_t n_chunks = backward ? a.n_chunks : n_tokens;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t0 = backward ? c * n_tokens / n_chunks : c, t1 = backward ? (c + 1) * n_tokens / n_chunks : c + 1;
    std::vector<acc_t> dw(2 * D, acc_t(0)), scratch(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / a.S, s = t % a.S;
      const float* ang = a.angles + s * a.ang_ss;
      for (int64_t h = 0; h < 2 * H; ++h) {
        const bool is_q = h < H;
        const int64_t hh = is_q ? h : h - H;
        const T* x = static_cast<const T*>(is_q ? a.q : a.k) +
                     (is_q ? b * a.q_sb + s * a.q_ss + hh * a.q_sh : b * a.k_sb + s * a.k_ss + hh * a.k_sh);
        const int64_t o = ((b * a.S + s) * H + hh) * D;
        T* out = static_cast<T*>(is_q ? a.q_out : a.k_out) + o;
        const T* gy = backward ? static_cast<const T*>(is_q ? a.gq : a.gk) + o : nullptr;
        row<T>(x, gy, out, static_cast<const acc_t*>(is_q ? a.wq : a.wk), ang, D, a.eps, dw.data() + (is_q ? 0 : D), scratch.data());
      }
    }
    if (backward)
      for (int64_t i = 0; i < 2 * D; ++i) a.dw_partial[c * 2 * D + i] = float(dw[i]);
  }
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::f16: f(_Float16{}); break;
    case DType::bf16: f(bf16_t{}); break;
  }
}

}  // namespace

void qk_norm_rope_fwd_cpu(const QKNormRopeArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag)>(a, false); });
}
void qk_norm_rope_bwd_cpu(const QKNormRopeArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag)>(a, true); });
}

}  // namespace mvkernels
