"""Building blocks of the multi-view DiT, named as upstream so that state-dict keys match (§4.2, §4.3).

Shapes: tokens ``x`` [B, S, D] (S = V*T*H*W in (v, t, h, w) order), conditioning ``emb`` [B, D] (the
RMS-normalised timestep sinusoid), ``adaln_lora`` [B, 3D] (shared by every sub-block), text ``context``
[B, V*M, Dc].
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention


class Timesteps(nn.Module):
    """Sinusoid of the noise level: ``[cos(t*f_k), sin(t*f_k)]``, f_k = exp(-ln(1e4) k / (C/2)); cos FIRST (§4.2.6).

    timesteps [B] -> [B, C] float32 (the caller casts to the model dtype, as upstream casts to the input's).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        arg = timesteps.reshape(-1, 1).float() * torch.exp(exponent)[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_2(SiLU(linear_1(s)))``. With AdaLN-LoRA it returns ``(s, mlp(s))``: the raw sinusoid is the
    conditioning vector and the MLP output [B, 3D] is the shared LoRA term. Without it, ``(mlp(s), None)``."""

    def __init__(self, dim: int, use_adaln_lora: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.use_adaln_lora = use_adaln_lora
        out = 3 * dim if use_adaln_lora else dim
        self.linear_1 = nn.Linear(dim, dim, bias=not use_adaln_lora, device=device, dtype=dtype)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, out, bias=not use_adaln_lora, device=device, dtype=dtype)

    def forward(self, sample: Tensor) -> tuple[Tensor, Tensor | None]:
        emb = self.linear_2(self.activation(self.linear_1(sample)))
        return (sample, emb) if self.use_adaln_lora else (emb, None)


class PatchRearrange(nn.Module):
    """``b c (t r) (h m) (w n) -> b t h w (c r m n)``: channel-major patch features (§4.2.3)."""

    def __init__(self, patch_spatial: int, patch_temporal: int) -> None:
        super().__init__()
        self.p, self.r = patch_spatial, patch_temporal

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        p, r = self.p, self.r
        x = x.reshape(B, C, T // r, r, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T // r, H // p, W // p, C * r * p * p)


class PatchEmbed(nn.Module):
    """[B, C, T, H, W] -> [B, T/r, H/p, W/p, D]; ``proj = Sequential(rearrange, Linear(C*r*p*p, D, no bias))``."""

    def __init__(self, in_channels: int, out_channels: int, patch_spatial: int, patch_temporal: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            PatchRearrange(patch_spatial, patch_temporal),
            nn.Linear(in_channels * patch_spatial * patch_spatial * patch_temporal, out_channels, bias=False,
                      device=device, dtype=dtype),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class GPT2FeedForward(nn.Module):
    """``layer2(GELU_erf(layer1(x)))``, no biases."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None) -> None:
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=False, device=device, dtype=dtype)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(d_ff, d_model, bias=False, device=device, dtype=dtype)
        self.layer1_lora = self.layer2_lora = None  # LoRA adapters (mvmodel.networks.lora), when targeted

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer1(x) if self.layer1_lora is None else self.layer1(x) + self.layer1_lora(x)
        h = self.activation(h)
        return self.layer2(h) if self.layer2_lora is None else self.layer2(h) + self.layer2_lora(h)


class VideoAttn(nn.Module):
    """Holds ``attn`` (the key prefix ``block.attn.*``); CA splits queries and text by view."""

    def __init__(self, x_dim: int, context_dim: int | None, num_heads: int, backend: str, device=None, dtype=None):
        super().__init__()
        self.attn = Attention(x_dim, context_dim, num_heads, x_dim // num_heads, backend, device=device, dtype=dtype)

    def forward(self, x: Tensor, context: Tensor | None, rope_angles: Tensor | None, n_views: int,
                connectivity: Any) -> Tensor:
        return self.attn(x, context, rope_angles, n_views=n_views, connectivity=connectivity)


def _adaln(dim: int, n_chunks: int, use_lora: bool, lora_dim: int, device, dtype) -> nn.Sequential:
    if use_lora:
        return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False, device=device, dtype=dtype),
                             nn.Linear(lora_dim, n_chunks * dim, bias=False, device=device, dtype=dtype))
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, n_chunks * dim, bias=False, device=device, dtype=dtype))


class DITBuildingBlock(nn.Module):
    """One sub-block: ``x + gate * Sub(LN(x) * (1 + scale) + shift)`` with (shift, scale, gate) from AdaLN(-LoRA).

    ``block_type`` is "fa" (self-attention + RoPE), "ca" (per-view text cross-attention) or "mlp".
    """

    def __init__(self, block_type: str, x_dim: int, context_dim: int, num_heads: int, mlp_ratio: float,
                 use_adaln_lora: bool, adaln_lora_dim: int, backend: str, device=None, dtype=None) -> None:
        super().__init__()
        block_type = {"full_attn": "fa", "cross_attn": "ca"}.get(block_type, block_type)
        self.block_type = block_type
        self.use_adaln_lora = use_adaln_lora
        if block_type == "fa":
            self.block = VideoAttn(x_dim, None, num_heads, backend, device, dtype)
        elif block_type == "ca":
            self.block = VideoAttn(x_dim, context_dim, num_heads, backend, device, dtype)
        elif block_type == "mlp":
            self.block = GPT2FeedForward(x_dim, int(x_dim * mlp_ratio), device, dtype)
        else:
            raise ValueError(f"unknown block type {block_type!r}")
        self.norm_state = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = _adaln(x_dim, 3, use_adaln_lora, adaln_lora_dim, device, dtype)
        self.activation_checkpointing = False

    def _forward(self, x: Tensor, emb: Tensor, context: Tensor | None, rope_angles: Tensor | None,
                 adaln_lora: Tensor | None, n_views: int, connectivity: Any) -> Tensor:
        mod = self.adaLN_modulation(emb)
        if self.use_adaln_lora:
            mod = mod + adaln_lora
        shift, scale, gate = (m[:, None, :] for m in mod.chunk(3, dim=1))
        h = self.norm_state(x) * (1 + scale) + shift
        if self.block_type == "fa":
            h = self.block(h, None, rope_angles, n_views, connectivity)
        elif self.block_type == "ca":
            h = self.block(h, context, None, n_views, "self")
        else:
            h = self.block(h)
        return x + gate * h

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, rope_angles: Tensor | None,
                adaln_lora: Tensor | None, n_views: int = 1, connectivity: Any = "all") -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, context, rope_angles, adaln_lora, n_views, connectivity,
                              use_reentrant=False)
        return self._forward(x, emb, context, rope_angles, adaln_lora, n_views, connectivity)


class GeneralDITTransformerBlock(nn.Module):
    """``blocks = ModuleList[FA, CA, MLP]``; adds the per-block absolute embedding first when given."""

    def __init__(self, x_dim: int, context_dim: int, num_heads: int, block_config: str, mlp_ratio: float,
                 use_adaln_lora: bool, adaln_lora_dim: int, backend: str, device=None, dtype=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            DITBuildingBlock(b.strip().lower(), x_dim, context_dim, num_heads, mlp_ratio, use_adaln_lora,
                             adaln_lora_dim, backend, device, dtype)
            for b in block_config.split("-")
        ])
        self.activation_checkpointing = False

    def _forward(self, x, emb, context, rope_angles, adaln_lora, extra_pos_emb, n_views, connectivity):
        if extra_pos_emb is not None:
            x = x + extra_pos_emb
        for block in self.blocks:
            x = block(x, emb, context, rope_angles, adaln_lora, n_views, connectivity)
        return x

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, rope_angles: Tensor | None,
                adaln_lora: Tensor | None, extra_pos_emb: Tensor | None = None, n_views: int = 1,
                connectivity: Any = "all") -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, context, rope_angles, adaln_lora, extra_pos_emb, n_views,
                              connectivity, use_reentrant=False)
        return self._forward(x, emb, context, rope_angles, adaln_lora, extra_pos_emb, n_views, connectivity)


class FinalLayer(nn.Module):
    """``linear(LN(x) * (1 + scale) + shift)`` with (shift, scale) from AdaLN(-LoRA) plus ``adaln_lora[:, :2D]``."""

    def __init__(self, hidden_size: int, spatial_patch_size: int, temporal_patch_size: int, out_channels: int,
                 use_adaln_lora: bool, adaln_lora_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.use_adaln_lora = use_adaln_lora
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        out = spatial_patch_size * spatial_patch_size * temporal_patch_size * out_channels
        self.linear = nn.Linear(hidden_size, out, bias=False, device=device, dtype=dtype)
        self.adaLN_modulation = _adaln(hidden_size, 2, use_adaln_lora, adaln_lora_dim, device, dtype)

    def forward(self, x: Tensor, emb: Tensor, adaln_lora: Tensor | None) -> Tensor:
        mod = self.adaLN_modulation(emb)
        if self.use_adaln_lora:
            mod = mod + adaln_lora[:, : 2 * self.hidden_size]
        shift, scale = (m[:, None, :] for m in mod.chunk(2, dim=1))
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


def unpatchify(x: Tensor, T: int, H: int, W: int, p: int, r: int, C: int) -> Tensor:
    """[B, T*H*W, p*p*r*C] with features ordered (p1, p2, t, C) -> [B, C, T*r, H*p, W*p] (§4.2.9)."""
    B = x.shape[0]
    x = x.reshape(B, T, H, W, p, p, r, C)
    return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(B, C, T * r, H * p, W * p)

