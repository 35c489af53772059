"""Parallelisation of the diffusion model, applied in a fixed order (torchtitan's recipe):

1. activation checkpointing (``MultiviewDiT.set_activation_checkpointing``: per sub-block as upstream, per block,
   or none; the wrapping is internal, so state-dict keys do not change), or "selective": per block, keeping the
   attention kernels' outputs so that backward recomputes everything but the attention core;
2. optionally ``torch.compile`` of every unit's ``forward`` (in place: state-dict keys unchanged, and module
   hooks, FSDP's and the offloaded optimizer's, stay outside the compiled region);
3. with ``context_parallel_size`` > 1, context parallelism hooks (``context_parallel.py``) on a (dp, cp) mesh;
4. FSDP2 ``fully_shard`` on every unit (each transformer block, or each FA/CA/MLP sub-block as upstream's wrap
   policy), then on the uncertainty head (kept fp32) and on the root, with a mixed-precision policy: parameters
   all-gathered in the compute dtype (bf16), gradients reduced in fp32, sharded master weights in fp32;
   ``reshard_after_forward`` (True / False / a group size) per unit, and optionally explicit forward/backward
   prefetch of the next ``forward_prefetch`` / ``backward_prefetch`` units.

Which of these a GPU gets can depend on its memory: ``parallel.per_gpu_kind`` (``resolve_gpu_kind``, at start).

FSDP2 also runs on CPU over gloo (verified with torch 2.13), so CPU tests exercise the same code as GPUs. With
``optimizer.cpu_offload`` on a single process, FSDP is not applied: the GPU keeps the bf16 weights and the
offloaded optimizer (``offload.py``) holds the fp32 master weights in host memory.
"""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..configs.base import ParallelConfig
from ..diffusion.model import DiffusionModel

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (env:// rendezvous), or make a one-process group for plain ``python``.

    NCCL on CUDA, gloo on CPU. Each rank uses GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but CUDA is not available")
        dev = torch.device("cuda", local_rank if device == "cuda" else torch.device(device).index)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"trainer.device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)  # rank 0 alone writes multi-GB checkpoints
        if "MASTER_ADDR" in os.environ and world > 1:
            dist.init_process_group(backend, timeout=timeout, device_id=dev if backend == "nccl" else None)
        else:  # a single process: an in-memory store, no network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


class TrainableDiffusion(DiffusionModel):
    """``DiffusionModel`` whose ``forward`` is the training loss, so FSDP2's root hooks wrap the whole step.

    forward(x0 [B, 16, V*T, H, W] float32, condition, sigma [B], epsilon like x0) -> ``edm_loss`` dict.
    """

    def forward(self, x0, condition, sigma, epsilon, video=None):  # noqa: D102
        return self.training_loss(x0, condition, sigma=sigma, epsilon=epsilon, video=video)


def _attention_ops() -> set:
    """Attention kernels whose outputs selective checkpointing keeps (69% of the 7B's FLOPs are attention)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)}
    try:
        import mvkernels.ops.fa4_attention  # noqa: F401, PLC0415 - registers mvkernels::fa4_attention

        ops.add(torch.ops.mvkernels.mv_attention)
        ops.add(torch.ops.mvkernels.fa4_attention)  # without it FA4's forward would run again in every backward
    except (ImportError, AttributeError, RuntimeError):  # mvkernels not built: the SDPA kernels are the ones used
        pass
    return ops


def apply_selective_checkpointing(blocks: list[nn.Module]) -> None:
    """Checkpoint each block but keep its self-attention outputs: backward recomputes the projections, MLP, norms
    and the text cross-attention (cheap), not the self-attention core (69% of the 7B's FLOPs at 63,600 tokens).
    Costs one [S, D] tensor plus the softmax statistics per block (0.53 GB for the 7B)."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    keep = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        packet = getattr(op, "overloadpacket", op)
        # Self-attention only (q and k shaped alike): per-view text cross-attention is cheap to recompute.
        if (packet in keep or op in keep) and len(args) > 1 and args[0].shape == args[1].shape:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, policy), **kwargs)

        block.forward = forward


def fsdp_units(model: DiffusionModel, unit: str) -> list[nn.Module]:
    net = model.net
    return net.fsdp_units() if unit == "subblock" else list(net.blocks.values())


def resolve_gpu_kind(cfg: ParallelConfig, device: torch.device, cap_gib: float = 0.0,
                     explicit: list[str] = (), memory_gib: float | None = None) -> str:
    """Apply the ``per_gpu_kind`` entry for this GPU's memory class to ``cfg`` (in place), leaving the fields in
    ``explicit`` (dotted command-line keys) alone. ``memory_gib``: the device's memory (default: queried).
    Returns a line for the start log."""
    if not cfg.per_gpu_kind:
        return "parallel choices: the experiment's (no per-GPU-kind table)"
    if device.type != "cuda" and memory_gib is None:
        return f"parallel choices: the experiment's (no GPU; per-GPU-kind table for {sorted(cfg.per_gpu_kind)} GiB)"
    gib = memory_gib if memory_gib is not None else torch.cuda.get_device_properties(device).total_memory / 2**30
    if cap_gib > 0:
        gib = min(gib, cap_gib)
    fits = [k for k in cfg.per_gpu_kind if float(k) <= gib]
    if not fits:
        return f"parallel choices: the experiment's ({gib:.0f} GiB is below every per-GPU-kind class)"
    kind = max(fits, key=float)
    applied = {}
    for field, value in cfg.per_gpu_kind[kind].items():
        if f"parallel.{field}" not in explicit:
            setattr(cfg, field, value)
            applied[field] = value
    return f"parallel choices for a {gib:.0f} GiB GPU (class {kind} GiB): {applied}"


def set_explicit_prefetch(units: list[nn.Module], forward: int, backward: int) -> None:
    """FSDP2 explicit prefetch: unit i all-gathers units i+1..i+forward ahead in forward, and i-1..i-backward in
    backward (0 leaves FSDP2's implicit one-unit prefetch)."""
    for i, u in enumerate(units):
        if forward > 0 and units[i + 1:i + 1 + forward]:
            u.set_modules_to_forward_prefetch(units[i + 1:i + 1 + forward])
        if backward > 0 and i > 0:
            u.set_modules_to_backward_prefetch(units[max(0, i - backward):i][::-1])


def apply_parallelism(model: DiffusionModel, cfg: ParallelConfig, *, compute_dtype: torch.dtype, info: DistInfo,
                      use_fsdp: bool = True) -> nn.Module:
    """AC -> compile -> fully_shard, in place. Without FSDP the model is moved to the device, the net cast to
    ``compute_dtype`` and the uncertainty head kept in fp32."""
    mode = cfg.activation_checkpointing
    model.net.set_activation_checkpointing("none" if mode == "selective" else mode)
    if mode == "selective":
        apply_selective_checkpointing(list(model.net.blocks.values()))
    units = fsdp_units(model, cfg.fsdp_unit)
    if cfg.compile:
        from torch._dynamo import config as dynamo_config

        # Every unit shares one code object; allow a recompile per unit in case guards specialise on it.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 2 * len(units) + 8))
        for u in units:
            u.forward = torch.compile(u.forward)  # per unit: one small graph, reused by every block
    if cfg.context_parallel_size > 1:
        from .context_parallel import context_parallel_mesh, enable_context_parallel

        if not use_fsdp:
            raise ValueError("parallel.context_parallel_size > 1 needs several processes (it runs under FSDP)")
        mesh2d = context_parallel_mesh(info.device.type, info.world_size, cfg.context_parallel_size)
        cp = enable_context_parallel(model.net, mesh2d["cp"].get_group())
        cp.collectives_outside_compile = cfg.compile and cfg.compile_collectives == "outside"
    if not use_fsdp:
        model.to(info.device)
        for name, p in model.net.named_parameters():  # parameters only: buffers such as pos_embedder.seq stay fp32
            if "_lora.net." not in name:  # LoRA adapters stay fp32: they are the trained (master) weights
                p.data = p.data.to(compute_dtype)
        model.logvar.float()
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Parameters are sharded over every rank, the context-parallel ones included (gradients are averaged over all
    # of them, which is the data-parallel mean given how context_parallel gathers the output; see there).
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    low = None if compute_dtype == torch.float32 else compute_dtype
    # cast_forward_inputs=False: the net casts its own inputs; RoPE tables and sigma must not be rounded here.
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    raf = cfg.reshard_after_forward
    if not isinstance(raf, bool) and (raf < 1 or info.world_size % raf):
        raise ValueError(f"parallel.reshard_after_forward={raf}: a group size must divide the world size "
                         f"{info.world_size} (or use true/false)")
    if not isinstance(raf, bool) and raf in (1, info.world_size):
        raf = raf == info.world_size  # FSDP2's own reading of 1 / world size, without its warning
    for u in units:
        fully_shard(u, mesh=mesh, mp_policy=mp, reshard_after_forward=raf)
    fully_shard(model.logvar, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
    # The root keeps the net's non-block weights (embedders, final layer); backward needs them right away.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    set_explicit_prefetch(units, cfg.forward_prefetch, cfg.backward_prefetch)
    return model
