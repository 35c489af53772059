"""mv_attention on a GPU against its peers, timed in one process (CUDA events, medians).

Workload: Cosmos-Predict1-7B multiview attention, bf16, B=1, 32 heads, head dim 128.
  dense   S = 12,720 / 63,600 / 76,320: ours vs FlashAttention-4, SDPA-cuDNN and SDPA-flash, fwd and fwd+bwd
  ring1   5 views at 63,600 (each view sees itself and its 2 ring neighbours): ours vs compiled FlexAttention
          and FlashAttention-4, both with the same 128 x 128 block mask (FA4: block sparsity + a CuTe mask_mod)
  fused   per-head RMSNorm + RoPE on q, k then attention: ours vs torch.compile'd norm+RoPE + SDPA-cuDNN / FA4
  cross   63,600 queries, 5 x 512 text keys, view i sees text i: ours ("self") vs SDPA and FA4 on a (B*5)-batch
FlashAttention-4 (package flash-attn-4) is timed whenever it imports; its rows are absent otherwise.
FLOPs (FlashAttention convention): fwd 4*Sq*Sk*D*H times the connected fraction, bwd 2.5x fwd.

Standalone: ``python benches/bench_mv_attention.py [--quick]`` prints a table (all sizes, every case). Under
pytest (``pytest benches/bench_mv_attention.py -s``) the figures go through benches/conftest.py's ``record``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

H, D = 32, 128
SIZES = (12_720, 63_600, 76_320)


def _cuda_time(fn, warmup=3, rep=10):
    """Median ms of ``fn`` (the harness's CUDA-event timer, fewer repetitions: these runs take up to 0.6 s)."""
    from conftest import cuda_time  # benches/ is on sys.path both as a script and under pytest

    return cuda_time(fn, warmup=warmup, rep=rep)


def _tflops(flops, ms):
    return flops / ms / 1e9


def _fwd_bwd(fn, leaves, grad):
    def step():
        for t in leaves:
            t.grad = None
        fn().backward(grad)
    # a variant made by _with_env must keep its environment through the backward too (MVKERNELS_ATTN_BWD is read
    # when the backward op runs, after fn() has returned)
    env = getattr(fn, "env", None)
    return _with_env(env, step) if env else step


def _time_modes(label, runners, modes, flops, timer):
    """Rows (label, mode, name, ms, TFLOP/s) for each {name: (fn, leaves, grad)} and mode: "fwd" times fn under
    no_grad, "fwdbwd" times fn + backward(grad) with the leaves' grads cleared (FLOPs 3.5x the forward's)."""
    rows = []
    for mode in modes:
        for name, (fn, leaves, grad) in runners.items():
            if mode == "fwd":
                with torch.no_grad():
                    ms = timer(fn)
                fl = flops
            else:
                ms = timer(_fwd_bwd(fn, leaves, grad))
                fl = 3.5 * flops
            rows.append((label, mode, name, ms, _tflops(fl, ms)))
    return rows


def _qkv(S, dtype=torch.bfloat16, seed=0):
    """Ours reads q, k, v as slices of one [1, S, 3, H, D] projection; SDPA gets its preferred [1, H, S, D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(1, S, 3, H, D, device="cuda", dtype=dtype, generator=g)
    return qkv


def _sdpa_layout(x):
    return x.transpose(1, 2).contiguous()


def _with_env(env: dict, fn):
    """Runs ``fn`` with the environment variables ``env`` set (MVKERNELS_ATTN_FWD=sm90|triton picks the forward,
    MVKERNELS_ATTN_BWD=sm90|triton the backward, MVKERNELS_ATTN_BWD_DQ=atomic|triton the sm90 backward's dQ;
    MVKERNELS_ATTN_PINGPONG=0 turns the sm90 forward's ping-pong off, MVKERNELS_ATTN_BWD_PINGPONG=1 the sm90
    backward's on); all are read at each call."""
    def run():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    run.env = env
    return run


def _ours_variants(fn):
    """{'ours': default forward} plus, on Hopper with the sm90 kernel built, explicit triton/sm90 variants."""
    from mvkernels.ops import mv_attention_sm90 as sm90

    out = {"ours": fn}
    if os.environ.get("MVKERNELS_BENCH_SM90", "0") == "1" and sm90.available() \
            and torch.cuda.get_device_capability() == (9, 0):
        out["ours-triton-fwd"] = _with_env({"MVKERNELS_ATTN_FWD": "triton"}, fn)
        out["ours-sm90-fwd"] = _with_env({"MVKERNELS_ATTN_FWD": "sm90", "MVKERNELS_ATTN_PINGPONG": "1"}, fn)
        out["ours-sm90-no-pingpong"] = _with_env({"MVKERNELS_ATTN_FWD": "sm90", "MVKERNELS_ATTN_PINGPONG": "0"}, fn)
        if sm90.available_bwd():  # backward variants (same sm90 forward); in fwd mode they time the forward again
            fwd = {"MVKERNELS_ATTN_FWD": "sm90", "MVKERNELS_ATTN_PINGPONG": "1"}
            out["ours-sm90-bwd-triton"] = _with_env({**fwd, "MVKERNELS_ATTN_BWD": "triton"}, fn)
            out["ours-sm90-bwd-sm90"] = _with_env({**fwd, "MVKERNELS_ATTN_BWD": "sm90",
                                                   "MVKERNELS_ATTN_BWD_DQ": "atomic"}, fn)
            tritondq = {**fwd, "MVKERNELS_ATTN_BWD": "sm90", "MVKERNELS_ATTN_BWD_DQ": "triton"}
            out["ours-sm90-bwd-sm90-tritondq"] = _with_env({**tritondq, "MVKERNELS_ATTN_BWD_PINGPONG": "0"}, fn)
            # the same with the dK/dV kernel's consumer warpgroups taking turns (A/B against the row above)
            out["ours-sm90-bwd-pingpong"] = _with_env({**tritondq, "MVKERNELS_ATTN_BWD_PINGPONG": "1"}, fn)
    return out


def _fa4_func():
    """Stock FlashAttention-4's ``flash_attn_func`` (what a user calls), or None when it is not installed."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - absent or broken: its rows are simply missing
        print(f"FlashAttention-4 not timed: {type(e).__name__}: {e}")
        return None
    return flash_attn_func


def _fa4_out(res):
    return res[0] if isinstance(res, tuple) else res


def case_dense(S, timer, modes=("fwd", "fwdbwd")):
    from mvkernels.ops.mv_attention import mv_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = _qkv(S).requires_grad_()
    ours_in = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    peer_in = [_sdpa_layout(t.detach()).requires_grad_() for t in ours_in]
    grad = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    flops = 4.0 * S * S * D * H
    runners = {n: (f, [qkv], grad) for n, f in _ours_variants(lambda: mv_attention(*ours_in)).items()}
    for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def run(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(*peer_in)
        runners[name] = (run, peer_in, grad.transpose(1, 2).contiguous())
    fa4 = _fa4_func()
    if fa4 is not None:  # FA4 takes our [B, S, H, D] layout: the same strided q, k, v slices as ours
        runners["fa4"] = (lambda: _fa4_out(fa4(*ours_in)), [qkv], grad)
    return _time_modes(f"dense S={S}", runners, modes, flops, timer)


def case_dq_variants(S, timer):
    """fwd+bwd of ours with dQ from its own kernel vs dQ by atomics inside the dK/dV kernel, vs SDPA-cuDNN."""
    import os

    from mvkernels.ops.mv_attention import mv_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = _qkv(S).requires_grad_()
    ours_in = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    peer_in = [_sdpa_layout(t.detach()).requires_grad_() for t in ours_in]
    grad = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    fl = 3.5 * 4.0 * S * S * D * H
    rows = []
    for variant in ("kernel", "atomic"):
        os.environ["MVKERNELS_ATTN_DQ"] = variant
        ms = timer(_fwd_bwd(lambda: mv_attention(*ours_in), [qkv], grad))
        rows.append((f"dense S={S}", "fwdbwd", "ours" if variant == "kernel" else "ours-atomic-dq", ms,
                     _tflops(fl, ms)))
    os.environ.pop("MVKERNELS_ATTN_DQ")

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*peer_in)
    ms = timer(_fwd_bwd(cudnn, peer_in, grad.transpose(1, 2).contiguous()))
    rows.append((f"dense S={S}", "fwdbwd", "sdpa-cudnn", ms, _tflops(fl, ms)))
    return rows


def _ring_mask(n_views, L, K=1):
    def mask_mod(b, h, q_idx, kv_idx):
        d = (q_idx // L - kv_idx // L) % n_views
        return (d <= K) | (d >= n_views - K)
    return mask_mod


def case_ring1(S, timer, n_views=5, modes=("fwd", "fwdbwd")):
    from mvkernels.ops.mv_attention import mv_attention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = S // n_views
    qkv = _qkv(S, seed=1).requires_grad_()
    ours_in = (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    peer_in = [_sdpa_layout(t.detach()).requires_grad_() for t in ours_in]
    grad = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    block_mask = create_block_mask(_ring_mask(n_views, L), None, None, S, S, device="cuda")
    flex = torch.compile(flex_attention)
    frac = 3 / n_views
    flops = 4.0 * S * S * D * H * frac
    runners = {n: (f, [qkv], grad) for n, f in
               _ours_variants(lambda: mv_attention(*ours_in, n_views=n_views, connectivity="ring1")).items()}
    runners.update({"flex": (lambda: flex(*peer_in, block_mask=block_mask), peer_in, grad.transpose(1, 2).contiguous())})
    fa4 = _fa4_func()
    if fa4 is not None:
        try:
            fa4_ring = _fa4_ring_runner(fa4, ours_in, block_mask, n_views, L)
            fa4_ring()  # compile once here, so a failure is reported and the other rows stay
            runners["fa4"] = (fa4_ring, [qkv], grad)
        except Exception as e:  # noqa: BLE001
            print(f"FlashAttention-4 ring1 not timed: {type(e).__name__}: {e}")
    return _time_modes(f"ring1 5v S={S}", runners, modes, flops, timer)


def _fa4_ring_runner(fa4, qkv_slices, block_mask, n_views, L, K=1):
    """FA4 with flex's 128 x 128 block mask as its block-sparsity tensors and the ring rule as a CuTe mask_mod
    (applied only inside the partially masked blocks)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    @cute.jit
    def ring_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        seg = fa_utils.scalar_to_ssa(L, cutlass.Int32)
        nv = fa_utils.scalar_to_ssa(n_views, cutlass.Int32)
        d = (m_idx // seg - n_idx // seg + nv) % nv
        return (d <= fa_utils.scalar_to_ssa(K, cutlass.Int32)) | (d >= fa_utils.scalar_to_ssa(n_views - K, cutlass.Int32))

    bs = tuple(block_mask.BLOCK_SIZE)
    fwd = BlockSparseTensorsTorch(mask_block_cnt=block_mask.kv_num_blocks, mask_block_idx=block_mask.kv_indices,
                                  full_block_cnt=block_mask.full_kv_num_blocks,
                                  full_block_idx=block_mask.full_kv_indices, block_size=bs)
    bwd = BlockSparseTensorsTorch(mask_block_cnt=block_mask.q_num_blocks, mask_block_idx=block_mask.q_indices,
                                  full_block_cnt=block_mask.full_q_num_blocks,
                                  full_block_idx=block_mask.full_q_indices, block_size=bs)
    return lambda: _fa4_out(fa4(*qkv_slices, mask_mod=ring_mask, block_sparse_tensors=fwd,
                                block_sparse_tensors_bwd=bwd))


def _norm_rope_eager(x, w, ang, eps=1e-6):
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w
    y1, y2 = y.chunk(2, dim=-1)
    a = ang[:, None, :]
    return (y * a.cos() + torch.cat([-y2, y1], -1) * a.sin()).to(x.dtype)


def case_fused(S, timer, modes=("fwd", "fwdbwd")):
    from mvkernels.ops.mv_attention import mv_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = _qkv(S, seed=2).requires_grad_()
    wq = (torch.rand(D, device="cuda") + 0.5).requires_grad_()
    wk = (torch.rand(D, device="cuda") + 0.5).requires_grad_()
    ang = torch.rand(S, D // 2, device="cuda").mul(30).repeat(1, 2)
    grad = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    norm_rope = torch.compile(_norm_rope_eager)

    def ours():
        return mv_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], rope_angles=ang, q_norm_weight=wq,
                            k_norm_weight=wk)

    def peer():
        q, k = norm_rope(qkv[:, :, 0], wq, ang), norm_rope(qkv[:, :, 1], wk, ang)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  qkv[:, :, 2].transpose(1, 2)).transpose(1, 2)

    runners = {name: (fn, [qkv, wq, wk], grad) for name, fn in (("ours", ours), ("compile-normrope+cudnn", peer))}
    fa4 = _fa4_func()
    if fa4 is not None:
        def peer_fa4():
            q, k = norm_rope(qkv[:, :, 0], wq, ang), norm_rope(qkv[:, :, 1], wk, ang)
            return _fa4_out(fa4(q, k, qkv[:, :, 2]))
        runners["compile-normrope+fa4"] = (peer_fa4, [qkv, wq, wk], grad)
    return _time_modes(f"fused S={S}", runners, modes, 4.0 * S * S * D * H, timer)


def case_cross(S, timer, n_views=5, text=512, modes=("fwd", "fwdbwd")):
    from mvkernels.ops.mv_attention import mv_attention

    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    kv = torch.randn(1, n_views * text, 2, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    grad = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    L = S // n_views

    def ours():
        return mv_attention(q, kv[:, :, 0], kv[:, :, 1], n_views=n_views, connectivity="self")

    def peer():  # upstream: views folded into the batch, SDPA picks its own backend
        qb = q.view(n_views, L, H, D).transpose(1, 2)
        kb = kv[:, :, 0].reshape(n_views, text, H, D).transpose(1, 2)
        vb = kv[:, :, 1].reshape(n_views, text, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(1, S, H, D)

    runners = {name: (fn, [q, kv], grad) for name, fn in (*_ours_variants(ours).items(), ("sdpa-batched", peer))}
    fa4 = _fa4_func()
    if fa4 is not None:
        def peer_fa4():
            return _fa4_out(fa4(q.view(n_views, L, H, D), kv[:, :, 0].reshape(n_views, text, H, D),
                                kv[:, :, 1].reshape(n_views, text, H, D))).reshape(1, S, H, D)
        runners["fa4-batched"] = (peer_fa4, [q, kv], grad)
    return _time_modes(f"cross S={S} 5x{text}", runners, modes, 4.0 * S * text * D * H, timer)


def _print(rows):
    best = {}
    for case, mode, name, ms, tf in rows:
        if not name.startswith("ours"):
            best[(case, mode)] = min(best.get((case, mode), math.inf), ms)
    print(f"{'case':<24}{'mode':<8}{'impl':<26}{'ms':>10}{'TFLOP/s':>10}{'x best peer':>13}")
    for case, mode, name, ms, tf in rows:
        ratio = f"{best[(case, mode)] / ms:.3f}" if name.startswith("ours") and (case, mode) in best else ""
        print(f"{case:<24}{mode:<8}{name:<26}{ms:>10.3f}{tf:>10.1f}{ratio:>13}")
    sys.stdout.flush()


def _best_configs():
    from mvkernels.ops import mv_attention_triton as tri

    for k in ("_mv_attn_fwd", "_mv_attn_bwd_dkdv", "_mv_attn_bwd_dq"):
        fn = getattr(tri, k)
        print(k, {key: str(c) for key, c in getattr(fn, "cache", {}).items()})


# ---------------------------------------------------------------------------------------------------------
# pytest entry points (benches/conftest.py: cuda_time, record; skipped without a GPU by its collection hook).
# Lean by default so the whole file fits a ~200 s budget: dense at 63,600 only, 10 timed runs per figure.
# MVKERNELS_BENCH_SIZES=12720,63600,76320 adds the other sizes.
# ---------------------------------------------------------------------------------------------------------
BENCH_SIZES = tuple(int(x) for x in os.environ.get("MVKERNELS_BENCH_SIZES", "63600").split(","))


def _pytest_timer(fn):
    from conftest import cuda_time

    return cuda_time(fn, warmup=2, rep=10)


def _record(benchmark, rows):
    """Tracked: our medians. Peers are stored untracked with the ratio peer_ms / ours_ms (> 1: ours faster)."""
    from conftest import record

    _print(rows)
    ours = {(c, m): ms for c, m, n, ms, _ in rows if n == "ours"}
    for case, mode, name, ms, tf in rows:
        key = f"{case} {mode} {name}".replace(" ", "_")
        if name == "ours":
            record(benchmark, key, ms, tflops=tf)
        else:
            record(benchmark, key, ms, tracked=False, tflops=tf, ratio_ours_vs=ms / ours[(case, mode)])


@pytest.mark.parametrize("S", BENCH_SIZES)
def test_bench_dense(benchmark, S):
    _record(benchmark, case_dense(S, _pytest_timer))


def test_bench_ring1(benchmark):
    _record(benchmark, case_ring1(63_600, _pytest_timer))


def test_bench_cross(benchmark):
    _record(benchmark, case_cross(63_600, _pytest_timer))


def test_bench_fused(benchmark):
    _record(benchmark, case_fused(63_600, _pytest_timer))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=12,720 and 63,600 dense, ring1/fused/cross at 63,600")
    ap.add_argument("--only", default="dense,ring1,fused,cross", help="comma list of cases")
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--sizes", default=None, help="comma list of dense sizes (overrides --quick)")
    ap.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd or both")
    ap.add_argument("--ring-fwd-only", action="store_true", help="ring1: forward only (skips compiling Flex bwd)")
    ap.add_argument("--sm90", action="store_true", help="also time ours with the Triton and the sm90 forward "
                    "(MVKERNELS_ATTN_FWD) and backward (MVKERNELS_ATTN_BWD) explicitly, same process as cuDNN")
    args = ap.parse_args()
    if args.sm90:
        os.environ["MVKERNELS_BENCH_SM90"] = "1"
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return
    timer = lambda fn: _cuda_time(fn, warmup=2, rep=args.rep)  # noqa: E731
    only = set(args.only.split(","))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    rows = []
    sizes = SIZES[:2] if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(x) for x in args.sizes.split(","))
    modes = tuple(args.modes.split(","))
    if "dense" in only:
        for S in sizes:
            new = case_dense(S, timer, modes=modes)
            rows += new
            _print(new)
    if "dq" in only:
        rows += case_dq_variants(sizes[0], timer)
        _print(rows[-3:])
    for name, fn in (("ring1", case_ring1), ("fused", case_fused), ("cross", case_cross)):
        if name in only:
            try:
                rows += fn(63_600, timer, modes=("fwd",) if name == "ring1" and args.ring_fwd_only else modes)
            except Exception as exc:  # a failing peer must not hide the other numbers
                print(f"{name}: failed: {type(exc).__name__}: {exc}")
            _print([r for r in rows if r[0].startswith(name)])
    print("\n=== summary ===")
    _print(rows)
    _best_configs()


if __name__ == "__main__":
    main()
