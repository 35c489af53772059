"""EDM Euler sampling as upstream's inference (diffusers ``EDMEulerScheduler`` defaults, cosmos-multiview.md §7.4).

* ``karras_sigmas(n)``: sigma_k = (smax^(1/rho) + k/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, k = 0..n-1, then 0.
* ``initial_noise``: N(0, 1) * sqrt(sigma_max^2 + 1) (diffusers' ``init_noise_sigma``, not sigma_max).
* ``sample_euler``: x <- x + (x - D)/sigma_k * (sigma_{k+1} - sigma_k) in fp32, rounded to the net dtype after every
  step as upstream; D with classifier-free guidance D_c + g (D_c - D_u). n steps = n (pairs of) net calls.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..networks.precision import set_sampling_step
from .conditioning import Condition
from .model import Denoiser


def karras_sigmas(num_steps: int, sigma_min: float = 0.0002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """[num_steps + 1] float64, decreasing from sigma_max to sigma_min, then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def initial_noise(shape: tuple[int, ...], sigma_max: float = 80.0, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """Starting latent: N(0,1) drawn on the generator's device (upstream: the CPU default generator) x sqrt(smax^2+1)."""
    gen_dev = "cpu" if generator is None else generator.device
    return (torch.randn(shape, generator=generator, device=gen_dev) * math.sqrt(sigma_max**2 + 1)).to(device)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, noise: Tensor, condition: Condition, uncondition: Condition | None = None, *,
                 guidance: float = 7.0, num_steps: int = 35, sigma_min: float = 0.0002, sigma_max: float = 80.0,
                 rho: float = 7.0, callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run the Euler sampler from ``noise`` (already scaled by ``initial_noise``); returns x0 latents (float32).

    noise [B, 16, V*T, H, W]; ``callback(step, x)`` after each step (e.g. progress bars).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    dt = denoiser.net.x_embedder.proj[1].weight.dtype
    x = noise.to(dt)
    for i in range(num_steps):
        set_sampling_step(denoiser.net, i)  # a net converted by apply_precision: bf16 for its first bf16_steps
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoiser.guided(x, s, condition, uncondition, guidance)
        xf = x.float()
        x = (xf + (xf - d) / s * (s_next - s)).to(dt)
        if callback is not None:
            callback(i, x)
    return x.float()
