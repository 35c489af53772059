"""Probe: where the time of mv_attention's Hopper backward goes, against cuDNN's backward, in one process.

Dense attention (one view), bf16, 32 heads x 128, q/k/v slices of one fused [1, S, 3, H, D] projection as in the
model. Times (CUDA events, medians, L2 flushed): the sm90 forward; the whole sm90 backward per dQ variant
(MVKERNELS_ATTN_BWD_DQ=triton: dK/dV kernel + Triton dQ kernel; =atomic: dQ inside the dK/dV kernel by bulk
reduce-adds); cuDNN's forward and forward+backward (its backward = the difference). Then one profiled backward
per variant lists every kernel's GPU time, so the pieces (delta pre-pass, padding, zero fill, the kernels, the
dQ layout copy) are measured rather than inferred.

    python benches/probe_attn_bwd.py [--seq 63600] [--rep 10] [--variants triton,atomic] [--fwd-block-n 128,176]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_mv_attention import _with_env  # benches/ is on sys.path, as for conftest
from conftest import cuda_time

H, D = 32, 128


def _with_dq(variant, fn):
    """fn with MVKERNELS_ATTN_BWD_DQ = the variant's first word (triton | atomic) and any further "+NAME=VALUE"
    environment settings of the variant (e.g. atomic+MVKERNELS_ATTN_BLOCK_N=176)."""
    dq, *extra = variant.split("+")
    return _with_env({"MVKERNELS_ATTN_BWD_DQ": dq, **dict(e.split("=", 1) for e in extra)}, fn)


def _kernel_table(fn, label):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"-- kernels of one call: {label}")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if e.device_time_total > 0:
            print(f"   {e.device_time_total / 1e3:10.3f} ms  x{e.count:<3d} {e.key[:110]}")


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mvkernels.ops import mv_attention_sm90 as sm90

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=63_600)
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--variants", default="triton,atomic",
                    help="comma list of MVKERNELS_ATTN_BWD_DQ values (triton | atomic)")
    ap.add_argument("--fwd-block-n", default="", help="also time the forward with these key tiles (128,176)")
    ap.add_argument("--profile", default=None, help="variants to list kernels of (default: all)")
    args = ap.parse_args()
    S = args.seq
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, S, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    do = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    conn = (1,)  # one view that sees itself
    fl_fwd = 4.0 * S * S * D * H
    timer = lambda fn: cuda_time(fn, warmup=2, rep=args.rep)  # noqa: E731
    rows = []
    out, lse = sm90.forward(q, k, v, 1, conn, scale)
    rows.append(("ours fwd (sm90)", timer(lambda: sm90.forward(q, k, v, 1, conn, scale)), fl_fwd))
    for bn in args.fwd_block_n.split(",") if args.fwd_block_n else ():
        fwd = _with_env({"MVKERNELS_ATTN_BLOCK_N": bn}, lambda: sm90.forward(q, k, v, 1, conn, scale))
        o2, l2 = fwd()
        print(f"fwd key tile {bn}: max |out diff| {(o2.float() - out.float()).abs().max().item():.3e}, "
              f"max |lse diff| {(l2 - lse).abs().max().item():.3e}")
        rows.append((f"ours fwd key tile {bn}", timer(fwd), fl_fwd))
    ref = None
    for variant in args.variants.split(","):
        bwd = _with_dq(variant, lambda: sm90.backward(do, q, k, v, out, lse, 1, conn, scale))
        grads = bwd()
        if ref is None:
            ref = grads
        else:  # same math, other dQ path or walk order: differences are accumulation-order noise
            errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref)]
            print(f"{variant}: max |diff| to {args.variants.split(',')[0]}: dq {errs[0]:.3e} dk {errs[1]:.3e} "
                  f"dv {errs[2]:.3e}")
        rows.append((f"ours bwd dq={variant}", timer(bwd), 2.5 * fl_fwd))
    peer = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    do_t = do.transpose(1, 2).contiguous()

    def cudnn_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*peer)

    def cudnn_fwdbwd():
        for t in peer:
            t.grad = None
        cudnn_fwd().backward(do_t)

    with torch.no_grad():
        f_ms = timer(cudnn_fwd)
    fb_ms = timer(cudnn_fwdbwd)
    rows += [("cuDNN fwd", f_ms, fl_fwd), ("cuDNN fwd+bwd", fb_ms, 3.5 * fl_fwd),
             ("cuDNN bwd (difference)", fb_ms - f_ms, 2.5 * fl_fwd)]
    print(f"GPU: {torch.cuda.get_device_name()}, S={S}, H={H}, D={D}, bf16")
    for name, ms, fl in rows:
        print(f"{name:<28}{ms:10.3f} ms {fl / ms / 1e9:8.1f} TFLOP/s")
    fwd_ms = rows[0][1]
    for name, ms, _ in rows:
        if name.startswith("ours bwd"):
            print(f"{name}: fwd+bwd {fwd_ms + ms:.1f} ms = {fb_ms / (fwd_ms + ms):.3f}x cuDNN")
    for variant in (args.profile or args.variants).split(","):
        _kernel_table(_with_dq(variant, lambda: sm90.backward(do, q, k, v, out, lse, 1, conn, scale)), variant)
    _kernel_table(cudnn_fwdbwd, "cuDNN fwd+bwd")


if __name__ == "__main__":
    main()
