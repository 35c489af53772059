"""One guided sampling step of the 7B 6-view net at 76,320 tokens, bf16, on one GPU (issue 7, item 5).

The net (random weights) is built on the meta device and materialised on the GPU, as the CLI does with a real
checkpoint. One step = ``mvmodel.inference.pipeline.euler_step_cfg``: the conditional and unconditional passes in
one forward of batch 2, guidance on the net output, the Euler update. Reports seconds per step (CUDA events,
median), TFLOP/s and MFU (2 x forward FLOPs of §10.2 per step / time / 989 TFLOP/s dense bf16), peak memory,
and the 35-step extrapolation (the sampler is 35 identical steps; T5 and decode excluded).

Variants (env MVB_INF_VARIANTS, comma-separated; the first is "ours", the others are peers timed in the same
process, the ratio is to the best peer):
  auto         the CLI default (mvkernels attention when installed, else SDPA)
  mvkernels    mvkernels.mv_attention with fused QK-norm/RoPE          hybrid  fused QK-norm/RoPE + torch SDPA
  sdpa         plain PyTorch norm/RoPE + SDPA, PyTorch's kernel choice
  sdpa_cudnn / sdpa_flash   the same with SDPA forced to cuDNN / FlashAttention-2
  any of these + "+compile": transformer blocks under torch.compile;  + "+seqcfg": cond and uncond as 2 forwards

Run on a GPU:  pytest benches/bench_inference_step.py -s --benchmark-json=run.json
               python benches/bench_inference_step.py [--small] [--variants auto,sdpa_cudnn] [--rep 3]
Quick check:   MVB_SMALL=1 pytest benches/bench_inference_step.py -s  (width 1024, 4 blocks, 768 tokens; seconds)
Video2World (issue 22): MVB_V2W=1 times the same step of the 7B Video2World net (96 patch-embed inputs, the
condition-mask channel) conditioned on 2 latent frames per view: the condition latents are mixed into the input,
the guided output is replaced there (``euler_step_cfg(..., video=...)``); figures get the suffix ``_v2w``.
Env: MVB_V2W=1, MVB_SMALL=1, MVB_REP (timed steps, default 3 full / 10 small), MVB_INF_VARIANTS (default
     auto,sdpa_cudnn,sdpa_flash), MVB_DEVICE=cpu (dry-run of the harness logic only, with MVB_SMALL=1).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cuda_time, record  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 datasheet
DEFAULT_VARIANTS = "auto,sdpa_cudnn,sdpa_flash"
DEVICE = os.environ.get("MVB_DEVICE", "cuda")  # "cpu" only to dry-run the harness logic (tiny sizes)
V2W = os.environ.get("MVB_V2W") == "1"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, rep: int) -> float:
    if DEVICE == "cuda":
        return cuda_time(fn, warmup=1, rep=rep, flush_l2=False)
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def step_row(ms: float, flops: float, peak_gib: float, out: torch.Tensor, ref: torch.Tensor) -> dict:
    """One sampling-step result: time, throughput (MFU against the GPU's bf16 peak), memory, 35-step minutes, and
    the output's relative difference from the first variant's (``ref``)."""
    s = ms / 1e3
    return {"s_per_step": s, "tflops": flops / s / 1e12, "mfu": flops / s / PEAK_FLOPS, "peak_gib": peak_gib,
            "steps35_min": 35 * s / 60, "rel_diff_vs_first": ((out.float() - ref).norm() / ref.norm()).item()}


def _shape(small: bool) -> dict:
    """Net overrides and the latent [1, 16, V*T, h, w] of the benchmark."""
    if small:
        return dict(net=dict(model_channels=1024, num_blocks=4, num_heads=8, adaln_lora_dim=64), V=6, T=2, h=16, w=16)
    return dict(net={}, V=6, T=8, h=60, w=106)  # 57 frames at 480x848 per view: 76,320 tokens


def build_net(small: bool):
    """The 7B 6-view net (or the small variant): meta build -> empty on the GPU -> random init, bf16, eval."""
    from mvmodel.networks import MultiviewDiT, preset

    name = "cosmos_7b_video2world_multiview_6view" if V2W else "cosmos_7b_multiview_6view"
    cfg = preset(name, **_shape(small)["net"])
    t0 = time.time()
    with torch.device("meta"):
        net = MultiviewDiT(cfg, dtype=torch.bfloat16)
    net = net.to_empty(device=DEVICE)
    torch.manual_seed(0)
    net.init_weights()
    with torch.no_grad():  # fresh init zeroes the last AdaLN projections; give every sub-block real work
        for tb in net.blocks.values():
            for b in tb.blocks:
                b.adaLN_modulation[-1].weight.normal_(0, 0.02)
    _sync()
    return net.eval().requires_grad_(False), time.time() - t0


def inputs(net, small: bool):
    from mvmodel.inference.pipeline import make_condition

    s = _shape(small)
    V, h, w = s["V"], s["h"], s["w"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(1, 16, V * s["T"], h, w, device=DEVICE, generator=g) * 2.0).to(torch.bfloat16)
    text = torch.randn(V * 512, 1024, device=DEVICE, generator=g) * 0.2
    text[torch.rand(V * 512, device=DEVICE, generator=g) > 0.1] = 0  # T5-like: ~50 valid tokens per view
    cond, uncond = make_condition(text, V, 24.0, 8 * h, 8 * w, [0, 0, 0, 0, 10, 10], torch.device(DEVICE),
                                  torch.bfloat16)
    video = None
    if V2W:  # 9 input frames: 2 of the 8 latent frames per view are given (the CLI's --num_input_frames 9)
        import dataclasses

        from mvmodel.diffusion.video2world import inference_condition

        gt = torch.randn(1, 16, V * s["T"], h, w, device=DEVICE, generator=g) * 0.5
        video = inference_condition(gt, V, num_condition_t=2, seed=0)
        mask = video.input_mask().to(torch.bfloat16)
        cond = dataclasses.replace(cond, condition_video_input_mask=mask)
        uncond = dataclasses.replace(uncond, condition_video_input_mask=mask)
    return x, cond, uncond, V * s["T"] * (h // 2) * (w // 2), video


def _sdpa_context(variant: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "sdpa_cudnn" in variant:
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    if "sdpa_flash" in variant:
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def run(small: bool = False, variants: list[str] | None = None, rep: int | None = None, benchmark=None) -> dict:
    """Time each variant's guided step; returns {variant: {s_per_step, tflops, mfu, peak_gib, steps35_min}}."""
    from mvmodel.inference.pipeline import euler_step_cfg

    variants = variants or os.environ.get("MVB_INF_VARIANTS", DEFAULT_VARIANTS).split(",")
    rep = rep or int(os.environ.get("MVB_REP", "10" if small else "3"))
    net, build_s = build_net(small)
    x, cond, uncond, tokens, video = inputs(net, small)
    flops = 2 * net.forward_flops(tokens)  # one step = cond + uncond forwards
    weights_gib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**30
    what = "inference step" + (" Video2World" if V2W else "")
    print(f"\n[{what}] {net.num_parameters() / 1e9:.2f}B params ({weights_gib:.1f} GiB bf16, built in "
          f"{build_s:.1f} s), {tokens} tokens x batch 2 (cond + uncond), {flops / 1e12:.1f} TFLOP per step")
    results, ref = {}, None
    plain_blocks = dict(net.blocks.items())
    for variant in variants:
        base = variant.split("+")[0]
        backend = {"sdpa_cudnn": "sdpa", "sdpa_flash": "sdpa"}.get(base, base)
        try:
            net.set_attention_backend(backend)
            for name, blk in plain_blocks.items():
                net.blocks[name] = torch.compile(blk) if "+compile" in variant else blk
            batch_cfg = "+seqcfg" not in variant

            def step():
                return euler_step_cfg(net, x, 1.3, 1.1, cond, uncond, 7.0, batch_cfg, video=video)

            with _sdpa_context(variant):
                out = step()  # also compiles
                _sync()
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = _time_ms(step, rep)
                peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
        except Exception as exc:  # noqa: BLE001 - report a variant that cannot run here, keep the others
            print(f"  {variant:24s} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if ref is None:
            ref = out.float()
        r = results[variant] = step_row(ms, flops, peak, out, ref)
        diff = r["rel_diff_vs_first"]
        print(f"  {variant:24s} {r['s_per_step']:7.2f} s/step  {r['tflops']:6.0f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
              f"peak {peak:5.1f} GiB  35 steps {r['steps35_min']:5.2f} min  (out rel diff {diff:.1e})")
        if benchmark is not None:
            record(benchmark, variant + ("_v2w" if V2W else ""), ms, tracked=variant == variants[0],
                   tflops=r["tflops"], mfu=r["mfu"],
                   peak_gib=peak, steps35_min=r["steps35_min"], tokens=tokens)
        del out
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if variants[0] in results and len(results) > 1:
        best = min((v for v in results if v != variants[0]), key=lambda v: results[v]["s_per_step"])
        ratio = results[best]["s_per_step"] / results[variants[0]]["s_per_step"]
        print(f"  ours ({variants[0]}) vs best peer ({best}): {ratio:.2f}x")
        if benchmark is not None:
            benchmark.extra_info["ratio_vs_best_peer"] = ratio
    return results


def test_inference_step(benchmark):
    res = run(small=os.environ.get("MVB_SMALL") == "1", benchmark=benchmark)
    assert res, "no variant ran"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--variants", default=None, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    ap.add_argument("--rep", type=int, default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_inference_step needs a CUDA GPU")
    run(a.small, a.variants.split(",") if a.variants else None, a.rep)
