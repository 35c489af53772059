"""Which post-training recipe runs on this GPU: full (FSDP), full with the offloaded optimizer (one GPU), or LoRA,
each with an activation-checkpointing (AC) policy, chosen from the GPU's memory (or ``trainer.gpu_memory_cap_gib``)
and the host's, with the estimates of ``preflight.memory_plan``.

``trainer.recipe``:

* ``config``: the experiment's flags as they are (only checked by the preflight);
* ``full`` / ``full_offload`` / ``lora``: that recipe; its AC is the fastest policy that fits (none, then
  selective, then block) unless ``parallel.activation_checkpointing`` is given on the command line;
* ``auto``: the first recipe that fits, in order full (several GPUs) or full_offload (one GPU), then LoRA.

A candidate fits when its GPU estimate (weights, gradients, activations of the AC policy, what the recipe keeps on
the GPU) plus ``trainer.recipe_margin_gib`` is within the GPU's memory, and its host estimate within the host's
total memory. When none fits, the error lists every candidate's needs against what is there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ..configs.base import RECIPES

AC_FASTEST_FIRST = ("none", "selective", "block")
GIB = 1024 ** 3


@dataclass
class Choice:
    recipe: str
    ac: str
    gpu_bytes: int  # estimated peak per GPU, without the margin
    host_bytes: int
    note: str


def apply_recipe(cfg, recipe: str, ac: str | None = None) -> None:
    """Set the flags of ``recipe`` (and the AC policy) on ``cfg`` in place."""
    if recipe not in RECIPES:
        raise ValueError(f"config trainer.recipe: {recipe!r} is not one of {RECIPES}")
    cfg.model.lora.enabled = recipe == "lora"
    cfg.optimizer.cpu_offload = recipe == "full_offload"
    if recipe != "full":
        cfg.parallel.per_gpu_kind = {}  # the FSDP table does not apply to one-GPU / LoRA recipes
    if ac is not None:
        cfg.parallel.activation_checkpointing = ac
    cfg.trainer.recipe = recipe


def estimate(cfg, recipe: str, ac: str, gpu_bytes: int, world: int = 1, local_world: int = 1) -> tuple[int, int]:
    """(GPU bytes the recipe cannot do without, host bytes) for ``cfg`` run as ``recipe`` with ``ac``."""
    from .preflight import memory_plan  # noqa: PLC0415 - preflight imports this module lazily too

    c = copy.deepcopy(cfg)
    apply_recipe(c, recipe, ac)
    plan = memory_plan(c, world, local_world, on_gpu=True, gpu_bytes=gpu_bytes)
    gpu = plan["gpu"]
    if recipe == "full_offload":  # optimizer state the plan puts on the GPU is optional: only the host part counts
        c.optimizer.offload_plan = "host"
        gpu = memory_plan(c, world, local_world, on_gpu=True, gpu_bytes=gpu_bytes)["gpu"]
    return int(gpu), int(plan["host_min"])


def choose(cfg, gpu_bytes: int, host_bytes: int, world: int = 1, local_world: int = 1) -> Choice:
    """The recipe and AC policy ``cfg.trainer.recipe`` asks for on a GPU of ``gpu_bytes`` (already capped) and a
    host of ``host_bytes``; ValueError with every candidate's numbers when none fits."""
    t = cfg.trainer
    if t.recipe == "auto":
        recipes = ["full" if world > 1 else "full_offload", "lora"]
    elif t.recipe in RECIPES:
        recipes = [t.recipe]
    else:
        raise ValueError(f"config trainer.recipe: {t.recipe!r} names no recipe to choose from")
    explicit_ac = "parallel.activation_checkpointing" in cfg.overrides
    acs = [cfg.parallel.activation_checkpointing] if explicit_ac else list(AC_FASTEST_FIRST)
    margin = int(t.recipe_margin_gib * GIB)
    tried = []
    for recipe in recipes:
        for ac in acs:
            gpu, host = estimate(cfg, recipe, ac, gpu_bytes, world, local_world)
            if gpu + margin <= gpu_bytes and host <= host_bytes:
                note = (f"recipe {recipe}, activation checkpointing {ac}: needs ~{gpu / GIB:.1f} GiB per GPU "
                        f"(+{t.recipe_margin_gib:g} GiB margin) of {gpu_bytes / GIB:.1f} GiB, ~{host / GIB:.1f} GiB "
                        f"of host memory of {host_bytes / GIB:.0f} GiB")
                return Choice(recipe, ac, gpu, host, note)
            tried.append(f"{recipe}+{ac}: GPU {gpu / GIB:.1f}+{t.recipe_margin_gib:g} GiB, host {host / GIB:.1f} GiB")
    raise ValueError(f"trainer.recipe={t.recipe}: nothing fits a {gpu_bytes / GIB:.1f} GiB GPU "
                     f"(trainer.gpu_memory_cap_gib={t.gpu_memory_cap_gib:g}) with {host_bytes / GIB:.0f} GiB of host "
                     f"memory; needed: {'; '.join(tried)} (fewer data.num_frames or views, or more GPUs)")


def resolve_recipe(cfg, device, world: int = 1, local_world: int = 1, gpu_bytes: int | None = None,
                   host_bytes: int | None = None) -> str:
    """Apply ``trainer.recipe`` to ``cfg`` in place (a no-op for "config"); returns a line for the start log.
    ``gpu_bytes`` / ``host_bytes``: defaults are the device's total memory (capped) and the host's."""
    import torch  # noqa: PLC0415

    from .memory_plan import host_memory_bytes  # noqa: PLC0415

    t = cfg.trainer
    if t.recipe == "config":
        return "recipe: the experiment's flags (trainer.recipe=config)"
    if gpu_bytes is None and getattr(device, "type", str(device)) != "cuda":
        if t.recipe == "auto":  # nothing to measure: the experiment's flags
            t.recipe = "lora" if cfg.model.lora.enabled else ("full_offload" if cfg.optimizer.cpu_offload else "full")
        apply_recipe(cfg, t.recipe)
        return f"recipe {t.recipe} (no GPU: activation checkpointing {cfg.parallel.activation_checkpointing} as configured)"
    if gpu_bytes is None:
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory
        if t.gpu_memory_cap_gib > 0:
            gpu_bytes = min(gpu_bytes, int(t.gpu_memory_cap_gib * GIB))
    if host_bytes is None:
        host_bytes = host_memory_bytes()[0]
    choice = choose(cfg, gpu_bytes, host_bytes, world, local_world)
    apply_recipe(cfg, choice.recipe, choice.ac)
    return choice.note
