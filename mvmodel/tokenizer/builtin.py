"""A weight-free tokenizer with the real tokenizer's interface and shapes: 8x8 space-to-depth + causal 8x time.

Each latent voxel covers one 8x8 pixel patch and one causal time group (frame 0 alone, then groups of 8
frames, as the causal tokenizer: T' = 1 + (T - 1)/8). Its 16 channels are fixed orthonormal projections of the
3x8x8 patch, averaged over the group: colour goes through an orthonormal luma/chroma transform, space through
the orthonormal 8x8 DCT-II, keeping the 10 lowest-frequency luma and 3 lowest of each chroma coefficients.

Exact properties (tested): ``encode(decode(z)) == z``; ``decode(encode(x)) == x`` for every clip in the span of
the kept basis (e.g. piecewise-constant videos on the 8x8x8 grid); decode(encode(x)) is the orthogonal
projection of x otherwise. ``export_torchscript`` writes ``encoder.jit``, ``decoder.jit`` and ``mean_std.pt`` in
upstream's checkpoint format, so the TorchScript loader can be exercised without the real weights.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor, nn

from .base import VideoTokenizer

# (colour row, u, v): 10 luma + 3 + 3 chroma low-frequency DCT coefficients = 16 channels.
_COEFFS = ([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 0, 2), (0, 2, 0), (0, 1, 2), (0, 2, 1), (0, 2, 2),
            (0, 0, 3)] + [(1, 0, 0), (1, 0, 1), (1, 1, 0)] + [(2, 0, 0), (2, 0, 1), (2, 1, 0)])


def space_to_depth_basis(patch: int = 8) -> Tensor:
    """[16, 3, patch, patch] float64 with orthonormal rows (over the 3*patch*patch values)."""
    colour = torch.tensor([[1, 1, 1], [-1, 0, 1], [1, -2, 1]], dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    n = torch.arange(patch, dtype=torch.float64)
    k = torch.arange(patch, dtype=torch.float64)[:, None]
    dct = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * patch)) * math.sqrt(2.0 / patch)
    dct[0] /= math.sqrt(2.0)  # [patch (freq), patch (pos)], orthonormal rows
    rows = [colour[c][:, None, None] * (dct[u][:, None] * dct[v][None, :])[None] for c, u, v in _COEFFS]
    return torch.stack(rows)


class _Encoder(nn.Module):
    """[N, 3, 1+8k, H, W] -> (latent [N, 16, 1+k, H/8, W/8],); TorchScript-able, returns a tuple like upstream's."""

    def __init__(self, basis: Tensor, tc: int) -> None:
        super().__init__()
        self.register_buffer("basis", basis.float())
        self.p = int(basis.shape[-1])
        self.tc = tc

    def forward(self, x: Tensor) -> tuple[Tensor]:
        N, C, T, H, W = x.shape
        p, tc = self.p, self.tc
        first = x[:, :, :1]
        rest = x[:, :, 1:].reshape(N, C, (T - 1) // tc, tc, H, W).mean(3)
        g = torch.cat([first, rest], dim=2)  # [N, 3, T', H, W]
        g = g.reshape(N, C, g.shape[2], H // p, p, W // p, p)
        z = torch.einsum("nctiyjx,kcyx->nktij", g.to(self.basis.dtype), self.basis) / p
        return (z.to(x.dtype),)


class _Decoder(nn.Module):
    """[N, 16, 1+k, h, w] -> [N, 3, 1+8k, 8h, 8w]; the adjoint of the encoder (replicates groups over time)."""

    def __init__(self, basis: Tensor, tc: int) -> None:
        super().__init__()
        self.register_buffer("basis", basis.float())
        self.p = int(basis.shape[-1])
        self.tc = tc

    def forward(self, z: Tensor) -> Tensor:
        N, K, Tl, h, w = z.shape
        p, tc = self.p, self.tc
        g = torch.einsum("nktij,kcyx->nctiyjx", z.to(self.basis.dtype), self.basis) * p
        g = g.reshape(N, 3, Tl, h * p, w * p)
        rest = g[:, :, 1:, None].expand(N, 3, Tl - 1, tc, h * p, w * p).reshape(N, 3, (Tl - 1) * tc, h * p, w * p)
        return torch.cat([g[:, :, :1], rest], dim=2).to(z.dtype)


class SpaceToDepthTokenizer(VideoTokenizer):
    """Weight-free stand-in for Cosmos-Tokenize1-CV8x8x8 (same latent shape and causal time grouping)."""

    def __init__(self, pixel_chunk_duration: int = 57, max_enc_batch_size: int = 8, max_dec_batch_size: int = 4) -> None:
        super().__init__(pixel_chunk_duration, max_enc_batch_size, max_dec_batch_size)
        basis = space_to_depth_basis(self.spatial_compression)
        self.encoder = _Encoder(basis, self.temporal_compression)
        self.decoder = _Decoder(basis, self.temporal_compression)

    def encode_chunk(self, x: Tensor) -> Tensor:
        return self.encoder(x)[0]

    def decode_chunk(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def export_torchscript(self, directory: str | os.PathLike) -> None:
        """Write ``encoder.jit``, ``decoder.jit`` and ``mean_std.pt`` (a (mean, std) tuple) in upstream's layout."""
        os.makedirs(directory, exist_ok=True)
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is upstream's file format
            warnings.filterwarnings("ignore", message=r".*torch\.jit")  # Deprecation- or FutureWarning by release
            torch.jit.script(self.encoder).save(os.path.join(directory, "encoder.jit"))
            torch.jit.script(self.decoder).save(os.path.join(directory, "decoder.jit"))
        mean = self.mean.reshape(self.latent_channels, -1).clone()
        std = self.std.reshape(self.latent_channels, -1).clone()
        torch.save((mean, std), os.path.join(directory, "mean_std.pt"))
