"""Where the one-GPU recipe keeps its optimizer state: chosen at start from the GPU's and the host's free memory.

The offloaded optimizer (``offload.py``) holds, per bucket (embedders/final layer/uncertainty head, then one
bucket per transformer block), four fp32 parts: the master weights, AdamW's ``exp_avg`` and ``exp_avg_sq``, and
the power EMA (16 bytes per parameter; 116 GB for the 7B). Each part of each bucket lives either on the GPU
("device") or in host memory. Rules, and why:

* master, exp_avg and exp_avg_sq of one bucket live together: the fused AdamW update reads and writes all three,
  so splitting them would move 4-8 bytes per parameter over PCIe every step. A bucket whose three live on the
  GPU is updated there (no gradient download, no weight upload, no CPU work); the others on the CPU as before.
* GPU space goes to the optimizer triplets first (12 bytes/parameter each, and each one removes CPU work and
  4 bytes/parameter of PCIe traffic), in bucket order; then to the EMA of GPU-updated buckets. The EMA of a
  host-updated bucket stays on the host (its lerp reads the host master). The EMA of a GPU-updated bucket kept
  on the host is refreshed from a download of the fp32 master, overlapped with the next forward.
* The GPU budget is its free memory now (after the bf16 weights are placed; capped by ``gpu_memory_cap_gib``,
  which also caps the allocator so that an 80 GB card can be simulated on a bigger one), minus what training
  will still allocate: bf16 gradients (2 bytes/parameter), the fp32 gradient of the biggest GPU-updated bucket,
  the activation peak (``activation_gib``, else a recipe-level estimate, ``estimate_activation_bytes``) and a
  safety margin (``gpu_memory_margin_gib``: allocator fragmentation, NCCL/cuBLAS workspaces).

The numerics do not depend on the plan: every bucket runs the same ``torch._fused_adamw_`` on the same flat fp32
tensors (the bf16 gradients rounded up to fp32 the same way) and the same EMA ``lerp_``. On a CPU device the
"device" placement is the CPU too, which lets tests run every placement and compare them bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pathlib import Path

import torch

PARTS = ("master", "exp_avg", "exp_avg_sq", "ema")
GiB = 2**30

# Activation memory of one training step, in units of one bf16 [tokens, width] tensor, calibrated on the 7B at
# 63,600 tokens on an H100 (peak allocated minus bf16 weights and gradients: 16.0 GiB with per-block recompute,
# 26.3 GiB selective; one unit = 0.485 GiB): units kept per block by each recompute mode, plus the live working
# set of the block being recomputed/differentiated. "none" keeps everything a block makes (~25 units: rough).
_UNITS_KEPT_PER_BLOCK = {"block": 1.0, "selective": 1.77, "subblock": 3.0, "none": 25.0}
_UNITS_LIVE = 5.0


def estimate_activation_bytes(tokens: int, width: int, num_blocks: int, ac_mode: str, batch: int = 1) -> int:
    """Recipe-level estimate of the activation peak of one step (bf16 compute)."""
    if ac_mode not in _UNITS_KEPT_PER_BLOCK:
        raise ValueError(f"activation checkpointing mode {ac_mode!r}: expected one of {sorted(_UNITS_KEPT_PER_BLOCK)}")
    unit = batch * tokens * width * 2
    return int(unit * (num_blocks * _UNITS_KEPT_PER_BLOCK[ac_mode] + _UNITS_LIVE))


@dataclass
class MemoryPlan:
    """``on_device[i]``: the parts of bucket i kept on ``device`` (the rest are in host memory)."""

    device: torch.device
    numels: list[int]
    on_device: list[frozenset[str]]
    with_ema: bool = True
    why: str = "all parts in host memory (fixed plan)"
    budget: dict[str, float] = field(default_factory=dict)  # GiB figures behind the choice, for the log

    def __post_init__(self) -> None:
        if len(self.on_device) != len(self.numels):
            raise ValueError(f"memory plan: {len(self.on_device)} placements for {len(self.numels)} buckets")
        for i, parts in enumerate(self.on_device):
            if set(parts) - set(PARTS):
                raise ValueError(f"memory plan: bucket {i} has unknown parts {sorted(set(parts) - set(PARTS))}")
            triplet = {"master", "exp_avg", "exp_avg_sq"} & set(parts)
            if triplet and len(triplet) != 3:
                raise ValueError(f"memory plan: bucket {i} splits master/exp_avg/exp_avg_sq ({sorted(parts)}); "
                                 "the three must live on one side (the fused update reads all three)")
            if "ema" in parts and not triplet:
                raise ValueError(f"memory plan: bucket {i} keeps its EMA on the device but updates on the host")

    def updates_on_device(self, i: int) -> bool:
        return "master" in self.on_device[i]

    def ema_on_device(self, i: int) -> bool:
        return "ema" in self.on_device[i]

    def part_bytes(self) -> dict[str, tuple[int, int]]:
        """{part: (bytes on the device, bytes on the host)}."""
        out = {}
        for part in PARTS:
            if part == "ema" and not self.with_ema:
                continue
            dev = sum(4 * n for n, p in zip(self.numels, self.on_device) if part in p)
            out[part] = (dev, 4 * sum(self.numels) - dev)
        return out

    def device_bytes(self) -> int:
        return sum(d for d, _ in self.part_bytes().values())

    def host_bytes(self) -> int:
        return sum(h for _, h in self.part_bytes().values())

    def describe(self) -> str:
        """The start-log lines: where each part lives, how much, and why."""
        n_dev = sum(self.updates_on_device(i) for i in range(len(self.numels)))
        lines = [f"memory plan ({self.why}): {n_dev} of {len(self.numels)} buckets updated on {self.device}, "
                 f"{self.device_bytes() / GiB:.1f} GiB of optimizer state there, {self.host_bytes() / GiB:.1f} GiB "
                 f"in host memory"]
        for part, (d, h) in self.part_bytes().items():
            lines.append(f"  {part:<10} device {d / GiB:7.2f} GiB  host {h / GiB:7.2f} GiB")
        if self.budget:
            lines.append("  budget: " + ", ".join(f"{k} {v:.1f} GiB" for k, v in self.budget.items()))
        return "\n".join(lines)


def host_plan(numels: list[int], device: torch.device | str, with_ema: bool = True) -> MemoryPlan:
    """Everything in host memory (the recipe before plans existed)."""
    return MemoryPlan(torch.device(device), list(numels), [frozenset()] * len(numels), with_ema)


def device_plan(numels: list[int], device: torch.device | str, with_ema: bool = True,
                buckets: int | None = None, ema_buckets: int | None = None) -> MemoryPlan:
    """The first ``buckets`` buckets (default: all) updated on ``device``, the EMA of the first ``ema_buckets`` of
    them (default: all of them) kept there too."""
    n = len(numels) if buckets is None else buckets
    e = n if ema_buckets is None else min(ema_buckets, n)
    parts = [frozenset({"master", "exp_avg", "exp_avg_sq"} | ({"ema"} if with_ema and i < e else set()))
             if i < n else frozenset() for i in range(len(numels))]
    return MemoryPlan(torch.device(device), list(numels), parts, with_ema,
                      why=f"fixed: {n} bucket(s) on the device, EMA of {e if with_ema else 0}")


def choose_plan(numels: list[int], device: torch.device | str, *, with_ema: bool, gpu_free_bytes: int,
                grad_bytes: int, activation_bytes: int, margin_bytes: int, host_available_bytes: int,
                host_margin_bytes: int = 4 * GiB) -> MemoryPlan:
    """Greedy plan (module docstring): optimizer triplets in bucket order, then EMAs, while the budget lasts.

    ``gpu_free_bytes``: free now (capped); ``grad_bytes``: the bf16 gradients still to come. Raises ValueError when
    what is left for the host does not fit the host's available memory."""
    biggest = 4 * max(numels)  # the fp32 gradient of one GPU-updated bucket, built during its update
    budget = gpu_free_bytes - grad_bytes - activation_bytes - margin_bytes - biggest
    left = budget
    on_dev: list[set[str]] = [set() for _ in numels]
    for i, n in enumerate(numels):
        if 12 * n <= left:
            on_dev[i] |= {"master", "exp_avg", "exp_avg_sq"}
            left -= 12 * n
    if with_ema:
        for i, n in enumerate(numels):
            if on_dev[i] and 4 * n <= left:
                on_dev[i].add("ema")
                left -= 4 * n
    plan = MemoryPlan(torch.device(device), list(numels), [frozenset(p) for p in on_dev], with_ema,
                      why="chosen at start: optimizer triplets first, then EMAs, while the GPU budget lasts",
                      budget={"GPU free": gpu_free_bytes / GiB, "bf16 grads": grad_bytes / GiB,
                              "activations": activation_bytes / GiB, "margin": margin_bytes / GiB,
                              "for state": max(budget, 0) / GiB, "host available": host_available_bytes / GiB})
    need = plan.host_bytes() + 2 * biggest  # + pinned staging (2 slots per kind, at most a bucket each)
    if need > host_available_bytes - host_margin_bytes:
        raise ValueError(f"memory plan: {need / GiB:.1f} GiB of optimizer state must go to host memory but only "
                         f"{host_available_bytes / GiB:.1f} GiB is available (minus a {host_margin_bytes / GiB:.0f} "
                         f"GiB margin) beside {plan.device_bytes() / GiB:.1f} GiB on the GPU; disable the EMA "
                         f"(ema.enabled=false), lower model.net_overrides num_blocks, or use more GPUs")
    return plan


def host_memory_bytes() -> tuple[int, int]:
    """(total, available) host memory: MemTotal and MemAvailable of /proc/meminfo (what can be allocated without
    swapping), else psutil's figures."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        return total, int(info.get("MemAvailable", info["MemTotal"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)


def host_available_bytes() -> int:
    return host_memory_bytes()[1]


def cap_gpu_memory(device: torch.device, cap_gib: float) -> None:
    """Make the caching allocator refuse to grow past ``cap_gib`` (simulates a smaller card; 0: no cap)."""
    if cap_gib <= 0 or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * GiB > total:
        raise ValueError(f"trainer.gpu_memory_cap_gib={cap_gib} exceeds the GPU's {total / GiB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / total, device)


def gpu_free_bytes(device: torch.device, cap_gib: float = 0.0) -> int:
    """Free GPU memory now; with a cap, what the cap leaves beside what this process already reserved."""
    free, _ = torch.cuda.mem_get_info(device)
    if cap_gib > 0:
        free = min(free, int(cap_gib * GiB) - torch.cuda.memory_reserved(device))
    return max(free, 0)


def tokens_per_sample(cfg, net_config) -> int:
    """Tokens the net sees per sample under the config's data shape (8x8x8 tokenizer, the net's patches)."""
    d = cfg.data
    V, T, (H, W) = len(d.view_keys), d.num_frames, d.video_size
    lat_t = 1 + (T - 1) // 8
    return V * lat_t // net_config.patch_temporal * (H // 8 // net_config.patch_spatial) * (
        W // 8 // net_config.patch_spatial)


def plan_for_config(cfg, numels: list[int], device: torch.device, net_config) -> MemoryPlan:
    """The plan named by ``optimizer.offload_plan``: "host", "device", "device:K" (the first K buckets) or "auto"
    (``choose_plan`` from the free GPU and host memory; on a CPU device everything stays in host memory)."""
    mode, with_ema = cfg.optimizer.offload_plan, cfg.ema.enabled
    if mode == "host" or (mode == "auto" and device.type != "cuda"):
        plan = host_plan(numels, device, with_ema)
        if mode == "auto":
            plan.why = "no GPU: all parts in host memory"
        return plan
    if mode == "device":
        return device_plan(numels, device, with_ema)
    if mode.startswith("device:"):
        return device_plan(numels, device, with_ema, buckets=int(mode.split(":", 1)[1]))
    t = cfg.trainer
    act = int(t.activation_gib * GiB) if t.activation_gib > 0 else estimate_activation_bytes(
        tokens_per_sample(cfg, net_config), net_config.model_channels, net_config.num_blocks,
        cfg.parallel.activation_checkpointing, cfg.data.batch_size)
    return choose_plan(numels, device, with_ema=with_ema, gpu_free_bytes=gpu_free_bytes(device, t.gpu_memory_cap_gib),
                       grad_bytes=2 * sum(numels), activation_bytes=act,
                       margin_bytes=int(t.gpu_memory_margin_gib * GiB), host_available_bytes=host_available_bytes())

