"""The post-training loop (cosmos-multiview.md §8.3): data -> tokenizer -> EDM loss -> backward -> clip ->
AdamW with warm-up -> power EMA -> checkpoints; resume from ``latest_checkpoint.txt``.

Determinism. The model is initialised from ``trainer.seed`` on every rank. The training noise (text dropout,
sigma, epsilon) of step ``i`` on data-parallel rank ``r`` comes from a generator seeded with ``(seed, r, i)``
(the ranks of one context-parallel group share r, hence the sample and its noise), so a resumed
run draws exactly what the uninterrupted run drew, without replaying RNG streams; the data order comes from the
loader's (seed, epoch, position). Global RNG states are saved too (for user code that draws from them).

Non-finite steps. When the loss or the gradient norm is NaN/Inf on any rank, the update (optimizer, EMA) is
skipped on every rank, the gradients dropped, and ``skipped_steps`` counted; the iteration still advances.
``trainer.max_nonfinite_steps`` consecutive such steps stop the run with an error naming the step and the
clips of the batch; weights that are not finite are never saved.

The job folder. Rank 0 holds a lock on it (``train.lock``: host and pid) for the run's lifetime. A run that does
not resume refuses to start where checkpoints exist (unless ``checkpoint.overwrite``, which moves them aside);
a resumed run verifies the checkpoint set (falling back to an older intact one) and compares its config with the
job's ``config.json`` (kept as it is; a changed config is written next to it as ``config_resume_N.json``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..configs.base import Config
from ..data import MultiviewDataset, build_dataloader
from ..diffusion.conditioning import condition_from_batch, video_to_model_range
from ..diffusion.video2world import training_condition
from ..networks import MultiviewDiT, load_cosmos_checkpoint, preset
from ..tokenizer import load_tokenizer
from . import checkpoint as ckpt
from .ema import PowerEMA, local_tensor
from .memory_plan import cap_gpu_memory, plan_for_config
from .monitor import Monitor, host_rss_gib
from .parallelize import DTYPES, DistInfo, TrainableDiffusion, apply_parallelism, init_distributed, resolve_gpu_kind
from .recipes import resolve_recipe


class TrainingError(RuntimeError):
    """The run cannot go on without producing garbage (diverged, non-finite weights); the message says why."""


# Settings that change what a resumed run computes (shapes, cameras, samples, noise): a resume refuses them
# unless checkpoint.allow_config_change. Other changes (lr, max_iter, ...) are allowed and reported.
BREAKING_KEYS = ("model.net", "model.net_overrides", "model.sigma_data", "data.view_keys", "data.num_frames",
                 "data.video_size", "data.batch_size", "data.sequence_interval", "data.start_frame_interval",
                 "data.caption_policy", "trainer.seed", "model.lora")
# Flags about how to start, not what to compute.
IGNORED_KEYS = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.allow_config_change",
                "trainer.max_steps_per_run")


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``section.key -> (old, new)`` for every differing setting (JSON values)."""
    out = {}
    for sec in sorted(set(old) | set(new)):
        a, b = old.get(sec), new.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key) and f"{sec}.{key}" not in IGNORED_KEYS:
                    out[f"{sec}.{key}"] = (a.get(key), b.get(key))
        elif a != b:
            out[sec] = (a, b)
    return out


class JobLock:
    """An exclusive ``flock`` on ``<job>/train.lock`` holding "host pid". The kernel drops the lock when its
    process dies, so a lock left by a killed run is taken over (with a warning); a live holder is named."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = Path(path), None

    def acquire(self) -> str | None:
        """Take the lock or raise naming its holder; returns a warning when a dead holder's lock is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ckpt.CheckpointError(f"job folder {self.path.parent} is in use by another training run ({holder}; "
                                       f"lock file {self.path}): stop that run, or start this one with another "
                                       f"job.name") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:
            return f"took over the lock {self.path} left by a run that is gone ({previous})"
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # empty = free; the file stays (unlinking races with a waiting opener)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def describe_batch(batch: dict, dataset_dir: str | os.PathLike) -> str:
    """Which clips a batch came from, with the files to look at (``__key__`` or ``clip_name`` from the
    dataset), so that a non-finite step can be traced to its data."""
    keys = batch.get("__key__", batch.get("clip_name"))
    if keys is None:
        return "a batch without clip names"
    keys = [keys] if isinstance(keys, str) else list(keys)
    starts = batch.get("start_frame")
    starts = starts.tolist() if isinstance(starts, torch.Tensor) else ([starts] if isinstance(starts, int) else starts)
    parts = []
    for i, k in enumerate(keys):
        start = f", start frame {starts[i]}" if starts is not None and i < len(starts) else ""
        parts.append(f"clip {k}{start} ({Path(dataset_dir) / 'videos' / '*' / f'{k}.mp4'}, "
                     f"{Path(dataset_dir) / 't5_xxl' / '*' / f'{k}.pickle'})")
    return "; ".join(parts)


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
        self._lock: JobLock | None = None
        self.monitor = None
        try:
            self._setup(progress, with_data)
        except BaseException:
            if getattr(self, "checkpointer", None) is not None:
                with contextlib.suppress(Exception):  # the setup error is the one to report
                    self.checkpointer.close()
            if self._lock is not None:
                self._lock.release()
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
        # full / full_offload / LoRA and the AC policy for this GPU (trainer.recipe; "config": as configured)
        self._recipe_note = resolve_recipe(cfg, dev, self.info.world_size,
                                           int(os.environ.get("LOCAL_WORLD_SIZE", self.info.world_size)))
        cfg.validate()
        self.offload = cfg.optimizer.cpu_offload
        # LoRA: a frozen base replicated on every GPU (no FSDP: nothing of it is trained, so there are no optimizer
        # states to shard) and fp32 adapters whose gradients are averaged over the ranks after backward.
        self.lora = cfg.model.lora.enabled
        # The offloaded optimizer's dicts are views of live buffers: those must be written before training goes on.
        self.checkpointer = ckpt.Checkpointer(self.job_dir / "checkpoints", cfg.checkpoint.keep_last, self.info.rank,
                                              async_save=cfg.checkpoint.async_save and not self.offload,
                                              prune_models=cfg.checkpoint.prune_models, log=self._log)
        self.use_fsdp = not (self.offload and self.info.world_size == 1) and not self.lora
        if self.offload and self.use_fsdp:
            raise ValueError("optimizer.cpu_offload is for a single GPU; with several GPUs FSDP shards the states")

        resume_from, config_name = self._on_main(self._prepare_job_folder)
        if not with_data:
            resume_from = None
        # Context parallelism: ranks d*cp .. d*cp+cp-1 share data-parallel rank d (one sample stream, one noise).
        self.cp_size = cfg.parallel.context_parallel_size
        if self.info.world_size % self.cp_size:
            raise ValueError(f"parallel.context_parallel_size={self.cp_size} must divide the number of processes "
                             f"({self.info.world_size})")
        self.dp_rank, self.dp_size = self.info.rank // self.cp_size, self.info.world_size // self.cp_size
        cap_gpu_memory(dev, cfg.trainer.gpu_memory_cap_gib)  # before anything is allocated on the GPU
        torch.manual_seed(cfg.trainer.seed)  # model init: same weights on every rank (upstream: seed 0)
        # A LoRA resume reads only the adapters from the job folder: the frozen base is the pretrained file again.
        self.model = self._build_model(load_pretrained=resume_from is None or self.lora)
        self._parallel_note = resolve_gpu_kind(cfg.parallel, dev, cfg.trainer.gpu_memory_cap_gib, cfg.overrides)
        self.model = apply_parallelism(self.model, cfg.parallel, compute_dtype=self.compute_dtype, info=self.info,
                                       use_fsdp=self.use_fsdp)
        self.params = [p for _, p in ckpt.trainable(self.model)]
        self.optimizer = self._build_optimizer()
        self.ema = None
        if cfg.ema.enabled and not self.offload:  # the offloaded optimizer keeps the EMA next to the masters
            self.ema = PowerEMA(self.params, cfg.ema.rate)
        self.tokenizer = self._build_tokenizer() if with_data else None
        self.dataset, self.loader = self._build_data() if with_data else ([], None)
        self.iteration, self.skipped_steps, self.nonfinite_run = 0, 0, 0
        self.resumed_from = resume_from
        if resume_from is not None:
            self._resume(resume_from)
        net_cfg = self.model.net.config
        V, T, (H, W) = len(cfg.data.view_keys), cfg.data.num_frames, cfg.data.video_size
        lat_t = 1 + (T - 1) // 8
        self.tokens_per_sample = V * lat_t // net_cfg.patch_temporal * (H // 8 // net_cfg.patch_spatial) * (
            W // 8 // net_cfg.patch_spatial)
        fwd = self.model.net.forward_flops(self.tokens_per_sample)
        self.monitor = Monitor(self.job_dir, enabled=self.info.is_main, start=self.iteration, total=cfg.trainer.max_iter,
                               config=cfg.to_dict(), config_name=config_name, logging_iter=cfg.trainer.logging_iter,
                               step_flops=3 * fwd * cfg.data.batch_size / self.cp_size,
                               tokens_per_step=self.tokens_per_sample * cfg.data.batch_size * self.dp_size,
                               device=dev, progress=progress)
        where = f"resumed from iteration {resume_from}" if resume_from is not None else self._start_note
        n_all = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.params)
        params = (f"{n_all / 1e6:.2f}M parameters" if n_train == n_all else
                  f"{n_all / 1e6:.2f}M parameters of which {n_train / 1e6:.3f}M trained (LoRA)")
        self.monitor.write(f"[mvmodel.train] {cfg.experiment or cfg.job.name}: {self.info.world_size} process(es) on "
                           f"{dev.type} ({self.info.backend}), {params}, {self.tokens_per_sample} tokens/sample, "
                           f"{len(self.dataset)} samples; {where}; job folder {self.job_dir}; {self._recipe_note}; "
                           f"{self._parallel_note}")

    # ------------------------------------------------------------------------------------------ job folder
    def _log(self, text: str) -> None:
        if self.monitor is not None:
            self.monitor.write(text)
        elif self.info.is_main:
            print(text, flush=True)

    def _on_main(self, fn):
        """Run ``fn`` on rank 0 only (file-system checks, the lock) and hand its result, or its error, to every
        rank, so that no rank is left waiting in a collective when rank 0 refuses to start."""
        out = [None, None]
        if self.info.is_main:
            try:
                out[0] = fn()
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                if self.info.world_size == 1:
                    raise
                out[1] = f"{type(exc).__name__}: {exc}"
                err = exc
        if self.info.world_size > 1:
            dist.broadcast_object_list(out, src=0)
        if out[1] is not None:
            if self.info.is_main:
                raise err
            raise ckpt.CheckpointError(f"rank 0 refused to start: {out[1]}")
        return out[0]

    def _prepare_job_folder(self) -> tuple[int | None, str | None]:
        """Rank 0: lock the job folder; choose the checkpoint to resume (verified) or refuse to start over one;
        compare the config. Returns (iteration to resume or None, config file name to write or None)."""
        c, cp = self.cfg.checkpoint, self.checkpointer
        self._lock = JobLock(self.job_dir / "train.lock")
        warning = self._lock.acquire()
        if warning:
            self._log(f"[mvmodel.train] warning: {warning}")
        resume_from, notes = None, []
        if c.resume:
            try:
                resume_from, notes = cp.find_resumable()
            except ckpt.CheckpointError as exc:
                if not c.overwrite:
                    raise
                notes = [f"{exc}"]
        for note in notes:
            self._log(f"[mvmodel.train] warning: {note}")
        if resume_from is not None:
            return resume_from, self._compare_config(resume_from)
        held = cp.held()
        if held:
            if not c.overwrite:
                why = "checkpoint.resume=false" if not c.resume else "none of them can be resumed"
                raise ckpt.CheckpointError(
                    f"{cp.dir} already holds checkpoints of iteration(s) {held} (iter_{held[-1]:09d}_*.pt, ...) and "
                    f"this run would start over ({why}). To continue that run: checkpoint.resume=true; to start a new "
                    f"one: another job.name, or checkpoint.overwrite=true (moves them to "
                    f"{self.job_dir}/replaced_<time>/)")
            dest = self.job_dir / f"replaced_{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir(parents=True)
            moved = cp.move_aside(dest / "checkpoints")
            for p in sorted(self.job_dir.glob("config*.json")) + [self.job_dir / "metrics.jsonl",
                                                                  self.job_dir / "tensorboard"]:
                if p.exists():
                    os.replace(p, dest / p.name)
                    moved.append(p.name)
            self._log(f"[mvmodel.train] checkpoint.overwrite=true: moved the checkpoints of iteration(s) {held} "
                      f"({len(moved)} files) to {dest}; delete that folder to free the space")
        return None, "config.json"

    def _compare_config(self, n: int) -> str | None:
        """Refuse a resume whose config changes a breaking setting (unless allowed); never rewrite config.json:
        a changed config is written as ``config_resume_{n}.json``. Returns the file name to write, or None."""
        saved = sorted(self.job_dir.glob("config_resume_*.json"))
        saved = [p for p in saved if p.stem[len("config_resume_"):].isdigit() and int(p.stem[14:]) <= n]
        path = saved[-1] if saved else self.job_dir / "config.json"
        if not path.is_file():
            self._log(f"[mvmodel.train] warning: {path} is missing; writing the current config there")
            return "config.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the job's config to compare with ({exc})") from exc
        new = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        changes = config_changes(old, new)
        if not changes:
            return None
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        breaking = [k for k in changes if k in BREAKING_KEYS]
        if self.cfg.model.lora.enabled and "checkpoint.load_path" in changes:
            breaking.append("checkpoint.load_path (the frozen base of the adapters)")
        if breaking and not self.cfg.checkpoint.allow_config_change:
            raise ValueError(f"resuming {self.job_dir} from iteration {n} with settings that change the run "
                             f"({', '.join(breaking)}) against {path}: {listed}. Use the saved values, a new "
                             f"job.name, or checkpoint.allow_config_change=true if this is intended")
        name = f"config_resume_{n:09d}.json"
        self._log(f"[mvmodel.train] resuming with changed settings ({listed}); {path.name} is kept, the new config "
                  f"is written to {self.job_dir / name}")
        return name

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
            if not os.path.isfile(path):  # a typo must not silently train from random weights
                raise FileNotFoundError(f"checkpoint.load_path={path}: no such file (working directory "
                                        f"{os.getcwd()}); download the pretrained model there, fix the path, or pass "
                                        f"checkpoint.load_path=none to start from random weights")
            report = load_cosmos_checkpoint(model, path, strict=self.cfg.checkpoint.load_strict)
            self._start_note = f"initialised from {path} ({len(report.loaded)} tensors loaded)"
            if self.info.is_main:
                print(f"[mvmodel.train] loaded {path}:\n{report}", flush=True)
        if self.lora:
            from ..networks.lora import add_lora

            lo = m.lora
            # After the base is loaded (its keys are the pretrained file's); freezes every base parameter.
            for p in model.parameters():
                p.requires_grad_(False)
            names = add_lora(net, lo.rank, lo.alpha, lo.targets)
            self._start_note += (f"; LoRA rank {lo.rank}, scale {lo.scale:g} on {', '.join(lo.targets)}: "
                                 f"{len(names)} adapters, base frozen in {m.precision}")
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
            ckpt.load_model_state(self.model, master, trainable_only=self.lora)
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

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._reduce_device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def _stop_if_save_failed(self, failed: bool) -> None:
        """Every rank stops when rank 0 could not write a checkpoint (``failed`` is already all-reduced)."""
        if failed:
            if self.info.is_main:
                self.checkpointer.check()
            raise ckpt.CheckpointError("rank 0 could not write a checkpoint (its error names the file); the run stops")

    def _check_finite_weights(self, n: int) -> None:
        """Refuse to save weights (or EMA weights) that hold NaN/Inf: a checkpoint must never be garbage."""
        if self.offload:
            named = [(b.names[0] + " .. " + b.names[-1], t) for b in self.optimizer.buckets
                     for t in (b.master, b.ema) if t is not None]
        else:
            names = [name for name, _ in ckpt.trainable(self.model)]
            named = list(zip(names, (local_tensor(p) for p in self.params)))
            if self.ema is not None:
                named += [(f"EMA of {name}", t) for name, t in zip(names, self.ema.shadow)]
        with torch.no_grad():
            dev = named[0][1].device  # one host sync for the whole model, not one per tensor
            sums = torch.stack([t.detach().sum(dtype=torch.float64).to(dev) for _, t in named]).cpu()
        bad = [named[i][0] for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist()]
        if self._any_rank(bool(bad)):
            raise TrainingError(
                f"iteration {n}: refusing to save non-finite weights ({', '.join(bad[:4]) or 'on another rank'}"
                f"{' ...' if len(bad) > 4 else ''}); {self.checkpointer.dir / ckpt.LATEST} is left as it was "
                f"(optimizer.lr={self.cfg.optimizer.lr}: a smaller learning rate may help)")

    def save(self) -> Path:
        """Write the checkpoint of the current iteration (a collective: every rank calls it)."""
        n, c, cp = self.iteration, self.cfg.checkpoint, self.checkpointer
        cp.drain()  # the previous asynchronous save is on disk (or failed) before this one starts
        self._stop_if_save_failed(self._any_rank(cp.failed()))
        if self.offload:
            self.optimizer.synchronize()
        self._check_finite_weights(n)
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
            # A LoRA set holds the adapters only (the base is checkpoint.load_path, frozen).
            only = self.lora
            reg = ckpt.model_state(self.model, reg_dtype, keep=main, trainable_only=only)
            cp.write(n, "reg_model", reg)
            if self.ema is not None:
                reg = None
                cp.write(n, "ema_model", ckpt.ema_state(self.model, self.ema.shadow, keep=main, trainable_only=only))
            else:
                cp.write(n, "ema_model", reg)
            reg = None
            optim = {"optimizer": ckpt.optimizer_state(self.model, self.optimizer, keep=main)}
            if reg_dtype != torch.float32:  # exact resume needs the fp32 master weights
                optim["master_weights"] = ckpt.model_state(self.model, None, keep=main, trainable_only=only)
        optim["scheduler"] = {"last_epoch": n, "warmup_steps": self.cfg.optimizer.warmup_steps}
        cp.write(n, "optim", optim)
        optim = None
        states = [None] * self.info.world_size
        dist.all_gather_object(states, {"data": self.loader.state_dict() if self.loader else None, "rng": rng_state()})
        trainer = {"iteration": n, "data": [s["data"] for s in states], "rng": [s["rng"] for s in states],
                   "skipped_steps": self.skipped_steps, "world_size": self.info.world_size,
                   "experiment": self.cfg.experiment}
        if self.lora:  # what the adapters need to be used: their base and scale (also in config.json)
            lo = self.cfg.model.lora
            trainer["lora"] = {"base": self.cfg.checkpoint.load_path, "rank": lo.rank, "alpha": lo.alpha,
                               "scale": lo.scale, "targets": list(lo.targets)}
        path = cp.commit(n, trainer)
        # Synchronous saving: a failed write stops every rank here, at this save.
        self._stop_if_save_failed(self._any_rank(cp.failed()))
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
        self._batch_desc = describe_batch(batch, cfg.data.dataset_dir)
        return self.optimize(x0, cond, gen)

    def optimize(self, x0: torch.Tensor, cond, gen: torch.Generator) -> dict[str, float]:
        """EDM loss on latents ``x0`` [B, 16, V*T, H, W] (scaled by sigma_data) -> backward -> clip -> update."""
        cfg, dev = self.cfg, self.info.device
        B = x0.shape[0]
        sigma = torch.exp(cfg.model.p_mean + cfg.model.p_std * torch.randn(B, generator=gen, dtype=torch.float64))
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        video = None
        if self.model.net.config.video2world:  # condition frames drawn after sigma/eps: Text2World streams unchanged
            m = cfg.model
            video = training_condition(x0, self.model.net.config.n_views, max_condition_t=m.condition_frames_max,
                                       p_mean=m.condition_augment_p_mean, p_std=m.condition_augment_p_std,
                                       dropout=m.condition_dropout, generator=gen)
        out = self.model(x0, cond, sigma.float().to(dev), eps.to(dev), video)
        loss = out["loss"]
        loss.backward()
        if self.lora and self.info.world_size > 1:
            self._average_adapter_grads()

        if self.offload:
            norm = self.optimizer.grad_norm()
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
        # The 5th value carries "rank 0's background checkpoint write failed" to every rank at no extra cost.
        failed = torch.tensor(1.0 if self.checkpointer.failed() else 0.0, device=loss.device)
        stats = torch.stack([loss.detach().float(), out["mse"].float(), out["edm"].float(),
                             norm.float().to(loss.device), failed]).to(self._reduce_device)
        local_loss_finite = torch.isfinite(loss.detach())  # read (a host sync) only on a skipped step
        dist.all_reduce(stats)  # sum over ranks; the norm is already global, so it is divided back
        ws = self.info.world_size
        loss_v, mse_v, edm_v, norm_v, failed_v = (stats / ws).tolist()
        self._stop_if_save_failed(failed_v > 0)
        finite = bool(np.isfinite(stats[:4].cpu().numpy()).all())
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
            self.nonfinite_run = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_run += 1
            culprits = self._nonfinite_culprits(local_loss_finite)
            self.monitor.write(f"[mvmodel.train] iteration {self.iteration + 1}: non-finite loss or gradient norm "
                               f"(loss={loss_v}, grad_norm={norm_v}); step skipped ({self.skipped_steps} so far, "
                               f"{self.nonfinite_run} in a row); batch: {culprits}")
            limit = cfg.trainer.max_nonfinite_steps
            if limit and self.nonfinite_run >= limit:
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"iteration {self.iteration + 1}: {self.nonfinite_run} consecutive steps with a non-finite loss "
                    f"or gradient norm (trainer.max_nonfinite_steps={limit}; last loss={loss_v}, grad_norm={norm_v}); "
                    f"last batch: {culprits}. The run stops without saving; the newest checkpoint is untouched")
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {"loss": loss_v, "mse": mse_v, "edm": edm_v, "grad_norm": norm_v, "lr": lr,
                "skipped_steps": float(self.skipped_steps)}

    def _average_adapter_grads(self) -> None:
        """Data-parallel mean of the adapters' gradients (the base is replicated and frozen): one all-reduce of
        one flat buffer (a few MB for the 7B at rank 8)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self._reduce_device)
        dist.all_reduce(flat)
        flat /= self.info.world_size
        off = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[off:off + g.numel()].view_as(g).to(g.device)
            off += g.numel()

    def _nonfinite_culprits(self, local_loss_finite: torch.Tensor) -> str:
        """The batches of the ranks whose own loss was non-finite (all ranks' when only the global gradient
        norm was): a collective, run only on a skipped step."""
        mine = (bool(local_loss_finite), getattr(self, "_batch_desc", None) or "latents passed to optimize()")
        found = [mine]
        if self.info.world_size > 1:
            found = [None] * self.info.world_size
            dist.all_gather_object(found, mine)
        bad = [f"rank {r}: {d}" if len(found) > 1 else d for r, (ok, d) in enumerate(found) if not ok]
        return "; ".join(bad) if bad else "; ".join(f"rank {r}: {d}" if len(found) > 1 else d
                                                     for r, (_, d) in enumerate(found))

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
        last_saved = self.resumed_from
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
        self.checkpointer.drain()
        self._stop_if_save_failed(self._any_rank(self.checkpointer.failed()))
        if self.offload:
            self.optimizer.synchronize()
        return {"iteration": self.iteration, "losses": losses, "skipped_steps": self.skipped_steps,
                "checkpoint_dir": str(self.checkpointer.dir)}

    def close(self) -> None:
        """Finish pending writes, release the job folder and the process group. A write error not yet reported
        is raised after everything is released."""
        try:
            self.checkpointer.close()
        finally:
            self.monitor.close()
            if self.offload:
                self.optimizer.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
