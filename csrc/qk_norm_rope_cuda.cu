// CUDA kernels of the fused QK-RMSNorm + RoPE op (math in qk_norm_rope_math.h, shared with the CPU build).
//
// Memory-bound: q and k are read once and written once. Blocks walk over tokens; one token's 2*H rows (q heads
// then k heads) share its angle row, so the block computes the D cos/sin values once into shared memory and
// every head reuses them. A row of D elements is handled by TPR threads: thread `lane` owns VEC elements at
// i0 = lane*VEC in the first half and their rotate-half partners at i0 + D/2, so a pair never crosses threads;
// the row's sum of squares is a shuffle reduction over TPR lanes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "qk_norm_rope.h"
#include "qk_norm_rope_math.h"

namespace mvkernels {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return T(v); }

__device__ __forceinline__ void sincos_acc(float a, float* s, float* c) { sincosf(a, s, c); }
__device__ __forceinline__ void sincos_acc(double a, double* s, double* c) { sincos(a, s, c); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, typename Acc<T>::type (&x)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) x[j] = to_acc(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const typename Acc<T>::type (&x)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_acc<T>(x[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int tpr) {
  for (int off = tpr / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Rows handled together by one thread: all their loads are issued before any of them is used. The backward
// (4 streams) keeps two rows in flight; the forward keeps one, which leaves registers for more resident blocks.

template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(256, BACKWARD ? 2 : 4) qk_norm_rope_kernel(const QKNormRopeArgs a, int tpr) {
  using acc_t = typename Acc<T>::type;
  constexpr int R = BACKWARD ? 2 : 1;
  extern __shared__ unsigned char smem_raw[];
  // Shared per block: weights (q then k), the current token's cos/sin, and (backward) the weight gradients.
  // Keeping them out of registers leaves the registers to the rows in flight.
  acc_t* s_w = reinterpret_cast<acc_t*>(smem_raw);  // [2, D]
  acc_t* s_cos = s_w + 2 * a.D;                      // [D]
  acc_t* s_sin = s_cos + a.D;                        // [D]
  acc_t* s_dw = s_sin + a.D;                         // [2, D], backward only

  const int D = int(a.D), half = D / 2, H = int(a.H);
  const int lane = threadIdx.x % tpr, rows_per_pass = blockDim.x / tpr, my_row = threadIdx.x / tpr;
  const int i0 = lane * VEC;
  const int64_t n_tokens = a.B * a.S;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    s_w[i] = static_cast<const acc_t*>(a.wq)[i];
    s_w[D + i] = static_cast<const acc_t*>(a.wk)[i];
    if (BACKWARD) s_dw[i] = s_dw[D + i] = acc_t(0);
  }
  // Weight-gradient accumulators for the role (q or k) of each row slot; flushed to shared memory when a slot
  // changes role (rows_per_pass * R not a multiple of H) and at the end.
  acc_t dw[R][2][VEC];
  int dw_role[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    dw_role[r] = -1;
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[r][0][j] = dw[r][1][j] = acc_t(0);
  }
  auto flush = [&](int r) {
    if (BACKWARD && dw_role[r] >= 0) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        atomicAdd(&s_dw[dw_role[r] * D + i0 + j], dw[r][0][j]);
        atomicAdd(&s_dw[dw_role[r] * D + half + i0 + j], dw[r][1][j]);
        dw[r][0][j] = dw[r][1][j] = acc_t(0);
      }
    }
  };

  for (int64_t tok = blockIdx.x; tok < n_tokens; tok += gridDim.x) {
    const int64_t b = tok / a.S, s = tok % a.S;
    for (int base = 0; base < 2 * H; base += R * rows_per_pass) {
      acc_t x[R][2][VEC], g[R][2][VEC];
      // 1. Issue every load of this chunk of rows.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = base + r * rows_per_pass + my_row;
        const bool is_q = row < H;
        const int h = is_q ? row : row - H;
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[r][0][j] = x[r][1][j] = g[r][0][j] = g[r][1][j] = acc_t(0);
        if (row < 2 * H) {
          const T* src = static_cast<const T*>(is_q ? a.q : a.k) +
                         (is_q ? b * a.q_sb + s * a.q_ss + h * a.q_sh : b * a.k_sb + s * a.k_ss + h * a.k_sh);
          load<T, VEC>(src + i0, x[r][0]); load<T, VEC>(src + half + i0, x[r][1]);
          if (BACKWARD) {
            const T* gsrc = static_cast<const T*>(is_q ? a.gq : a.gk) + ((b * a.S + s) * H + h) * D;
            load<T, VEC>(gsrc + i0, g[r][0]); load<T, VEC>(gsrc + half + i0, g[r][1]);
          }
        }
      }
      // 2. While they are in flight: the token's cos/sin table, once per block (first chunk of the token).
      if (base == 0) {
        __syncthreads();  // the previous token's table is no longer read
        for (int i = threadIdx.x; i < D; i += blockDim.x)
          sincos_acc(acc_t(a.angles[s * a.ang_ss + i]), &s_sin[i], &s_cos[i]);
        __syncthreads();
      }
      // 3. Compute and store each row. Every thread runs the same steps, so shuffles see the whole warp.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = base + r * rows_per_pass + my_row;
        const bool active = row < 2 * H;
        const int role = row < H ? 0 : 1;
        const int h = role == 0 ? row : row - H;
        const acc_t* w = s_w + role * D;
        acc_t ss = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += x[r][0][j] * x[r][0][j] + x[r][1][j] * x[r][1][j];
        const acc_t rinv = rms_inv<acc_t>(group_sum(ss, tpr), D, acc_t(a.eps));
        acc_t res[2][VEC];
        if (!BACKWARD) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            rope_pair_fwd<acc_t>(x[r][0][j] * rinv * w[i0 + j], x[r][1][j] * rinv * w[half + i0 + j],
                                 s_cos[i0 + j], s_sin[i0 + j], s_cos[half + i0 + j], s_sin[half + i0 + j],
                                 res[0][j], res[1][j]);
        } else {
          if (active && role != dw_role[r]) { flush(r); dw_role[r] = role; }
          acc_t dot = 0;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc_t dy0, dy1;
            rope_pair_bwd<acc_t>(g[r][0][j], g[r][1][j], s_cos[i0 + j], s_sin[i0 + j], s_cos[half + i0 + j],
                                 s_sin[half + i0 + j], dy0, dy1);
            if (active) { dw[r][0][j] += dy0 * x[r][0][j] * rinv; dw[r][1][j] += dy1 * x[r][1][j] * rinv; }
            res[0][j] = dy0 * w[i0 + j];  // dxhat, turned into dx below
            res[1][j] = dy1 * w[half + i0 + j];
            dot += (res[0][j] * x[r][0][j] + res[1][j] * x[r][1][j]) * rinv;
          }
          const acc_t dot_over_d = group_sum(dot, tpr) / acc_t(D);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            res[0][j] = rms_grad<acc_t>(res[0][j], x[r][0][j] * rinv, dot_over_d, rinv);
            res[1][j] = rms_grad<acc_t>(res[1][j], x[r][1][j] * rinv, dot_over_d, rinv);
          }
        }
        if (active) {
          T* dst = static_cast<T*>(role == 0 ? a.q_out : a.k_out) + ((b * a.S + s) * H + h) * D;
          store<T, VEC>(dst + i0, res[0]); store<T, VEC>(dst + half + i0, res[1]);
        }
      }
    }
  }

  if (BACKWARD) {  // one partial row of weight gradients per block; the caller sums them
#pragma unroll
    for (int r = 0; r < R; ++r) flush(r);
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * D; i += blockDim.x) a.dw_partial[blockIdx.x * 2 * D + i] = float(s_dw[i]);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("mvkernels qk_norm_rope ") + what + ": " + cudaGetErrorString(e));
}

template <typename T, int VEC, bool BACKWARD>
void launch_typed(const QKNormRopeArgs& a, int64_t stream) {
  using acc_t = typename Acc<T>::type;
  const int tpr = int(a.D / 2 / VEC);
  if (tpr < 1 || tpr > 32 || (tpr & (tpr - 1)) != 0 || tpr * VEC * 2 != a.D)
    throw std::invalid_argument("mvkernels qk_norm_rope: head dim " + std::to_string(a.D) + " unsupported on CUDA with vector width " + std::to_string(VEC));
  int threads = int(2 * a.H * tpr);
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : (threads + 31) / 32 * 32);
  threads = threads / tpr * tpr;
  const size_t smem = (BACKWARD ? 6 : 4) * a.D * sizeof(acc_t);
  // Forward: one token per block (plenty of blocks). Backward: the caller fixed the grid (n_chunks) because it
  // allocated one partial weight-gradient row per block.
  const int64_t n_tokens = a.B * a.S;
  const int64_t grid = BACKWARD ? a.n_chunks : (n_tokens < 65535 * 32 ? n_tokens : 65535 * 32);
  if (grid == 0) return;
  qk_norm_rope_kernel<T, VEC, BACKWARD><<<unsigned(grid), threads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(a, tpr);
  check(cudaGetLastError(), "launch");
}

template <bool BACKWARD>
void launch(const QKNormRopeArgs& a, int vec, int64_t stream) {
  auto by_vec = [&](auto tag, auto... vecs) {
    using T = decltype(tag);
    bool done = false;
    ((vec == decltype(vecs)::value ? (launch_typed<T, decltype(vecs)::value, BACKWARD>(a, stream), done = true) : false), ...);
    if (!done) throw std::invalid_argument("mvkernels qk_norm_rope: vector width " + std::to_string(vec) + " unsupported");
  };
  using V1 = std::integral_constant<int, 1>; using V2 = std::integral_constant<int, 2>;
  using V4 = std::integral_constant<int, 4>; using V8 = std::integral_constant<int, 8>;
  switch (a.dtype) {
    case DType::bf16: by_vec(__nv_bfloat16{}, V1{}, V2{}, V4{}, V8{}); break;
    case DType::f16: by_vec(__half{}, V1{}, V2{}, V4{}, V8{}); break;
    case DType::f32: by_vec(float{}, V1{}, V2{}, V4{}); break;
    case DType::f64: by_vec(double{}, V1{}, V2{}); break;
  }
}

}  // namespace

void qk_norm_rope_fwd_cuda(const QKNormRopeArgs& a, int vec, int64_t stream) { launch<false>(a, vec, stream); }
void qk_norm_rope_bwd_cuda(const QKNormRopeArgs& a, int vec, int64_t stream) { launch<true>(a, vec, stream); }

}  // namespace mvkernels
