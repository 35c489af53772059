"""Triton kernels of ``mvkernels.mv_attention``: FlashAttention-2 style forward and backward over view segments.

Tensors (all read in place through their strides; the head-dim stride must be 1):
  q [B, Sq, H, D], k and v [B, Sk, H, D]; out, dq [B, Sq, H, D] and dk, dv [B, Sk, H, D] are written contiguous.
  lse, delta [B, H, Sq] float32; lse is the row log-sum-exp in base 2 (log2 of the softmax denominator of
  scale * q.k), which the backward pass reuses so no row statistic is recomputed.

View segments: q is ``n_views`` segments of Lq = Sq / n_views rows, k/v of Lk = Sk / n_views rows. A table
``conn`` int32 [n_views, n_views + 1] says, for each segment, how many segments it is connected to (column 0)
and which (columns 1..count). Each program owns one BLOCK_M (or BLOCK_N) tile that never crosses a segment
border, and walks only the key (or query) ranges of connected segments: unconnected pairs cost nothing. Only the
last, partial tile of each range is masked; the full tiles run unmasked. Dense attention is the same code with
one segment connected to itself.

This module is imported lazily by ``mv_attention.py`` so that ``TRITON_INTERPRET=1`` set by the caller (tests on
CPU) is honoured: ``triton.jit`` decides interpreter vs compiler when the decorator runs.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfgs(pairs):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages), ...] -> autotune configs; one small tile in the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# Kept short on purpose: each entry costs a compile and a timed trial at first use. Measured on an H100 (see
# .notes/attention.md): dense hd128 fwd 128x128/8w/3st, dK/dV 64x128/8w/3st, dQ 128x64/8w/3st; short key ranges
# (5 x 512 text keys) prefer 64x64/4w. MVKERNELS_ATTN_TUNE=wide widens the search for tuning runs, =first takes
# each list's first entry (fast test runs on a GPU).
_TUNE = os.environ.get("MVKERNELS_ATTN_TUNE", "")
if _TUNE == "wide":
    _FWD_CONFIGS = _cfgs([(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                          (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)])
    _DKDV_CONFIGS = _cfgs([(32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (16, 64, 4, 4),
                           (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3)])
    _DQ_CONFIGS = _cfgs([(128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 16, 8, 4), (64, 32, 4, 3),
                         (64, 64, 4, 3), (128, 128, 8, 2)])
else:
    _FWD_CONFIGS = _cfgs([(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)])
    _DKDV_CONFIGS = _cfgs([(64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3)])
    _DQ_CONFIGS = _cfgs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)])
    if _TUNE == "first":
        _FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS = _FWD_CONFIGS[:1], _DKDV_CONFIGS[:1], _DQ_CONFIGS[:1]


def _quick_bench(fn, quantiles=None, **_):
    """Autotune timing: a few ms per config instead of Triton's default 25 + 100 ms (tiny shapes in tests)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotune(configs, key):
    kw = {"prune_configs_by": {"early_config_prune": _prune_fp32}}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kw["do_bench"] = _quick_bench
    return triton.autotune(configs=configs, key=key, **kw)


def _prune_fp32(configs, named_args, **kwargs):
    """fp32 tiles are twice the bytes: keep shared memory in bounds by dropping the large tiles."""
    if named_args["Q"].dtype == torch.float32 and not _INTERPRET:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small or configs[-1:]
    return configs


# Under TRITON_INTERPRET=1 the kernels may only call builtins of triton.language, or @jit helpers (tl.max, tl.sum,
# tl.zeros, tl.cdiv) that were themselves created while the interpreter was on, i.e. when TRITON_INTERPRET=1 was
# set before triton was first imported. A test process cannot always promise that, so in that case the row
# reductions go through tl.reduce with our own combine functions (same IR; slower in the interpreter only).
_STDLIB_OK = not _INTERPRET or not isinstance(tl.max, triton.runtime.jit.JITFunction)


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


if _STDLIB_OK:
    @triton.jit
    def _rowmax(x):
        return tl.max(x, 1)

    @triton.jit
    def _rowsum(x):
        return tl.sum(x, 1)
else:
    @triton.jit
    def _rowmax(x):
        return tl.reduce(x, 1, _max2)

    @triton.jit
    def _rowsum(x):
        return tl.reduce(x, 1, _add2)


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_range(acc, m_i, l_i, q, K_bh, V_bh, stride_ks, stride_vs, n_lo, n_hi, n_end, qk_scale,
               offs_d, BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_FP32: tl.constexpr):
    """Online softmax over key rows [n_lo, n_hi) in BLOCK_N steps; MASK drops rows >= n_end (segment end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        rows = (start_n + offs_n).to(tl.int64)
        kt_ptrs = K_bh + rows[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = V_bh + rows[:, None] * stride_vs + offs_d[None, :]
        if MASK:
            ok = (start_n + offs_n) < n_end
            kt = tl.load(kt_ptrs, mask=ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
        if IS_FP32:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = qk * qk_scale
        if MASK:
            qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, _rowmax(qk))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _rowsum(p)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if IS_FP32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_range_tma(acc, m_i, l_i, q, k_desc, v_desc, n_lo, n_hi, n_end, qk_scale,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_FP32: tl.constexpr):
    """As ``_fwd_range`` but K/V tiles come through tensor descriptors (TMA on Hopper). Rows are relative to the
    segment and the descriptor ends at the segment end, so rows past it are zero-filled, never read."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        k = k_desc.load([start_n, 0])
        if IS_FP32:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        if MASK:
            qk = tl.where(((start_n + offs_n) < n_end)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, _rowmax(qk))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _rowsum(p)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])
        if IS_FP32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@_autotune(_FWD_CONFIGS, key=["HEAD_DIM", "NV", "IS_FP32", "Lk"])
@triton.jit(do_not_specialize=["H", "Sq", "Lq", "Lk"])  # one binary for every length
def _mv_attn_fwd(Q, K, V, O, LSE, CONN,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                 H, Sq, Lq, Lk, qk_scale,
                 NV: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    n_mblk = (Lq + BLOCK_M - 1) // BLOCK_M
    seg = pid_m // n_mblk
    q_end = seg * Lq + Lq
    offs_m = seg * Lq + (pid_m % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < q_end
    q_ptrs = Q + off_b * sqb + off_h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    K_bh = K + off_b * skb + off_h * skh
    V_bh = V + off_b * svb + off_h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    row = CONN + seg * (NV + 1)
    for c in range(tl.load(row)):
        k_lo = tl.load(row + 1 + c) * Lk
        if USE_TMA:
            k_desc = tl.make_tensor_descriptor(K_bh + k_lo * sks, shape=[Lk, HEAD_DIM], strides=[sks, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(V_bh + k_lo * svs, shape=[Lk, HEAD_DIM], strides=[svs, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            acc, m_i, l_i = _fwd_range_tma(acc, m_i, l_i, q, k_desc, v_desc, 0, n_full, Lk, qk_scale,
                                           BLOCK_N, False, IS_FP32)
            if n_full < Lk:
                acc, m_i, l_i = _fwd_range_tma(acc, m_i, l_i, q, k_desc, v_desc, n_full, Lk, Lk, qk_scale,
                                               BLOCK_N, True, IS_FP32)
        else:
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_bh, V_bh, sks, svs, k_lo, k_lo + n_full, k_lo + Lk,
                                       qk_scale, offs_d, BLOCK_N, False, IS_FP32)
            if n_full < Lk:
                acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_bh, V_bh, sks, svs, k_lo + n_full, k_lo + Lk,
                                           k_lo + Lk, qk_scale, offs_d, BLOCK_N, True, IS_FP32)
    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    o_ptrs = O + off_b * sob + off_h * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O), then dK/dV (programs own key tiles), then dQ (programs own query tiles)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta(O, DO, DELTA, sob, sos, soh, sdb, sds, sdh, H, Sq,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < Sq
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + off_b * sob + off_h * soh + rows * sos + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + rows * sds + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = _rowsum(o.to(tl.float32) * do.to(tl.float32))
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=ok)


@triton.jit
def _dkdv_range(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQA_bh, stride_qs, stride_ds, stride_as, m_lo, m_hi,
                m_end, qk_scale, offs_d, BLOCK_M: tl.constexpr, MASK: tl.constexpr, IS_FP32: tl.constexpr,
                ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key tile over query rows [m_lo, m_hi); MASK drops rows >= m_end.
    ATOMIC_DQ also adds this tile's share of dQ (dS @ K, unscaled) into the fp32 buffer DQA with atomics."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + offs_m
        rows64 = rows.to(tl.int64)
        qt_ptrs = Q_bh + rows64[None, :] * stride_qs + offs_d[:, None]
        do_ptrs = DO_bh + rows64[:, None] * stride_ds + offs_d[None, :]
        if MASK:
            ok = rows < m_end
            qt = tl.load(qt_ptrs, mask=ok[None, :], other=0.0)
            lse = tl.load(LSE_bh + rows, mask=ok, other=float("inf"))  # masked rows get p = 0
            do = tl.load(do_ptrs, mask=ok[:, None], other=0.0)
            delta = tl.load(DELTA_bh + rows, mask=ok, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            lse = tl.load(LSE_bh + rows)
            do = tl.load(do_ptrs)
            delta = tl.load(DELTA_bh + rows)
        if IS_FP32:
            pt = tl.math.exp2(tl.dot(k, qt, input_precision="ieee") * qk_scale - lse[None, :])
            dv = tl.dot(pt, do, dv, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst, tl.trans(qt), dk, input_precision="ieee")
            if ATOMIC_DQ:
                dq_part = tl.dot(tl.trans(dst), k, input_precision="ieee")
        else:
            pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
            if ATOMIC_DQ:
                dq_part = tl.dot(tl.trans(dst.to(k.dtype)), k)
        if ATOMIC_DQ:
            dqa_ptrs = DQA_bh + rows64[:, None] * stride_as + offs_d[None, :]
            if MASK:
                tl.atomic_add(dqa_ptrs, dq_part, mask=ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dqa_ptrs, dq_part, sem="relaxed")
    return dk, dv


@_autotune(_DKDV_CONFIGS, key=["HEAD_DIM", "NV", "IS_FP32", "Lq"])
@triton.jit(do_not_specialize=["H", "Sq", "Lq", "Lk"])  # one binary for every length
def _mv_attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CONN_T, DQA,
                      sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh, sab, sas, sah,
                      H, Sq, Lq, Lk, sm_scale, qk_scale,
                      NV: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    n_nblk = (Lk + BLOCK_N - 1) // BLOCK_N
    seg = pid_n // n_nblk
    offs_n = seg * Lk + (pid_n % n_nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < seg * Lk + Lk
    rows = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + off_b * skb + off_h * skh + rows * sks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + off_b * svb + off_h * svh + rows * svs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    Q_bh = Q + off_b * sqb + off_h * sqh
    DO_bh = DO + off_b * sdb + off_h * sdh
    LSE_bh = LSE + pid_bh.to(tl.int64) * Sq
    DELTA_bh = DELTA + pid_bh.to(tl.int64) * Sq
    DQA_bh = DQA + off_b * sab + off_h * sah

    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    m_full = (Lq // BLOCK_M) * BLOCK_M
    row = CONN_T + seg * (NV + 1)
    for c in range(tl.load(row)):
        m_lo = tl.load(row + 1 + c) * Lq
        dk, dv = _dkdv_range(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQA_bh, sqs, sds, sas, m_lo,
                             m_lo + m_full, m_lo + Lq, qk_scale, offs_d, BLOCK_M, False, IS_FP32, ATOMIC_DQ)
        if m_full < Lq:
            dk, dv = _dkdv_range(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQA_bh, sqs, sds, sas, m_lo + m_full,
                                 m_lo + Lq, m_lo + Lq, qk_scale, offs_d, BLOCK_M, True, IS_FP32, ATOMIC_DQ)
    # dK and dV are written contiguous [B, Sk, H, D]; both share the strides sgb/sgs/sgh.
    g_off = off_b * sgb + off_h * sgh + rows * sgs + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_range(dq, q, do, lse, delta, K_bh, V_bh, stride_ks, stride_vs, n_lo, n_hi, n_end, qk_scale,
              offs_d, BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_FP32: tl.constexpr):
    """Accumulate dQ of one query tile over key rows [n_lo, n_hi); MASK drops rows >= n_end."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        rows64 = (start_n + offs_n).to(tl.int64)
        kt_ptrs = K_bh + rows64[None, :] * stride_ks + offs_d[:, None]
        vt_ptrs = V_bh + rows64[None, :] * stride_vs + offs_d[:, None]
        if MASK:
            ok = (start_n + offs_n) < n_end
            kt = tl.load(kt_ptrs, mask=ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        if IS_FP32:
            p = tl.math.exp2(tl.dot(q, kt, input_precision="ieee") * qk_scale - lse[:, None])
        else:
            p = tl.math.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(ok[None, :], p, 0.0)
        if IS_FP32:
            dp = tl.dot(do, vt, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds, tl.trans(kt), dq, input_precision="ieee")
        else:
            dp = tl.dot(do, vt)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@_autotune(_DQ_CONFIGS, key=["HEAD_DIM", "NV", "IS_FP32", "Lk"])
@triton.jit(do_not_specialize=["H", "Sq", "Lq", "Lk"])  # one binary for every length
def _mv_attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CONN,
                    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh,
                    H, Sq, Lq, Lk, sm_scale, qk_scale,
                    NV: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    n_mblk = (Lq + BLOCK_M - 1) // BLOCK_M
    seg = pid_m // n_mblk
    offs_m = seg * Lq + (pid_m % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seg * Lq + Lq
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + off_b * sqb + off_h * sqh + rows * sqs + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + rows * sds + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    K_bh = K + off_b * skb + off_h * skh
    V_bh = V + off_b * svb + off_h * svh

    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    row = CONN + seg * (NV + 1)
    for c in range(tl.load(row)):
        k_lo = tl.load(row + 1 + c) * Lk
        dq = _dq_range(dq, q, do, lse, delta, K_bh, V_bh, sks, svs, k_lo, k_lo + n_full, k_lo + Lk, qk_scale,
                       offs_d, BLOCK_N, False, IS_FP32)
        if n_full < Lk:
            dq = _dq_range(dq, q, do, lse, delta, K_bh, V_bh, sks, svs, k_lo + n_full, k_lo + Lk, k_lo + Lk,
                           qk_scale, offs_d, BLOCK_N, True, IS_FP32)
    tl.store(DQ + off_b * sgb + off_h * sgh + rows * sgs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _tables_host(n_views: int, conn: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flattened int tables [n_views, n_views + 1]: (count, ids...) per q-segment, and per k-segment."""
    def build(get):
        out = []
        for i in range(n_views):
            ids = [j for j in range(n_views) if get(i, j)]
            out += [len(ids)] + ids + [0] * (n_views - len(ids))
        return tuple(out)

    return (build(lambda i, j: conn[i * n_views + j]), build(lambda i, j: conn[j * n_views + i]))


_device_tables: dict = {}


def _tables(n_views: int, conn: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two connection tables as int32 tensors on ``device``, built once per (pattern, device)."""
    key = (n_views, conn, str(device))
    if key not in _device_tables:
        rows, cols = _tables_host(n_views, conn)
        _device_tables[key] = (torch.tensor(rows, dtype=torch.int32, device=device),
                               torch.tensor(cols, dtype=torch.int32, device=device))
    return _device_tables[key]


_allocator_set = False


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) for K/V tiles: Hopper or newer, 16-byte aligned base and row strides.
    Opt-in with ``MVKERNELS_ATTN_TMA=1``: on an H100 it measured the same as the pointer path (130.7 vs 132.5 ms,
    dense fwd at 63,600 tokens), so the simpler path is the default."""
    global _allocator_set
    want = os.environ.get("MVKERNELS_ATTN_TMA", "0") == "1"
    t0 = tensors[0]
    if not want or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if t0.device.type == "cuda" and torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    if t0.device.type == "cpu" and not _INTERPRET:
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    if not _allocator_set:  # device-side descriptors need scratch memory from the launcher
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=t0.device))
        _allocator_set = True
    return True


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a [B, S, H, D] tensor whose last stride is 1."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q, k, v, n_views: int, conn: tuple[int, ...], scale: float):
    """out [B, Sq, H, D] (contiguous, q's dtype), lse [B, H, Sq] float32 (base 2)."""
    if _INTERPRET and q.dtype != torch.float32:
        # Triton's interpreter computes through numpy, which has no bf16: 16-bit arithmetic there is wrong
        # (seen with triton 3.9). On CPU the same kernels run in fp32 and the result is rounded once.
        out, lse = forward(q.float(), k.float(), v.float(), n_views, conn, scale)
        return out.to(q.dtype), lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sq == 0 or B * H == 0:
        return out, lse
    rows, _ = _tables(n_views, tuple(conn), q.device)
    Lq, Lk = Sq // n_views, Sk // n_views

    def grid(meta):
        return (n_views * triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    _mv_attn_fwd[grid](q, k, v, out, lse, rows, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                       H, Sq, Lq, Lk, scale * LOG2E,
                       NV=n_views, HEAD_DIM=D, IS_FP32=q.dtype == torch.float32, USE_TMA=_use_tma(k, v))
    return out, lse


def backward(do, q, k, v, out, lse, n_views: int, conn: tuple[int, ...], scale: float):
    """dq [B, Sq, H, D], dk, dv [B, Sk, H, D], all contiguous in the inputs' dtype."""
    if _INTERPRET and q.dtype != torch.float32:  # see forward(): no 16-bit arithmetic in the interpreter
        grads = backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, n_views, conn, scale)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    dq = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Sk, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Sk, H, D), dtype=v.dtype, device=q.device)
    if Sq == 0 or B * H == 0:
        return dq, dk.zero_(), dv.zero_()
    rows, cols = _tables(n_views, tuple(conn), q.device)
    Lq, Lk = Sq // n_views, Sk // n_views
    is_fp32 = q.dtype == torch.float32

    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    blk = 32 if _INTERPRET else 128
    _bwd_delta[(triton.cdiv(Sq, blk), B * H)](out, do, delta, *_strides(out), *_strides(do), H, Sq,
                                               HEAD_DIM=D, BLOCK=blk)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    if os.environ.get("MVKERNELS_ATTN_DQ", "kernel") == "atomic":
        # dQ accumulated with fp32 atomics inside the dK/dV kernel: 5 MMAs per tile pair instead of 7, at the
        # cost of run-to-run bit differences in dQ. A fixed tile (the measured dK/dV best): autotune trials
        # would accumulate into the buffer more than once.
        dqa = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=q.device)
        bm, bn, nw, ns = (32, 16, 4, 1) if _INTERPRET else (64, 128, 8, 3)
        _mv_attn_bwd_dkdv.fn[(n_views * triton.cdiv(Lk, bn), B * H)](
            q, k, v, do, lse, delta, dk, dv, cols, dqa, *common, *_strides(dk), *_strides(dqa),
            H, Sq, Lq, Lk, scale, scale * LOG2E, NV=n_views, HEAD_DIM=D, IS_FP32=is_fp32, ATOMIC_DQ=True,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
        return dqa.mul_(scale).to(q.dtype), dk, dv
    _mv_attn_bwd_dkdv[lambda m: (n_views * triton.cdiv(Lk, m["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, cols, delta, *common, *_strides(dk), 0, 0, 0,
        H, Sq, Lq, Lk, scale, scale * LOG2E, NV=n_views, HEAD_DIM=D, IS_FP32=is_fp32, ATOMIC_DQ=False)
    _mv_attn_bwd_dq[lambda m: (n_views * triton.cdiv(Lq, m["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, rows, *common, *_strides(dq),
        H, Sq, Lq, Lk, scale, scale * LOG2E, NV=n_views, HEAD_DIM=D, IS_FP32=is_fp32)
    return dq, dk, dv


def head_dim_ok(d: int) -> bool:
    """Tiles are [rows, D] with D a power of two in 16..128 (256 would overflow shared memory)."""
    return d in (16, 32, 64, 128)


__all__ = ["forward", "backward", "head_dim_ok", "LOG2E"]
