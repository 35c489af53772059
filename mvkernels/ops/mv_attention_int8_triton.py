"""Triton kernels of ``mvkernels.mv_attention_int8``: the quantizing pre-pass and the 8-bit attention forward.

Three launches per call (all on the caller's stream):

1. ``_kv_stats``: one pass over k (after RMSNorm + RoPE when given) and v writing per-block partial column sums of
   k and per-block column absmax of v, [B*H, n_blocks, D] fp32 each; torch reduces them (sum / amax over blocks)
   to the K mean and the V per-channel absmax. This is the only second read of k and v: the K mean and the V
   scale are reductions over all tokens and must exist before any K or V row can be quantized. It costs two
   extra reads of k and v (~0.6 ms at 76,320 tokens x batch 2 x 32 heads x 128 on an H200, <1% of the attention).
2. ``_quantize``: reads q, k, v once each (RMSNorm + RoPE fused for q and k) and writes, per (batch, head),
   Q int8 [B, H, NV*Lq_pad, D] with one fp32 scale per row (the group's absmax / 127, times softmax_scale*log2(e)),
   K - mean int8 [B, H, NV*Lk_pad, D] with one fp32 scale per row, and V^T e4m3 [B, H, D, NV*Lk_pad] (keys
   contiguous: the K-major B operand that Hopper's FP8 wgmma needs for P.V) scaled by 448 / absmax per channel.
   Each view segment is padded to a multiple of 128 rows with zeros (scales 0), so the attention kernel loads
   whole tiles without masks and a tile never straddles two segments.
3. ``_attn_fwd``: FlashAttention-2 loop over the connected key segments (the table and block skipping of
   ``mv_attention_triton``): S = int8 dot (int32, exact) dequantised in fp32 by the row (Q) and column (K) scale
   vectors, online softmax in fp32 (exp2), P scaled to [0, 448] and cast to e4m3, P.V as a fresh fp32 dot per key
   tile added to the fp32 accumulator in registers (two-level accumulation), out = acc * v_scale / l.
   K^T [D, BLOCK_N] and V [BLOCK_N, D] tiles are addressed transposed and every stride/length the compiler needs for
   16-byte alignment is specialized or hinted: both are then pipelined with cp.async (IGMMA s8 + QGMMA e4m3 wgmma in
   the sm_90 SASS; see .notes/attention_int8.md).

Scales are stored per row (Q) / per key (K) even when a group of rows shares one value: the attention kernel then
reads scale vectors and does not depend on the quantization granularity (set by the pre-pass' Q_GROUP / K_GROUP).
Masking: only a segment's last, partial key tile masks its scores to -inf; padded V rows are 0, so P.V adds 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import mv_attention_triton as _tri

LOG2E = 1.4426950408889634
LOG2_448 = 8.807354922057604  # log2(448): P is computed directly in [0, 448] (e4m3's largest finite value)
_LOG2_448 = tl.constexpr(LOG2_448)
PAD = 128                      # every view segment is padded to a multiple of this many rows
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_STDLIB_OK = _tri._STDLIB_OK
_max2, _add2, _rowmax, _rowsum = _tri._max2, _tri._add2, _tri._rowmax, _tri._rowsum

if _STDLIB_OK:
    @triton.jit
    def _colsum(x):
        return tl.sum(x, 0)

    @triton.jit
    def _colmax(x):
        return tl.max(x, 0)
else:
    @triton.jit
    def _colsum(x):
        return tl.reduce(x, 0, _add2)

    @triton.jit
    def _colmax(x):
        return tl.reduce(x, 0, _max2)


# ----------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 -> float8_e4m3fn, round to nearest even. |x| must be <= 448. The interpreter's own cast rounds wrongly
    when the mantissa carries into the exponent (seen with triton 3.9), so under TRITON_INTERPRET=1 the value is
    first rounded onto the e4m3 grid in fp32 (then the cast is exact); on the GPU the hardware cvt.rn is used."""
    if EMULATE:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000          # keep 3 mantissa bits (normal range)
        xn = b.to(tl.float32, bitcast=True)
        xs = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # subnormals: multiples of 2^-9
        x = tl.where(tl.abs(x) < 0.015625, xs, xn)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        return x.to(tl.float8e4nv)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _load_rows(X_bh, stride_s, rows, ok, offs_d, W, cos, sin, eps,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """[BLOCK, D] fp32 rows of one head, RMSNorm (x * rsqrt(mean(x^2) + eps) * w) then rotate-half RoPE
    (x * cos + [-x2, x1] * sin); masked rows are 0. Same math and order as ``mv_attention._norm_rope``."""
    ptrs = X_bh + rows.to(tl.int64)[:, None] * stride_s
    x = tl.load(ptrs + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if ROPE:
        rot_d = (offs_d + HEAD_DIM // 2) % HEAD_DIM
        xr = tl.load(ptrs + rot_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if NORM:
        r = 1.0 / tl.sqrt(_rowsum(x * x) / HEAD_DIM + eps)
        x = x * r[:, None] * tl.load(W + offs_d)[None, :]
        if ROPE:
            xr = xr * r[:, None] * tl.load(W + rot_d)[None, :]
    if ROPE:
        sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)
        x = x * cos + sign[None, :] * xr * sin
    return x


@triton.jit
def _group_absmax(x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr):
    """Per-row absmax of the row's group of GROUP consecutive rows, broadcast back to [BLOCK]. NaN/Inf anywhere in
    a group makes its value NaN (max ignores NaN on the GPU, so a row sum of x * 0 carries it)."""
    a = tl.abs(x)
    bad = x * 0.0
    if GROUP == 1:
        return _rowmax(a) + _rowsum(bad)
    g = _rowmax(tl.reshape(a, [BLOCK // GROUP, GROUP * HEAD_DIM])) + \
        _rowsum(tl.reshape(bad, [BLOCK // GROUP, GROUP * HEAD_DIM]))
    return tl.reshape(tl.broadcast_to(g[:, None], [BLOCK // GROUP, GROUP]), [BLOCK])


@triton.jit
def _quant_int8(x, amax):
    """x / (amax / 127) rounded half-up to int8. Rows with amax == 0 give 0."""
    safe = tl.where(amax > 0.0, amax, 1.0)
    return tl.floor(x * (127.0 / safe)[:, None] + 0.5).to(tl.int8)


@triton.jit
def _quant_e4m3(x, amax, EMULATE: tl.constexpr):
    """x / (amax / 448) to e4m3 (the measured alternative for Q.K^T). Rows with amax == 0 give 0."""
    safe = tl.where(amax > 0.0, amax, 1.0)
    return _to_e4m3(x * (448.0 / safe)[:, None], EMULATE)


@triton.jit
def _store_codes(ptrs, x, amax, FP8: tl.constexpr, EMULATE: tl.constexpr):
    # one helper per output type: triton 3.6 rejects a function whose (dead) branches return different types
    if FP8:
        tl.store(ptrs, _quant_e4m3(x, amax, EMULATE))
    else:
        tl.store(ptrs, _quant_int8(x, amax))


# ----------------------------------------------------------------------------------------------------------
# 1. K column sums and V column absmax (per block of rows; reduced over blocks by torch)
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Sk"])
def _kv_stats(K, V, KW, ANG, KSUM, VMAX,
              skb, sks, skh, svb, svs, svh, sang,
              H, Sk, eps,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < Sk
    cos = 0.0
    sin = 0.0
    if ROPE:
        a = tl.load(ANG + rows.to(tl.int64)[:, None] * sang + offs_d[None, :], mask=ok[:, None], other=0.0)
        cos, sin = tl.cos(a), tl.sin(a)
    k = _load_rows(K + b * skb + h * skh, sks, rows, ok, offs_d, KW, cos, sin, eps, HEAD_DIM, NORM, ROPE)
    v = tl.load(V + b * svb + h * svh + rows.to(tl.int64)[:, None] * svs + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    out = (bh.to(tl.int64) * tl.num_programs(0) + pid) * HEAD_DIM + offs_d
    tl.store(KSUM + out, _colsum(k))
    tl.store(VMAX + out, _colmax(tl.abs(v)) + _colsum(v * 0.0))  # NaN/Inf in v -> NaN absmax


# ----------------------------------------------------------------------------------------------------------
# 2. quantize q, k, v (reads each once; norm + RoPE fused)
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Lq", "Lk", "Lq_pad", "Lk_pad"])
def _quantize(Q, K, V, QW, KW, ANG, KMEAN, VINV, QO, QS, KO, KS, VT, VT2,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sang,
              H, Lq, Lk, Lq_pad, Lk_pad, q_mult, eps,
              NV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
              Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr,
              ROPE: tl.constexpr, QK_FP8: tl.constexpr, EMULATE: tl.constexpr, V_PLANES: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_max = 448.0 if QK_FP8 else 127.0
    # q blocks: padded rows [seg * Lq_pad, seg * Lq_pad + Lq_pad) <- source rows [seg * Lq, seg * Lq + Lq)
    n_qb = Lq_pad // BLOCK
    if pid < NV * n_qb:
        seg = pid // n_qb
        t = (pid % n_qb) * BLOCK + tl.arange(0, BLOCK)
        ok = t < Lq
        rows = seg * Lq + t
        cos = 0.0
        sin = 0.0
        if ROPE:
            a = tl.load(ANG + rows.to(tl.int64)[:, None] * sang + offs_d[None, :], mask=ok[:, None], other=0.0)
            cos, sin = tl.cos(a), tl.sin(a)
        x = _load_rows(Q + b * sqb + h * sqh, sqs, rows, ok, offs_d, QW, cos, sin, eps, HEAD_DIM, NORM_Q, ROPE)
        amax = _group_absmax(x, BLOCK, HEAD_DIM, Q_GROUP)
        prow = bh64 * (NV * Lq_pad) + seg * Lq_pad + t
        _store_codes(QO + prow[:, None] * HEAD_DIM + offs_d[None, :], x, amax, QK_FP8, EMULATE)
        tl.store(QS + prow, amax * (q_mult / qk_max))
    n_kb = Lk_pad // BLOCK
    if pid < NV * n_kb:
        seg = pid // n_kb
        t = (pid % n_kb) * BLOCK + tl.arange(0, BLOCK)
        ok = t < Lk
        rows = seg * Lk + t
        cos = 0.0
        sin = 0.0
        if ROPE:  # RoPE implies Sk == Sq: the same table rows
            a = tl.load(ANG + rows.to(tl.int64)[:, None] * sang + offs_d[None, :], mask=ok[:, None], other=0.0)
            cos, sin = tl.cos(a), tl.sin(a)
        x = _load_rows(K + b * skb + h * skh, sks, rows, ok, offs_d, KW, cos, sin, eps, HEAD_DIM, NORM_K, ROPE)
        x = tl.where(ok[:, None], x - tl.load(KMEAN + bh64 * HEAD_DIM + offs_d)[None, :], 0.0)  # K smoothing
        amax = _group_absmax(x, BLOCK, HEAD_DIM, K_GROUP)
        prow = bh64 * (NV * Lk_pad) + seg * Lk_pad + t
        _store_codes(KO + prow[:, None] * HEAD_DIM + offs_d[None, :], x, amax, QK_FP8, EMULATE)
        tl.store(KS + prow, amax / qk_max)
        v = tl.load(V + b * svb + h * svh + rows.to(tl.int64)[:, None] * svs + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        xv = v * tl.load(VINV + bh64 * HEAD_DIM + offs_d)[None, :]
        v8 = _to_e4m3(xv, EMULATE)
        # V^T [B*H, D, NV*Lk_pad]: keys contiguous (the K-major B operand of the FP8 P.V dot)
        vt_off = bh64 * HEAD_DIM * (NV * Lk_pad) + offs_d[None, :].to(tl.int64) * (NV * Lk_pad) \
            + (seg * Lk_pad + t)[:, None]
        tl.store(VT + vt_off, v8)
        if V_PLANES == 2:  # second plane: the e4m3 rounding residual x 16 (|residual| <= 16 at 448: fits)
            tl.store(VT2 + vt_off, _to_e4m3((xv - v8.to(tl.float32)) * 16.0, EMULATE))


# ----------------------------------------------------------------------------------------------------------
# 3. attention forward
# ----------------------------------------------------------------------------------------------------------
def _cfgs(rows):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages), ...] -> autotune configs; one small tile in the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


# BLOCK_M 128 with 8 warps (2 warpgroups of 64 rows), BLOCK_N 128/64, 2-4 stages. ptxas for sm_90 (triton 3.9,
# compiled on the CPU): 128x128/8w 255 registers, no spill; 128x64/8w 242; 128x64 with 4 warps (one warpgroup for
# 128 rows) spills 384 bytes, so 4-warp tiles are only in the wide list. MVKERNELS_ATTN_TUNE=first keeps the first
# entry (GPU test runs); =wide adds more.
_TUNE = os.environ.get("MVKERNELS_ATTN_TUNE", "")
_FWD_ROWS = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)]
if _TUNE == "wide":
    _FWD_ROWS += [(128, 128, 8, 4), (128, 64, 8, 4), (128, 64, 4, 3), (128, 64, 4, 2), (64, 128, 4, 3),
                  (64, 64, 4, 3), (128, 64, 8, 2)]
elif _TUNE == "first":
    _FWD_ROWS = _FWD_ROWS[:1]
_FWD_CONFIGS = _cfgs(_FWD_ROWS)


@triton.jit
def _fwd_range(acc, m_i, l_i, q, qs, K_bh, KS_bh, VT_bh, VT2_bh, s_vt, n_lo, n_hi, n_end, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, QK_FP8: tl.constexpr,
               EMULATE: tl.constexpr, I2F_MAGIC: tl.constexpr, V_PLANES: tl.constexpr):
    """Online softmax over padded key rows [n_lo, n_hi) in BLOCK_N steps; MASK drops keys >= n_end."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)  # tiles start at multiples of BLOCK_N (segments are padded)
        cols = start_n + offs_n
        # K^T [D, BLOCK_N] and V [BLOCK_N, D] are addressed transposed (not loaded + tl.trans): that way Triton's
        # pipeliner turns both loads into cp.async stages (with tl.trans it kept them synchronous for 8-bit types,
        # seen in the sm_90 TTGIR of triton 3.9)
        kt = tl.load(K_bh + cols.to(tl.int64)[None, :] * HEAD_DIM + offs_d[:, None])
        ks = tl.load(KS_bh + cols)
        v_off = offs_d.to(tl.int64)[None, :] * s_vt + cols[:, None]
        v = tl.load(VT_bh + v_off)  # [BLOCK_N, D], keys contiguous
        if V_PLANES == 2:
            v2 = tl.load(VT2_bh + v_off)
        if QK_FP8:
            x = tl.dot(q, kt)
        else:
            s = tl.dot(q, kt, out_dtype=tl.int32)  # exact: |s| <= 127^2 * 128 < 2^22
            if I2F_MAGIC:  # int32 -> fp32 with an integer add + fp sub (full rate) instead of I2F
                x = (s + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                x = s.to(tl.float32)
        x = x * ks[None, :]  # log2-domain score = x * qs (qs > 0 holds softmax_scale * log2(e))
        if MASK:
            x = tl.where((cols < n_end)[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, _rowmax(x) * qs)
        p = tl.math.exp2(x * qs[:, None] - (m_new - _LOG2_448)[:, None])  # in [0, 448]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _rowsum(p)
        p8 = _to_e4m3(p, EMULATE)
        if V_PLANES == 2:  # residual plane first (x 1/16, exact), then the main plane on top: still one tile
            pv = tl.dot(p8, v, tl.dot(p8, v2) * 0.0625)
        else:
            pv = tl.dot(p8, v)  # fresh fp32 result for this key tile only
        acc = acc * alpha[:, None] + pv                    # promoted into the fp32 accumulator
        m_i = m_new
    return acc, m_i, l_i


def _quick_bench(fn, quantiles=None, **_):
    """Autotune timing: a few runs per config (a 76k-token call takes ~0.2-0.6 s; Triton's default is 100 ms)."""
    return triton.testing.do_bench(fn, warmup=1, rep=1, quantiles=quantiles)


def _autotune(configs, key):
    import inspect

    kw = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **kw)


@_autotune(_FWD_CONFIGS, key=["HEAD_DIM", "NV", "QK_FP8", "V_PLANES", "LK_BUCKET"])
@triton.jit(do_not_specialize=["H", "Sq", "Lq", "Lk", "Lq_pad", "Lk_pad", "LK_BUCKET"])
def _attn_fwd(QI, QS, KI, KS, VT, VT2, VS, O, CONN,
              sob, sos, soh, s_vt, H, Sq, Lq, Lk, Lq_pad, Lk_pad, LK_BUCKET,
              NV: tl.constexpr, HEAD_DIM: tl.constexpr, QK_FP8: tl.constexpr, EMULATE: tl.constexpr,
              I2F_MAGIC: tl.constexpr, V_PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    # padded lengths are multiples of 128 (PAD): told to the compiler so that the V^T column stride keeps 16-byte
    # alignment and its tiles are loaded with cp.async (lengths stay unspecialized: one binary for all)
    Lq_pad = tl.multiple_of(Lq_pad, 128)
    Lk_pad = tl.multiple_of(Lk_pad, 128)
    n_mblk = (Lq + BLOCK_M - 1) // BLOCK_M
    seg = pid_m // n_mblk
    t = (pid_m % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    prow = bh64 * (NV * Lq_pad) + seg * Lq_pad + t
    q = tl.load(QI + prow[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(QS + prow)
    K_bh = KI + bh64 * (NV * Lk_pad) * HEAD_DIM
    KS_bh = KS + bh64 * (NV * Lk_pad)
    # s_vt = NV * Lk_pad (a multiple of 128) comes as its own, specialized argument: Triton then knows the V^T rows
    # are 16-byte aligned and pipelines the V tiles with cp.async (a computed stride kept them synchronous)
    VT_bh = VT + bh64 * HEAD_DIM * s_vt
    VT2_bh = VT2 + bh64 * HEAD_DIM * s_vt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    row = CONN + seg * (NV + 1)
    for c in range(tl.load(row)):
        k_lo = tl.multiple_of(tl.load(row + 1 + c) * Lk_pad, 128)
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, qs, K_bh, KS_bh, VT_bh, VT2_bh, s_vt, k_lo, k_lo + n_full,
                                   k_lo + Lk, offs_d, HEAD_DIM, BLOCK_N, False, QK_FP8, EMULATE, I2F_MAGIC,
                                   V_PLANES)
        if n_full < Lk:
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, qs, K_bh, KS_bh, VT_bh, VT2_bh, s_vt, k_lo + n_full,
                                       k_lo + n_full + BLOCK_N, k_lo + Lk, offs_d, HEAD_DIM, BLOCK_N, True,
                                       QK_FP8, EMULATE, I2F_MAGIC, V_PLANES)
    vs = tl.load(VS + bh64 * HEAD_DIM + offs_d)  # absmax_v / 448 per channel
    out = acc * vs[None, :] / l_i[:, None]
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    o_rows = (seg * Lq + t).to(tl.int64)
    tl.store(O + b * sob + h * soh + o_rows[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(t < Lq)[:, None])


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
def _pad(n: int) -> int:
    return (n + PAD - 1) // PAD * PAD


def _lk_bucket(lk: int) -> int:
    """Autotune key for the key length: short (< 4k), medium (< 32k), long."""
    return 0 if lk < 4096 else (1 if lk < 32768 else 2)


def quantize(q, k, v, n_views: int, scale: float, rope_angles, q_norm_weight, k_norm_weight, eps: float, *,
             qk_fp8: bool = False, q_group: int = 1, k_group: int = 1, v_planes: int = 1):
    """Run the stats and quantize kernels. Returns a dict of the operands the attention kernel reads:
    qi [B, H, NV*Lq_pad, D] int8 (e4m3 with qk_fp8), qs [B, H, NV*Lq_pad] fp32 (x softmax_scale * log2 e),
    ki, ks likewise for K - k_mean, vt [B, H, D, NV*Lk_pad] e4m3, vs [B, H, D] fp32 (absmax / 448),
    k_mean [B, H, D] fp32, and ``scales``: one fp32 buffer that holds qs, ks and vs (views into it), so that
    one reduction checks every scale for NaN/Inf."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    Lq, Lk = Sq // n_views, Sk // n_views
    Lq_pad, Lk_pad = _pad(Lq), _pad(Lk)
    dev = q.device
    f32 = torch.float32
    norm_q, norm_k, rope = q_norm_weight is not None, k_norm_weight is not None, rope_angles is not None
    dummy = torch.zeros(1, dtype=f32, device=dev)
    qw = q_norm_weight.to(f32).contiguous() if norm_q else dummy
    kw = k_norm_weight.to(f32).contiguous() if norm_k else dummy
    ang = rope_angles if rope else dummy
    sang = ang.stride(0) if rope else 0

    blk_s = 32 if _INTERPRET else 64
    nb = triton.cdiv(Sk, blk_s)
    ksum = torch.empty((B * H, nb, D), dtype=f32, device=dev)
    vmax = torch.empty((B * H, nb, D), dtype=f32, device=dev)
    _kv_stats[(nb, B * H)](k, v, kw, ang, ksum, vmax, *k.stride()[:3], *v.stride()[:3], sang, H, Sk, float(eps),
                           HEAD_DIM=D, BLOCK=blk_s, NORM=norm_k, ROPE=rope, num_warps=4)
    k_mean = ksum.sum(1).div_(Sk).view(B, H, D)
    vabs = vmax.amax(1).view(B, H, D)  # NaN-propagating

    n_q, n_k = B * H * n_views * Lq_pad, B * H * n_views * Lk_pad
    scales = torch.empty(n_q + n_k + B * H * D, dtype=f32, device=dev)
    qs = scales[:n_q].view(B, H, n_views * Lq_pad)
    ks = scales[n_q:n_q + n_k].view(B, H, n_views * Lk_pad)
    vs = scales[n_q + n_k:].view(B, H, D)
    torch.div(vabs, 448.0, out=vs)
    vinv = 448.0 / torch.where(vabs > 0, vabs, torch.ones_like(vabs))
    qk_dtype = torch.float8_e4m3fn if qk_fp8 else torch.int8
    qi = torch.empty((B, H, n_views * Lq_pad, D), dtype=qk_dtype, device=dev)
    ki = torch.empty((B, H, n_views * Lk_pad, D), dtype=qk_dtype, device=dev)
    vt = torch.empty((B, H, D, n_views * Lk_pad), dtype=torch.float8_e4m3fn, device=dev)
    vt2 = torch.empty_like(vt) if v_planes == 2 else vt
    blk = 32 if _INTERPRET else 64
    blk = max(blk, q_group, k_group)
    grid = (n_views * max(Lq_pad, Lk_pad) // blk, B * H)
    _quantize[grid](q, k, v, qw, kw, ang, k_mean, vinv, qi, qs, ki, ks, vt, vt2,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], sang,
                    H, Lq, Lk, Lq_pad, Lk_pad, float(scale * LOG2E), float(eps),
                    NV=n_views, HEAD_DIM=D, BLOCK=blk, Q_GROUP=q_group, K_GROUP=k_group, NORM_Q=norm_q,
                    NORM_K=norm_k, ROPE=rope, QK_FP8=qk_fp8, EMULATE=_INTERPRET, V_PLANES=v_planes, num_warps=4)
    return dict(qi=qi, qs=qs, ki=ki, ks=ks, vt=vt, vt2=vt2, vs=vs, k_mean=k_mean, scales=scales,
                Lq=Lq, Lk=Lk, Lq_pad=Lq_pad, Lk_pad=Lk_pad, v_planes=v_planes)


def attention(ops: dict, out: torch.Tensor, n_views: int, conn: tuple[int, ...], qk_fp8: bool = False,
              i2f_magic: bool | None = None) -> torch.Tensor:
    """The 8-bit attention kernel on the operands of :func:`quantize`; writes ``out`` [B, Sq, H, D]."""
    B, Sq, H, D = out.shape
    if Sq == 0 or B * H == 0:
        return out
    if i2f_magic is None:
        i2f_magic = os.environ.get("MVKERNELS_INT8_I2F", "magic") != "cvt"
    rows, _ = _tri._tables(n_views, tuple(conn), out.device)
    Lq, Lk, Lq_pad, Lk_pad = ops["Lq"], ops["Lk"], ops["Lq_pad"], ops["Lk_pad"]

    def grid(meta):
        return (n_views * triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    _attn_fwd[grid](ops["qi"], ops["qs"], ops["ki"], ops["ks"], ops["vt"], ops["vt2"], ops["vs"], out, rows,
                    out.stride(0), out.stride(1), out.stride(2), n_views * Lk_pad, H, Sq, Lq, Lk, Lq_pad, Lk_pad, _lk_bucket(Lk),
                    NV=n_views, HEAD_DIM=D, QK_FP8=qk_fp8, EMULATE=_INTERPRET, I2F_MAGIC=bool(i2f_magic),
                    V_PLANES=ops["v_planes"])
    return out


def best_configs() -> dict:
    return {str(k): str(c) for k, c in getattr(_attn_fwd, "cache", {}).items()}


__all__ = ["quantize", "attention", "best_configs", "PAD", "LOG2E", "LOG2_448"]
