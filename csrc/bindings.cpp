// pybind11 module mvkernels._C: launchers that take raw pointers, sizes, strides and a CUDA stream (as an int).
// No libtorch: the Python side (mvkernels/ops/*.py) validates tensors and allocates outputs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "mv_attention_sm90.h"
#include "qk_norm_rope.h"

namespace py = pybind11;
using mvkernels::QKNormRopeArgs;

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ',') { if (!cur.empty()) out.push_back(cur); cur.clear(); }
    else cur += c;
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

QKNormRopeArgs make_args(int dtype, uintptr_t q, uintptr_t k, std::array<int64_t, 3> qs, std::array<int64_t, 3> ks,
                         uintptr_t q_out, uintptr_t k_out, uintptr_t gq, uintptr_t gk, uintptr_t wq, uintptr_t wk,
                         uintptr_t angles, int64_t ang_ss, uintptr_t dw_partial, int64_t n_chunks,
                         std::array<int64_t, 4> bshd, float eps) {
  QKNormRopeArgs a{};
  a.q = reinterpret_cast<const void*>(q); a.k = reinterpret_cast<const void*>(k);
  a.q_sb = qs[0]; a.q_ss = qs[1]; a.q_sh = qs[2]; a.k_sb = ks[0]; a.k_ss = ks[1]; a.k_sh = ks[2];
  a.q_out = reinterpret_cast<void*>(q_out); a.k_out = reinterpret_cast<void*>(k_out);
  a.gq = reinterpret_cast<const void*>(gq); a.gk = reinterpret_cast<const void*>(gk);
  a.wq = reinterpret_cast<const void*>(wq); a.wk = reinterpret_cast<const void*>(wk);
  a.angles = reinterpret_cast<const float*>(angles); a.ang_ss = ang_ss;
  a.dw_partial = reinterpret_cast<float*>(dw_partial); a.n_chunks = n_chunks;
  a.B = bshd[0]; a.S = bshd[1]; a.H = bshd[2]; a.D = bshd[3];
  a.eps = eps;
  a.dtype = static_cast<mvkernels::DType>(dtype);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mvworld compiled kernels (CPU build always; CUDA kernels when built with a CUDA compiler)";
  m.def("build_info", []() {
    py::dict d;
#ifdef MVWORLD_WITH_CUDA
    d["cuda_archs"] = split_archs(MVWORLD_CUDA_ARCHS);
    d["cuda_version"] = std::string(MVWORLD_CUDA_VERSION);
#else
    d["cuda_archs"] = std::vector<std::string>{};
    d["cuda_version"] = py::none();
#endif
#ifdef MVWORLD_WITH_SM90_ATTN
    d["sm90_attention"] = true;
#else
    d["sm90_attention"] = false;
#endif
    d["cpu"] = true;
    return d;
  });

#ifdef MVWORLD_WITH_SM90_ATTN
  // Hopper attention forward (sm_90a only; the caller checks the device). Strides in elements, (b, s, h).
  m.def("mv_attention_fwd_sm90", [](int64_t stream, int dtype, uintptr_t q, uintptr_t k, uintptr_t v,
                                    std::array<int64_t, 3> qs, std::array<int64_t, 3> ks, std::array<int64_t, 3> vs,
                                    uintptr_t out, uintptr_t lse, uintptr_t conn, std::array<int64_t, 5> b_sq_sk_h_d,
                                    int n_views, float scale) {
    mvkernels::MvAttnSm90Args a{};
    a.q = reinterpret_cast<const void*>(q); a.k = reinterpret_cast<const void*>(k);
    a.v = reinterpret_cast<const void*>(v);
    a.q_sb = qs[0]; a.q_ss = qs[1]; a.q_sh = qs[2]; a.k_sb = ks[0]; a.k_ss = ks[1]; a.k_sh = ks[2];
    a.v_sb = vs[0]; a.v_ss = vs[1]; a.v_sh = vs[2];
    a.out = reinterpret_cast<void*>(out); a.lse = reinterpret_cast<float*>(lse);
    a.conn = reinterpret_cast<const int*>(conn);
    a.B = b_sq_sk_h_d[0]; a.Sq = b_sq_sk_h_d[1]; a.Sk = b_sq_sk_h_d[2]; a.H = b_sq_sk_h_d[3]; a.D = b_sq_sk_h_d[4];
    a.n_views = n_views; a.scale = scale; a.dtype = dtype;
    mvkernels::mv_attention_fwd_sm90(a, stream);
  });
  // Hopper attention backward: dK, dV and (dq_accum != 0) fp32 dQ atomics. lse/delta padded per segment.
  m.def("mv_attention_bwd_sm90", [](int64_t stream, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t dout,
                                    std::array<int64_t, 3> qs, std::array<int64_t, 3> ks, std::array<int64_t, 3> vs,
                                    std::array<int64_t, 3> dos, uintptr_t lse_pad, uintptr_t delta_pad, uintptr_t dk,
                                    uintptr_t dv, uintptr_t dq_accum, uintptr_t conn_t,
                                    std::array<int64_t, 5> b_sq_sk_h_d, int n_views, float scale) {
    mvkernels::MvAttnBwdSm90Args a{};
    a.q = reinterpret_cast<const void*>(q); a.k = reinterpret_cast<const void*>(k);
    a.v = reinterpret_cast<const void*>(v); a.dout = reinterpret_cast<const void*>(dout);
    a.q_sb = qs[0]; a.q_ss = qs[1]; a.q_sh = qs[2]; a.k_sb = ks[0]; a.k_ss = ks[1]; a.k_sh = ks[2];
    a.v_sb = vs[0]; a.v_ss = vs[1]; a.v_sh = vs[2]; a.do_sb = dos[0]; a.do_ss = dos[1]; a.do_sh = dos[2];
    a.lse_pad = reinterpret_cast<const float*>(lse_pad); a.delta_pad = reinterpret_cast<const float*>(delta_pad);
    a.dk = reinterpret_cast<void*>(dk); a.dv = reinterpret_cast<void*>(dv);
    a.dq_accum = reinterpret_cast<float*>(dq_accum);
    a.conn_t = reinterpret_cast<const int*>(conn_t);
    a.B = b_sq_sk_h_d[0]; a.Sq = b_sq_sk_h_d[1]; a.Sk = b_sq_sk_h_d[2]; a.H = b_sq_sk_h_d[3]; a.D = b_sq_sk_h_d[4];
    a.n_views = n_views; a.scale = scale; a.dtype = dtype;
    mvkernels::mv_attention_bwd_sm90(a, stream);
  });
  m.def("mv_attention_sm90_supported", [](int64_t D, int dtype) { return mvkernels::mv_attention_sm90_supported(D, dtype); });
#endif

  // device: -1 = CPU, otherwise CUDA (on the caller's current device and `stream`).
  m.def("qk_norm_rope_fwd", [](int device, int vec, int64_t stream, int dtype, uintptr_t q, uintptr_t k,
                               std::array<int64_t, 3> qs, std::array<int64_t, 3> ks, uintptr_t q_out, uintptr_t k_out,
                               uintptr_t wq, uintptr_t wk, uintptr_t angles, int64_t ang_ss,
                               std::array<int64_t, 4> bshd, float eps) {
    auto a = make_args(dtype, q, k, qs, ks, q_out, k_out, 0, 0, wq, wk, angles, ang_ss, 0, 0, bshd, eps);
    if (device < 0) { py::gil_scoped_release nogil; mvkernels::qk_norm_rope_fwd_cpu(a); return; }
#ifdef MVWORLD_WITH_CUDA
    mvkernels::qk_norm_rope_fwd_cuda(a, vec, stream);
#else
    (void)vec; (void)stream;
    throw std::runtime_error("mvkernels._C was built without CUDA");
#endif
  });
  m.def("qk_norm_rope_bwd", [](int device, int vec, int64_t stream, int dtype, uintptr_t q, uintptr_t k,
                               std::array<int64_t, 3> qs, std::array<int64_t, 3> ks, uintptr_t gq, uintptr_t gk,
                               uintptr_t dq, uintptr_t dk, uintptr_t wq, uintptr_t wk, uintptr_t angles, int64_t ang_ss,
                               uintptr_t dw_partial, int64_t n_chunks, std::array<int64_t, 4> bshd, float eps) {
    auto a = make_args(dtype, q, k, qs, ks, dq, dk, gq, gk, wq, wk, angles, ang_ss, dw_partial, n_chunks, bshd, eps);
    if (device < 0) { py::gil_scoped_release nogil; mvkernels::qk_norm_rope_bwd_cpu(a); return; }
#ifdef MVWORLD_WITH_CUDA
    mvkernels::qk_norm_rope_bwd_cuda(a, vec, stream);
#else
    (void)vec; (void)stream;
    throw std::runtime_error("mvkernels._C was built without CUDA");
#endif
  });
}
