// Launch interface of the Hopper (sm_90a) forward kernel of mv_attention. Plain pointers, sizes, strides.
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
#ifdef MVWORLD_WITH_CUDA
// Throws std::runtime_error on a bad argument or a CUDA error at launch.
void mv_attention_fwd_sm90(const MvAttnSm90Args& a, int64_t stream);
#endif

}  // namespace mvkernels
