// Launch interface of the fused QK-RMSNorm + RoPE op. Plain pointers, sizes and strides (no libtorch).
#pragma once
#include <cstdint>

namespace mvkernels {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

struct QKNormRopeArgs {
  // q and k: [B, S, H, D] with unit stride on D; strides in elements for (b, s, h).
  const void* q; const void* k;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh;
  // Forward: q_out/k_out are the results. Backward: the gradients w.r.t. q and k. Contiguous [B, S, H, D].
  void* q_out; void* k_out;
  // Backward only: gradients of the forward outputs, contiguous [B, S, H, D].
  const void* gq; const void* gk;
  const void* wq; const void* wk;    // [D], fp32 (fp64 when the inputs are fp64)
  const float* angles;               // [S, D] fp32, row stride ang_ss, unit stride on D
  int64_t ang_ss;
  // Backward only: per-chunk partial weight gradients [n_chunks, 2, D] fp32 (q then k); summed by the caller.
  float* dw_partial;
  int64_t n_chunks;
  int64_t B, S, H, D;
  float eps;
  DType dtype;
};

void qk_norm_rope_fwd_cpu(const QKNormRopeArgs& a);
void qk_norm_rope_bwd_cpu(const QKNormRopeArgs& a);
#ifdef MVWORLD_WITH_CUDA
// `vec` elements per 16-byte access (or fewer when unaligned); the caller checks supported(D, vec).
void qk_norm_rope_fwd_cuda(const QKNormRopeArgs& a, int vec, int64_t stream);
void qk_norm_rope_bwd_cuda(const QKNormRopeArgs& a, int vec, int64_t stream);
#endif

}  // namespace mvkernels
