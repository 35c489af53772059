// Launch interface of the Hopper (sm_90a) forward and backward kernels of mv_attention. Plain pointers, sizes, strides.
#pragma once
#include <cstdint>

namespace mvkernels {

struct MvAttnSm90Args {
  // q [B, Sq, H, D], k and v [B, Sk, H, D]: element strides for (b, s, h); the D stride is 1.
  const void* q; const void* k; const void* v;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;
  void* out;        // [B, Sq, H, D] contiguous, q's dtype
  float* lse;       // [B, H, Sq] fp32, base 2: log2 of the softmax denominator of scale * q.k
  const int* conn;  // int32 [n_views, n_views + 1] on the device: (count, key-segment ids) per query segment
  int64_t B, Sq, Sk, H, D;
  int n_views;
  float scale;
  int dtype;        // mvkernels::DType: 2 = f16, 3 = bf16
};

// Shapes and dtypes the kernel has instances for: D in {64, 128}, bf16 (3) or fp16 (2).
inline bool mv_attention_sm90_supported(int64_t D, int dtype) {
  return (D == 64 || D == 128) && (dtype == 2 || dtype == 3);
}
// Backward (csrc/mv_attention_sm90_bwd.cu): dK, dV and optionally dQ (fp32 bulk reduce-add) of one mv_attention call.
struct MvAttnBwdSm90Args {
  // q, do [B, Sq, H, D], k, v [B, Sk, H, D]: element strides for (b, s, h); the D stride is 1.
  const void* q; const void* k; const void* v; const void* dout;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, do_sb, do_ss, do_sh;
  // [B * H, n_views, Lq_pad] fp32, Lq_pad = Lq rounded up to 64: the forward's base-2 lse (padding +inf) and
  // delta = rowsum(dO * O) (padding 0), so the kernel copies whole 64-row slices and padded rows get P = 0; inside
  // each 64-row tile, row 8j + 2q + e is stored at 16q + 2j + e (vector loads per lane quad q; _pad_rows).
  const float* lse_pad; const float* delta_pad;
  void* dk; void* dv;  // [B, Sk, H, D] contiguous, k's dtype
  // [B * H, n_views, Lq_pad / 64, D / 64, 4096] fp32, zeroed by the caller; receives scale * dS K, each 64 x 64
  // block in fragment order (see mv_attention_sm90.py). Null: no dQ (the Triton dQ kernel computes it)
  float* dq_accum;
  const int* conn_t;   // int32 [n_views, n_views + 1]: (count, query-segment ids) per key segment (transposed)
  int64_t B, Sq, Sk, H, D;
  int n_views;
  float scale;
  int dtype;
};

#ifdef MVWORLD_WITH_CUDA
// Throws std::runtime_error on a bad argument or a CUDA error at launch.
void mv_attention_fwd_sm90(const MvAttnSm90Args& a, int64_t stream);
void mv_attention_bwd_sm90(const MvAttnBwdSm90Args& a, int64_t stream);
#endif

}  // namespace mvkernels
