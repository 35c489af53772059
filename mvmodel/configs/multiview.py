"""Named multi-view Text2World post-training experiments (upstream names and values, cosmos-multiview.md §8.2).

    torchrun --nproc_per_node=8 -m mvmodel.train --config=mvmodel/configs/multiview.py -- \
        experiment=text2world_multiview_7b_example_waymo [section.key=value ...]

* ``text2world_multiview_7b_example_waymo``: upstream's Waymo example (5 views x 57 frames at 480x848 = 63,600
  tokens, 2000 iterations, checkpoint every 200, lr 2^-14.3 with a 2500-step warm-up, FSDP over all GPUs,
  activation checkpointing per sub-block, pretrained 6-view release as the starting point).
* ``text2world_multiview_7b_example_waymo_1gpu``: the same on ONE 80 GB GPU: fp32 master weights, Adam moments
  and EMA in host memory (``optimizer.cpu_offload``), compiled blocks, selective activation checkpointing.
* ``text2world_multiview_7b_lora_example_waymo``: LoRA post-training of the 7B (upstream's single-view LoRA
  recipe: rank 8, scale 1, adapters on the self- and cross-attention q and v of all blocks), base frozen in bf16,
  replicated on every GPU; ``..._1gpu``: the same on one GPU of 40 GB and up (activation checkpointing chosen
  from the GPU's memory by the preflight, ``trainer.recipe=lora``).
* ``text2world_multiview_cpu_lora_example``: LoRA on the CPU example's net (README; a minute on 2 cores).
* ``text2world_multiview_tiny_example``: a 2-block width-64 net on a small synthetic dataset, fp32, the
  built-in tokenizer; for tests (seconds on a CPU).
* ``text2world_multiview_cpu_example``: README's CPU walk-through (synthetic data, a width-128 net that learns the
  scene in a few minutes on 2 cores, also under ``torchrun --nproc_per_node=2``).
* ``text2world_multiview_demo``: the same for ``python -m mvmodel.demo`` (its own dataset/tokenizer folders).
* ``video2world_multiview_7b_example_waymo`` / ``_1gpu``: upstream's Video2World Waymo example (the Text2World
  recipe with the condition-mask net, 0-2 conditioning latent frames per sample, sigma_aug = exp(N(-3, 2)),
  unconditional = condition region zeroed), from the released Video2World 6-view weights.
* ``video2world_multiview_tiny_example`` / ``video2world_multiview_cpu_example``: the tiny and CPU examples with the
  Video2World net (tests, the CPU continuation walk-through).
"""
from __future__ import annotations

from .base import (PRETRAINED_7B, PRETRAINED_7B_V2W, TOKENIZER_DIR, WAYMO_VIEW_KEYS, CheckpointConfig, Config, DataConfig, EMAConfig,
                   JobConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainerConfig)

# FSDP2 choices of the 7B recipe per GPU memory class (GiB of device memory, capped by trainer.gpu_memory_cap_gib),
# applied at start (parallel.per_gpu_kind; command-line parallel.* overrides win). Per GPU with N FSDP ranks:
# fp32 master + AdamW moments + EMA 16 B x 7.23B / N, fp32 sharded gradients 4 B x 7.23B / N, activations at
# 63,600 tokens / cp (selective 26.5 GiB, sub-block 43 GiB at cp=1), and with reshard_after_forward=False the
# unsharded bf16 weights from forward to backward (13.5 GiB).
GPU_KINDS = {
    # H200 (141 GB, ~140 GiB): 2 GPUs, cp=1 -> 54 + 13.5 + 26.5 + 13.5 = ~108 GiB: fits. Selective recompute skips
    # re-running self-attention (69% of the FLOPs; sub-block recompute re-runs all of it), keeping the gathered
    # weights saves one all-gather per block in backward (14.5 GB per step), explicit prefetch of the next block
    # keeps the all-gather stream one unit ahead of compute, compiled blocks as on one GPU.
    "130": dict(activation_checkpointing="selective", reshard_after_forward=False, forward_prefetch=1,
                backward_prefetch=1, compile=True),
    # 80 GB cards (~79 GiB): the FSDP recipe needs >= 4 of them (2: 67 GiB of states + gradients alone). At 4:
    # 27 + 6.7 + 26.5 = 60 GiB with selective recompute, so weights are resharded after forward (+13.5 does not
    # fit with a margin).
    "75": dict(activation_checkpointing="selective", reshard_after_forward=True, forward_prefetch=1,
               backward_prefetch=1, compile=True),
}

# The tiny nets see T5 embeddings of width 1024 (the tiny T5 of mvmodel.data.tiny_t5 has T5-11B's width).
_TINY_NET = dict(n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False, crossattn_emb_channels=1024,
                 camera_names=list(WAYMO_VIEW_KEYS))


def text2world_multiview_7b_example_waymo() -> Config:
    """Upstream's ``text2world_multiview_7b_example_waymo`` (U), composed values of §8.2."""
    name = "text2world_multiview_7b_example_waymo"
    return Config(
        job=JobConfig(project="posttraining", group="diffusion_text2world", name=name),
        data=DataConfig(dataset_dir="datasets/waymo", view_keys=list(WAYMO_VIEW_KEYS), num_frames=57,
                        video_size=(480, 848), sequence_interval=1, start_frame_interval=1, batch_size=1,
                        num_workers=8),
        model=ModelConfig(net="cosmos_7b_multiview_waymo", precision="bfloat16", tokenizer_dir=TOKENIZER_DIR,
                          text_dropout=0.2),
        optimizer=OptimizerConfig(lr=2 ** -14.3, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.1,
                                  warmup_steps=2500, warmup_start=1e-6, grad_clip=1.0),
        ema=EMAConfig(enabled=True, rate=0.10),
        checkpoint=CheckpointConfig(save_iter=200, load_path=PRETRAINED_7B, keep_last=3),
        # Upstream's sub-block recompute, uncompiled, where no GPU_KINDS entry applies (CPU, small GPUs).
        parallel=ParallelConfig(activation_checkpointing="subblock", compile=False, fsdp_unit="block",
                                per_gpu_kind={k: dict(v) for k, v in GPU_KINDS.items()}),
        trainer=TrainerConfig(max_iter=2000, logging_iter=200, seed=0),
    )


def text2world_multiview_7b_example_waymo_1gpu() -> Config:
    """The Waymo example on one 80 GB GPU: CPU-offloaded optimizer, master weights and EMA; compiled blocks."""
    cfg = text2world_multiview_7b_example_waymo()
    cfg.job.name = "text2world_multiview_7b_example_waymo_1gpu"
    cfg.optimizer.cpu_offload = True
    cfg.parallel.per_gpu_kind = {}  # no FSDP here; the memory plan (optimizer.offload_plan=auto) adapts to the GPU
    cfg.parallel.compile = True
    # Selective recompute: each block's input and its self-attention output are kept (28 x 0.5 GB more than
    # per-block recompute), so the backward never re-runs self-attention (~70% of the FLOPs). Measured on an
    # H100 80GB at 63,600 tokens: 17.35 s/step, 47.4% MFU, 53.2 GiB peak vs "block" 20.48 s, 40.1%, 42.9 GiB.
    cfg.parallel.activation_checkpointing = "selective"
    cfg.checkpoint.keep_last = 2  # each checkpoint is ~130 GB with the fp32 optimizer state
    return cfg


def text2world_multiview_7b_lora_example_waymo() -> Config:
    """LoRA post-training of the 7B on Waymo: rank 8, scale 1, self/cross-attention q and v, base frozen in bf16."""
    cfg = text2world_multiview_7b_example_waymo()
    cfg.job.name = "text2world_multiview_7b_lora_example_waymo"
    cfg.model.lora.enabled = True
    cfg.parallel.per_gpu_kind = {}  # the table is for FSDP of the full model
    # Upstream's LoRA examples train the adapters at a higher rate than full post-training (few, zero-started
    # weights); 2^-14.3 would barely move them in 2000 steps.
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.warmup_steps = 100
    cfg.optimizer.weight_decay = 0.0  # decaying adapters pulls the net back to its base, not to zero weights
    cfg.parallel.compile = True
    cfg.parallel.activation_checkpointing = "selective"
    cfg.checkpoint.keep_last = 5  # an adapter set is a few tens of MB
    return cfg


def text2world_multiview_7b_lora_example_waymo_1gpu() -> Config:
    """LoRA of the 7B on ONE GPU (40 GB and up): activation checkpointing picked from the GPU's memory."""
    cfg = text2world_multiview_7b_lora_example_waymo()
    cfg.job.name = "text2world_multiview_7b_lora_example_waymo_1gpu"
    cfg.trainer.recipe = "lora"  # the preflight picks the AC policy that fits (selective on 80 GB, block on 48/40 GB)
    cfg.data.num_workers = 4
    return cfg


def text2world_multiview_tiny_example() -> Config:
    """Tests: 5 views x 9 frames at 64x96 (240 tokens), a 2-block width-64 net, fp32, built-in tokenizer."""
    return Config(
        job=JobConfig(project="posttraining", group="diffusion_text2world", name="text2world_multiview_tiny_example"),
        data=DataConfig(dataset_dir="datasets/synthetic_tiny", view_keys=list(WAYMO_VIEW_KEYS), num_frames=9,
                        video_size=(64, 96), batch_size=1, num_workers=0),
        model=ModelConfig(net="tiny", net_overrides=dict(_TINY_NET), precision="float32", attention_backend="sdpa",
                          tokenizer_dir=None),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=4),
        ema=EMAConfig(enabled=True, rate=0.10),
        checkpoint=CheckpointConfig(save_iter=4, load_path=None, keep_last=2, reg_model_dtype="float32"),
        parallel=ParallelConfig(activation_checkpointing="subblock"),
        trainer=TrainerConfig(max_iter=8, logging_iter=1, seed=0, tf32=False),
    )


def text2world_multiview_cpu_example() -> Config:
    """README's CPU walk-through: width 128, 4 blocks of 4 heads, 5 views x 25 frames at 64x96 (480 tokens).

    Learns the synthetic scene in a few minutes on 2 CPU cores (also under ``torchrun --nproc_per_node=2``,
    gloo). Reads ``datasets/synthetic`` and the tokenizer fitted to it and normalised on it by
    ``python -m mvmodel.tokenizer.export`` (the raw built-in one is not unit-variance: the sampler fails on it).
    """
    cfg = text2world_multiview_tiny_example()
    cfg.job.name = "text2world_multiview_cpu_example"
    cfg.data.dataset_dir = "datasets/synthetic"
    cfg.data.num_frames = 25
    cfg.model.net_overrides.update(model_channels=128, num_blocks=4, num_heads=4, adaln_lora_dim=32)
    cfg.model.attention_backend = "auto"
    cfg.model.tokenizer_dir = "checkpoints/mvworld-tokenizer-synthetic"
    cfg.model.tokenizer_dtype = "float32"
    cfg.model.text_dropout = 0.2
    # EDM paper's image values (upstream: 0 / 1): more training at the low noise levels that carry the detail;
    # with 0 / 1 the samples of these short runs keep blotchy colour noise.
    cfg.model.p_mean, cfg.model.p_std = -1.2, 1.2
    cfg.optimizer = OptimizerConfig(lr=2e-3, warmup_steps=20, weight_decay=0.01)
    cfg.ema.rate = 0.05
    cfg.checkpoint = CheckpointConfig(save_iter=100, load_path=None, keep_last=2, reg_model_dtype="float32")
    cfg.parallel.activation_checkpointing = "none"
    cfg.trainer = TrainerConfig(max_iter=300, logging_iter=50, seed=0, tf32=True)
    return cfg


def text2world_multiview_cpu_lora_example() -> Config:
    """README's CPU LoRA run: rank-4 adapters on the CPU example's net, its 300-step EMA as the frozen base."""
    cfg = text2world_multiview_cpu_example()
    cfg.job.name = "text2world_multiview_cpu_lora_example"
    cfg.model.lora.enabled = True
    cfg.model.lora.rank = 4
    cfg.checkpoint.load_path = ("checkpoints/posttraining/diffusion_text2world/text2world_multiview_cpu_example/"
                                "checkpoints/iter_000000300_ema_model.pt")
    cfg.optimizer.weight_decay = 0.0
    cfg.checkpoint.save_iter = 20
    cfg.trainer.max_iter = 40
    cfg.trainer.logging_iter = 10
    return cfg


def text2world_multiview_demo() -> Config:
    """``python -m mvmodel.demo``: the CPU example on the demo's own dataset and tokenizer folders."""
    cfg = text2world_multiview_cpu_example()
    cfg.job.name = "text2world_multiview_demo"
    cfg.data.dataset_dir = "outputs/demo/dataset"
    cfg.model.tokenizer_dir = "outputs/demo/tokenizer"
    # The sample's layout (road, lane marks, poles) is decided at high noise: with the CPU example's -1.2 / 1.2 the
    # net's x0 error at sigma 40 after 300 steps was 0.08-0.14 per camera (per-position mean of the clip: 0.035) and
    # the sample showed no road. Median sigma 1 and two windows per step: 0.04-0.07, road and poles in place, at
    # 0.77 s/step on 2 idle cores (1 window: 0.52 s/step needs ~600 steps for the same error).
    cfg.model.p_mean, cfg.model.p_std = 0.0, 1.2
    cfg.data.batch_size = 2
    return cfg


def _video2world(cfg: Config, name: str) -> Config:
    """A Text2World experiment turned into its Video2World twin: same data, trainer and memory plan; the net gets
    the condition-mask channel; the conditioning values are ModelConfig's defaults (upstream's video_cond_bool)."""
    cfg.job.name, cfg.job.group = name, "diffusion_video2world"
    cfg.model.net_overrides["video2world"] = True
    return cfg


def video2world_multiview_7b_example_waymo() -> Config:
    """Upstream's ``video2world_multiview_7b_example_waymo``: 5 Waymo views x 57 frames, 8 GPUs, from the released
    Video2World weights (a Text2World checkpoint also loads: its mask channel starts at zero)."""
    cfg = _video2world(text2world_multiview_7b_example_waymo(), "video2world_multiview_7b_example_waymo")
    cfg.checkpoint.load_path = PRETRAINED_7B_V2W
    return cfg


def video2world_multiview_7b_example_waymo_1gpu() -> Config:
    """The Video2World Waymo example on one 80 GB GPU (the Text2World _1gpu memory plan: 4 more patch-embed
    inputs, 16K parameters, change nothing there)."""
    cfg = _video2world(text2world_multiview_7b_example_waymo_1gpu(), "video2world_multiview_7b_example_waymo_1gpu")
    cfg.checkpoint.load_path = PRETRAINED_7B_V2W
    return cfg


def video2world_multiview_tiny_example() -> Config:
    """Tests: the tiny example with the Video2World net (9 frames = 2 latent frames per view: 0-2 conditioned)."""
    return _video2world(text2world_multiview_tiny_example(), "video2world_multiview_tiny_example")


def video2world_multiview_cpu_example() -> Config:
    """The CPU walk-through's Video2World model: the Text2World CPU example's net, data and schedule (25 frames =
    4 latent frames per view, 0-2 of them conditioned)."""
    return _video2world(text2world_multiview_cpu_example(), "video2world_multiview_cpu_example")


EXPERIMENTS = {
    "text2world_multiview_7b_example_waymo": text2world_multiview_7b_example_waymo,
    "text2world_multiview_7b_example_waymo_1gpu": text2world_multiview_7b_example_waymo_1gpu,
    "text2world_multiview_7b_lora_example_waymo": text2world_multiview_7b_lora_example_waymo,
    "text2world_multiview_7b_lora_example_waymo_1gpu": text2world_multiview_7b_lora_example_waymo_1gpu,
    "text2world_multiview_cpu_lora_example": text2world_multiview_cpu_lora_example,
    "text2world_multiview_tiny_example": text2world_multiview_tiny_example,
    "text2world_multiview_cpu_example": text2world_multiview_cpu_example,
    "text2world_multiview_demo": text2world_multiview_demo,
    "video2world_multiview_7b_example_waymo": video2world_multiview_7b_example_waymo,
    "video2world_multiview_7b_example_waymo_1gpu": video2world_multiview_7b_example_waymo_1gpu,
    "video2world_multiview_tiny_example": video2world_multiview_tiny_example,
    "video2world_multiview_cpu_example": video2world_multiview_cpu_example,
}
