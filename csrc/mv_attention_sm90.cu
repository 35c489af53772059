// Hopper (sm_90a) forward kernel of mv_attention, FlashAttention-3 style: TMA + mbarrier pipeline, warp
// specialisation (one producer warpgroup, two consumer warpgroups), wgmma with the softmax of key tile j
// overlapped with the P.V GEMM of tile j-1 inside each consumer warpgroup.
//
// CTA = 128 query rows of one (batch, head, query segment); consumer warpgroup c owns rows 64c..64c+63.
// Per key tile of kN keys (128; 176 at D = 128 for long key walks, see the launch):
//                             S = Q K^T   (wgmma, A = Q and B = K from shared memory, both K-major)
//                             P = exp2(S * scale*log2e - m)  (registers, online softmax)
//                             O += P V    (wgmma, A = P from registers, B = V from shared memory, MN-major)
// The key tiles are the concatenation of the connected key segments' tiles (table `conn`, as the Triton kernel).
//
// Segments without copies: every operand is a 5-D TMA map (D, H, L, n_views, B) with the caller's element
// strides, L = segment length. A box that runs past a segment's end is out of bounds in the L dimension, so
// TMA zero-fills it instead of reading the next segment: K/V rows past the end are 0 (their scores are still
// masked to -inf; P is then 0 and the zero V rows add nothing, even where the next segment holds NaN/Inf).
//
// Shared memory (16-bit elements, 128-byte swizzle): a [rows x D] tile is D/64 column blocks of
// [rows x 128 bytes]; every block starts 1024-byte aligned (the swizzle pattern repeats every 8 rows).
//   Q: 1 tile, K: 2 stages, V: 2 stages   (D = 128: 32 + 64 + 64 KiB with 128-key tiles, 32 + 88 + 88 with 176)
#include <cstdlib>

#include "mv_attention_sm90.h"
#include "qk_norm_rope.h"  // DType
#include "sm90_common.cuh"

namespace mvkernels {
namespace sm90 {

constexpr int kBlockM = 128;    // query rows per CTA
// keys per tile: kN = 128 or 176 (template argument; 176 is FlashAttention-3's choice for head dim 128)
constexpr int kStages = 2;      // K/V ring depth
constexpr int kThreads = 384;   // 3 warpgroups
constexpr int kConsumerWarps = 8;
// Register budgets after the split: 128 * 24 + 256 * 240 = 64,512 <= 65,536 (the launch takes 384 * 168).
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;

template <int D, int kN>
struct SmemLayout {
  static constexpr int kColBlocks = D / 64;
  static constexpr int kQBlockBytes = kBlockM * kRowBytes;  // one 64-column block of the 128-row Q tile (16 KiB)
  static constexpr int kBlockBytes = kN * kRowBytes;        // one 64-column block of a K/V tile (16 / 22 KiB)
  static constexpr int kQBytes = kColBlocks * kQBlockBytes;
  static constexpr int kTileBytes = kColBlocks * kBlockBytes;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBar = kV + kStages * kTileBytes;
  // barriers: q_full, k_full[2], k_empty[2], v_full[2], v_empty[2] (8 bytes each)
  static constexpr int kBytes = kBar + 128 + 1024;  // + 1024: the dynamic base is rounded up to 1024
  static_assert(kBlockBytes % 1024 == 0, "column blocks must stay 1024-byte aligned (swizzle atoms)");
  static_assert(kBytes <= 227 * 1024, "shared memory");
};

#if MV_SM90_DEVICE
// ------------------------------------------------------------------------------------------------------------
// the two GEMMs of a tile (issue only; the caller commits and waits)
// ------------------------------------------------------------------------------------------------------------
// S = Q K^T over D: k-step kk reads 16 columns of D, i.e. 32 bytes into column block kk / 4. Moving the start
// address inside a swizzled 128-byte row is valid because the hardware applies the swizzle to the final address
// (atoms are 1024-byte aligned, base offset 0).
template <typename T, int D, int kN>
__device__ __forceinline__ void issue_qk(float (&s)[kN / 2], uint32_t q_rows, uint32_t k_tile) {
  using L = SmemLayout<D, kN>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t da = smem_desc(q_rows + (kk / 4) * L::kQBlockBytes + (kk % 4) * 32, 16, 1024);
    const uint64_t db = smem_desc(k_tile + (kk / 4) * L::kBlockBytes + (kk % 4) * 32, 16, 1024);
    if constexpr (kN == 176) wgmma_ss_n176<T>(s, da, db, kk > 0);
    else wgmma_ss_n128<T>(s, da, db, kk > 0);
  }
}

// O += P V over the tile's kN keys: k-step kk reads keys 16kk..16kk+15 = 16 rows of 128 bytes (2048 bytes) into
// every column block; the N = D columns span the column blocks at LBO = one block.
template <typename T, int D, int kN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&p)[kN / 4], uint32_t v_tile) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    const uint64_t db = smem_desc(v_tile + kk * 16 * kRowBytes, SmemLayout<D, kN>::kBlockBytes, 1024);
    if constexpr (D == 128) wgmma_rs_n128<T>(o, &p[4 * kk], db);
    else wgmma_rs_n64<T>(o, &p[4 * kk], db);
  }
}

// ------------------------------------------------------------------------------------------------------------
// online softmax on the wgmma accumulator fragment (fragment layout: sm90_common.cuh)
// ------------------------------------------------------------------------------------------------------------
// Online softmax in place on the S accumulator fragment (FlashAttention-3 order): updates the running max m (raw
// scores) and the thread-partial denominator l (reduced over the quad only in the epilogue: every lane of a row
// scales by the same alpha, so partial sums stay consistent), overwrites s with P = exp2(s * scale_log2 - m *
// scale_log2) in fp32 and returns the O rescale alpha. Key columns >= valid (past the key segment's end) count
// as -inf. It runs while the previous tile's P.V wgmma is in flight, so it must not define that wgmma's inputs
// (O, the P fragment): P is packed into the A fragment only after the wait (pack_p).
template <bool kFirst, int kN>
__device__ __forceinline__ void softmax_inplace(float (&s)[kN / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                                float scale_log2, int valid, int lane) {
  const int c0 = 2 * (lane % 4);
  if (valid < kN) {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i)
      if (8 * (i / 4) + c0 + (i % 2) >= valid) s[i] = -INFINITY;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = kFirst ? -INFINITY : m[r];
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    mx = quad_max(mx);  // finite: every tile has at least one valid key column
    alpha[r] = kFirst ? 0.f : ex2((m[r] - mx) * scale_log2);
    m[r] = mx;
    const float neg_ms = -mx * scale_log2;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = s[4 * j + 2 * r + e];
        v = ex2(fmaf(v, scale_log2, neg_ms));
        sum += v;
      }
    }
    l[r] = kFirst ? sum : fmaf(l[r], alpha[r], sum);
  }
}

// A fragment of m64k16 (16-bit): a[0] = (row, k 2(l%4)+{0,1}), a[1] = (row + 8, same k), a[2] = (row, k + 8),
// a[3] = (row + 8, k + 8) -- exactly accumulator values 8kk..8kk+7 of 8-column blocks 2kk and 2kk+1, so
// p[4kk + i] packs P of s[8kk + 2i], s[8kk + 2i + 1] with no data movement between threads.
template <typename T, int kN>
__device__ __forceinline__ void pack_p(const float (&s)[kN / 2], uint32_t (&p)[kN / 4]) {
#pragma unroll
  for (int i = 0; i < kN / 4; ++i) p[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
}

template <int N>
__device__ __forceinline__ void rescale(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] *= alpha[(i / 2) % 2];
}

#endif  // MV_SM90_DEVICE

struct Params {
  void* out;
  float* lse;
  const int* conn;
  int H, Sq, Lq, Lk, n_views, m_blocks;
  float scale_log2;
};

// ------------------------------------------------------------------------------------------------------------
// kernel
// ------------------------------------------------------------------------------------------------------------
template <typename T, int D, bool kPingPong, int kN>
__global__ void __launch_bounds__(kThreads, 1)
    mv_attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, const Params prm) {
#if MV_SM90_DEVICE
  using L = SmemLayout<D, kN>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base + L::kQ;
  const uint32_t bars = base + L::kBar;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8 + 8 * s; };
  auto k_empty = [&](int s) { return bars + 24 + 8 * s; };
  auto v_full = [&](int s) { return bars + 40 + 8 * s; };
  auto v_empty = [&](int s) { return bars + 56 + 8 * s; };
  auto sK = [&](int s) { return base + L::kK + s * L::kTileBytes; };
  auto sV = [&](int s) { return base + L::kV + s * L::kTileBytes; };

  const int seg = blockIdx.x / prm.m_blocks;
  const int m_row0 = (blockIdx.x % prm.m_blocks) * kBlockM;  // first query row inside the segment
  const int bh = blockIdx.y;
  const int b = bh / prm.H, h = bh % prm.H;
  const int* conn_row = prm.conn + seg * (prm.n_views + 1);
  const int tiles_per_seg = (prm.Lk + kN - 1) / kN;
  const int n_tiles = conn_row[0] * tiles_per_seg;  // >= 1: every query segment sees >= 1 key segment

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), kConsumerWarps);
      mbar_init(v_empty(s), kConsumerWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---------------- producer: one thread issues every TMA load ----------------
    shrink_registers<kProducerRegs>();
    if (threadIdx.x != 0) return;
    prefetch_map(&tm_k);
    prefetch_map(&tm_v);
    mbar_expect_tx(q_full, L::kQBytes);
#pragma unroll
    for (int cb = 0; cb < L::kColBlocks; ++cb)
      tma_load(sQ + cb * L::kQBlockBytes, &tm_q, q_full, cb * 64, h, m_row0, seg, b);
    int c = 0, kt = 0;  // connected-segment index, tile inside that segment
    for (int t = 0; t < n_tiles; ++t) {
      const int st = t % kStages;
      const uint32_t free_parity = ((t / kStages) & 1) ^ 1;
      const int kseg = conn_row[1 + c];
      mbar_wait(k_empty(st), free_parity);
      mbar_expect_tx(k_full(st), L::kTileBytes);
#pragma unroll
      for (int cb = 0; cb < L::kColBlocks; ++cb)
        tma_load(sK(st) + cb * L::kBlockBytes, &tm_k, k_full(st), cb * 64, h, kt * kN, kseg, b);
      mbar_wait(v_empty(st), free_parity);
      mbar_expect_tx(v_full(st), L::kTileBytes);
#pragma unroll
      for (int cb = 0; cb < L::kColBlocks; ++cb)
        tma_load(sV(st) + cb * L::kBlockBytes, &tm_v, v_full(st), cb * 64, h, kt * kN, kseg, b);
      if (++kt == tiles_per_seg) { kt = 0; ++c; }
    }
    return;
  }

  // ---------------- consumers: warpgroups 1 and 2, 64 query rows each ----------------
  grow_registers<kConsumerRegs>();
  const int cw = wg - 1;
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t q_rows = sQ + cw * 64 * kRowBytes;  // this warpgroup's 64 rows (1024-byte aligned)
  const float scale_log2 = prm.scale_log2;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float s[kN / 2];
  uint32_t p[kN / 4];
  float m[2], l[2], alpha[2];
  int kt = 0;  // tile index inside the current key segment -> valid columns of the tile
  auto valid_cols = [&](int k) { return prm.Lk - k * kN; };

  // Ping-pong turns: every consumer warpgroup issues its GEMMs n_tiles + 1 times; warpgroup 0 goes first (warpgroup
  // 1 arrives once up front and skips its very last hand-over, so both barriers end balanced).
  auto my_turn = [&] { if (kPingPong) named_sync(1 + cw); };
  auto hand_over = [&](bool last) { if (kPingPong && !(last && cw == 1)) named_arrive(2 - cw); };
  if (kPingPong && cw == 1) named_arrive(1);

  mbar_wait(q_full, 0);

  // tile 0: S, softmax (nothing to overlap with yet)
  mbar_wait(k_full(0), 0);
  my_turn();
  wgmma_fence();
  issue_qk<T, D, kN>(s, q_rows, sK(0));
  wgmma_commit();
  hand_over(false);
  wgmma_wait<0>();
  release(k_empty(0), lane);
  softmax_inplace<true, kN>(s, m, l, alpha, scale_log2, valid_cols(kt), lane);
  pack_p<T, kN>(s, p);
  if (++kt == tiles_per_seg) kt = 0;

  // steady state: issue S_t = Q K_t^T and O += P_{t-1} V_{t-1}; softmax of S_t runs while the P.V wgmma does
  for (int t = 1; t < n_tiles; ++t) {
    const int st = t % kStages, sp = (t - 1) % kStages;
    mbar_wait(k_full(st), (t / kStages) & 1);
    mbar_wait(v_full(sp), ((t - 1) / kStages) & 1);  // long since loaded: V_{t-1} was issued before K_t
    pin(o);
    pin(p);
    my_turn();
    wgmma_fence();
    issue_qk<T, D, kN>(s, q_rows, sK(st));
    wgmma_commit();
    issue_pv<T, D, kN>(o, p, sV(sp));
    wgmma_commit();
    hand_over(false);

    wgmma_wait<1>();  // S_t done (groups complete in order); P.V may still run
    pin(s);           // the softmax reads S only after the wait
    release(k_empty(st), lane);
    softmax_inplace<false, kN>(s, m, l, alpha, scale_log2, valid_cols(kt), lane);
    if (++kt == tiles_per_seg) kt = 0;

    wgmma_wait<0>();  // P.V done: O may be rescaled, the P fragment and V_{t-1} reused
    pin(o);
    pin(p);
    release(v_empty(sp), lane);
    rescale(o, alpha);
    pack_p<T, kN>(s, p);
  }

  // last P.V
  {
    const int t = n_tiles - 1, st = t % kStages;
    mbar_wait(v_full(st), (t / kStages) & 1);
    pin(o);
    pin(p);
    my_turn();
    wgmma_fence();
    issue_pv<T, D, kN>(o, p, sV(st));
    wgmma_commit();
    hand_over(true);
    wgmma_wait<0>();
    pin(o);
    pin(p);
    release(v_empty(st), lane);
  }

  // ---------------- epilogue: O / l -> out (16-bit), lse = m * scale_log2 + log2(l) ----------------
  T* out = static_cast<T*>(prm.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float row_l = quad_sum(l[r]);
    const float inv = 1.f / row_l;
    const int row = m_row0 + cw * 64 + warp * 16 + lane / 4 + 8 * r;  // inside the segment
    if (row < prm.Lq) {
      const int64_t grow = static_cast<int64_t>(seg) * prm.Lq + row;
      const int64_t bhs = static_cast<int64_t>(b) * prm.Sq + grow;
      T* orow = out + (bhs * prm.H + h) * D + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(orow + 8 * j) = pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
      if (lane % 4 == 0) prm.lse[static_cast<int64_t>(bh) * prm.Sq + grow] = m[r] * scale_log2 + log2f(row_l);
    }
  }
#else
  __trap();  // only the sm_90a build has this kernel; the host side checks the device before launching
#endif
}

template <typename T, int D, bool kPingPong, int kN>
void launch(const MvAttnSm90Args& a, cudaStream_t stream) {
  auto kernel = mv_attn_fwd_sm90_kernel<T, D, kPingPong, kN>;
  const int smem = SmemLayout<D, kN>::kBytes;
  static std::once_flag once;  // per instantiation; one attribute call suffices for the process's devices
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [&] {
    attr_err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  });
  if (attr_err != cudaSuccess)
    throw std::runtime_error(std::string("mv_attention_fwd_sm90: cudaFuncSetAttribute: ") + cudaGetErrorString(attr_err));
  const bool bf16 = a.dtype == static_cast<int>(DType::bf16);
  const int64_t nv = a.n_views, Lq = a.Sq / nv, Lk = a.Sk / nv;
  const CUtensorMap tq = make_map(a.q, bf16, D, a.H, Lq, nv, a.B, a.q_sb, a.q_ss, a.q_sh);
  const CUtensorMap tk = make_map(a.k, bf16, D, a.H, Lk, nv, a.B, a.k_sb, a.k_ss, a.k_sh, kN);
  const CUtensorMap tv = make_map(a.v, bf16, D, a.H, Lk, nv, a.B, a.v_sb, a.v_ss, a.v_sh, kN);
  Params prm{};
  prm.out = a.out;
  prm.lse = a.lse;
  prm.conn = a.conn;
  prm.H = int(a.H);
  prm.Sq = int(a.Sq);
  prm.Lq = int(Lq);
  prm.Lk = int(Lk);
  prm.n_views = a.n_views;
  prm.m_blocks = int((Lq + kBlockM - 1) / kBlockM);
  prm.scale_log2 = a.scale * 1.4426950408889634f;
  const dim3 grid(unsigned(nv * prm.m_blocks), unsigned(a.B * a.H));
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, prm);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("mv_attention_fwd_sm90: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace sm90

void mv_attention_fwd_sm90(const MvAttnSm90Args& a, int64_t stream) {
  if (!mv_attention_sm90_supported(a.D, a.dtype))
    throw std::runtime_error("mv_attention_fwd_sm90: needs D in {64, 128} and bf16/fp16, got D=" + std::to_string(a.D));
  if (a.n_views < 1 || a.Sq % a.n_views || a.Sk % a.n_views || a.Sk == 0)
    throw std::runtime_error("mv_attention_fwd_sm90: Sq and Sk must be positive multiples of n_views");
  if (a.Sq >= (int64_t(1) << 31) || a.B * a.H >= 65536)
    throw std::runtime_error("mv_attention_fwd_sm90: Sq must be < 2^31 and B*H < 65536");
  if (a.Sq == 0 || a.B * a.H == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const bool bf16 = a.dtype == static_cast<int>(DType::bf16);
  // MVKERNELS_ATTN_PINGPONG=0 turns the consumer warpgroups' ping-pong off (A/B timing in one process).
  const char* pp_env = std::getenv("MVKERNELS_ATTN_PINGPONG");
  const bool pp = !(pp_env && pp_env[0] == '0');
  // Key tile at D = 128: 176 keys (FlashAttention-3's choice: fewer softmax/barrier rounds per FLOP) for long key
  // walks, 128 for short ones. Measured on an H100, dense, 32 heads: 63,600 and 76,320 tokens 1.5-4% faster with
  // 176; 12,720 tokens 8-13% slower (more of each CTA's time is the unoverlapped first tile). Sk (all keys) stands
  // in for the keys one query tile walks; MVKERNELS_ATTN_BLOCK_N=128|176 overrides.
  const char* bn_env = std::getenv("MVKERNELS_ATTN_BLOCK_N");
  const bool n176 = bn_env && bn_env[0] ? std::string(bn_env) == "176" : a.Sk >= 32768;
  if (a.D == 128) {
    if (n176) {
      if (bf16) pp ? sm90::launch<__nv_bfloat16, 128, true, 176>(a, st) : sm90::launch<__nv_bfloat16, 128, false, 176>(a, st);
      else pp ? sm90::launch<__half, 128, true, 176>(a, st) : sm90::launch<__half, 128, false, 176>(a, st);
    } else {
      if (bf16) pp ? sm90::launch<__nv_bfloat16, 128, true, 128>(a, st) : sm90::launch<__nv_bfloat16, 128, false, 128>(a, st);
      else pp ? sm90::launch<__half, 128, true, 128>(a, st) : sm90::launch<__half, 128, false, 128>(a, st);
    }
  } else {
    if (bf16) pp ? sm90::launch<__nv_bfloat16, 64, true, 128>(a, st) : sm90::launch<__nv_bfloat16, 64, false, 128>(a, st);
    else pp ? sm90::launch<__half, 64, true, 128>(a, st) : sm90::launch<__half, 64, false, 128>(a, st);
  }
}

}  // namespace mvkernels
