"""LoRA adapters for the multi-view DiT (upstream's LoRA post-training of the 7B models, rank 8 on the self- and
cross-attention ``to_q`` / ``to_v`` of every block, scale 1).

An adapter adds ``scale * B(A(x))`` (A: in -> rank, B: rank -> out, B zero at start) to the output of one base
linear. Adapters are modules beside the linear they adapt, named ``<linear>_lora`` with ``net.0`` (A) and ``net.1``
(B): e.g. ``blocks.block3.blocks.0.block.attn.to_q_lora.net.0.weight``. Base weights keep their keys (a LoRA job's
base is the released ``model.pt`` as it is) and adapter keys are recognisable by ``_lora.``.

Why not ``peft`` (measured with peft 0.21 on this net, CPU, ``inject_adapter_in_model`` on ``attn.to_[qv].0``):

* our self-attention runs q, k, v as ONE GEMM over the concatenated base weights (``Attention.forward``), which
  reads ``to_q[0].weight``; peft's wrapped linear exposes the base weight there, so the adapter was silently
  ignored: the self-attention output did not change with a non-zero adapter. Adapters must be added to the fused
  output's q and v slices, which only the attention itself can do (``Attention._lora_qkv``);
* peft renames the base keys (``to_q.0.base_layer.weight``), which breaks upstream's key layout and our strict
  loaders. (``fully_shard`` itself accepted peft's modules with bf16 base and fp32 adapters.)

So the adapter is this small module and the attention / MLP call it; everything else (freezing, optimizer, EMA,
checkpoints) only sees parameters that require grad.

Targets (``model.lora.targets``): ``to_q``, ``to_k``, ``to_v``, ``to_out`` (both attentions), the same prefixed
``self.`` or ``cross.`` for one of them, and ``mlp.layer1`` / ``mlp.layer2``. Default ``["to_q", "to_v"]``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out")
MLP_LINEARS = ("layer1", "layer2")
TARGETS = (ATTN_LINEARS + tuple(f"{k}.{n}" for k in ("self", "cross") for n in ATTN_LINEARS)
           + tuple(f"mlp.{n}" for n in MLP_LINEARS))
DEFAULT_TARGETS = ("to_q", "to_v")
_KEY = re.compile(r"_lora\.net\.[01]\.weight$")


class LoRALinear(nn.Module):
    """``scale * B(A(x))``: ``net = Sequential(Linear(in, rank), Linear(rank, out))``, no biases.

    The weights stay fp32 (they are the trained master weights) and are cast to the input's dtype in forward, so
    a bf16 base computes the adapter in bf16 too."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.scale = rank, float(scale)
        self.net = nn.Sequential(nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32),
                                 nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A as nn.Linear's default (kaiming-uniform), B zero: the adapted net starts equal to the base.
        nn.init.kaiming_uniform_(self.net[0].weight, a=math.sqrt(5))
        nn.init.zeros_(self.net[1].weight)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.net[0].weight.to(x.dtype), self.net[1].weight.to(x.dtype)
        return F.linear(F.linear(x, a), b) * self.scale

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` [out, in], fp32: what merging adds to the base weight."""
        return (self.net[1].weight.float() @ self.net[0].weight.float()) * self.scale


def check_targets(targets: Iterable[str], key: str = "model.lora.targets") -> tuple[str, ...]:
    out = tuple(targets)
    if not out:
        raise ValueError(f"config {key}: needs at least one target, e.g. {list(DEFAULT_TARGETS)}")
    bad = [t for t in out if t not in TARGETS]
    if bad:
        raise ValueError(f"config {key}: unknown target module(s) {bad}; expected some of {list(TARGETS)}")
    return out


def _wanted(targets: tuple[str, ...], kind: str, linear: str) -> bool:
    """kind "self"/"cross"/"mlp"; linear e.g. "to_q" or "layer1"."""
    if kind == "mlp":
        return f"mlp.{linear}" in targets
    return linear in targets or f"{kind}.{linear}" in targets


def _sites(net: nn.Module):
    """(kind, owner module, linear name, nn.Linear) of every adaptable linear of the net's blocks."""
    from .attention import Attention  # noqa: PLC0415 - avoid a cycle at import
    from .blocks import GPT2FeedForward  # noqa: PLC0415

    for module in net.blocks.modules():
        if isinstance(module, Attention):
            kind = "self" if module.is_selfattn else "cross"
            for name in ATTN_LINEARS:
                yield kind, module, name, getattr(module, name)[0]
        elif isinstance(module, GPT2FeedForward):
            for name in MLP_LINEARS:
                yield "mlp", module, name, getattr(module, name)


def add_lora(net: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Attach adapters (scale = alpha / rank; alpha None = rank, scale 1) to the targeted linears of every block
    and freeze everything else. Returns the adapter module names. Idempotent targets only: a second call raises."""
    targets = check_targets(targets)
    if rank < 1:
        raise ValueError(f"config model.lora.rank: {rank} must be >= 1")
    scale = 1.0 if alpha is None else float(alpha) / rank
    added = []
    for p in net.parameters():
        p.requires_grad_(False)
    for kind, owner, name, linear in _sites(net):
        if not _wanted(targets, kind, name):
            continue
        if getattr(owner, f"{name}_lora", None) is not None:
            raise ValueError(f"{name}_lora already present: LoRA was added twice")
        dev = linear.weight.device if not linear.weight.is_meta else None
        setattr(owner, f"{name}_lora", LoRALinear(linear.in_features, linear.out_features, rank, scale, device=dev))
        added.append(name)
    if not added:
        raise ValueError(f"config model.lora.targets: {list(targets)} matched no linear of the net")
    return [n for n, m in net.named_modules() if isinstance(m, LoRALinear)]


def is_lora_key(key: str) -> bool:
    return bool(_KEY.search(key))


def lora_modules(net: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}


def base_key(adapter_prefix: str) -> str:
    """``...attn.to_q_lora`` -> ``...attn.to_q.0.weight``; ``...mlp.block.layer1_lora`` -> ``...layer1.weight``."""
    stem = adapter_prefix[: -len("_lora")]
    return f"{stem}.0.weight" if stem.rsplit(".", 1)[-1] in ATTN_LINEARS else f"{stem}.weight"


@torch.no_grad()
def merge_state_dict(base: dict[str, Tensor], adapters: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A full state dict: ``base`` with ``scale * B @ A`` of each adapter added to its linear (in fp32 or the base's
    wider dtype, stored back in the base weight's dtype). Keys of both carry the same prefix (``net.`` in trainer files, none in a bare net's)."""
    out = dict(base)
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in adapters.items():
        if not is_lora_key(k):
            raise ValueError(f"{k}: not a LoRA adapter key (expected ..._lora.net.0.weight / net.1.weight)")
        pairs.setdefault(k.rsplit(".net.", 1)[0], {})[k.rsplit(".", 2)[-2]] = v
    for stem, ab in pairs.items():
        if set(ab) != {"0", "1"}:
            raise ValueError(f"{stem}: adapter incomplete (has net.{sorted(ab)} of net.0 / net.1)")
        key = base_key(stem)
        if key not in base:
            raise ValueError(f"adapter {stem} adapts {key}, which the base state dict lacks")
        w = base[key]
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32 at least; float64 bases stay exact
        delta = (ab["1"].to(acc) @ ab["0"].to(acc)) * scale
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(f"adapter {stem}: delta {list(delta.shape)} does not fit {key} {list(w.shape)}")
        out[key] = (w.to(acc) + delta).to(w.dtype)
    return out
