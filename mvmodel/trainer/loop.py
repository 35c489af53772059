"""The post-training loop (cosmos-multiview.md §8.3): data -> tokenizer -> EDM loss -> backward -> clip ->
AdamW with warm-up -> power EMA -> checkpoints; resume from ``latest_checkpoint.txt``.

Determinism. The model is initialised from ``trainer.seed`` on every rank. The training noise (text dropout,
sigma, epsilon) of step ``i`` on data-parallel rank ``r`` comes from a generator seeded with ``(seed, r, i)``
(the ranks of one context-parallel group share r, hence the sample and its noise), so a resumed
run draws exactly what the uninterrupted run drew, without replaying RNG streams; the data order comes from the
loader's (seed, epoch, position). Global RNG states are saved too (for user code that draws from them).

Non-finite steps. When the loss or the gradient norm is NaN/Inf on any rank, the update (optimizer, EMA) is
skipped on every rank, the gradients dropped, and ``skipped_steps`` counted; the iteration still advances.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..configs.base import Config
from ..data import MultiviewDataset, build_dataloader
from ..diffusion.conditioning import condition_from_batch, video_to_model_range
from ..networks import MultiviewDiT, load_cosmos_checkpoint, preset
from ..tokenizer import load_tokenizer
from . import checkpoint as ckpt
from .ema import PowerEMA
from .memory_plan import cap_gpu_memory, plan_for_config
from .monitor import Monitor, host_rss_gib
from .parallelize import DTYPES, DistInfo, TrainableDiffusion, apply_parallelism, init_distributed, resolve_gpu_kind


def warmup_multiplier(iteration: int, warmup_steps: int, start: float) -> float:
    """Upstream's ``LambdaLinearScheduler`` with one cycle: ``start + (1 - start) * n / warmup`` then 1."""
    if warmup_steps <= 0 or iteration >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * iteration / warmup_steps


def step_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The CPU generator of one training step on one rank (see the module docstring)."""
    state = np.random.SeedSequence([seed, rank, iteration]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


class Trainer:
    """Build everything from a :class:`Config`, then :meth:`train`. Works under torchrun or plain python."""

    def __init__(self, cfg: Config, *, progress: bool = True, with_data: bool = True) -> None:
        """``with_data=False`` builds no dataset/tokenizer (benchmarks feed latents to :meth:`optimize`)."""
        self.cfg = cfg.validate()
        owns_group = not dist.is_initialized()
        self.info: DistInfo = init_distributed(cfg.trainer.device)
        try:
            self._setup(progress, with_data)
        except BaseException:
            if owns_group and dist.is_initialized():  # leave no half-built process group behind
                dist.destroy_process_group()
            raise

    def _setup(self, progress: bool, with_data: bool) -> None:
        cfg = self.cfg
        dev = self.info.device
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.trainer.tf32
            torch.backends.cudnn.allow_tf32 = cfg.trainer.tf32
        self.job_dir = cfg.job.path_local
        self.compute_dtype = DTYPES[cfg.model.precision]
        self.offload = cfg.optimizer.cpu_offload
        # The offloaded optimizer's dicts are views of live buffers: those must be written before training goes on.
        self.checkpointer = ckpt.Checkpointer(self.job_dir / "checkpoints", cfg.checkpoint.keep_last, self.info.rank,
                                              async_save=cfg.checkpoint.async_save and not self.offload)
        self.use_fsdp = not (self.offload and self.info.world_size == 1)
        if self.offload and self.use_fsdp:
            raise ValueError("optimizer.cpu_offload is for a single GPU; with several GPUs FSDP shards the states")

        resume_from = self.checkpointer.latest() if cfg.checkpoint.resume else None
        # Context parallelism: ranks d*cp .. d*cp+cp-1 share data-parallel rank d (one sample stream, one noise).
        self.cp_size = cfg.parallel.context_parallel_size
        if self.info.world_size % self.cp_size:
            raise ValueError(f"parallel.context_parallel_size={self.cp_size} must divide the number of processes "
                             f"({self.info.world_size})")
        self.dp_rank, self.dp_size = self.info.rank // self.cp_size, self.info.world_size // self.cp_size
        cap_gpu_memory(dev, cfg.trainer.gpu_memory_cap_gib)  # before anything is allocated on the GPU
        torch.manual_seed(cfg.trainer.seed)  # model init: same weights on every rank (upstream: seed 0)
        self.model = self._build_model(load_pretrained=resume_from is None)
        self._parallel_note = resolve_gpu_kind(cfg.parallel, dev, cfg.trainer.gpu_memory_cap_gib, cfg.overrides)
        self.model = apply_parallelism(self.model, cfg.parallel, compute_dtype=self.compute_dtype, info=self.info,
                                       use_fsdp=self.use_fsdp)
        self.params = [p for _, p in self.model.named_parameters()]
        self.optimizer = self._build_optimizer()
        self.ema = None
        if cfg.ema.enabled and not self.offload:  # the offloaded optimizer keeps the EMA next to the masters
            self.ema = PowerEMA(self.params, cfg.ema.rate)
        self.tokenizer = self._build_tokenizer() if with_data else None
        self.dataset, self.loader = self._build_data() if with_data else ([], None)
        self.iteration, self.skipped_steps = 0, 0
        if resume_from is not None and with_data:
            self._resume(resume_from)
        net_cfg = self.model.net.config
        V, T, (H, W) = len(cfg.data.view_keys), cfg.data.num_frames, cfg.data.video_size
        lat_t = 1 + (T - 1) // 8
        self.tokens_per_sample = V * lat_t // net_cfg.patch_temporal * (H // 8 // net_cfg.patch_spatial) * (
            W // 8 // net_cfg.patch_spatial)
        fwd = self.model.net.forward_flops(self.tokens_per_sample)
        self.monitor = Monitor(self.job_dir, enabled=self.info.is_main, start=self.iteration, total=cfg.trainer.max_iter,
                               config=cfg.to_dict(), logging_iter=cfg.trainer.logging_iter,
                               step_flops=3 * fwd * cfg.data.batch_size / self.cp_size,
                               tokens_per_step=self.tokens_per_sample * cfg.data.batch_size * self.dp_size,
                               device=dev, progress=progress)
        where = f"resumed from iteration {resume_from}" if resume_from is not None else self._start_note
        self.monitor.write(f"[mvmodel.train] {cfg.experiment or cfg.job.name}: {self.info.world_size} process(es) on "
                           f"{dev.type} ({self.info.backend}), {sum(p.numel() for p in self.params) / 1e6:.2f}M "
                           f"parameters, {self.tokens_per_sample} tokens/sample, {len(self.dataset)} samples; {where}; "
                           f"job folder {self.job_dir}; {self._parallel_note}")

    # ------------------------------------------------------------------------------------------ building
    def _build_model(self, load_pretrained: bool) -> TrainableDiffusion:
        m = self.cfg.model
        overrides = dict(m.net_overrides)
        if "camera_names" in overrides and overrides["camera_names"] is not None:
            overrides["camera_names"] = tuple(overrides["camera_names"])
        net_cfg = preset(m.net, attention_backend=m.attention_backend, **overrides)
        if net_cfg.n_views != len(self.cfg.data.view_keys):
            raise ValueError(f"model.net {m.net!r} has n_views={net_cfg.n_views} but data.view_keys has "
                             f"{len(self.cfg.data.view_keys)} views")
        # The offloaded single-GPU path builds the bf16 weights on the GPU directly (the 7B's fp32 copy would
        # need 29 GB of host memory on top of the optimizer's); otherwise fp32 on the CPU, then FSDP shards.
        init_device = self.info.device if not self.use_fsdp else torch.device("cpu")
        init_dtype = self.compute_dtype if not self.use_fsdp else torch.float32
        with torch.device("meta"):
            net = MultiviewDiT(net_cfg, dtype=init_dtype)
        net.to_empty(device=init_device)  # allocated once, in its final dtype
        net.init_weights()
        model = TrainableDiffusion(net, sigma_data=m.sigma_data, p_mean=m.p_mean, p_std=m.p_std)
        self._start_note = "random init"
        path = self.cfg.checkpoint.load_path
        if load_pretrained and path:
            if os.path.isfile(path):
                report = load_cosmos_checkpoint(model, path, strict=self.cfg.checkpoint.load_strict)
                self._start_note = f"initialised from {path} ({len(report.loaded)} tensors loaded)"
                if self.info.is_main:
                    print(f"[mvmodel.train] loaded {path}:\n{report}", flush=True)
            elif self.info.is_main:
                print(f"[mvmodel.train] checkpoint.load_path={path} not found: starting from random weights", flush=True)
        return model

    def _build_optimizer(self):
        o = self.cfg.optimizer
        if self.offload:
            from .offload import OffloadedAdamW

            ema_rate = self.cfg.ema.rate if self.cfg.ema.enabled else None
            net_cfg = self.model.net.config
            opt = OffloadedAdamW(list(self.model.named_parameters()), lr=o.lr, betas=o.betas, eps=o.eps,
                                 weight_decay=o.weight_decay, ema_rate=ema_rate, threads=o.offload_threads,
                                 plan=lambda numels: plan_for_config(self.cfg, numels, self.info.device, net_cfg))
            opt.install_prefetch_hooks(self.model)
            if self.info.is_main:  # where each part lives and why, in the start log
                print(f"[mvmodel.train] {opt.plan.describe()}", flush=True)
            return opt
        # Upstream: one group, weight decay on every parameter (§8.2).
        fused = self.info.device.type == "cuda"  # one kernel per step on GPU (works on FSDP2 DTensors)
        return torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 foreach=None if fused else True, fused=fused or None)

    def _build_tokenizer(self):
        m, d = self.cfg.model, self.cfg.data
        if m.tokenizer_dir is None:
            tok = load_tokenizer(None, pixel_chunk_duration=d.num_frames)
        else:
            tok = load_tokenizer(m.tokenizer_dir, pixel_chunk_duration=d.num_frames, device=self.info.device,
                                 dtype=DTYPES[m.tokenizer_dtype])
        return tok.to(self.info.device).eval()

    def _build_data(self):
        d, t = self.cfg.data, self.cfg.trainer
        ds = MultiviewDataset(d.dataset_dir, num_frames=d.num_frames, view_keys=d.view_keys, video_size=tuple(d.video_size),
                              sequence_interval=d.sequence_interval, start_frame_interval=d.start_frame_interval,
                              decoder=d.decoder, caption_policy=d.caption_policy, on_error=d.on_error)
        loader = build_dataloader(ds, batch_size=d.batch_size, rank=self.dp_rank, world_size=self.dp_size,
                                  seed=t.seed, shuffle=d.shuffle, num_workers=d.num_workers,
                                  device=self.info.device if self.info.device.type == "cuda" else None)
        return ds, loader

    # ------------------------------------------------------------------------------------------ resume / save
    def _resume(self, n: int) -> None:
        cp = self.checkpointer
        optim = cp.load(n, "optim")
        master = optim.get("master_weights") or cp.load(n, "reg_model")
        if self.offload:
            self.optimizer.load_state(optim, master, cp.load(n, "ema_model") if self.cfg.ema.enabled else None)
        else:
            ckpt.load_model_state(self.model, master)
            ckpt.load_optimizer_state(self.model, self.optimizer, optim["optimizer"])
            if self.ema is not None:
                self.ema.copy_from(ckpt.local_parts(self.model, cp.load(n, "ema_model")))
        state = cp.load(n, "")
        self.iteration = int(state["iteration"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        data = state["data"] if isinstance(state["data"], list) else [state["data"]]
        # Positions are global sample counts, so a job restarted on another world size continues too.
        self.loader.load_state_dict(data[min(self.info.rank, len(data) - 1)])
        rngs = state.get("rng") or []
        if self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank])

    def save(self) -> Path:
        """Write the checkpoint of the current iteration (a collective: every rank calls it)."""
        n, c, cp = self.iteration, self.cfg.checkpoint, self.checkpointer
        cp.wait()  # the previous asynchronous save is on disk before this one starts
        reg_dtype = DTYPES[c.reg_model_dtype]
        main = self.info.is_main
        if self.offload:
            # Views of the optimizer's flat host buffers: torch.save stores each buffer once, no copies.
            self.optimizer.synchronize()
            master = self.optimizer.master_state(self.model)
            cp.write(n, "reg_model", {k: (v.to(reg_dtype) if ckpt.save_dtype(reg_dtype, k, v) else v) for k, v in master.items()})
            cp.write(n, "ema_model", self.optimizer.ema_state(self.model) if self.cfg.ema.enabled else master)
            optim = {"optimizer": self.optimizer.state_dict(), "master_weights": master}
        else:
            reg = ckpt.model_state(self.model, reg_dtype, keep=main)
            cp.write(n, "reg_model", reg)
            if self.ema is not None:
                reg = None
                cp.write(n, "ema_model", ckpt.ema_state(self.model, self.ema.shadow, keep=main))
            else:
                cp.write(n, "ema_model", reg)
            reg = None
            optim = {"optimizer": ckpt.optimizer_state(self.model, self.optimizer, keep=main)}
            if reg_dtype != torch.float32:  # exact resume needs the fp32 master weights
                optim["master_weights"] = ckpt.model_state(self.model, None, keep=main)
        optim["scheduler"] = {"last_epoch": n, "warmup_steps": self.cfg.optimizer.warmup_steps}
        cp.write(n, "optim", optim)
        optim = None
        states = [None] * self.info.world_size
        dist.all_gather_object(states, {"data": self.loader.state_dict() if self.loader else None, "rng": rng_state()})
        trainer = {"iteration": n, "data": [s["data"] for s in states], "rng": [s["rng"] for s in states],
                   "skipped_steps": self.skipped_steps, "world_size": self.info.world_size,
                   "experiment": self.cfg.experiment}
        path = cp.commit(n, trainer)
        ckpt.barrier()
        return path

    # ------------------------------------------------------------------------------------------ the loop
    def _batches(self) -> Iterator[dict]:
        while True:
            got = False
            for batch in self.loader:
                got = True
                yield batch
            if not got and len(self.loader) == 0:
                raise ValueError(f"the loader yields no batch: {len(self.dataset)} samples for "
                                 f"{self.info.world_size} ranks x batch {self.cfg.data.batch_size}")

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the (all-rank mean) metrics of the step."""
        cfg, dev = self.cfg, self.info.device
        gen = step_generator(cfg.trainer.seed, self.dp_rank, self.iteration)
        V = len(cfg.data.view_keys)
        with torch.no_grad():
            video = batch["video"].to(dev, non_blocking=True)
            x0 = self.tokenizer.encode_views(video_to_model_range(video).to(self.tokenizer_dtype), V).float()
            x0 = x0 * cfg.model.sigma_data
        cond = condition_from_batch(batch, n_views=V, text_dropout=cfg.model.text_dropout, generator=gen, device=dev)
        return self.optimize(x0, cond, gen)

    def optimize(self, x0: torch.Tensor, cond, gen: torch.Generator) -> dict[str, float]:
        """EDM loss on latents ``x0`` [B, 16, V*T, H, W] (scaled by sigma_data) -> backward -> clip -> update."""
        cfg, dev = self.cfg, self.info.device
        B = x0.shape[0]
        sigma = torch.exp(cfg.model.p_mean + cfg.model.p_std * torch.randn(B, generator=gen, dtype=torch.float64))
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        out = self.model(x0, cond, sigma.float().to(dev), eps.to(dev))
        loss = out["loss"]
        loss.backward()

        if self.offload:
            norm = self.optimizer.grad_norm()
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
        stats = torch.stack([loss.detach().float(), out["mse"].float(), out["edm"].float(),
                             norm.float().to(loss.device)]).to(self._reduce_device)
        dist.all_reduce(stats)  # sum over ranks; the norm is already global, so it is divided back
        ws = self.info.world_size
        loss_v, mse_v, edm_v, norm_v = (stats / ws).tolist()
        finite = bool(np.isfinite(stats.cpu().numpy()).all())
        lr = cfg.optimizer.lr * warmup_multiplier(self.iteration, cfg.optimizer.warmup_steps, cfg.optimizer.warmup_start)
        clip = cfg.optimizer.grad_clip
        coef = min(1.0, clip / (norm_v + 1e-6)) if clip > 0 and finite else 1.0
        if finite:
            if self.offload:
                self.optimizer.step(lr=lr, grad_scale=coef, iteration=self.iteration)
            else:
                if coef < 1.0:
                    torch._foreach_mul_(grads, coef)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.params, self.iteration)
        else:
            self.skipped_steps += 1
            self.monitor.write(f"[mvmodel.train] iteration {self.iteration}: non-finite loss or gradient norm "
                               f"(loss={loss_v}, grad_norm={norm_v}); step skipped ({self.skipped_steps} so far)")
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {"loss": loss_v, "mse": mse_v, "edm": edm_v, "grad_norm": norm_v, "lr": lr,
                "skipped_steps": float(self.skipped_steps)}

    @property
    def _reduce_device(self) -> torch.device:
        return self.info.device if self.info.backend == "nccl" else torch.device("cpu")

    @property
    def tokenizer_dtype(self) -> torch.dtype:
        return getattr(self.tokenizer, "dtype", torch.float32)

    def train(self) -> dict[str, Any]:
        """Run to ``trainer.max_iter`` (or ``max_steps_per_run`` steps); returns a summary."""
        t = self.cfg.trainer
        stop = t.max_iter if not t.max_steps_per_run else min(t.max_iter, self.iteration + t.max_steps_per_run)
        losses: list[float] = []
        batches = self._batches()
        self.model.train()
        last_saved = self.iteration if self.checkpointer.latest() == self.iteration else None
        while self.iteration < stop:
            t0 = time.perf_counter()
            batch = next(batches)
            metrics = self.train_step(batch)
            if self.info.device.type == "cuda":
                torch.cuda.synchronize(self.info.device)
            metrics["host_rss_gib"] = host_rss_gib()
            self.monitor.step(self.iteration, metrics, time.perf_counter() - t0)
            losses.append(metrics["loss"])
            if self.iteration % self.cfg.checkpoint.save_iter == 0:
                self.save()
                last_saved = self.iteration
        if last_saved != self.iteration:
            self.save()  # upstream: a final save unless one was just made
        self.checkpointer.wait()
        if self.offload:
            self.optimizer.synchronize()
        return {"iteration": self.iteration, "losses": losses, "skipped_steps": self.skipped_steps,
                "checkpoint_dir": str(self.checkpointer.dir)}

    def close(self) -> None:
        self.checkpointer.close()
        self.monitor.close()
        if self.offload:
            self.optimizer.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
