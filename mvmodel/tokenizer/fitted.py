"""A linear tokenizer fitted to a dataset: PCA of its 8x8x8 patches, with the built-in one's latent shapes.

The built-in DCT tokenizer (``builtin.py``) keeps 16 fixed low-frequency coefficients of each 8x8 patch averaged
over each group of 8 frames, so its videos are 8x8 blocks that stand still for 8 frames. Here the 16 latent
channels of a voxel are instead the 16 principal components of the dataset's spatio-temporal patches:

* the causal first latent frame: PCA of the 3x8x8 patches of a chunk's first frame (192 values);
* every later latent frame: PCA of the 3x8x8x8 patches of its 8-frame group (1536 values), so a component can be
  "a pole edge moving right" and the decoded group moves frame by frame instead of repeating one picture;
* the decoder: a least-squares fit of each patch from the latents of its 3x3 neighbourhood (a 3x3 convolution
  and pixel shuffle), which removes most of the block edges a per-patch inverse leaves; fitted for slightly wrong
  latents (:data:`LATENT_NOISE`), so a sample's latent errors do not turn into grain.

The encoder is a strided convolution (weights = components, bias = -components . patch mean), the decoder a
convolution; both are TorchScript-able, so ``export_torchscript`` writes the same ``encoder.jit`` / ``decoder.jit``
folder as the real tokenizer's and :class:`~mvmodel.tokenizer.JITVideoTokenizer` loads it. The fitted arrays are
also written to ``basis.npz`` (numpy's documented zip-of-.npy format; names and shapes in :data:`NPZ_ARRAYS`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import VideoTokenizer

P, TC, K = 8, 8, 16  # spatial patch, temporal group, latent channels (the upstream CV8x8x8 tokenizer's)
# basis.npz: name -> shape. enc_*: encoder conv weights (rows = principal components, largest first) and biases;
# dec_*: decoder conv weights (one 3x3 latent neighbourhood -> one patch) and biases (patch values, pixel order
# colour, [time,] row, column; pixels in [-1, 1]).
NPZ_ARRAYS = {"enc_first_weight": (K, 3, P, P), "enc_first_bias": (K,),
              "enc_group_weight": (K, 3, TC, P, P), "enc_group_bias": (K,),
              "dec_first_weight": (3 * P * P, K, 3, 3), "dec_first_bias": (3 * P * P,),
              "dec_group_weight": (3 * TC * P * P, K, 1, 3, 3), "dec_group_bias": (3 * TC * P * P,)}


# The decoder is fitted for latents carrying errors of 0.4x each channel's std, as a sampled latent does. A plain
# least-squares decoder (0) turns such errors into grain: the demo's sample (300 steps) had 1.43-1.85x the real
# clips' neighbour-pixel detail per camera with 0, 0.98-1.28x with 0.3 (the test's limit is 1.3x); the same latents
# re-decoded with 0.4 have ~0.05 less. Reference-clip PSNR: 24.9 dB with 0, 24.3 with 0.3, 23.9 with 0.4 (the DCT
# basis: 21.4 dB).
LATENT_NOISE = 0.4


class _Encoder(nn.Module):
    """[N, 3, 1+8k, H, W] -> (latent [N, 16, 1+k, H/8, W/8],), a tuple like upstream's encoder."""

    def __init__(self, w: dict[str, Tensor]) -> None:
        super().__init__()
        for name in ("enc_first_weight", "enc_first_bias", "enc_group_weight", "enc_group_bias"):
            self.register_buffer(name[4:], w[name].float())
        self.p, self.tc = P, TC  # attributes: TorchScript does not read module globals

    def forward(self, x: Tensor) -> tuple[Tensor]:
        p, tc = self.p, self.tc
        x = x.to(self.first_weight.dtype)
        first = F.conv2d(x[:, :, 0], self.first_weight, self.first_bias, stride=p)
        rest = F.conv3d(x[:, :, 1:], self.group_weight, self.group_bias, stride=(tc, p, p))
        return (torch.cat([first[:, :, None], rest], dim=2),)


class _Decoder(nn.Module):
    """[N, 16, 1+k, h, w] -> [N, 3, 1+8k, 8h, 8w]: each patch from the latents of its 3x3 neighbourhood."""

    def __init__(self, w: dict[str, Tensor]) -> None:
        super().__init__()
        for name in ("dec_first_weight", "dec_first_bias", "dec_group_weight", "dec_group_bias"):
            self.register_buffer(name[4:], w[name].float())
        self.p, self.tc = P, TC

    def forward(self, z: Tensor) -> Tensor:
        p, tc = self.p, self.tc
        N, _, Tl, h, w = z.shape
        z = z.to(self.first_weight.dtype)
        first = F.conv2d(z[:, :, 0], self.first_weight, self.first_bias, padding=1)  # [N, 3*8*8, h, w]
        first = first.reshape(N, 3, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(N, 3, 1, h * p, w * p)
        g = F.conv3d(z[:, :, 1:], self.group_weight, self.group_bias, padding=(0, 1, 1))  # [N, 3*8*8*8, k, h, w]
        g = g.reshape(N, 3, tc, p, p, Tl - 1, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return torch.cat([first, g.reshape(N, 3, (Tl - 1) * tc, h * p, w * p)], dim=2)


def _first_patches(x: Tensor) -> Tensor:
    """[N, 3, T, H, W] -> the first frame's patches [N*h*w, 3*8*8] (colour, row, column)."""
    N, C, _, H, W = x.shape
    f = x[:, :, 0].reshape(N, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
    return f.reshape(-1, C * P * P)


def _group_patches(x: Tensor) -> Tensor:
    """[N, 3, 1+8k, H, W] -> the 8-frame groups' patches [N*k*h*w, 3*8*8*8] (colour, time, row, column)."""
    N, C, T, H, W = x.shape
    g = x[:, :, 1:].reshape(N, C, (T - 1) // TC, TC, H // P, P, W // P, P).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return g.reshape(-1, C * TC * P * P)


def _components(s: Tensor, ss: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Top-16 principal components [16, D] (each signed so its largest entry is positive) and the mean [D]."""
    mean = s / n
    cov = ss / n - mean[:, None] * mean[None, :]
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    comp = vecs[:, -K:].flip(1).T.contiguous()
    sign = torch.sign(comp.gather(1, comp.abs().argmax(1, keepdim=True)))
    return comp * sign, mean


def _neighbourhood(z: Tensor) -> Tensor:
    """[N, 16, h, w] latents -> [N*h*w, 16*9 + 1] (zero outside the frame, as the decoder's padding; 1 = bias)."""
    N, _, h, w = z.shape
    u = F.unfold(z, 3, padding=1).transpose(1, 2).reshape(N * h * w, K * 9)
    return torch.cat([u, torch.ones(len(u), 1, dtype=u.dtype)], 1)


@torch.no_grad()
def fit_patch_basis(clips: Iterable[Tensor] | list[Tensor], latent_noise: float = LATENT_NOISE,
                    ridge: float = 1e-6) -> dict[str, Tensor]:
    """Fit the encoder and decoder on video chunks [N, 3, 1+8k, H, W] in [-1, 1] (iterated twice: PCA, then the
    decoder's least squares on the PCA latents, for latents off by ``latent_noise`` x each channel's std).
    Returns the float64 arrays of :data:`NPZ_ARRAYS`."""
    clips = list(clips)
    if not clips:
        raise ValueError("fit_patch_basis needs at least one clip")
    # Sums of x and x x^T (float64) instead of the patch matrix: a 480x848 dataset has millions of patches.
    acc = {"first": [0, 0, 0], "group": [0, 0, 0]}
    for x in clips:
        x = x.double()
        for name, p in (("first", _first_patches(x)), ("group", _group_patches(x))):
            a = acc[name]
            a[0], a[1], a[2] = a[0] + p.sum(0), a[1] + p.T @ p, a[2] + len(p)
    if acc["group"][2] == 0:
        raise ValueError("fit_patch_basis needs clips of at least 9 frames (one 8-frame group after the first)")
    w = {}
    for name, shape in (("first", (3, P, P)), ("group", (3, TC, P, P))):
        comp, mean = _components(*acc[name])
        w[f"enc_{name}_weight"], w[f"enc_{name}_bias"] = comp.reshape(K, *shape), -(comp @ mean)
    enc = _Encoder(w).double()  # its buffers went through float32: the decoder is fitted to the shipped encoder
    # Decoder: normal equations of patch ~ [3x3 latent neighbourhood, 1] @ W, accumulated over the clips.
    normal = {"first": [0, 0], "group": [0, 0]}
    for x in clips:
        x = x.double()
        z = enc(x)[0]
        N, _, Tl, h, wd = z.shape
        zg = z[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(N * (Tl - 1), K, h, wd)
        for name, feats, target in (("first", _neighbourhood(z[:, :, 0]), _first_patches(x)),
                                    ("group", _neighbourhood(zg), _group_patches(x))):
            a = normal[name]
            a[0], a[1] = a[0] + feats.T @ feats, a[1] + feats.T @ target
    for name, shape in (("first", (K, 3, 3)), ("group", (K, 1, 3, 3))):
        xtx, xty = normal[name]
        n = xtx[-1, -1]  # the bias feature is 1 per patch
        # Each channel's variance from the centre tap (feature k*9+4) and the bias column: E[z^2] - E[z]^2
        var = xtx.diagonal()[4:-1:9] / n - (xtx[4:-1:9, -1] / n) ** 2
        # Expected error of a latent channel = noise^2 x its variance on each of its 9 taps (a ridge per feature):
        # the decoder of a noisy-latent least-squares fit shrinks the directions the data pins down poorly
        noise = torch.cat([(latent_noise ** 2 * var)[:, None].expand(K, 9).reshape(-1), var.new_zeros(1)])
        lam = ridge * xtx.diagonal().mean()
        sol = torch.linalg.solve(xtx + torch.diag(n * noise + lam), xty)  # [145, D]
        # unfold's feature order is (channel, row, column) = a conv weight's [K, 3, 3] flattened
        w[f"dec_{name}_weight"] = sol[:-1].T.reshape(-1, *shape).contiguous()
        w[f"dec_{name}_bias"] = sol[-1].contiguous()
    return w


class FittedTokenizer(VideoTokenizer):
    """The fitted linear tokenizer behind the chunked, normalised, per-view interface (latents as the built-in's)."""

    def __init__(self, arrays: dict[str, Tensor | np.ndarray], pixel_chunk_duration: int = 57,
                 max_enc_batch_size: int = 8, max_dec_batch_size: int = 4) -> None:
        super().__init__(pixel_chunk_duration, max_enc_batch_size, max_dec_batch_size)
        w = {}
        for name, shape in NPZ_ARRAYS.items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = tuple(arrays[name].shape) if name in arrays else "missing"
                raise ValueError(f"fitted tokenizer array {name}: expected shape {shape}, got {got}")
            w[name] = torch.as_tensor(np.asarray(arrays[name]))
        self.encoder, self.decoder = _Encoder(w), _Decoder(w)

    @classmethod
    def fit(cls, clips: Iterable[Tensor], pixel_chunk_duration: int, **kwargs) -> "FittedTokenizer":
        return cls(fit_patch_basis(clips), pixel_chunk_duration, **kwargs)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, pixel_chunk_duration: int = 57, **kwargs) -> "FittedTokenizer":
        with np.load(path) as f:
            return cls(dict(f), pixel_chunk_duration, **kwargs)

    def arrays(self) -> dict[str, np.ndarray]:
        mods = {"enc": self.encoder, "dec": self.decoder}
        return {n: getattr(mods[n[:3]], n[4:]).detach().cpu().numpy() for n in NPZ_ARRAYS}

    def save_npz(self, path: str | os.PathLike) -> None:
        np.savez(Path(path), **self.arrays())

    def encode_chunk(self, x: Tensor) -> Tensor:
        return self.encoder(x)[0].to(x.dtype)

    def decode_chunk(self, z: Tensor) -> Tensor:
        return self.decoder(z).to(z.dtype)

    def export_torchscript(self, directory: str | os.PathLike) -> None:
        """``encoder.jit``, ``decoder.jit``, ``mean_std.pt`` (upstream's layout) and ``basis.npz``."""
        super().export_torchscript(directory)
        self.save_npz(Path(directory) / "basis.npz")


def reconstruction_psnr(tokenizer: VideoTokenizer, video: Tensor, n_views: int = 1) -> float:
    """PSNR (dB, peak-to-peak 2 of [-1, 1]) of decode(encode(video)) against video [B, 3, V*T, H, W]."""
    rec = tokenizer.decode_views(tokenizer.encode_views(video, n_views), n_views).clamp(-1, 1)
    mse = (rec.float() - video.float()).pow(2).mean()
    return float(10 * torch.log10(4.0 / mse))
