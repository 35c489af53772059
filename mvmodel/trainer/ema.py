"""Karras' power-function EMA (EDM2) as upstream's ``FastEmaModelUpdater`` with ``PowerEMAConfig`` (§8.4).

gamma is the largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)`` for the relative standard
deviation s (``rate``; 0.1 -> gamma = 6.9372). At optimizer step ``iteration`` (0-based)::

    beta = 0                                  if iteration == 0   (a fresh run copies the model)
    beta = (1 - 1 / (iteration + 1)) ** (gamma + 1)  otherwise
    ema  = beta * ema + (1 - beta) * param

The EMA is kept in fp32 and holds one tensor per parameter *shard* (FSDP2 local shards, or whole tensors), in
the order of ``model.named_parameters()``. Upstream updates from the bf16 copy of the weights; we update from
the fp32 master weights (the rounding upstream adds carries no information).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def power_ema_gamma(rate: float) -> float:
    """The exponent gamma of a power EMA with relative standard deviation ``rate`` (sigma_rel)."""
    if not 0 < rate < 0.28:  # beyond ~0.2812 the cubic has no positive root
        raise ValueError(f"power EMA rate (sigma_rel) must be in (0, 0.28), got {rate}")
    s2 = rate ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(iteration: int, gamma: float) -> float:
    """Decay used at optimizer step ``iteration`` (0-based)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return 0.0 if iteration == 0 else (1.0 - 1.0 / (iteration + 1)) ** (gamma + 1)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor parameter (shares storage), or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class PowerEMA:
    """fp32 shadow copies of ``params`` (a list of tensors or DTensors); ``update(params, iteration)``."""

    def __init__(self, params: list[Tensor], rate: float = 0.1, device: torch.device | str | None = None) -> None:
        self.rate = float(rate)
        self.gamma = power_ema_gamma(rate)
        with torch.no_grad():
            self.shadow = [local_tensor(p).detach().to(device=device or local_tensor(p).device, dtype=torch.float32,
                                                       copy=True) for p in params]

    @torch.no_grad()
    def update(self, params: list[Tensor], iteration: int) -> float:
        """Blend the current weights in; returns the beta used."""
        beta = power_ema_beta(iteration, self.gamma)
        src = [local_tensor(p).detach() for p in params]
        if len(src) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, got {len(src)} parameters")
        src = [s if s.dtype == torch.float32 and s.device == d.device else s.to(d.device, torch.float32)
               for s, d in zip(src, self.shadow)]
        if beta == 0.0:
            torch._foreach_copy_(self.shadow, src)
        else:
            torch._foreach_lerp_(self.shadow, src, 1.0 - beta)
        return beta

    @torch.no_grad()
    def copy_from(self, tensors: list[Tensor]) -> None:
        """Set the shadow from same-shaped local tensors (loading a checkpoint)."""
        for d, s in zip(self.shadow, tensors):
            d.copy_(local_tensor(s))
