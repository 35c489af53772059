"""The guided 6-view 7B sampling step per inference precision: bf16, 8-bit attention alone, FP8 linears alone, both.

Same step as ``bench_inference_step.py`` (76,320 tokens x batch 2, cond + uncond in one forward, Euler update),
transformer blocks under torch.compile, random weights. The net is converted once for "fp8"
(``mvmodel.networks.precision.apply_precision``, default bf16 blocks = first and last) and each variant switches
the converted parts on or off (``set_precision_mode``), so every row runs the same weights in the same process.
Reports s/step (CUDA events, median), TFLOP/s counted at bf16 FLOPs, the 35-step minutes, peak memory, and the
step output's relative difference to the bf16 row. A variant whose part cannot run here (no Hopper, no
``mvkernels.ops.mv_attention_int8``, no torchao) is reported unavailable and skipped.

Run on a GPU:  pytest benches/bench_inference_precision.py -s --benchmark-json=run.json
               python benches/bench_inference_precision.py [--small] [--variants bf16,fp8] [--rep 3]
Env: MVB_SMALL=1 (width 1024, 4 blocks, 768 tokens), MVB_REP (timed steps, default 3 full / 10 small),
     MVB_PREC_VARIANTS (default bf16,fp8-attn,fp8-linear,fp8), MVB_DEVICE=cpu (dry-run of the harness logic only,
     with MVB_SMALL=1: eager, every 8-bit row unavailable).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference_step import DEVICE, _time_ms, build_net, inputs, step_row  # noqa: E402
from conftest import cuda_time, record  # noqa: E402

DEFAULT_VARIANTS = "bf16,fp8-attn,fp8-linear,fp8"


def run(small: bool = False, variants: list[str] | None = None, rep: int | None = None, benchmark=None) -> dict:
    from mvmodel.inference.pipeline import euler_step_cfg
    from mvmodel.networks.precision import Precision, apply_precision, set_precision_mode, set_sampling_step

    variants = variants or os.environ.get("MVB_PREC_VARIANTS", DEFAULT_VARIANTS).split(",")
    rep = rep or int(os.environ.get("MVB_REP", "10" if small else "3"))
    # bf16 blocks, the 8-bit blocks in bf16 and in 8 bits, per variant: more graphs than the default limit of 8
    torch._dynamo.config.recompile_limit = 64
    net, build_s = build_net(small)
    x, cond, uncond, tokens = inputs(net, small)
    flops = 2 * net.forward_flops(tokens)
    have = apply_precision(net, Precision("fp8"))  # FP8 weight copies made once, here (not timed)
    print(f"\n[inference precision] {net.num_parameters() / 1e9:.2f}B params (built in {build_s:.1f} s), {tokens} "
          f"tokens x batch 2, {flops / 1e12:.1f} TFLOP per step (bf16 count); converted: {have.mode}, bf16 blocks "
          f"{sorted(have.block_set(len(net.blocks)))}")
    if DEVICE == "cuda":  # (MVB_DEVICE=cpu dry-runs the harness logic eagerly)
        for name, blk in list(net.blocks.items()):
            net.blocks[name] = torch.compile(blk)
    results, ref = {}, None
    for variant in variants:
        try:
            set_precision_mode(net, variant)
        except ValueError as exc:
            print(f"  {variant:12s} unavailable: {exc}")
            continue
        set_sampling_step(net, 0)

        def step():
            return euler_step_cfg(net, x, 1.3, 1.1, cond, uncond, 7.0, True)

        out = step()  # also compiles this setting
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_time(step, warmup=0, rep=rep, flush_l2=False)  # step() above warmed it
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            ms, peak = _time_ms(step, rep), float("nan")
        if ref is None:
            ref = out.float()
        r = results[variant] = step_row(ms, flops, peak, out, ref)  # MFU against the bf16 peak
        diff = r["rel_diff_vs_first"]
        print(f"  {variant:12s} {r['s_per_step']:7.2f} s/step  {r['tflops']:6.0f} TFLOP/s  peak {peak:5.1f} GiB  "
              f"35 steps {r['steps35_min']:5.2f} min  (step output vs {variants[0]}: {diff:.1e})")
        if benchmark is not None:
            record(benchmark, f"guided_step_{variant}", ms, tracked=variant != "bf16", tflops=r["tflops"],
                   steps35_min=r["steps35_min"], peak_gib=peak, rel_diff_vs_first=diff, tokens=tokens)
        del out
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if "bf16" in results:
        for v in results:
            if v != "bf16":
                print(f"  {v} vs bf16: {results['bf16']['s_per_step'] / results[v]['s_per_step']:.2f}x")
    return results


def test_inference_precision(benchmark):
    res = run(small=os.environ.get("MVB_SMALL") == "1", benchmark=benchmark)
    assert "bf16" in res, "the bf16 row did not run"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="width 1024, 4 blocks, 768 tokens (seconds)")
    ap.add_argument("--variants", default=None, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    ap.add_argument("--rep", type=int, default=None, help="timed steps (default 3, 10 with --small)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_inference_precision needs a CUDA GPU")
    run(a.small, a.variants.split(",") if a.variants else None, a.rep)
