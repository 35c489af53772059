"""EDM formulation of Cosmos-Predict1 (cosmos-multiview.md §7.1-§7.2): preconditioning, noise levels, loss.

* ``EDMScaling``: c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
* ``sample_sigma``: ln(sigma) ~ N(p_mean, p_std), one per sample (upstream: p_mean 0, p_std 1, no clamping).
* ``loss_weight``: lambda(s) = (s^2+sd^2)/(s*sd)^2.
* ``UncertaintyHead`` (upstream's ``logvar`` module, keys ``logvar.0.freqs``, ``logvar.0.phases``, ``logvar.1.weight``):
  u(c_noise) = Linear(128->1, no bias)(sqrt(2) * cos(c_noise * freqs + phases)).
* ``edm_loss``: mean over elements of lambda * (x0 - D)^2 * exp(-u) + u.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EDMScaling:
    """Preconditioning with ``sigma_data`` (0.5 for Cosmos). All methods take sigma [...] and broadcast."""

    sigma_data: float = 0.5

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (c_skip, c_out, c_in, c_noise), each shaped like sigma."""
        sd2 = self.sigma_data**2
        denom = sigma**2 + sd2
        c_skip = sd2 / denom
        c_out = sigma * self.sigma_data / denom.sqrt()
        c_in = 1.0 / denom.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def sample_sigma(batch_size: int, *, p_mean: float = 0.0, p_std: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """Training noise levels [B] float32: ``exp(p_mean + p_std * N(0, 1))``.

    Upstream draws through ``NormalDist.inv_cdf`` of numpy uniforms from the global numpy RNG; the distribution is
    the same, the stream differs (we use a torch generator so that data-parallel ranks can be seeded apart).
    """
    z = torch.randn(batch_size, generator=generator, dtype=torch.float64, device="cpu" if generator is None
                    else generator.device)
    return torch.exp(p_mean + p_std * z).to(device=device, dtype=torch.float32)


class FourierFeatures(nn.Module):
    """``gain * cos(x * freqs + phases)`` with fixed random buffers (persistent: they are in the checkpoint).

    freqs = 2*pi*bandwidth*N(0,1), phases = 2*pi*U(0,1); gain sqrt(2) when ``normalize``. x [B] -> [B, C] in x's dtype.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0, normalize: bool = False,
                 generator: torch.Generator | None = None, device=None) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels, generator=generator).to(device))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=generator).to(device))
        self.gain = math.sqrt(2.0) if normalize else 1.0

    def forward(self, x: Tensor) -> Tensor:
        arg = torch.outer(x.reshape(-1).float(), self.freqs.float()) + self.phases.float()
        return (arg.cos() * self.gain).to(x.dtype)


class UncertaintyHead(nn.Sequential):
    """Upstream's ``logvar``: ``Sequential(FourierFeatures(128, normalize=True), Linear(128, 1, bias=False))``.

    c_noise [B] -> u [B, 1]. Kept in fp32 by ``DiffusionModel`` (tiny, and its output enters exp()).
    """

    def __init__(self, num_channels: int = 128, generator: torch.Generator | None = None, device=None) -> None:
        super().__init__(FourierFeatures(num_channels, normalize=True, generator=generator, device=device),
                         nn.Linear(num_channels, 1, bias=False, device=device))


def edm_loss(x0: Tensor, denoised: Tensor, sigma: Tensor, logvar: Tensor | None, scaling: EDMScaling) -> dict[str, Tensor]:
    """The training loss (``loss_add_logvar=True``, mean reduction, weight 1, mask 1).

    x0, denoised [B, ...]; sigma [B]; logvar [B, 1] or None. Computed in fp32. Returns ``loss`` (scalar),
    ``mse`` (mean (x0-D)^2), ``edm`` (mean lambda*(x0-D)^2) and ``per_sample`` [B] (the loss per sample).
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x0f, df = x0.float(), denoised.float()
    sig = sigma.float().reshape(shape)
    mse = (x0f - df) ** 2
    weighted = scaling.loss_weight(sig) * mse
    if logvar is not None:
        u = logvar.float().reshape(shape)
        kendall = weighted * torch.exp(-u) + u
    else:
        kendall = weighted
    return {
        "loss": kendall.mean(),
        "mse": mse.mean().detach(),
        "edm": weighted.mean().detach(),
        "per_sample": kendall.flatten(1).mean(1).detach(),
    }
