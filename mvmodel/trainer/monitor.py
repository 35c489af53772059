"""Training telemetry on rank 0: a tqdm progress bar (loss, it/s, tokens/s, MFU, memory), TensorBoard scalars
when ``tensorboard`` is importable, ``metrics.jsonl`` (one JSON line per step) and ``config.json`` in the job
folder."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (datasheet, FLOP/s) used for MFU; unknown devices report no MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return val * (756 / 989 if key == "H100" and "PCIe" in name else 1.0)
    return None


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident host memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def host_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Monitor:
    """Everything is a no-op on ranks other than 0."""

    def __init__(self, job_dir: Path, *, enabled: bool, start: int, total: int, config: dict[str, Any],
                 logging_iter: int, config_name: str | None = "config.json", step_flops: float, tokens_per_step: int, device: torch.device,
                 progress: bool = True) -> None:
        self.enabled, self.logging_iter = enabled, logging_iter
        self.step_flops, self.tokens = step_flops, tokens_per_step
        self.peak = peak_flops(device)
        self.device = device
        self.bar = self.tb = self.metrics = None
        if not enabled:
            return
        job_dir.mkdir(parents=True, exist_ok=True)
        if config_name:  # a resumed run keeps the job's config.json (the trainer picks another name when it changed)
            (job_dir / config_name).write_text(json.dumps(config, indent=2, default=str) + "\n")
        self.metrics = open(job_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(job_dir / "tensorboard"))
        except ImportError:
            self.tb = None
        if progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0)
            except ImportError:
                self.bar = None
        self._last = time.perf_counter()

    def step(self, iteration: int, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        """Record one finished step (``iteration`` = steps done). Returns the derived figures."""
        derived = {"s_per_step": seconds, "tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0,
                   "mem_gib": memory_gib(self.device)}
        if self.peak:
            derived["mfu"] = self.step_flops / seconds / self.peak if seconds > 0 else 0.0
        if not self.enabled:
            return derived
        row = {"iteration": iteration, **{k: float(v) for k, v in metrics.items()}, **derived}
        self.metrics.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration":
                    self.tb.add_scalar(f"train/{k}", v, iteration)
        if self.bar is not None:
            post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{derived['tokens_per_s']:.3g}",
                    "mem": f"{derived['mem_gib']:.1f}G"}
            if "mfu" in derived:
                post["mfu"] = f"{100 * derived['mfu']:.1f}%"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif iteration % self.logging_iter == 0:
            print(f"iter {iteration}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "iteration"),
                  flush=True)
        return derived

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.metrics is not None:
            self.metrics.close()
