"""Probe: does Triton's Hopper warp specialization (``tl.range(..., warp_specialize=True)``) with device-side
tensor descriptors lift the dense attention forward past SDPA-cuDNN on this GPU?

A dense-only forward (no view segments, S a multiple of every tile) timed in one process against cuDNN at the
same shape, per configuration (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize). Outputs are checked
against cuDNN before timing. The product kernel (``mv_attention_triton.py``) adopts what wins here.

    python benches/probe_attn_fwd_ws.py [--seq 63488] [--heads 32]
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from conftest import cuda_time

LOG2E = 1.4426950408889634


@triton.jit
def _probe_fwd(Q, K, V, O, sb, ss, sh, osb, oss, osh, H, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    base = (pid_bh // H).to(tl.int64) * sb + (pid_bh % H).to(tl.int64) * sh
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[S, HEAD_DIM], strides=[ss, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[S, HEAD_DIM], strides=[ss, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[S, HEAD_DIM], strides=[ss, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    q = q_desc.load([pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    for start_n in tl.range(0, S, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_base = (pid_bh // H).to(tl.int64) * osb + (pid_bh % H).to(tl.int64) * osh
    tl.store(O + o_base + offs_m.to(tl.int64)[:, None] * oss + offs_d[None, :], acc.to(O.dtype.element_ty))


def run(q, k, v, bm, bn, warps, stages, ws):
    B, S, H, D = q.shape
    out = torch.empty_like(q)
    _probe_fwd[(S // bm, B * H)](q, k, v, out, q.stride(0), q.stride(1), q.stride(2),
                                 out.stride(0), out.stride(1), out.stride(2), H, S, D ** -0.5 * LOG2E,
                                 HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=warps, num_stages=stages)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=63488)  # 63,600 rounded down to a multiple of 256
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, a.seq, 3, a.heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)  # strided views of a fused QKV, as in the model
    flops = 4 * a.seq * a.seq * 128 * a.heads

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    ref = cudnn()
    rows = []
    t_ref = cuda_time(cudnn, warmup=2, rep=5)
    rows.append({"config": "SDPA-cuDNN", "ms": t_ref, "tflops": flops / t_ref / 1e9})
    print(f"cuDNN: {t_ref:.2f} ms, {flops / t_ref / 1e9:.0f} TFLOP/s", flush=True)
    # warp_specialize needs num_warps=4 (Triton adds producer/consumer partitions: 12 warps); BLOCK_M=256 splits
    # the rows over two consumer warpgroups, as FlashAttention-3 does.
    grid = [(128, 128, 8, 2, False), (128, 64, 4, 3, False), (256, 128, 8, 2, False),
            (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True),
            (256, 128, 4, 2, True), (256, 64, 4, 2, True), (256, 64, 4, 3, True)]
    for bm, bn, w, s, ws in grid:
        name = f"M{bm} N{bn} w{w} s{s} ws={int(ws)}"
        try:
            out = run(q, k, v, bm, bn, w, s, ws)
            err = (out.float() - ref.float()).abs().max().item()
            if not err < 2e-2:
                raise RuntimeError(f"max |out - cuDNN| = {err:.3g}")
            t = cuda_time(lambda: run(q, k, v, bm, bn, w, s, ws), warmup=2, rep=5)
            rows.append({"config": name, "ms": t, "tflops": flops / t / 1e9, "vs_cudnn": t_ref / t, "err": err})
            print(f"{name}: {t:.2f} ms, {flops / t / 1e9:.0f} TFLOP/s, {t_ref / t:.3f}x cuDNN, err {err:.2e}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result too
            rows.append({"config": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
