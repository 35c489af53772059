"""Post-train a multi-view Text2World DiT (upstream's command shape, our module names).

usage: [torchrun --nproc_per_node=N] -m mvmodel.train --config=FILE [--dryrun] [--no_preflight] [--] \\
           experiment=NAME [section.key=value ...]

    torchrun --nproc_per_node=8 -m mvmodel.train --config=mvmodel/configs/multiview.py -- \\
        experiment=text2world_multiview_7b_example_waymo

options:
  -h, --help        show this help (with the experiments of --config when given) and exit
  --config=FILE     experiment module (a .py path or dotted module name) defining EXPERIMENTS
  --dryrun          print the composed config as JSON and exit
  --no_preflight    skip the checks of dataset, weights, tokenizer and memory made before the net is built
  experiment=NAME   one of the module's experiments
  section.key=value typed override, e.g. trainer.max_iter=100 optimizer.lr=1e-4 data.dataset_dir=datasets/x
                    (sections: job, data, model, optimizer, ema, checkpoint, parallel, trainer)

Multi-node: torchrun's rendezvous flags (--nnodes, --rdzv_backend, --rdzv_endpoint). On a machine without a GPU
the processes use the CPU and gloo. Outputs go to ``${OUTPUT_ROOT:-checkpoints}/{project}/{group}/{name}/``
(config.json, metrics.jsonl, checkpoints/iter_*_{reg_model,ema_model,optim}.pt); the inference CLI reads that
job folder directly (``--checkpoint_dir`` = its parent, ``--diffusion_transformer_dir`` = the experiment name).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .configs import make_config, parse_cli
from .configs.base import Config

GIB = 1024 ** 3
# Activation memory per sample, in units of one [tokens, width] bf16 tensor per block, for each activation
# checkpointing mode (saved inputs; "selective" also keeps the self-attention output), plus the live working set
# of the block being recomputed. Calibrated on the 7B one-GPU runs of .notes/trainer.md (block: 42.9 GiB,
# selective: 53.2 GiB peak at 63,600 tokens); "none" keeps every intermediate of every block.
_SAVED_PER_BLOCK = {"none": 16, "block": 1, "selective": 2, "subblock": 3}
_LIVE = 6


def _help(argv: list[str]) -> str:
    text = __doc__
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv[:-1]:
        config_file = argv[argv.index("--config") + 1]
    try:
        from .configs.base import load_experiments

        exps = load_experiments(config_file or "mvmodel/configs/multiview.py")
        text += f"\nexperiments of {config_file or 'mvmodel/configs/multiview.py'}:\n"
        for name, fn in exps.items():
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            text += f"  {name:46s} {first}\n"
    except (ValueError, FileNotFoundError, ImportError) as exc:
        text += f"\n(cannot list experiments: {exc})\n"
    return text


# ------------------------------------------------------------------------------------------------ preflight
def _host_memory() -> tuple[float, float]:
    """(total, available) host memory in bytes, from /proc/meminfo (sysconf elsewhere)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        avail = int(info.get("MemAvailable", info["MemTotal"]).split()[0]) * 1024
        return float(total), float(avail)
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return float(total), float(total)


def memory_plan(cfg: Config, world: int, local_world: int, on_gpu: bool) -> dict:
    """Estimated peak bytes: per GPU and per host, from the recipe (params, precision, optimizer, AC, tokens).

    A meta-device build counts the parameters without allocating anything.
    """
    import torch

    from .networks import MultiviewDiT, preset

    m, d, p = cfg.model, cfg.data, cfg.parallel
    overrides = dict(m.net_overrides)
    overrides.setdefault("camera_names", tuple(d.view_keys))
    with torch.device("meta"):
        net = MultiviewDiT(preset(m.net, **overrides))
    n = sum(t.numel() for t in net.parameters())
    c = net.config
    cbytes = 2 if m.precision in ("bfloat16", "float16") else 4
    V, T, (H, W) = len(d.view_keys), d.num_frames, d.video_size
    tokens = V * (1 + (T - 1) // 8) // c.patch_temporal * (H // 8 // c.patch_spatial) * (W // 8 // c.patch_spatial)
    act_unit = tokens * c.model_channels * cbytes * d.batch_size // max(1, p.context_parallel_size)
    acts = (_SAVED_PER_BLOCK[p.activation_checkpointing] * c.num_blocks + _LIVE) * act_unit
    ema = 4 * n if cfg.ema.enabled else 0
    if cfg.optimizer.cpu_offload:  # bf16 weights + grads on the GPU; fp32 masters, Adam moments, EMA on the host
        dev = 2 * cbytes * n + acts
        host = 12 * n + ema + 2 * GIB
    else:  # FSDP: fp32 masters, grads, Adam moments, EMA sharded over the ranks; each rank builds fp32 first
        sharded = (16 * n + ema) / world
        unsharded = 2 * cbytes * n / max(1, c.num_blocks)  # one gathered block (+ prefetch)
        if on_gpu:
            dev = sharded + unsharded + acts
            host = local_world * 4 * n
        else:
            dev = 0
            host = local_world * (sharded + 4 * n / world + unsharded + acts) + local_world * 4 * n
    return {"params": n, "tokens": tokens, "gpu": dev, "host": host}


def preflight(cfg: Config, resuming: bool) -> list[str]:
    """Check the dataset, the tokenizer, the pretrained weights and the memory before anything is built.

    Returns lines describing what the run needs; raises ValueError (one line, naming the setting) on a problem.
    """
    import torch

    d, m, ck = cfg.data, cfg.model, cfg.checkpoint
    ds = Path(d.dataset_dir)
    fix = "make one with python -m mvmodel.data.synthetic, or set data.dataset_dir=PATH"
    if not (ds / "videos").is_dir():
        raise ValueError(f"data.dataset_dir={ds}: no videos/ folder (expected upstream's layout "
                         f"videos/<view>/<clip>.mp4); {fix}")
    missing_views = [v for v in d.view_keys if not (ds / "videos" / v).is_dir()]
    if missing_views:
        raise ValueError(f"data.dataset_dir={ds}: no videos/ folder for view(s) {', '.join(missing_views)} "
                         f"(data.view_keys={','.join(d.view_keys)})")
    clips = sorted(p.stem for p in (ds / "videos" / d.view_keys[0]).glob("*.mp4"))
    if not clips:
        raise ValueError(f"data.dataset_dir={ds}: videos/{d.view_keys[0]}/ holds no .mp4 clip")
    if not (ds / "t5_xxl").is_dir():
        raise ValueError(f"data.dataset_dir={ds}: no T5 embeddings (t5_xxl/); write them with python -m "
                         f"mvmodel.data.t5_embeddings --dataset_path {ds} [--t5_dir DIR]")
    if m.tokenizer_dir is not None:
        from .tokenizer import REQUIRED_FILES

        missing = [f for f in REQUIRED_FILES if not (Path(m.tokenizer_dir) / f).is_file()]
        if missing:
            raise ValueError(f"model.tokenizer_dir={m.tokenizer_dir}: missing {', '.join(missing)} (the "
                             f"Cosmos-Tokenize1-CV8x8x8-720p files: python -m mvmodel.download; or "
                             f"python -m mvmodel.tokenizer.export for the built-in one)")
    if ck.load_path and not resuming and not os.path.isfile(ck.load_path):
        raise ValueError(f"checkpoint.load_path={ck.load_path}: file not found (download it with python -m "
                         f"mvmodel.download --model_sizes 7B --model_types Text2World-Sample-AV-Multiview "
                         f"--checkpoint_dir checkpoints, or set checkpoint.load_path=none to start from random weights)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    on_gpu = cfg.trainer.device != "cpu" and torch.cuda.is_available()
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA GPU is visible (set trainer.device=cpu or auto)")
    if cfg.optimizer.cpu_offload and not on_gpu:
        raise ValueError("optimizer.cpu_offload=true needs a CUDA GPU (it keeps the optimizer on the host for "
                         "one GPU); no GPU is visible")
    plan = memory_plan(cfg, world, local_world, on_gpu)
    host_total, host_avail = _host_memory()
    lines = [f"dataset {ds}: {len(clips)} clip(s) x {len(d.view_keys)} views; weights "
             f"{'resume from the job folder' if resuming else ck.load_path or 'random init'}; tokenizer "
             f"{m.tokenizer_dir or 'built-in'}",
             f"estimated memory: {plan['params'] / 1e9:.3g}B parameters, {plan['tokens']} tokens/sample -> host "
             f"{plan['host'] / GIB:.1f} GiB for {local_world} process(es) on this machine (total "
             f"{host_total / GIB:.0f} GiB, {host_avail / GIB:.0f} GiB available)"
             + (f", {plan['gpu'] / GIB:.1f} GiB per GPU" if on_gpu else "")]
    if plan["host"] > host_total:
        raise ValueError(f"{cfg.experiment or cfg.job.name}: needs ~{plan['host'] / GIB:.0f} GiB of host memory "
                         f"({plan['params'] / 1e9:.3g}B parameters{' on the CPU' if not on_gpu else ''}), this "
                         f"machine has {host_total / GIB:.0f} GiB" + ("" if on_gpu else
                         "; it is a GPU recipe: run it where GPUs are visible") + " (--no_preflight to try anyway)")
    if on_gpu:
        gpu_total = torch.cuda.get_device_properties(0).total_memory
        if plan["gpu"] > gpu_total:
            raise ValueError(f"{cfg.experiment or cfg.job.name}: needs ~{plan['gpu'] / GIB:.0f} GiB per GPU with "
                             f"{world} process(es), {torch.cuda.get_device_name(0)} has {gpu_total / GIB:.0f} GiB: use "
                             f"more GPUs, parallel.activation_checkpointing=subblock or optimizer.cpu_offload=true "
                             f"(one GPU) (--no_preflight to try anyway)")
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_help(args))
        if argv is not None:
            return None
        sys.exit(0)
    check = "--no_preflight" not in args
    args = [a for a in args if a != "--no_preflight"]
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        config_file, experiment, overrides, dryrun = parse_cli(args)
        cfg = make_config(config_file, experiment, overrides)
        if dryrun:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return None
        if check:
            from .trainer.checkpoint import Checkpointer

            resuming = cfg.checkpoint.resume and Checkpointer(cfg.job.path_local / "checkpoints").latest() is not None
            for line in preflight(cfg, resuming):
                if is_main:
                    print(f"[mvmodel.train] {line}", flush=True)
    except (ValueError, FileNotFoundError) as exc:
        if argv is not None:
            raise
        if is_main:
            print(f"mvmodel.train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    from .trainer import Trainer  # heavy imports only once the command line is valid
    from .trainer.checkpoint import CheckpointError
    from .trainer.loop import TrainingError

    # Refusals and failures the user must act on: one line naming the file/setting, exit status 1.
    expected = (CheckpointError, TrainingError, ValueError, FileNotFoundError)
    try:
        trainer = Trainer(cfg)
    except expected as exc:
        if argv is not None:
            raise
        sys.exit(f"mvmodel.train: error: {exc}")
    try:
        summary = trainer.train()
    except (CheckpointError, TrainingError) as exc:
        try:
            trainer.close()
        except CheckpointError as late:  # a second write error while stopping: report it too
            exc = f"{exc}; also: {late}"
        if argv is not None:
            raise
        sys.exit(f"mvmodel.train: error: {exc}")
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to see
            trainer.close()
        raise
    trainer.close()
    return summary


if __name__ == "__main__":
    main()
