"""Fused QK-RMSNorm + RoPE at the 7B's shape: q, k = [1, 63600, 32, 128] bf16, fp32 angle table.

Reports GB/s (q and k read once and written once, plus the angle table), the fraction of the measured
device-to-device copy bandwidth, and the ratio to eager PyTorch and to torch.compile of the same reference,
all timed in this process. Run: pytest benches/bench_qk_norm_rope.py --benchmark-json=run.json
"""
import pytest
import torch

import mvkernels
from mvkernels.ops.qk_norm_rope import qk_norm_rope_reference

from conftest import cuda_time, record


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), flush_l2=False)
    return 2 * nbytes / ms / 1e6


@pytest.mark.parametrize("S", [63600])
def test_qk_norm_rope_bandwidth(benchmark, S, monkeypatch):
    monkeypatch.setenv("MVKERNELS_BACKEND", "csrc")
    B, H, D = 1, 32, 128
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)  # q, k as views of a fused QKV output
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    wq = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    wk = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    angles = mvkernels.rope3d_angles(5, 8, 30, 53, D, fps=10.0, t_extrapolation_ratio=2.0).cuda()[:S]
    nbytes = 4 * q.numel() * q.element_size() + angles.numel() * 4

    ours = lambda: mvkernels.qk_norm_rope(q, k, wq, wk, angles)
    eager = lambda: qk_norm_rope_reference(q, k, wq, wk, angles)
    compiled_fn = torch.compile(qk_norm_rope_reference)
    compiled = lambda: compiled_fn(q, k, wq, wk, angles)
    ref = qk_norm_rope_reference(q.double(), k.double(), wq.double(), wk.double(), angles)
    out = ours()
    assert (out[0].double() - ref[0]).abs().max() < 0.1  # sanity: timing the right function

    copy_gbs = copy_bandwidth_gbs()
    t_ours, t_eager, t_comp = cuda_time(ours), cuda_time(eager), cuda_time(compiled)
    gbs = nbytes / t_ours / 1e6
    record(benchmark, "ours", t_ours, fn=ours, gbs=gbs, pct_of_copy=100 * gbs / copy_gbs)
    record(benchmark, "eager", t_eager, tracked=False, ratio_ours_vs=t_eager / t_ours)
    record(benchmark, "torch_compile", t_comp, tracked=False, ratio_ours_vs=t_comp / t_ours)
    record(benchmark, "copy_bandwidth", 0.0, tracked=False, gbs=copy_gbs)
    print(f"\nqk_norm_rope {tuple(q.shape)} bf16: ours {t_ours:.3f} ms = {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.1f}% of "
          f"copy {copy_gbs:.0f} GB/s); eager {t_eager:.3f} ms ({t_eager / t_ours:.1f}x); "
          f"torch.compile {t_comp:.3f} ms ({t_comp / t_ours:.2f}x)")

    # backward: dq, dk, dwq, dwk vs the compiled reference's backward
    gq, gk = torch.randn_like(out[0]), torch.randn_like(out[1])
    qg, kg, wqg, wkg = (t.detach().clone().requires_grad_() for t in (q, k, wq, wk))

    def bwd(fn):
        qo, ko = fn(qg, kg, wqg, wkg, angles)
        return lambda: torch.autograd.grad((qo, ko), (qg, kg, wqg, wkg), (gq, gk), retain_graph=True)

    t_bo, t_bc = cuda_time(bwd(mvkernels.qk_norm_rope)), cuda_time(bwd(compiled_fn))
    record(benchmark, "ours_bwd", t_bo, bwd_gbs=(nbytes + 2 * q.numel() * 2) / t_bo / 1e6)
    record(benchmark, "torch_compile_bwd", t_bc, tracked=False, ratio_ours_vs=t_bc / t_bo)
    print(f"backward: ours {t_bo:.3f} ms, torch.compile {t_bc:.3f} ms ({t_bc / t_bo:.2f}x)")
