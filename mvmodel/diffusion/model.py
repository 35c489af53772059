"""``DiffusionModel``: the DiT plus the uncertainty head, with EDM denoising and the training loss (§7).

Its ``state_dict()`` has exactly the checkpoint's keys, ``net.*`` and ``logvar.*`` (§4.3, §8.5), so
``torch.save(model.state_dict())`` writes an upstream-loadable ``*_model.pt`` and ``load_cosmos_checkpoint`` reads
the release into it.

Shapes: latents x0 [B, 16, V*T, H, W] (already scaled by sigma_data, as upstream's encode does); sigma [B].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..networks import MultiviewDiT
from .conditioning import Condition
from .edm import EDMScaling, UncertaintyHead, edm_loss, sample_sigma
from .video2world import VideoCondition


@dataclass
class DenoisePrediction:
    x0: Tensor      # D(x_sigma), [B, C, T, H, W], float32
    eps: Tensor     # (x_sigma - D) / sigma
    logvar: Tensor  # u(c_noise) [B, 1], float32
    net_output: Tensor  # F_theta, in the net's dtype


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class DiffusionModel(nn.Module):
    """net (``MultiviewDiT``) + logvar (``UncertaintyHead``); EDM with ``sigma_data`` (0.5).

    ``p_mean``/``p_std``: training ln-sigma distribution (0, 1 in upstream). The uncertainty head stays fp32.
    """

    def __init__(self, net: MultiviewDiT, *, sigma_data: float = 0.5, p_mean: float = 0.0, p_std: float = 1.0,
                 logvar_channels: int = 128, logvar_seed: int = 0, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.net = net
        # The dtype the net computes in (bf16 upstream). None: the patch-embedding weight's dtype; set it explicitly
        # when FSDP2 mixed precision keeps fp32 master weights but runs the net in bf16.
        self.compute_dtype = compute_dtype
        gen = torch.Generator().manual_seed(logvar_seed)
        device = next(net.parameters()).device
        # Real even for a meta-built net: 384 numbers whose random buffers must not be lost to to_empty().
        self.logvar = UncertaintyHead(logvar_channels, generator=gen, device=None if device.type == "meta" else device)
        self.scaling = EDMScaling(sigma_data)
        self.p_mean, self.p_std = p_mean, p_std

    @property
    def net_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.net.x_embedder.proj[1].weight.dtype

    def denoise(self, x_sigma: Tensor, sigma: Tensor, condition: Condition,
                video: VideoCondition | None = None) -> DenoisePrediction:
        """D(x_sigma) = c_skip x_sigma + c_out F(c_in x_sigma, c_noise, cond).

        As upstream, sigma and the net input are rounded to the net's dtype before use; the skip combination is
        done in fp32 (upstream does it in bf16). ``video`` (Video2World training, upstream's
        ``ExtendDiffusionModel.denoise``): the condition region's input is the augmented condition latent, the
        mask channel is fed to the net, and x0 is replaced by the condition latent there; eps stays relative to
        the noisy x_sigma, as upstream.
        """
        dt = self.net_dtype
        sigma = sigma.reshape(-1).to(dt).float()
        if sigma.numel() != x_sigma.shape[0]:
            raise ValueError(f"sigma must have one value per sample ({x_sigma.shape[0]}), got {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        x_noisy = x_sigma.to(dt).float()
        xf = x_noisy
        if video is not None:
            condition = dataclasses.replace(condition, condition_video_input_mask=video.input_mask().to(dt))
            xf = video.compose(x_noisy, sigma).to(dt).float()
        out = self.net((xf * _bcast(c_in, xf)).to(dt), c_noise.to(dt), **condition.to_kwargs())
        x0 = _bcast(c_skip, xf) * xf + _bcast(c_out, xf) * out.float()
        if video is not None:
            x0 = video.replace_x0(x0)
        eps = (x_noisy - x0) / _bcast(sigma, xf)
        logvar = self.logvar(c_noise.to(dt).float())
        return DenoisePrediction(x0, eps, logvar, out)

    def training_loss(self, x0: Tensor, condition: Condition, *, sigma: Tensor | None = None,
                      epsilon: Tensor | None = None, generator: torch.Generator | None = None,
                      video: VideoCondition | None = None) -> dict[str, Tensor]:
        """One EDM training loss: x_sigma = x0 + sigma * eps; returns ``edm_loss``'s dict plus ``sigma``.

        ``sigma`` [B] and ``epsilon`` (x0's shape) are drawn from ``generator`` when not given; ``video``: the
        Video2World condition (``mvmodel.diffusion.video2world.training_condition``).
        """
        B = x0.shape[0]
        if sigma is None:
            sigma = sample_sigma(B, p_mean=self.p_mean, p_std=self.p_std, generator=generator, device=x0.device)
        if epsilon is None:
            gen_dev = "cpu" if generator is None else generator.device
            epsilon = torch.randn(x0.shape, generator=generator, device=gen_dev, dtype=torch.float32).to(x0.device)
        if epsilon.shape != x0.shape:
            raise ValueError(f"epsilon shape {tuple(epsilon.shape)} != x0 shape {tuple(x0.shape)}")
        sigma = sigma.to(x0.device).float().reshape(B)
        x_sigma = x0.float() + _bcast(sigma, x0) * epsilon.float()
        pred = self.denoise(x_sigma, sigma, condition, video)
        out = edm_loss(x0, pred.x0, sigma.to(self.net_dtype).float(), pred.logvar, self.scaling)
        out["sigma"] = sigma.detach()
        out["logvar"] = pred.logvar.detach().reshape(B)
        return out


class Denoiser:
    """What samplers call: ``D(x, sigma, cond)`` -> x0 estimate (float32), with classifier-free guidance.

    ``guided(x, sigma, cond, uncond, g)`` = D_c + g (D_c - D_u), which equals upstream's guidance on the net output
    F_c + g (F_c - F_u) because D is affine in F (§7.4).
    """

    def __init__(self, net: MultiviewDiT, sigma_data: float = 0.5) -> None:
        self.net = net
        self.scaling = EDMScaling(sigma_data)

    def _forward(self, x: Tensor, sigma: Tensor, conds: list[Condition]) -> list[Tensor]:
        dt = self.net.x_embedder.proj[1].weight.dtype
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B).to(dt).float()
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        xf = x.to(dt).float()
        x_in = (xf * _bcast(c_in, xf)).to(dt)
        outs = []
        for cond in conds:
            f = self.net(x_in, c_noise.to(dt), **cond.to_kwargs()).float()
            outs.append(_bcast(c_skip, xf) * xf + _bcast(c_out, xf) * f)
        return outs

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma: Tensor | float, condition: Condition) -> Tensor:
        return self._forward(x, sigma, [condition])[0]

    @torch.no_grad()
    def guided(self, x: Tensor, sigma: Tensor | float, condition: Condition, uncondition: Condition | None,
               guidance: float) -> Tensor:
        if uncondition is None or guidance == 0:
            return self(x, sigma, condition)
        d_c, d_u = self._forward(x, sigma, [condition, uncondition])
        return d_c + guidance * (d_c - d_u)
