"""One 7B multi-view training step on ONE GPU: the 5-view Waymo net (random init), 63,600 tokens
(latent [1, 16, 40, 60, 106], 5 x 512 T5 tokens), bf16 compute, fp32 master weights + AdamW moments + power
EMA in host memory (``optimizer.cpu_offload``), activation checkpointing, torch.compile per block.

It runs the trainer's own step (``Trainer.optimize``: EDM loss, backward, grad-norm clip, the offloaded AdamW
whose CPU update overlaps the next forward, EMA), built from experiment
``text2world_multiview_7b_example_waymo_1gpu`` with no dataset (random latents stand for tokenizer output).
Reports seconds per step (steady state, optimizer included), MFU (3 x forward model FLOPs / step time / peak
bf16), peak GPU memory, peak host memory, and the CPU update's own time.

    pytest benches/bench_train_step.py -s --benchmark-json=run.json

Knobs (environment): MV_BENCH_AC=block|selective|subblock|none (default: the experiment's, selective: it keeps
the 28 self-attention outputs, +10 GiB over block, and skips their recompute), MV_BENCH_COMPILE=1|0 (default 1),
MV_BENCH_BLOCKS=28 (fewer for a quick check), MV_BENCH_STEPS=3 timed steps after 2 warm-up steps,
MV_BENCH_EMA=1|0 (the fp32 EMA takes 29 GB of host memory), MV_BENCH_ATTN=auto|mvkernels|hybrid|fa4|sdpa (the
model's attention backend; default the experiment's, "auto"), MV_BENCH_PLAN=auto|host|device|device:K (where the
master weights, moments and EMA live: ``optimizer.offload_plan``, default auto = as much on the GPU as fits),
MV_BENCH_CAP=76 (cap usable GPU memory in GiB: an 80 GB card's plan on a bigger GPU; the figure's name then gets
``_cap76``), MV_BENCH_ACT_GIB (the activation peak the plan budgets for; default: the recipe estimate),
MV_BENCH_SET="section.key=value ..." (any further overrides, space-separated; not tracked),
MV_BENCH_V2W=1 (issue 22: the same step of ``video2world_multiview_7b_example_waymo_1gpu``, the Video2World net
with 0-2 conditioning latent frames per sample drawn by the trainer; the figure's name gets ``_v2w``).
"""
from __future__ import annotations

import os
import resource
import time

import pytest
import torch

from conftest import record



def training_inputs(dev):
    """One random 7B training sample at upstream's shape: 5 views x 57 frames at 480x848 = 40 latent frames of
    60x106 (63,600 tokens), 5 x 512 T5 tokens."""
    from mvmodel.diffusion import Condition

    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(1, 16, 40, 60, 106, generator=g) * 0.5).to(dev)
    cond = Condition(crossattn_emb=torch.randn(1, 5 * 512, 1024, generator=g).to(dev),
                     fps=torch.full((1,), 10.0, device=dev), padding_mask=torch.zeros(1, 1, 480, 848, device=dev))
    return x0, cond

def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@pytest.mark.gpu
def test_train_step_7b_one_gpu(benchmark, tmp_path):
    from mvmodel.configs import make_config
    from mvmodel.trainer import Trainer, step_generator
    from mvmodel.trainer.monitor import host_rss_gib, peak_flops

    blocks = int(_env("MV_BENCH_BLOCKS", "28"))
    overrides = [f"job.output_root={tmp_path}", "checkpoint.load_path=none", "checkpoint.resume=false",
                 f"parallel.compile={_env('MV_BENCH_COMPILE', '1')}", f"ema.enabled={_env('MV_BENCH_EMA', '1')}",
                 "optimizer.warmup_steps=0", "trainer.device=cuda",
                 f"optimizer.offload_plan={_env('MV_BENCH_PLAN', 'auto')}",
                 f"trainer.gpu_memory_cap_gib={_env('MV_BENCH_CAP', '0')}",
                 f"trainer.activation_gib={_env('MV_BENCH_ACT_GIB', '0')}"]
    overrides += os.environ.get("MV_BENCH_SET", "").split()
    if "MV_BENCH_ATTN" in os.environ:
        overrides.append(f"model.attention_backend={os.environ['MV_BENCH_ATTN']}")
    if "MV_BENCH_AC" in os.environ:
        overrides.append(f"parallel.activation_checkpointing={os.environ['MV_BENCH_AC']}")
    if blocks != 28:
        overrides.append(f'model.net_overrides={{"num_blocks": {blocks}}}')
    v2w = _env("MV_BENCH_V2W", "0") == "1"
    family = "video2world" if v2w else "text2world"
    cfg = make_config("mvmodel/configs/multiview.py", f"{family}_multiview_7b_example_waymo_1gpu", overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, with_data=False)
    build_s = time.perf_counter() - t0
    print(f"\n[train_step] built in {build_s:.0f} s", flush=True)  # long work shows progress
    dev = trainer.info.device
    try:
        x0, cond = training_inputs(dev)
        tokens = trainer.tokens_per_sample
        assert tokens == 63600, tokens

        def step():
            return trainer.optimize(x0, cond, step_generator(0, 0, trainer.iteration))

        warm = []
        for i in range(2):  # compile, allocator warm-up, first offloaded update
            t1 = time.perf_counter()
            warm.append(step())
            torch.cuda.synchronize()
            print(f"[train_step] warm-up step {i + 1}: {time.perf_counter() - t1:.1f} s, "
                  f"peak GPU {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB", flush=True)
        trainer.optimizer.synchronize()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        n = int(_env("MV_BENCH_STEPS", "3"))
        timed: dict = {}

        def timed_steps():
            t0 = time.perf_counter()
            timed["metrics"] = [step() for _ in range(n)]
            torch.cuda.synchronize()
            timed["loop_s"] = time.perf_counter() - t0  # the last CPU update belongs to the next step
            trainer.optimizer.synchronize()
            timed["tail_s"] = time.perf_counter() - t0 - timed["loop_s"]

        benchmark.pedantic(timed_steps, rounds=1, iterations=1)  # pytest-benchmark's wall clock of the n steps
        metrics, loop_s, tail_s = timed["metrics"], timed["loop_s"], timed["tail_s"]
        s_per_step = loop_s / n

        # The CPU update alone (nothing to overlap with): what the overlap hides.
        step()
        torch.cuda.synchronize()
        trainer.optimizer.synchronize()
        t1 = time.perf_counter()
        trainer.model(x0, cond, torch.ones(1, device=dev), torch.randn_like(x0))["loss"].backward()
        torch.cuda.synchronize()
        fwd_bwd_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        trainer.optimizer.step(lr=1e-6, grad_scale=1.0, iteration=trainer.iteration)
        trainer.optimizer.synchronize()
        update_s = time.perf_counter() - t1
        trainer.optimizer.zero_grad()

        flops = 3 * trainer.model.net.forward_flops(tokens)  # model FLOPs (recompute not counted)
        peak = peak_flops(dev) or float("nan")
        mfu = flops / s_per_step / peak
        gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**30
        gpu_reserved = torch.cuda.max_memory_reserved(dev) / 2**30
        host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        n_params = sum(p.numel() for p in trainer.params)
        cap = float(_env("MV_BENCH_CAP", "0"))
        name = "train_step_7b_1gpu" + (f"_cap{cap:g}" if cap else "") + ("_v2w" if v2w else "")
        if _env("MV_BENCH_PLAN", "auto") != "auto":
            name += "_plan_" + _env("MV_BENCH_PLAN", "auto").replace(":", "")
        record(benchmark, name, s_per_step * 1e3, tracked=blocks == 28 and not os.environ.get("MV_BENCH_SET"), mfu=mfu,
               memory_plan=trainer.optimizer.plan.describe(), tflops=flops / s_per_step / 1e12,
               gpu_peak_gib=gpu_peak, gpu_reserved_gib=gpu_reserved, host_peak_gib=host_peak,
               host_now_gib=host_rss_gib(), cpu_update_s=update_s, fwd_bwd_s=fwd_bwd_s, tail_s=tail_s,
               params=n_params, blocks=blocks, tokens=tokens, build_s=build_s,
               ac=cfg.parallel.activation_checkpointing, compile=cfg.parallel.compile,
               losses=[m["loss"] for m in warm + metrics])
        print(f"\n7B multiview {family} train step on {torch.cuda.get_device_name(dev)}: {n_params / 1e9:.2f}B params, "
              f"{tokens} tokens, AC={cfg.parallel.activation_checkpointing}, compile={cfg.parallel.compile}\n"
              f"  {s_per_step:.2f} s/step (optimizer overlapped; {n} steps), MFU {100 * mfu:.1f}% "
              f"({flops / s_per_step / 1e12:.0f} TFLOP/s of model FLOPs)\n"
              f"  fwd+bwd alone {fwd_bwd_s:.2f} s, CPU AdamW+EMA alone {update_s:.2f} s\n"
              f"  peak GPU memory {gpu_peak:.1f} GiB allocated / {gpu_reserved:.1f} GiB reserved; "
              f"peak host RSS {host_peak:.1f} GiB; build {build_s:.0f} s\n"
              f"  {trainer.optimizer.plan.describe()}\n"
              f"  losses {[round(m['loss'], 4) for m in warm + metrics]}")
        assert all(m["loss"] == m["loss"] for m in metrics)
    finally:
        trainer.close()
