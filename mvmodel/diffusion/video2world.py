"""Video2World conditioning of the multi-view DiT: the first latent frames of every view are given (upstream's
``DiffusionMultiviewV2WModel`` for sampling, ``ExtendDiffusionModel`` for training; upstream-more.md §2).

Shapes: latents [B, 16, V*T, h, w] (views concatenated in time, view-major); ``indicator`` [B, 1, V*T, 1, 1] is 1
on the first ``num_condition_t`` latent frames of EACH view; the net's extra input channel
``condition_video_input_mask`` [B, 1, V*T, h, w] is the indicator broadcast (zeros where the condition is dropped).

Sampling, each step at noise level sigma (``VideoCondition.compose`` / ``replace_output``):

* ``aug = gt + sigma_aug * n`` with a FIXED noise n (upstream: ``arch_invariant_rand(seed)``, a numpy
  ``RandomState(seed).standard_normal`` in float32) and ``sigma_aug = 0.001``;
* ``x_in = ind * aug * c_in(sigma_aug) / c_in(sigma) + (1 - ind) * x_t`` (the net multiplies by c_in(sigma), so it
  sees ``aug * c_in(sigma_aug)`` in the condition region);
* after guidance, ``F = ind * (gt - c_skip x_in) / c_out + (1 - ind) * F``: the x0 estimate equals gt there;
* once ``sigma <= sigma_aug`` the indicator is zero (the last step denoises every frame); the input mask stays;
* the Euler step starts from x_in (upstream's ``scheduler.step(..., new_xt)``);
* the unconditional branch keeps the condition frames and mask: guidance differs only in the text.

Training (``training_composition``): per sample ``num_condition_t`` in [0, max] (the same in every view),
``sigma_aug = exp(N(p_mean, p_std))`` (upstream -3, 2), fresh noise; with probability ``condition_dropout`` the
sample is unconditional: the condition region's input is zeroed and so is its mask (upstream's
``zero_condition_region_condition_mask``); the prediction is replaced by gt in the region (no loss there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .edm import EDMScaling

DEFAULT_AUGMENT_SIGMA = 0.001  # upstream's inference_utils.DEFAULT_AUGMENT_SIGMA


def latent_frames_of_input(num_input_frames: int) -> int:
    """Conditioning latent frames per view for ``--num_input_frames`` (upstream's compute_num_latent_frames: the
    causal tokenizer maps frame 0 to latent 0 and each following 8 frames to one more latent)."""
    if num_input_frames < 1:
        raise ValueError(f"--num_input_frames {num_input_frames}: must be >= 1")
    return 1 + (num_input_frames - 1 + 7) // 8


def condition_indicator(n_views: int, t_per_view: int, num_condition_t: Tensor | int, batch: int = 1,
                        device=None, dtype=torch.float32) -> Tensor:
    """[B, 1, V*T, 1, 1]: 1 on the first ``num_condition_t`` (int or [B] ints) latent frames of every view."""
    n = torch.as_tensor(num_condition_t, device=device).reshape(-1).expand(batch)
    if int(n.max()) > t_per_view or int(n.min()) < 0:
        raise ValueError(f"num_condition_t {n.tolist()} must be within 0..{t_per_view} latent frames per view")
    t = torch.arange(t_per_view, device=device)
    ind = (t[None, :] < n[:, None]).to(dtype)  # [B, T]
    return ind[:, None, :].expand(batch, n_views, t_per_view).reshape(batch, 1, n_views * t_per_view, 1, 1)


def arch_invariant_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """Upstream's ``misc.arch_invariant_rand``: numpy ``RandomState(seed).standard_normal`` as float32, the same
    numbers on every machine and device."""
    return torch.from_numpy(np.random.RandomState(int(seed)).standard_normal(shape).astype(np.float32))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass
class VideoCondition:
    """The condition latents of one generation or training batch.

    gt [B, 16, V*T, h, w] (x sigma_data, the diffusion data space); indicator [B, 1, V*T, 1, 1];
    augment_sigma [B]; noise like gt; keep [B] (False: the condition is dropped, the unconditional training case).
    """

    gt: Tensor
    indicator: Tensor
    augment_sigma: Tensor
    noise: Tensor
    keep: Tensor | None = None
    scaling: EDMScaling = EDMScaling(0.5)

    def input_mask(self) -> Tensor:
        """The net's condition-mask channel [B, 1, V*T, h, w] (zeros for a dropped condition)."""
        m = self.indicator.expand(-1, 1, -1, *self.gt.shape[-2:])
        if self.keep is not None:
            m = m * _bcast(self.keep.to(m.dtype), m)
        return m

    def active_indicator(self, sigma: Tensor) -> Tensor:
        """The indicator at noise level ``sigma`` [B]: zero once sigma <= sigma_aug (upstream's inference trick:
        the last steps denoise the condition region too)."""
        on = (sigma.reshape(-1).float() > self.augment_sigma.reshape(-1).float()).to(self.indicator.dtype)
        return self.indicator * _bcast(on, self.indicator)

    def compose(self, x_t: Tensor, sigma: Tensor, indicator: Tensor | None = None) -> Tensor:
        """The net input before c_in: ``ind * aug * c_in(sigma_aug) / c_in(sigma) + (1 - ind) * x_t`` (fp32)."""
        ind = self.indicator if indicator is None else indicator
        sigma = sigma.reshape(-1).float().to(x_t.device)
        s_aug = self.augment_sigma.reshape(-1).float().to(x_t.device)
        aug = self.gt.float() + _bcast(s_aug, self.gt) * self.noise.float()
        _, _, c_in_aug, _ = self.scaling(s_aug)
        _, _, c_in, _ = self.scaling(sigma)
        aug = aug * _bcast(c_in_aug / c_in, aug)
        if self.keep is not None:  # dropped condition: the region's input is zero
            aug = aug * _bcast(self.keep.to(aug.dtype), aug)
        return ind * aug + (1 - ind) * x_t.float()

    def replace_output(self, f: Tensor, x_in: Tensor, sigma: Tensor, indicator: Tensor) -> Tensor:
        """Net output F with the condition region replaced by ``(gt - c_skip x_in) / c_out``, so that the x0
        estimate ``c_skip x_in + c_out F`` equals gt there (upstream's ``_reverse_precondition_output``)."""
        c_skip, c_out, _, _ = self.scaling(sigma.reshape(-1).float().to(f.device))
        target = (self.gt.float() - _bcast(c_skip, x_in) * x_in.float()) / _bcast(c_out, x_in)
        return indicator * target + (1 - indicator) * f.float()

    def replace_x0(self, x0: Tensor) -> Tensor:
        """x0 estimate with gt in the condition region (training: no loss there, as upstream's default)."""
        return self.indicator * self.gt.float() + (1 - self.indicator) * x0


def inference_condition(gt: Tensor, n_views: int, num_condition_t: int, seed: int,
                        augment_sigma: float = DEFAULT_AUGMENT_SIGMA) -> VideoCondition:
    """The sampling condition: ``gt`` [1, 16, V*T, h, w] holds the encoded input frames (zero-padded video)."""
    B, _, VT, _, _ = gt.shape
    if VT % n_views:
        raise ValueError(f"condition latent has {VT} frames, not a multiple of n_views={n_views}")
    ind = condition_indicator(n_views, VT // n_views, num_condition_t, B, gt.device)
    return VideoCondition(gt.float(), ind, torch.full((B,), float(augment_sigma), device=gt.device),
                          arch_invariant_noise(tuple(gt.shape), seed).to(gt.device))


def training_condition(x0: Tensor, n_views: int, *, max_condition_t: int = 2, p_mean: float = -3.0,
                       p_std: float = 2.0, dropout: float = 0.2, generator: torch.Generator | None = None,
                       num_condition_t: Tensor | None = None) -> VideoCondition:
    """A training batch's condition: per sample 0..``max_condition_t`` latent frames (same in every view),
    sigma_aug = exp(N(p_mean, p_std)), fresh N(0, 1) noise, dropped with probability ``dropout``."""
    B, _, VT, _, _ = x0.shape
    T = VT // n_views
    if not 0 <= max_condition_t <= T:
        raise ValueError(f"max_condition_t={max_condition_t} must be within 0..{T} latent frames per view")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"condition dropout rate must be in [0, 1], got {dropout}")
    gdev = "cpu" if generator is None else generator.device
    if num_condition_t is None:
        num_condition_t = torch.randint(0, max_condition_t + 1, (B,), generator=generator, device=gdev)
    s_aug = torch.exp(p_mean + p_std * torch.randn(B, generator=generator, device=gdev, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32)
    keep = torch.rand(B, generator=generator, device=gdev) >= dropout
    dev = x0.device
    ind = condition_indicator(n_views, T, num_condition_t.to(dev), B, dev)
    return VideoCondition(x0.float(), ind, s_aug.float().to(dev), noise.to(dev), keep.to(dev))
