"""Multi-GPU scaling of the 7B multi-view training step (issue 8, item 3): FSDP2 on 1, 2, 4, 8 GPUs, with and
without context parallelism, at 63,600 tokens per sample (5 views x 57 frames at 480x848, random init).

One run = one ``torchrun`` launch; each rank runs the trainer's own step (``Trainer.optimize``: EDM loss,
backward, grad-norm clip, AdamW, power EMA) on random latents [1, 16, 40, 60, 106] and 5 x 512 T5 tokens (no
dataset, no tokenizer). Rank 0 appends one JSON line to ``--out``: seconds per step (median of the timed steps,
slowest rank), tokens/s per GPU, MFU per GPU (3 x forward model FLOPs of the samples in flight / step time / GPUs
/ peak bf16; activation recompute not counted), peak memory per GPU (max over ranks), losses.
``--summarize`` prints the table and the weak-scaling efficiency: tokens/s/GPU of each run over the 1-GPU run's.

The 1-GPU baseline cannot hold the FSDP recipe's fp32 master weights + AdamW moments + EMA (7.4B x 20 bytes =
148 GB) on one GPU, so it uses the single-GPU experiment (CPU-offloaded optimizer, compiled blocks, per-block
recompute); pass ``--experiment`` to compare other recipes. With context parallelism, ``cp`` ranks share one
sample: samples per step = GPUs / cp.

    OUT=scaling.jsonl
    torchrun --standalone --nproc_per_node=1 benches/bench_scaling.py --out $OUT \
        --experiment text2world_multiview_7b_example_waymo_1gpu
    for n in 2 4 8; do
      for cp in 1 2 4 8; do
        [ $cp -le $n ] && torchrun --standalone --nproc_per_node=$n benches/bench_scaling.py --out $OUT --cp $cp
      done
    done
    python benches/bench_scaling.py --summarize $OUT

Variants: ``--ac selective`` (keeps the self-attention outputs), ``--compile 1``, ``--fsdp-unit subblock``,
``--blocks 4`` for a quick check, and any config key with ``--set section.key=value`` (repeatable; e.g.
``--set parallel.reshard_after_forward=false``, ``--set trainer.gpu_memory_cap_gib=76``). Without explicit
knobs the experiment's per-GPU-kind choices apply (``parallel.per_gpu_kind``); explicit ones win.
Targets (issue 8): >= 90% weak-scaling efficiency 1 -> 8 GPUs, >= 45% MFU.

Regression tracking: every row carries ``gpu_kind`` (the GPU's name, plus ``x<N>`` for N GPUs, e.g.
``NVIDIA_H200x2``) and ``scaling_key``; ``python benches/compare.py scaling.jsonl [--update]`` checks the step
times against (or stores them in) ``benches/baselines/<gpu_kind>.json``, the 1-GPU rows in the single-GPU file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mvmodel.configs import make_config
    from mvmodel.diffusion import Condition
    from mvmodel.trainer import Trainer, step_generator
    from mvmodel.trainer.monitor import memory_gib, peak_flops

    def gpu_name() -> str:  # as benches/conftest.py: the baseline file's name
        return torch.cuda.get_device_name().replace(" ", "_")

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_scaling needs CUDA GPUs (launch it with torchrun on the GPU machine; "
                         "--device cpu --experiment text2world_multiview_tiny_example is a CPU smoke test)")
    out_root = tempfile.mkdtemp(prefix="bench_scaling_")
    overrides = [f"job.output_root={out_root}", "checkpoint.load_path=none", "checkpoint.resume=false",
                 "optimizer.warmup_steps=0", f"trainer.device={args.device}",
                 f"parallel.context_parallel_size={args.cp}",
                 f"ema.enabled={args.ema}"]
    if args.ac:
        overrides.append(f"parallel.activation_checkpointing={args.ac}")
    if args.compile is not None:
        overrides.append(f"parallel.compile={args.compile}")
    if args.fsdp_unit:
        overrides.append(f"parallel.fsdp_unit={args.fsdp_unit}")
    if args.blocks != 28 and "7b" in args.experiment:
        overrides.append(f'model.net_overrides={{"num_blocks": {args.blocks}}}')
    overrides += args.set
    cfg = make_config("mvmodel/configs/multiview.py", args.experiment, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, with_data=False)
    build_s = time.perf_counter() - t0
    dev, info = trainer.info.device, trainer.info
    try:
        d, net_cfg = cfg.data, trainer.model.net.config
        V, (H, W) = len(d.view_keys), d.video_size
        g = torch.Generator().manual_seed(trainer.dp_rank)  # the ranks of one CP group share a sample
        # The tokenizer's output shape: [1, 16, V * (1 + (frames - 1) / 8), H / 8, W / 8] (7B: [1, 16, 40, 60, 106]).
        x0 = (torch.randn(1, 16, V * (1 + (d.num_frames - 1) // 8), H // 8, W // 8, generator=g) * 0.5).to(dev)
        cond = Condition(crossattn_emb=torch.randn(1, V * 512, net_cfg.crossattn_emb_channels, generator=g).to(dev),
                         fps=torch.full((1,), 10.0, device=dev), padding_mask=torch.zeros(1, 1, H, W, device=dev))
        tokens = trainer.tokens_per_sample

        def step() -> dict:
            return trainer.optimize(x0, cond, step_generator(0, trainer.dp_rank, trainer.iteration))

        losses = [step()["loss"] for _ in range(args.warmup)]
        if trainer.offload:
            trainer.optimizer.synchronize()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t1 = time.perf_counter()
            losses.append(step()["loss"])
            if cuda:
                torch.cuda.synchronize()
            dt = torch.tensor([time.perf_counter() - t1], device=dev)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
            times.append(dt.item())
        peak_mem = torch.tensor([memory_gib(dev)], device=dev)  # GPU: allocated; CPU: host RSS
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
        s = statistics.median(times)
        world, dp = info.world_size, trainer.dp_size
        flops = 3 * trainer.model.net.forward_flops(tokens) * dp  # model FLOPs of the samples in flight
        peak = peak_flops(dev) or float("nan")
        p = cfg.parallel  # as resolved at start (per-GPU-kind choices applied)
        choices = (f"ac={p.activation_checkpointing},compile={int(p.compile)},raf={p.reshard_after_forward},"
                   f"prefetch={p.forward_prefetch}/{p.backward_prefetch}"
                   + (f",plan={trainer.optimizer.plan.why.split(':')[0]}" if trainer.offload else "")
                   + "".join(f",{o}" for o in args.set) + (f",blocks={args.blocks}" if args.blocks != 28 else ""))
        gpu_kind = gpu_name() if cuda else "cpu"
        if world > 1 and cuda:
            gpu_kind += f"x{world}"
        row = dict(gpu=torch.cuda.get_device_name(dev) if cuda else "cpu", gpus=world, cp=args.cp, dp=dp,
                   gpu_kind=gpu_kind, scaling_key=f"scaling::{args.experiment}::cp={args.cp}::{choices}",
                   parallel=dataclasses.asdict(p),
                   memory_plan=trainer.optimizer.plan.describe() if trainer.offload else None,
                   host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   experiment=args.experiment,
                   ac=cfg.parallel.activation_checkpointing, compile=cfg.parallel.compile, blocks=args.blocks,
                   tokens_per_sample=tokens, s_per_step=s, step_times=times,
                   tokens_per_s_per_gpu=tokens * dp / s / world, mfu=flops / s / world / peak,
                   peak_mem_gib_per_gpu=peak_mem.item(), build_s=build_s, losses=losses)
        if info.is_main:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{world} GPU(s), cp={args.cp}: {s:.2f} s/step, {row['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
                  f"MFU {100 * row['mfu']:.1f}%, peak {row['peak_mem_gib_per_gpu']:.1f} GiB/GPU", flush=True)
    finally:
        trainer.close()
        shutil.rmtree(out_root, ignore_errors=True)  # the trainer's final checkpoint is not needed


def summarize(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no runs recorded")
    base = [r for r in rows if r["gpus"] == 1]
    ref = base[0]["tokens_per_s_per_gpu"] if base else None
    print(f"{'GPUs':>4} {'cp':>3} {'s/step':>8} {'tok/s/GPU':>10} {'MFU':>6} {'GiB/GPU':>8} {'host GiB':>8} "
          f"{'weak eff.':>9}  recipe")
    for r in sorted(rows, key=lambda r: (r["gpus"], r["cp"])):
        eff = f"{100 * r['tokens_per_s_per_gpu'] / ref:8.1f}%" if ref else "      n/a"
        print(f"{r['gpus']:>4} {r['cp']:>3} {r['s_per_step']:>8.2f} {r['tokens_per_s_per_gpu']:>10.0f} "
              f"{100 * r['mfu']:>5.1f}% {r['peak_mem_gib_per_gpu']:>8.1f} {r.get('host_peak_rss_gib', float('nan')):>8.1f} "
              f"{eff}  {r.get('scaling_key', r['experiment'] + ', AC=' + r['ac'])}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scaling.jsonl", help="JSON-lines file the results are appended to")
    p.add_argument("--summarize", metavar="JSONL", help="print the table of a results file and exit")
    p.add_argument("--experiment", default="text2world_multiview_7b_example_waymo")
    p.add_argument("--cp", type=int, default=1, help="parallel.context_parallel_size")
    p.add_argument("--ac", default=None, help="parallel.activation_checkpointing (default: the experiment's)")
    p.add_argument("--compile", default=None, choices=["0", "1"], help="parallel.compile (default: the experiment's)")
    p.add_argument("--fsdp-unit", default=None, choices=["block", "subblock"])
    p.add_argument("--ema", default="1", choices=["0", "1"])
    p.add_argument("--blocks", type=int, default=28)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override (repeatable), e.g. parallel.reshard_after_forward=false")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args)


if __name__ == "__main__":
    main()
