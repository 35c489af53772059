"""Checks made before the trainer builds anything: dataset, tokenizer, pretrained weights and memory.

The memory figures come from the recipe (parameters, precision, optimizer placement, activation checkpointing,
tokens), so a run that cannot fit is refused in a second with what it needs, not killed after minutes.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..configs.base import Config
from .memory_plan import estimate_activation_bytes, host_memory_bytes, tokens_per_sample

GIB = 1024 ** 3


@functools.lru_cache(maxsize=16)
def _count_parameters(net_name: str, overrides_json: str, lora: tuple | None):
    """(base parameters, LoRA parameters, net config) from a meta-device build (no memory; cached: the recipe
    choice asks for the same net several times)."""
    import torch

    from ..networks import MultiviewDiT, preset

    overrides = json.loads(overrides_json)
    if overrides.get("camera_names") is not None:
        overrides["camera_names"] = tuple(overrides["camera_names"])
    with torch.device("meta"):
        net = MultiviewDiT(preset(net_name, **overrides))
        if lora is not None:
            from ..networks.lora import add_lora

            add_lora(net, lora[0], None, lora[1])
    n_lora = sum(t.numel() for t in net.parameters() if t.requires_grad) if lora is not None else 0
    return sum(t.numel() for t in net.parameters()) - n_lora, n_lora, net.config


def memory_plan(cfg: Config, world: int, local_world: int, on_gpu: bool, gpu_bytes: int | None = None) -> dict:
    """Estimated peak bytes: per GPU and per host, from the recipe (params, precision, optimizer, AC, tokens).

    With the one-GPU offloaded optimizer, "host" is the all-host plan's figure and "host_min" what the host still
    needs when the memory plan (``optimizer.offload_plan`` auto/device) keeps on a GPU of ``gpu_bytes`` (default:
    GPU 0's) as much optimizer state as fits. A meta-device build counts the parameters without allocating.
    """
    import torch

    m, d, p = cfg.model, cfg.data, cfg.parallel
    overrides = dict(m.net_overrides)
    overrides.setdefault("camera_names", tuple(d.view_keys))
    lora = (m.lora.rank, tuple(m.lora.targets)) if m.lora.enabled else None
    n, n_lora, c = _count_parameters(m.net, json.dumps(overrides, sort_keys=True, default=list), lora)
    cbytes = 2 if m.precision in ("bfloat16", "float16") else 4
    tokens = tokens_per_sample(cfg, c)
    acts = estimate_activation_bytes(tokens // max(1, p.context_parallel_size), c.model_channels, c.num_blocks,
                                     p.activation_checkpointing, d.batch_size)
    ema = 4 * n if cfg.ema.enabled else 0
    if m.lora.enabled:  # frozen base in the compute dtype on every GPU; fp32 adapters, their grads, moments, EMA
        state = (16 + (4 if cfg.ema.enabled else 0)) * n_lora
        dev = cbytes * n + state + acts if on_gpu else 0
        # Host: each process reads the pretrained file (memory-mapped, in the base dtype) once; on a CPU it holds it.
        host = local_world * (cbytes * n + 2 * GIB + (0 if on_gpu else state + acts))
        return {"params": n + n_lora, "trainable": n_lora, "tokens": tokens, "gpu": dev, "host": host,
                "host_min": host}
    if cfg.optimizer.cpu_offload:  # bf16 weights + grads on the GPU; fp32 masters, Adam moments, EMA placed by plan
        dev = 2 * cbytes * n + acts
        state = 12 * n + ema
        host = state + 2 * GIB
        host_min = host
        if on_gpu and cfg.optimizer.offload_plan != "host":
            if gpu_bytes is None:
                gpu_bytes = torch.cuda.get_device_properties(0).total_memory
            if cfg.trainer.gpu_memory_cap_gib > 0:
                gpu_bytes = min(gpu_bytes, int(cfg.trainer.gpu_memory_cap_gib * GIB))
            room = max(0, gpu_bytes - dev - int(cfg.trainer.gpu_memory_margin_gib * GIB))
            host_min = state - min(state, room) + 2 * GIB
            dev += min(state, room)
        return {"params": n, "trainable": n, "tokens": tokens, "gpu": dev, "host": host, "host_min": host_min}
    # FSDP: fp32 masters, grads, Adam moments, EMA sharded over the ranks; each rank builds fp32 first
    sharded = (16 * n + ema) / world
    unsharded = 2 * cbytes * n / max(1, c.num_blocks)  # one gathered block (+ prefetch)
    if on_gpu:
        dev = sharded + unsharded + acts
        host = local_world * 4 * n
    else:
        dev = 0
        host = local_world * (sharded + 4 * n / world + unsharded + acts) + local_world * 4 * n
    return {"params": n, "trainable": n, "tokens": tokens, "gpu": dev, "host": host, "host_min": host}


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
        from ..tokenizer import REQUIRED_FILES

        missing = [f for f in REQUIRED_FILES if not (Path(m.tokenizer_dir) / f).is_file()]
        if missing:
            raise ValueError(f"model.tokenizer_dir={m.tokenizer_dir}: missing {', '.join(missing)} (the "
                             f"Cosmos-Tokenize1-CV8x8x8-720p files: python -m mvmodel.download; or "
                             f"python -m mvmodel.tokenizer.export for the built-in one)")
    lora = cfg.model.lora.enabled or cfg.trainer.recipe == "lora"  # a LoRA resume reloads its frozen base too
    if ck.load_path and (not resuming or lora) and not os.path.isfile(ck.load_path):
        raise ValueError(f"checkpoint.load_path={ck.load_path}: file not found (download it with python -m "
                         f"mvmodel.download --model_sizes 7B --model_types Text2World-Sample-AV-Multiview "
                         f"--checkpoint_dir checkpoints, or set checkpoint.load_path=none to start from random weights)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    on_gpu = cfg.trainer.device != "cpu" and torch.cuda.is_available()
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA GPU is visible (set trainer.device=cpu or auto)")
    from .recipes import resolve_recipe  # noqa: PLC0415 - recipes imports this module

    # trainer.recipe (full / full_offload / lora / auto): picked for this GPU's memory, or refused with numbers.
    recipe_note = resolve_recipe(cfg, torch.device("cuda", 0) if on_gpu else torch.device("cpu"), world, local_world)
    if cfg.optimizer.cpu_offload and not on_gpu:
        raise ValueError("optimizer.cpu_offload=true needs a CUDA GPU (it keeps the optimizer on the host for "
                         "one GPU); no GPU is visible")
    plan = memory_plan(cfg, world, local_world, on_gpu)
    host_total, host_avail = host_memory_bytes()
    lines = [f"dataset {ds}: {len(clips)} clip(s) x {len(d.view_keys)} views; weights "
             f"{'resume from the job folder' if resuming else ck.load_path or 'random init'}; tokenizer "
             f"{m.tokenizer_dir or 'built-in'}",
             f"estimated memory: {plan['params'] / 1e9:.3g}B parameters, {plan['tokens']} tokens/sample -> host "
             f"{plan['host_min'] / GIB:.1f} GiB"
             + (f" (all optimizer state on the host: {plan['host'] / GIB:.1f})" if cfg.optimizer.cpu_offload else "")
             + (f" ({plan['trainable'] / 1e6:.2f}M trained LoRA parameters)" if cfg.model.lora.enabled else "")
             + f" for {local_world} process(es) on this machine (total "
             f"{host_total / GIB:.0f} GiB, {host_avail / GIB:.0f} GiB available)"
             + (f", {plan['gpu'] / GIB:.1f} GiB per GPU" if on_gpu else ""), recipe_note]
    if plan["host_min"] > host_total:
        raise ValueError(f"{cfg.experiment or cfg.job.name}: needs ~{plan['host_min'] / GIB:.0f} GiB of host memory "
                         f"({plan['params'] / 1e9:.3g}B parameters{' on the CPU' if not on_gpu else ''}), this "
                         f"machine has {host_total / GIB:.0f} GiB" + ("" if on_gpu else
                         "; it is a GPU recipe: run it where GPUs are visible") + " (--no_preflight to try anyway)")
    if on_gpu:
        gpu_total = torch.cuda.get_device_properties(0).total_memory
        cap = cfg.trainer.gpu_memory_cap_gib
        if cap > 0:
            gpu_total = min(gpu_total, int(cap * GIB))
        if plan["gpu"] > gpu_total:
            raise ValueError(f"{cfg.experiment or cfg.job.name}: needs ~{plan['gpu'] / GIB:.0f} GiB per GPU with "
                             f"{world} process(es), {torch.cuda.get_device_name(0)} has {gpu_total / GIB:.0f} GiB"
                             f"{f' (trainer.gpu_memory_cap_gib={cap:g})' if cap > 0 else ''}; host "
                             f"{plan['host_min'] / GIB:.0f} of {host_total / GIB:.0f} GiB: trainer.recipe=auto, use "
                             f"more GPUs, parallel.activation_checkpointing=subblock or optimizer.cpu_offload=true "
                             f"(one GPU) (--no_preflight to try anyway)")
    return lines
