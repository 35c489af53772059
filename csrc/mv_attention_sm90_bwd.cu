// Hopper (sm_90a) backward kernel of mv_attention: dK and dV per key tile, dQ by fp32 atomics (optional).
//
// CTA = 128 keys of one (batch, head, key segment); consumer warpgroup c owns keys 64c..64c+63. It walks the
// 64-row query tiles of every query segment connected to its key segment (transposed table `conn_t`, as the
// Triton dK/dV kernel). Per query tile, with everything transposed so that the keys are the wgmma M dimension:
//   S^T  = K_c Q^T          wgmma SS m64n64, A = K (smem, K-major), B = Q (smem, K-major)
//   dP^T = V_c dO^T         wgmma SS m64n64, A = V, B = dO
//   P^T  = exp2(S^T * scale*log2e - lse)        (registers; lse is the forward's base-2 row statistic)
//   dV  += P^T dO           wgmma RS, A = P^T (registers), B = dO (smem, MN-major)
//   dS^T = P^T (dP^T - delta)                   (registers, also stored to smem for dQ)
//   dK  += dS^T Q           wgmma RS, A = dS^T, B = Q (MN-major)
//   dQ   = dS K             wgmma SS, A = dS (smem, MN-major), B = K (MN-major); D = 128: warpgroup c takes D
//                           columns 64c..64c+63 over the CTA's 128 keys; D = 64: all columns over its own 64 keys.
//                           Each warpgroup stores its 64 x 64 fp32 block to shared memory and one thread adds it to
//                           a global fp32 accumulator with a single bulk reduce-add (cp.reduce.async.bulk, done by
//                           the L2, 16 KiB per instruction; double-buffered so the copy-out of tile t overlaps tile
//                           t+1). Not bitwise deterministic: the order of the CTAs' additions varies run to run.
// dK is scaled by the softmax scale once at the end; dQ's share is scaled before its reduce-add.
//
// Why these tiles: keys are M (the accumulators dK and dV stay in registers for the whole walk: D/2 + D/2 fp32
// per thread = 128 at D = 128), query tiles of 64 rows keep S^T and dP^T at 32 registers each, and the dQ block
// per warpgroup is 64 x 64 (32 registers) because it is split over the two warpgroups by columns. Peak live
// accumulators at D = 128: dK 64 + dV 64 + S^T 32 + dP^T 32 (or dQ 32 + P/dS fragments 32) = 192 of 240.
// Two warpgroups x 64 keys = 128 keys per CTA: each Q/dO tile loaded from L2 serves 128 keys (same reuse as
// FlashAttention-3's hd128 backward), at 64 KiB K/V + stages of 32 KiB Q/dO.
//
// Segments and masking (no copies, no per-element masks):
// * Q, dO, K, V are 5-D TMA maps (D, H, L, n_views, B) over the caller's strides; rows past a segment end are
//   zero-filled. lse and delta come padded per segment to a multiple of 64 rows (lse = +inf, delta = 0), so a
//   query row past its segment end has S = 0, P = exp2(-inf) = 0 and dS = 0: it adds nothing anywhere.
// * Keys past the key segment's end have K = V = 0 rows: their dK/dV rows are garbage-free but simply not
//   stored, and their dS rows multiply zero K rows in dQ.
//
// Shared memory (16-bit, 128-byte swizzle, every block 1024-byte aligned), D = 128:
//   K 32 KiB, V 32 KiB, kStages x (Q 16 KiB + dO 16 KiB + lse/delta 512 B), dS 2 x 16 KiB (double buffer),
//   with the in-kernel dQ also 2 buffers x 2 warpgroups x 16 KiB fp32 (and 2 instead of 3 Q/dO stages to fit).
//
// Ping-pong (kPingPong, MVKERNELS_ATTN_BWD_PINGPONG=1, only without the in-kernel dQ): the two consumer warpgroups
// take strict turns at every GEMM issue point (S^T/dP^T, dV, dK: three per tile), so warpgroup 1 runs about one
// GEMM behind warpgroup 0. Without it both drain their wgmma queue (wait<0>) at the same moment at every tile end
// and both compute exp2 / dS at once; with it one warpgroup's drain, mbarrier wait and elementwise work run while
// the tensor cores still have the other warpgroup's queued GEMMs. The arithmetic of each warpgroup is unchanged,
// so dK/dV are bit-identical to the lockstep kernel.
//
// Ordering rules kept from the forward (.notes/attention.md): no non-wgmma instruction defines a register that is
// an input or accumulator of a wgmma still in flight (P^T is packed while dP^T runs, dS^T while dV runs; neither
// is read by those), and accumulators are read only after the wait that retires them (pin()).
#include <cstdlib>  // std::getenv

#include "mv_attention_sm90.h"
#include "qk_norm_rope.h"  // DType
#include "sm90_common.cuh"

namespace mvkernels {
namespace sm90_bwd {

using namespace sm90;

constexpr int kBlockN = 128;  // keys per CTA (two consumer warpgroups x 64)
constexpr int kBlockM = 64;   // query rows per tile
constexpr int kThreads = 384;
[[maybe_unused]] constexpr int kConsumerWarps = 8;  // used by device code only
[[maybe_unused]] constexpr int kProducerRegs = 24;
[[maybe_unused]] constexpr int kConsumerRegs = 240;

template <int D, bool kDq = false>
struct BwdSmem {
  // Q/dO ring depth (D = 128: 193 KiB in all, 225 KiB with the dQ buffers and 2 stages; D = 64: 97 / 161 KiB)
  static constexpr int kStages = (kDq && D == 128) ? 2 : 3;
  static constexpr int kColBlocks = D / 64;
  static constexpr int kKBlockBytes = kBlockN * kRowBytes;  // 64-column block of the 128-row K/V tiles (16 KiB)
  static constexpr int kQBlockBytes = kBlockM * kRowBytes;  // 64-column block of the 64-row Q/dO tiles (8 KiB)
  static constexpr int kKVTile = kColBlocks * kKBlockBytes;
  static constexpr int kQTile = kColBlocks * kQBlockBytes;
  static constexpr int kDsBytes = kBlockN * kRowBytes;  // dS^T [128 keys x 64 queries] 16-bit
  static constexpr int kK = 0;
  static constexpr int kV = kK + kKVTile;
  static constexpr int kQ = kV + kKVTile;
  static constexpr int kDO = kQ + kStages * kQTile;
  static constexpr int kDS = kDO + kStages * kQTile;
  static constexpr int kDqBlockBytes = 64 * 64 * 4;  // one warpgroup's fp32 dQ block
  static constexpr int kDQ = kDS + 2 * kDsBytes;     // [buffer][warpgroup] dQ blocks (kDq only)
  static constexpr int kRowStats = kDQ + (kDq ? 4 * kDqBlockBytes : 0);  // per stage: lse[64], delta[64] fp32
  static constexpr int kBar = kRowStats + kStages * 512;
  // barriers: kv_full, full[kStages], empty[kStages]
  static constexpr int kBytes = kBar + 8 * (1 + 2 * kStages) + 1024;  // + 1024: base rounded up to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory");
};

#if MV_SM90_DEVICE
// ------------------------------------------------------------------------------------------------------------
// PTX wrappers used by the backward only
// ------------------------------------------------------------------------------------------------------------
// 1-D bulk copy global -> shared (16-byte aligned, size a multiple of 16), completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}

// Generic-proxy shared stores (dS^T) must be visible to the async proxy (wgmma's smem operand reads).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

__device__ __forceinline__ void st_shared_f4(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// global[0:bytes] += shared[0:bytes] (fp32, element-wise, performed in the L2), as one bulk async group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Until every bulk group of this thread has finished reading its shared-memory source.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Until every bulk group of this thread has completed (its global writes done).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// ------------------------------------------------------------------------------------------------------------
// the GEMMs of a query tile (issue only; the caller fences, commits and waits)
// ------------------------------------------------------------------------------------------------------------
// X^T = A_c B^T over D (S^T with A = K, B = Q; dP^T with A = V, B = dO). Both operands from shared memory: holding
// K in registers instead (RS wgmma, saving 2 KiB of smem reads per k-step) measured 7.5% slower with 2 or 4 of
// the 8 k-steps in registers and 23% with all 8 on an H100 (ptxas spills 16-112 bytes: the kernel has no spare
// registers). k-step kk reads 16 columns of D: 32 bytes into column block kk / 4 of both tiles (A: 128-row blocks,
// this warpgroup's 64 rows; B: 64-row blocks).
template <typename T, int D>
__device__ __forceinline__ void issue_transposed_scores(float (&acc)[32], uint32_t a_rows, uint32_t b_tile) {
  using L = BwdSmem<D>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t col = (kk % 4) * 32;
    wgmma_ss_n64<T>(acc, smem_desc(a_rows + (kk / 4) * L::kKBlockBytes + col, 16, 1024),
                    smem_desc(b_tile + (kk / 4) * L::kQBlockBytes + col, 16, 1024), kk > 0);
  }
}

// G[64 keys x D] += F^T[64 x 64 queries] X[64 queries x D] (dV with F = P, X = dO; dK with F = dS, X = Q): k-step kk
// reads query rows 16kk..16kk+15 (2048 bytes into every column block); N = D spans the blocks at LBO = one block.
template <typename T, int D>
__device__ __forceinline__ void issue_key_grad(float (&g)[D / 2], const uint32_t (&f)[16], uint32_t x_tile) {
#pragma unroll
  for (int kk = 0; kk < kBlockM / 16; ++kk) {
    const uint64_t db = smem_desc(x_tile + kk * 16 * kRowBytes, BwdSmem<D>::kQBlockBytes, 1024);
    if constexpr (D == 128) wgmma_rs_n128<T>(g, &f[4 * kk], db);
    else wgmma_rs_n64<T>(g, &f[4 * kk], db);
  }
}

// dQ[64 queries x 64 columns] (+)= dS[64 x kKeys keys] K[kKeys keys x 64 columns]. Both operands are stored key-major
// (rows = keys = the K dimension), i.e. MN-major: k-step kk is 16 key rows = 2048 bytes further; SBO = 1024 (next 8
// keys), LBO unused (M = N = 64 is a single 128-byte swizzle atom wide).
template <typename T, int D, int kKeys>
__device__ __forceinline__ void issue_dq(float (&dq)[32], uint32_t ds_rows, uint32_t k_rows) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    const uint32_t off = kk * 16 * kRowBytes;
    wgmma_ss_n64<T, true>(dq, smem_desc(ds_rows + off, BwdSmem<D>::kDsBytes, 1024),
                       smem_desc(k_rows + off, BwdSmem<D>::kKBlockBytes, 1024), kk > 0);
  }
}

// Which dQ GEMM a warpgroup issues, chosen so that both warpgroups issue one (a wgmma under a branch that differs
// between warpgroups makes ptxas serialise every wgmma of the kernel, C7520):
//   D = 128: warpgroup c computes columns 64c..64c+63 over all 128 keys (needs both warpgroups' dS rows);
//   D = 64:  warpgroup c computes all 64 columns over its own 64 keys; the two partial sums meet in the atomics.
template <int D>
struct DqSplit {
  static constexpr int kKeys = D == 128 ? kBlockN : 64;
  static __device__ __forceinline__ uint32_t ds_offset(int cw) { return D == 128 ? 0 : cw * 64 * kRowBytes; }
  static __device__ __forceinline__ uint32_t k_offset(int cw) {
    return D == 128 ? cw * BwdSmem<D>::kKBlockBytes : cw * 64 * kRowBytes;
  }
  static __device__ __forceinline__ int col0(int cw) { return D == 128 ? 64 * cw : 0; }
};

// Turn-taking of the two consumer warpgroups (kPingPong). Named barriers kTurn0 / kTurn1 (256 threads: one
// warpgroup syncs, the other arrives; ids unused elsewhere in this kernel, 1 is the dQ path's dS barrier) gate
// warpgroup 0's and warpgroup 1's GEMM issues. Warpgroup c waits on its own barrier before issuing and arrives on
// the other's after committing, so issues alternate 0, 1, 0, 1, ... Balance, with n = 3 * n_tiles turns each:
//   kTurn0: warpgroup 0 syncs n + 1 times (every turn + finish()); warpgroup 1 arrives 1 (start()) + n times.
//   kTurn1: warpgroup 1 syncs n times; warpgroup 0 arrives n times.
// Both are skipped entirely when n_tiles == 0 (uniform over the CTA), so empty walks stay balanced too. Strict
// alternation also means no barrier ever receives a second arrive before its previous sync completed.
template <bool kOn>
struct TurnTaking {
  static constexpr int kTurn0 = 2, kTurn1 = 3;
  int cw;
  bool active;  // n_tiles > 0
  // warpgroup 1 pre-arrives so that warpgroup 0 takes the first turn
  __device__ __forceinline__ void start() const {
    if (kOn && active && cw == 1) named_arrive(kTurn0);
  }
  __device__ __forceinline__ void my_turn() const {
    if (kOn) named_sync(cw == 0 ? kTurn0 : kTurn1);
  }
  __device__ __forceinline__ void hand_over() const {
    if (kOn) named_arrive(cw == 0 ? kTurn1 : kTurn0);
  }
  // warpgroup 0 consumes warpgroup 1's last hand-over (keeps the loop free of a "last turn" branch)
  __device__ __forceinline__ void finish() const {
    if (kOn && active && cw == 0) named_sync(kTurn0);
  }
};

// ------------------------------------------------------------------------------------------------------------
// elementwise steps on the m64n64 accumulator fragment (layout: sm90_common.cuh): value 4j + 2r + e is at key
// row 16w + l/4 + 8r and query column 8j + 2(l%4) + e, so each thread needs 16 lse/delta values (8 float2).
// ------------------------------------------------------------------------------------------------------------
// lse and delta arrive permuted per 64-row tile (the host's _pad_rows): the 16 values a quad lane q needs, columns
// 8j + 2q + {0, 1} for j = 0..7, are contiguous at float offset 16q, so 4 vector loads fetch them instead of 8.
__device__ __forceinline__ void load_row_stats(float2 (&v)[8], uint32_t stats, int lane) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float4 x;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w)
                 : "r"(stats + 64 * (lane % 4) + 16 * k)
                 : "memory");
    v[2 * k] = make_float2(x.x, x.y);
    v[2 * k + 1] = make_float2(x.z, x.w);
  }
}

// P^T in place of S^T (fp32), and packed into the A fragment of the dV GEMM (same packing as the forward's P).
template <typename T>
__device__ __forceinline__ void probs(float (&s)[32], uint32_t (&pf)[16], const float2 (&lse)[8],
                                      float scale_log2) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float l = (i % 2) ? lse[i / 4].y : lse[i / 4].x;
    s[i] = ex2(fmaf(s[i], scale_log2, -l));
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) pf[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
}

// dS^T = P^T (dP^T - delta): packed into the dK GEMM's A fragment and stored to the dS buffer (rows = keys, 128
// bytes = 64 queries per row, 128-byte swizzle: 16-byte chunk j of row r sits at chunk j ^ (r % 8)). Pair i of the
// fragment is (row 16w + l/4 + 8(i%2), columns 8(i/2) + 2(l%4) + {0, 1}), so pairs 4m..4m+3 are the four 8 x 8
// matrices (rows +0/+8) x (columns 16m / 16m+8) in the mma fragment layout: one stmatrix.x4 stores them (lane t
// gives the address of row t%8 of matrix t/8; each matrix row is one 16-byte chunk). 4 shared-memory instructions
// per thread instead of 16 scalar stores: ncu showed this kernel's MIO queue throttling (0.52 stall cycles per
// instruction vs cuDNN's 0.07).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b),
               "r"(c), "r"(d)
               : "memory");
}

template <typename T>
__device__ __forceinline__ void dscores(const float (&p)[32], const float (&dp)[32], uint32_t (&dsf)[16],
                                        const float2 (&delta)[8], uint32_t ds_rows, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float2 dl = delta[i / 2];
    dsf[i] = pack2<T>(p[2 * i] * (dp[2 * i] - dl.x), p[2 * i + 1] * (dp[2 * i + 1] - dl.y));
  }
  const int mat = lane / 8;
  const int row = 16 * warp + 8 * (mat % 2) + lane % 8;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int chunk = 2 * m + mat / 2;
    stmatrix_x4(ds_rows + row * kRowBytes + ((chunk ^ (row % 8)) << 4), dsf[4 * m], dsf[4 * m + 1], dsf[4 * m + 2],
                dsf[4 * m + 3]);
  }
}
#endif  // MV_SM90_DEVICE

struct Params {
  void* dk;
  void* dv;
  float* dq_accum;
  const float* lse_pad;
  const float* delta_pad;
  const int* conn_t;
  int H, Sk, Lq, Lq_pad, Lk, n_views, n_blocks;
  float scale, scale_log2;
};

// ------------------------------------------------------------------------------------------------------------
// kernel
// ------------------------------------------------------------------------------------------------------------
template <typename T, int D, bool kDq, bool kPingPong>
__global__ void __launch_bounds__(kThreads, 1)
    mv_attn_bwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
                            const Params prm) {
#if MV_SM90_DEVICE
  // the in-kernel dQ path's dS barrier (id 1) pairs the warpgroups per tile: turn-taking on top of it could deadlock
  static_assert(!(kDq && kPingPong), "ping-pong only with dQ from the Triton kernel");
  using L = BwdSmem<D, kDq>;
  constexpr int kStages = L::kStages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = base + L::kK, sV = base + L::kV;
  const uint32_t bars = base + L::kBar;
  const uint32_t kv_full = bars;
  auto full = [&](int s) { return bars + 8 + 8 * s; };
  auto empty = [&](int s) { return bars + 8 + 8 * kStages + 8 * s; };
  auto sQ = [&](int s) { return base + L::kQ + s * L::kQTile; };
  auto sDO = [&](int s) { return base + L::kDO + s * L::kQTile; };
  auto sLse = [&](int s) { return base + L::kRowStats + s * 512; };
  auto sDelta = [&](int s) { return base + L::kRowStats + s * 512 + 256; };
  auto sDS = [&](int b) { return base + L::kDS + b * L::kDsBytes; };
  auto sDQ = [&](int b, int cw) { return base + L::kDQ + (2 * b + cw) * L::kDqBlockBytes; };

  const int seg = blockIdx.x / prm.n_blocks;                  // key segment
  const int n_row0 = (blockIdx.x % prm.n_blocks) * kBlockN;  // first key row inside the segment
  const int bh = blockIdx.y;
  const int b = bh / prm.H, h = bh % prm.H;
  const int* conn_row = prm.conn_t + seg * (prm.n_views + 1);
  const int tiles_per_seg = (prm.Lq + kBlockM - 1) / kBlockM;
  const int n_tiles = conn_row[0] * tiles_per_seg;  // 0 when no query segment sees this key segment
  // The walk over the n_tiles query tiles starts at t0 and wraps around (same tiles, other order): the key tiles of
  // a segment start evenly spread, so concurrent CTAs add their dQ blocks to different addresses instead of all
  // reducing into the same block at once (measured 1% faster at 63,600 tokens on an H100).
  const int t0 = static_cast<int>(static_cast<int64_t>(blockIdx.x % prm.n_blocks) * n_tiles / prm.n_blocks);
  auto next_tile = [&](int& c, int& mt) {
    if (++mt == tiles_per_seg) {
      mt = 0;
      if (++c == conn_row[0]) c = 0;
    }
  };

  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumerWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---------------- producer: one thread issues every TMA load ----------------
    shrink_registers<kProducerRegs>();
    if (threadIdx.x != 0 || n_tiles == 0) return;
    prefetch_map(&tm_q);
    prefetch_map(&tm_do);
    mbar_expect_tx(kv_full, 2 * L::kKVTile);
#pragma unroll
    for (int cb = 0; cb < L::kColBlocks; ++cb) {
      tma_load(sK + cb * L::kKBlockBytes, &tm_k, kv_full, cb * 64, h, n_row0, seg, b);
      tma_load(sV + cb * L::kKBlockBytes, &tm_v, kv_full, cb * 64, h, n_row0, seg, b);
    }
    int c = t0 / tiles_per_seg, mt = t0 % tiles_per_seg;  // connected query-segment index, tile inside it
    for (int t = 0; t < n_tiles; ++t) {
      const int st = t % kStages;
      const int qseg = conn_row[1 + c];
      const int m_row0 = mt * kBlockM;
      mbar_wait(empty(st), ((t / kStages) & 1) ^ 1);
      mbar_expect_tx(full(st), 2 * L::kQTile + 512);
#pragma unroll
      for (int cb = 0; cb < L::kColBlocks; ++cb) {
        tma_load(sQ(st) + cb * L::kQBlockBytes, &tm_q, full(st), cb * 64, h, m_row0, qseg, b);
        tma_load(sDO(st) + cb * L::kQBlockBytes, &tm_do, full(st), cb * 64, h, m_row0, qseg, b);
      }
      const int64_t stat_row = (static_cast<int64_t>(bh) * prm.n_views + qseg) * prm.Lq_pad + m_row0;
      bulk_load(sLse(st), prm.lse_pad + stat_row, 256, full(st));
      bulk_load(sDelta(st), prm.delta_pad + stat_row, 256, full(st));
      next_tile(c, mt);
    }
    return;
  }

  // ---------------- consumers: warpgroups 1 and 2, 64 keys each ----------------
  grow_registers<kConsumerRegs>();
  const int cw = wg - 1;
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t k_rows = sK + cw * 64 * kRowBytes;  // this warpgroup's 64 keys (1024-byte aligned)
  const uint32_t v_rows = sV + cw * 64 * kRowBytes;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  float s[32], dp[32], dq[32];
  uint32_t pf[16], dsf[16];
  float2 stats[8];

  // dQ of a finished tile -> shared memory in fragment order (thread-contiguous 16-byte chunks: no bank conflicts;
  // the host undoes the order), then one thread adds the block to the global accumulator with a bulk reduce. The
  // issuing thread first waits until the previous reduce has read its buffer, and the barrier publishes that, so
  // the next stores into that buffer (two flushes later) are safe with one barrier per flush.
  auto flush_dq = [&](int t_done, int64_t blk) {
    pin(dq);
    const uint32_t buf = sDQ(t_done % 2, cw);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      st_shared_f4(buf + ((warp * 8 + j) * 32 + lane) * 16, dq[4 * j] * prm.scale, dq[4 * j + 1] * prm.scale,
                   dq[4 * j + 2] * prm.scale, dq[4 * j + 3] * prm.scale);
    fence_async_smem();
    if (tid == 0) bulk_wait_read();
    warpgroup_sync(4 + cw);
    if (tid == 0) bulk_reduce_add_f32(prm.dq_accum + blk * 64 * 64, buf, L::kDqBlockBytes);
  };

  const TurnTaking<kPingPong> turns{cw, n_tiles > 0};
  turns.start();
  if (n_tiles > 0) mbar_wait(kv_full, 0);
  int c = t0 / tiles_per_seg, mt = t0 % tiles_per_seg;
  for (int t = 0; t < n_tiles; ++t) {
    const int st = t % kStages;
    const uint32_t ds_buf = sDS(t % 2);
    mbar_wait(full(st), (t / kStages) & 1);

    // S^T and dP^T as two groups: the exponentials of P^T run while dP^T is computed
    turns.my_turn();
    wgmma_fence();
    issue_transposed_scores<T, D>(s, k_rows, sQ(st));
    wgmma_commit();
    issue_transposed_scores<T, D>(dp, v_rows, sDO(st));
    wgmma_commit();
    turns.hand_over();
    wgmma_wait<1>();
    pin(s);
    load_row_stats(stats, sLse(st), lane);
    probs<T>(s, pf, stats, prm.scale_log2);

    // dV += P^T dO; dS^T is computed while it runs (its registers are no input of the dV GEMM)
    turns.my_turn();
    wgmma_fence();
    issue_key_grad<T, D>(dv, pf, sDO(st));
    wgmma_commit();
    turns.hand_over();
    wgmma_wait<1>();  // dP^T done (groups retire in order), dV may still run
    pin(dp);
    load_row_stats(stats, sDelta(st), lane);
    dscores<T>(s, dp, dsf, stats, ds_buf + cw * 64 * kRowBytes, warp, lane);

    // dK += dS^T Q, then (in-kernel dQ) dQ = dS K. dK uses this warpgroup's own registers, so it is issued before
    // waiting for the other warpgroup's dS^T rows: the tensor cores work through the barrier. (Measured on an H100
    // at 63,600 tokens: 1.3% faster than barrier-then-both. Deferring the dQ copy-out into the next tile, under
    // its S^T or dP^T GEMMs, measured 6% / 50% slower: its stores compete with those GEMMs' shared-memory reads,
    // and the second placement spills.)
    turns.my_turn();
    wgmma_fence();
    issue_key_grad<T, D>(dk, dsf, sQ(st));
    wgmma_commit();
    if constexpr (kDq) {
      fence_async_smem();
      named_sync(1);  // both warpgroups' dS^T rows are in ds_buf (and both finished the dQ that read it 2 tiles ago)
      issue_dq<T, D, DqSplit<D>::kKeys>(dq, ds_buf + DqSplit<D>::ds_offset(cw), sK + DqSplit<D>::k_offset(cw));
      wgmma_commit();
    }
    turns.hand_over();
    wgmma_wait<0>();
    pin(pf);
    pin(dsf);
    release(empty(st), lane);
    if constexpr (kDq) {
      const int64_t blk = ((static_cast<int64_t>(bh) * prm.n_views + conn_row[1 + c]) * (prm.Lq_pad / kBlockM) + mt) *
                              L::kColBlocks + DqSplit<D>::col0(cw) / 64;
      flush_dq(t, blk);
    }
    next_tile(c, mt);
  }
  turns.finish();
  if (kDq && tid == 0) bulk_wait_all();  // the last reduces still read this CTA's shared memory
  pin(dk);
  pin(dv);

  // ---------------- epilogue: dK * scale, dV -> [B, Sk, H, D] (16-bit), rows inside the key segment only ----------
  T* dk_out = static_cast<T*>(prm.dk);
  T* dv_out = static_cast<T*>(prm.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = n_row0 + cw * 64 + warp * 16 + lane / 4 + 8 * r;
    if (row < prm.Lk) {
      const int64_t bsr = static_cast<int64_t>(b) * prm.Sk + static_cast<int64_t>(seg) * prm.Lk + row;
      const int64_t off = (bsr * prm.H + h) * D + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dk_out + off + 8 * j) =
            pack2<T>(dk[4 * j + 2 * r] * prm.scale, dk[4 * j + 2 * r + 1] * prm.scale);
        *reinterpret_cast<uint32_t*>(dv_out + off + 8 * j) = pack2<T>(dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
      }
    }
  }
#else
  __trap();  // only the sm_90a build has this kernel; the host side checks the device before launching
#endif
}

// ------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------
constexpr const char* kWho = "mv_attention_bwd_sm90";

template <typename T, int D, bool kDq, bool kPingPong>
void launch(const MvAttnBwdSm90Args& a, cudaStream_t stream) {
  auto kernel = mv_attn_bwd_sm90_kernel<T, D, kDq, kPingPong>;
  const int smem = BwdSmem<D, kDq>::kBytes;
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [&] {
    attr_err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  });
  if (attr_err != cudaSuccess)
    throw std::runtime_error(std::string(kWho) + ": cudaFuncSetAttribute: " + cudaGetErrorString(attr_err));
  const bool bf16 = a.dtype == static_cast<int>(DType::bf16);
  const int64_t nv = a.n_views, Lq = a.Sq / nv, Lk = a.Sk / nv;
  const CUtensorMap tq = make_map(a.q, bf16, D, a.H, Lq, nv, a.B, a.q_sb, a.q_ss, a.q_sh, kBlockM, kWho);
  const CUtensorMap tdo = make_map(a.dout, bf16, D, a.H, Lq, nv, a.B, a.do_sb, a.do_ss, a.do_sh, kBlockM, kWho);
  const CUtensorMap tk = make_map(a.k, bf16, D, a.H, Lk, nv, a.B, a.k_sb, a.k_ss, a.k_sh, kBlockN, kWho);
  const CUtensorMap tv = make_map(a.v, bf16, D, a.H, Lk, nv, a.B, a.v_sb, a.v_ss, a.v_sh, kBlockN, kWho);
  Params prm{};
  prm.dk = a.dk;
  prm.dv = a.dv;
  prm.dq_accum = a.dq_accum;
  prm.lse_pad = a.lse_pad;
  prm.delta_pad = a.delta_pad;
  prm.conn_t = a.conn_t;
  prm.H = int(a.H);
  prm.Sk = int(a.Sk);
  prm.Lq = int(Lq);
  prm.Lq_pad = int((Lq + kBlockM - 1) / kBlockM * kBlockM);
  prm.Lk = int(Lk);
  prm.n_views = a.n_views;
  prm.n_blocks = int((Lk + kBlockN - 1) / kBlockN);
  prm.scale = a.scale;
  prm.scale_log2 = a.scale * 1.4426950408889634f;
  const dim3 grid(unsigned(nv * prm.n_blocks), unsigned(a.B * a.H));
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, tdo, prm);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(kWho) + ": launch failed: " + cudaGetErrorString(err));
}

// MVKERNELS_ATTN_BWD_PINGPONG=1 (read per call; default 0 = the lockstep kernel) turns on the consumer warpgroups'
// turn-taking. It applies only with dQ from the Triton kernel; the atomic-dQ kernel always runs in lockstep.
inline bool pingpong_requested() {
  const char* env = std::getenv("MVKERNELS_ATTN_BWD_PINGPONG");
  return env && env[0] == '1';
}

template <typename T, int D>
void launch_dq(const MvAttnBwdSm90Args& a, cudaStream_t st) {
  if (a.dq_accum) launch<T, D, true, false>(a, st);
  else if (pingpong_requested()) launch<T, D, false, true>(a, st);
  else launch<T, D, false, false>(a, st);
}

}  // namespace sm90_bwd

void mv_attention_bwd_sm90(const MvAttnBwdSm90Args& a, int64_t stream) {
  if (!mv_attention_sm90_supported(a.D, a.dtype))
    throw std::runtime_error("mv_attention_bwd_sm90: needs D in {64, 128} and bf16/fp16, got D=" + std::to_string(a.D));
  if (a.n_views < 1 || a.Sq % a.n_views || a.Sk % a.n_views || a.Sk == 0)
    throw std::runtime_error("mv_attention_bwd_sm90: Sq and Sk must be positive multiples of n_views");
  if (a.Sq >= (int64_t(1) << 31) || a.Sk >= (int64_t(1) << 31) || a.B * a.H >= 65536)
    throw std::runtime_error("mv_attention_bwd_sm90: Sq and Sk must be < 2^31 and B*H < 65536");
  if (a.Sq == 0 || a.B * a.H == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const bool bf16 = a.dtype == static_cast<int>(DType::bf16);
  if (a.D == 128) {
    if (bf16) sm90_bwd::launch_dq<__nv_bfloat16, 128>(a, st);
    else sm90_bwd::launch_dq<__half, 128>(a, st);
  } else {
    if (bf16) sm90_bwd::launch_dq<__nv_bfloat16, 64>(a, st);
    else sm90_bwd::launch_dq<__half, 64>(a, st);
  }
}

}  // namespace mvkernels
