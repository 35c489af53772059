"""Common interface of the video tokenizers: chunked, normalised, per-view encode/decode (cosmos-multiview.md §3).

Pixels are float in [-1, 1], [B, 3, T, H, W]; latents are [B, 16, T', H/8, W/8] with the causal time rule
T' = 1 + (T - 1)/8 per chunk. The time axis is cut into chunks of ``pixel_chunk_duration`` frames (57 for the
multi-view configs), each encoded independently (``(b n) c t h w``) in sub-batches of at most
``max_enc_batch_size``; decoding cuts latents into chunks of ``latent_chunk_duration`` frames, sub-batches of at
most ``max_dec_batch_size``. Normalisation as upstream: z = (E(x) - mean) / std, x = D(z * std + mean), with
mean/std [1, 16, latent_chunk_duration, 1, 1] (per channel and per latent frame within a chunk).

Multi-view: ``encode_views`` rearranges ``B C (V T) H W -> (B V) C T H W``, encodes, and puts views back along
time. The diffusion model multiplies latents by sigma_data (0.5) after encoding; that is not done here.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn


class VideoTokenizer(nn.Module):
    """Subclasses implement ``encode_chunk`` / ``decode_chunk`` (raw, un-normalised) on [N, C, t, H, W]."""

    latent_channels = 16
    spatial_compression = 8
    temporal_compression = 8

    def __init__(self, pixel_chunk_duration: int = 57, max_enc_batch_size: int = 8, max_dec_batch_size: int = 4,
                 mean: Tensor | None = None, std: Tensor | None = None) -> None:
        super().__init__()
        if pixel_chunk_duration < 1 or (pixel_chunk_duration - 1) % self.temporal_compression:
            raise ValueError(f"pixel_chunk_duration={pixel_chunk_duration} must be 1 + a multiple of "
                             f"{self.temporal_compression} (causal tokenizer), e.g. 57 or 121")
        self.pixel_chunk_duration = pixel_chunk_duration
        self.latent_chunk_duration = 1 + (pixel_chunk_duration - 1) // self.temporal_compression
        self.max_enc_batch_size, self.max_dec_batch_size = max_enc_batch_size, max_dec_batch_size
        C, Tl = self.latent_channels, self.latent_chunk_duration
        mean = torch.zeros(C, Tl) if mean is None else mean
        std = torch.ones(C, Tl) if std is None else std
        self.register_buffer("mean", self._stat(mean, "mean"), persistent=False)
        self.register_buffer("std", self._stat(std, "std"), persistent=False)

    def _stat(self, t: Tensor, name: str) -> Tensor:
        """Upstream: view as [16, -1], keep the first latent_chunk_duration columns -> [1, 16, Tl, 1, 1]."""
        C, Tl = self.latent_channels, self.latent_chunk_duration
        t = torch.as_tensor(t).float()
        if t.numel() % C or t.numel() // C < Tl:
            raise ValueError(f"tokenizer {name} has {t.numel()} values: need 16 x n with n >= {Tl} "
                             f"(latent frames per {self.pixel_chunk_duration}-frame chunk)")
        return t.reshape(C, -1)[:, :Tl].reshape(1, C, Tl, 1, 1)

    # ---- to implement
    def encode_chunk(self, x: Tensor) -> Tensor:  # [N, 3, Tc, H, W] -> [N, 16, Tl, H/8, W/8]
        raise NotImplementedError

    def decode_chunk(self, z: Tensor) -> Tensor:  # [N, 16, Tl, h, w] -> [N, 3, Tc, 8h, 8w]
        raise NotImplementedError

    def export_torchscript(self, directory: str | os.PathLike) -> None:
        """Write ``encoder.jit``, ``decoder.jit`` (the subclass's ``encoder`` / ``decoder`` modules, scripted) and
        ``mean_std.pt`` (a (mean, std) tuple of [16, latent frames]) in upstream's checkpoint layout."""
        os.makedirs(directory, exist_ok=True)
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is upstream's file format
            warnings.filterwarnings("ignore", message=r".*torch\.jit")  # Deprecation- or FutureWarning by release
            torch.jit.script(self.encoder).save(os.path.join(directory, "encoder.jit"))
            torch.jit.script(self.decoder).save(os.path.join(directory, "decoder.jit"))
        mean = self.mean.reshape(self.latent_channels, -1).clone()
        std = self.std.reshape(self.latent_channels, -1).clone()
        torch.save((mean, std), os.path.join(directory, "mean_std.pt"))

    # ---- shapes
    def latent_num_frames(self, num_pixel_frames: int) -> int:
        if num_pixel_frames % self.pixel_chunk_duration:
            raise ValueError(f"{num_pixel_frames} frames is not a multiple of pixel_chunk_duration="
                             f"{self.pixel_chunk_duration}")
        return num_pixel_frames // self.pixel_chunk_duration * self.latent_chunk_duration

    def pixel_num_frames(self, num_latent_frames: int) -> int:
        if num_latent_frames % self.latent_chunk_duration:
            raise ValueError(f"{num_latent_frames} latent frames is not a multiple of latent_chunk_duration="
                             f"{self.latent_chunk_duration}")
        return num_latent_frames // self.latent_chunk_duration * self.pixel_chunk_duration

    # ---- chunked, normalised encode / decode
    @staticmethod
    def _chunk(x: Tensor, length: int) -> Tensor:
        B, C, T, H, W = x.shape
        n = T // length
        return x.reshape(B, C, n, length, H, W).permute(0, 2, 1, 3, 4, 5).reshape(B * n, C, length, H, W)

    @staticmethod
    def _unchunk(x: Tensor, batch: int) -> Tensor:
        Bn, C, t, H, W = x.shape
        n = Bn // batch
        return x.reshape(batch, n, C, t, H, W).permute(0, 2, 1, 3, 4, 5).reshape(batch, C, n * t, H, W)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1] (T a multiple of pixel_chunk_duration, H and W multiples of 8) -> latents."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        self.latent_num_frames(T)
        s = self.spatial_compression
        if H % s or W % s:
            raise ValueError(f"video size {H}x{W} must be divisible by {s}")
        chunks = self._chunk(video, self.pixel_chunk_duration)
        outs = [self.encode_chunk(chunks[i:i + self.max_enc_batch_size])
                for i in range(0, chunks.shape[0], self.max_enc_batch_size)]
        z = torch.cat(outs)
        z = (z - self.mean.to(z)) / self.std.to(z)
        return self._unchunk(z, B)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """[B, 16, T', h, w] (T' a multiple of latent_chunk_duration) -> [B, 3, T, 8h, 8w] in about [-1, 1]."""
        if latent.dim() != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, T, h, w], got {tuple(latent.shape)}")
        B = latent.shape[0]
        self.pixel_num_frames(latent.shape[2])
        chunks = self._chunk(latent, self.latent_chunk_duration)
        chunks = chunks * self.std.to(chunks) + self.mean.to(chunks)
        outs = [self.decode_chunk(chunks[i:i + self.max_dec_batch_size])
                for i in range(0, chunks.shape[0], self.max_dec_batch_size)]
        return self._unchunk(torch.cat(outs), B)

    @staticmethod
    def _views_to_batch(x: Tensor, n_views: int) -> Tensor:
        B, C, VT, H, W = x.shape
        if VT % n_views:
            raise ValueError(f"time axis {VT} is not divisible by n_views={n_views}")
        return x.reshape(B, C, n_views, VT // n_views, H, W).transpose(1, 2).reshape(B * n_views, C, VT // n_views, H, W)

    @staticmethod
    def _batch_to_views(x: Tensor, n_views: int) -> Tensor:
        BV, C, T, H, W = x.shape
        return x.reshape(BV // n_views, n_views, C, T, H, W).transpose(1, 2).reshape(BV // n_views, C, n_views * T, H, W)

    def encode_views(self, video: Tensor, n_views: int) -> Tensor:
        """[B, 3, V*T, H, W] (views along time, view-major) -> [B, 16, V*T', H/8, W/8]."""
        return self._batch_to_views(self.encode(self._views_to_batch(video, n_views)), n_views)

    def decode_views(self, latent: Tensor, n_views: int) -> Tensor:
        """[B, 16, V*T', h, w] -> [B, 3, V*T, 8h, 8w]."""
        return self._batch_to_views(self.decode(self._views_to_batch(latent, n_views)), n_views)
