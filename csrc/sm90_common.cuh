// Shared pieces of the Hopper (sm_90a) attention kernels (forward: mv_attention_sm90.cu, backward:
// mv_attention_sm90_bwd.cu): PTX wrappers (mbarrier, TMA, wgmma), shared-memory descriptors, accumulator-fragment
// helpers and the host-side TMA map construction. Everything here was verified on an H100 with the forward.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums only: the driver entry point is fetched at run time
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

// The device code exists only in the sm_90a pass (wgmma, setmaxnreg and TMA need the arch-specific feature set);
// other device passes (e.g. sm_80) compile the kernels as a trap. The host pass sees everything.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MV_SM90_DEVICE 0
#else
#define MV_SM90_DEVICE 1
#endif

namespace mvkernels {
namespace sm90 {

constexpr int kRowBytes = 128;  // one swizzled row: 64 16-bit elements

#if MV_SM90_DEVICE
// ------------------------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Producer: one arrival that also announces `bytes` of TMA traffic completing this phase.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Spins until the phase with this parity has completed. A fresh barrier is in phase 0, so waiting for parity 1
// returns at once ("the preceding phase"): that is how the producer's first pass over the empty ring starts.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// One TMA box {64 columns, 1 head, 128 rows, 1 segment, 1 batch} -> shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int col, int head,
                                         int row, int seg, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(col), "r"(head), "r"(row), "r"(seg), "r"(batch)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Pins register values in program order relative to the (volatile) wgmma fence/wait instructions: reads after a
// wait see the finished accumulators, writes before a fence are not sunk past it, and an A fragment read by an
// in-flight wgmma stays allocated until the wait that follows.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Reads an accumulator after a wgmma wait into a new register: volatile, so not hoisted above the wait, and unlike
// pin() it does not redefine the accumulator itself (ptxas serialises wgmma pipelines whose accumulators are
// written by other instructions while any wgmma group is pending).
__device__ __forceinline__ float read_after_wait(float v) {
  float y;
  asm volatile("mov.b32 %0, %1;" : "=f"(y) : "f"(v) : "memory");
  return y;
}
// Moves the next tile's P into the A-fragment registers after the wait: the copy is an instruction of its own
// (volatile, after the wait), so the conversion never writes registers that a pending wgmma reads.
__device__ __forceinline__ uint32_t copy_after_wait(uint32_t v) {
  uint32_t y;
  asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(v) : "memory");
  return y;
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63), base offset 0 (every
// swizzle atom is 1024-byte aligned). Byte offsets are stored >> 4 in 14-bit fields.
//   K-major (Q, K):  SBO = 1024 (next 8 rows), LBO unused (1).
//   MN-major (V):    SBO = 1024 (next 8 keys = K dimension), LBO = next 64 columns of D (N dimension).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

#define MV_F8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                    "+f"(d[i + 6]), "+f"(d[i + 7])
#define MV_F32(d) MV_F8(d, 0), MV_F8(d, 8), MV_F8(d, 16), MV_F8(d, 24)
#define MV_F64(d) MV_F32(d), MV_F8(d, 32), MV_F8(d, 40), MV_F8(d, 48), MV_F8(d, 56)
#define MV_F88(d) MV_F64(d), MV_F8(d, 64), MV_F8(d, 72), MV_F8(d, 80)
#define MV_REGS32                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MV_REGS64                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

#define MV_REGS88                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "  \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "  \
  "%86, %87}"

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool kBf16 = true; };
template <> struct MmaType<__half> { static constexpr bool kBf16 = false; };

// One wgmma instruction in both of its spellings: the element type is part of the opcode, so the bf16 and fp16
// forms are separate string literals. PRE/POST are the text before the opcode and after its type.
#define MV_WGMMA(T, PRE, SHAPE, POST, ...)                                                                   \
  do {                                                                                                     \
    if constexpr (MmaType<T>::kBf16)                                                                       \
      asm volatile(PRE "wgmma.mma_async.sync.aligned." SHAPE ".f32.bf16.bf16 " POST : __VA_ARGS__);        \
    else                                                                                                   \
      asm volatile(PRE "wgmma.mma_async.sync.aligned." SHAPE ".f32.f16.f16 " POST : __VA_ARGS__);          \
  } while (0)
// scale_d = 0 overwrites the accumulator (first k-step of a tile): a predicate made inside the asm block.
#define MV_SCALE_D_PRED(i) "{\n .reg .pred p;\n setp.ne.b32 p, %" #i ", 0;\n"

// S[64 x 128] (+)= A[64 x 16] * B[128 x 16]^T, both from shared memory, K-major (no transposes).
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  MV_WGMMA(T, MV_SCALE_D_PRED(66), "m64n128k16", MV_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n",
           MV_F64(d) : "l"(da), "l"(db), "r"(scale_d));
}

// S[64 x 176] (+)= A[64 x 16] * B[176 x 16]^T, as wgmma_ss_n128 (176-key tiles of the forward).
template <typename T>
__device__ __forceinline__ void wgmma_ss_n176(float (&d)[88], uint64_t da, uint64_t db, int scale_d) {
  MV_WGMMA(T, MV_SCALE_D_PRED(90), "m64n176k16", MV_REGS88 ", %88, %89, p, 1, 1, 0, 0;\n}\n",
           MV_F88(d) : "l"(da), "l"(db), "r"(scale_d));
}

// S[64 x 64] (+)= A[64 x 16] B[64 x 16]^T, both K-major in shared memory; kTrans: both MN-major instead
// (imm-trans-a = imm-trans-b = 1), i.e. A[64 x 16] B[16 x 64] read from their transposed layouts.
template <typename T, bool kTrans = false>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (kTrans)
    MV_WGMMA(T, MV_SCALE_D_PRED(34), "m64n64k16", MV_REGS32 ", %32, %33, p, 1, 1, 1, 1;\n}\n",
             MV_F32(d) : "l"(da), "l"(db), "r"(scale_d));
  else
    MV_WGMMA(T, MV_SCALE_D_PRED(34), "m64n64k16", MV_REGS32 ", %32, %33, p, 1, 1, 0, 0;\n}\n",
             MV_F32(d) : "l"(da), "l"(db), "r"(scale_d));
}

// O[64 x N] += A[64 x 16] (registers) * B[16 x N], B from shared memory MN-major (imm-trans-b = 1).
template <typename T>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t* a, uint64_t db) {
  MV_WGMMA(T, "", "m64n128k16", MV_REGS64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n",
           MV_F64(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

template <typename T>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t* a, uint64_t db) {
  MV_WGMMA(T, "", "m64n64k16", MV_REGS32 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n",
           MV_F32(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// ------------------------------------------------------------------------------------------------------------
// kernel set-up shared by the producer/consumer kernels
// ------------------------------------------------------------------------------------------------------------
// After thread 0 initialised the mbarriers: make them visible to the async proxy (TMA) and to the other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Warpgroup register budgets: the producer gives registers back, the consumers take them (whole warpgroups).
template <int N>
__device__ __forceinline__ void shrink_registers() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void grow_registers() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }

__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Fragment of an m64nN fp32 accumulator: thread (warp w, lane l) holds, for each 8-column block j,
//   s[4j + 0], s[4j + 1] at row 16w + l/4,     columns 8j + 2(l%4) + {0, 1}
//   s[4j + 2], s[4j + 3] at row 16w + l/4 + 8, the same columns.
// So each thread owns two rows (r = 0, 1); a row is shared by the 4 lanes of a quad.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  // the lower-indexed column goes to the low 16 bits
  if constexpr (MmaType<T>::kBf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Consumer warps each release a stage once their own wait_group has returned: with one arrival per consumer
// warp (8 in all) the stage is free only when every wgmma reading it has completed.
__device__ __forceinline__ void release(uint32_t bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}
// Ping-pong between the two consumer warpgroups (named barriers 1 and 2, 256 threads each: one warpgroup waits,
// the other arrives): warpgroup c issues its GEMMs only after the other one has issued its own, so the tensor cores
// run one warpgroup's GEMMs while the other one computes its softmax.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;" ::"r"(id) : "memory"); }
// one warpgroup alone (128 threads)
__device__ __forceinline__ void warpgroup_sync(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }
#endif  // MV_SM90_DEVICE


// ------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point: no link against libcuda.
inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                       &found);
#else
    cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err == cudaSuccess && found == cudaDriverEntryPointSuccess) fn = reinterpret_cast<EncodeTiledFn>(ptr);
  });
  if (!fn) throw std::runtime_error("mv_attention_fwd_sm90: cuTensorMapEncodeTiled is not available from the driver");
  return fn;
}

// 5-D map (D, H, L, n_views, B) over a [B, n_views * L, H, D] view with element strides (sb, ss, sh, 1);
// box {64, 1, box_rows, 1, 1}, 128-byte swizzle, zero fill out of bounds (rows past a segment's end).
inline CUtensorMap make_map(const void* ptr, bool bf16, int64_t D, int64_t H, int64_t L, int64_t n_views, int64_t B,
                            int64_t sb, int64_t ss, int64_t sh, uint32_t box_rows = 128,
                            const char* who = "mv_attention_fwd_sm90") {
  CUtensorMap map;
  const cuuint64_t dims[5] = {cuuint64_t(D), cuuint64_t(H), cuuint64_t(L), cuuint64_t(n_views), cuuint64_t(B)};
  const cuuint64_t strides[4] = {cuuint64_t(sh * 2), cuuint64_t(ss * 2), cuuint64_t(L * ss * 2), cuuint64_t(sb * 2)};
  const cuuint32_t box[5] = {64, 1, box_rows, 1, 1};
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  CUresult r = encode_tiled()(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 5,
                              const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string(who) + ": cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) +
                             "); strides must be multiples of 16 bytes and the base 16-byte aligned");
  return map;
}

}  // namespace sm90
}  // namespace mvkernels
