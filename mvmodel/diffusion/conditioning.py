"""Conditioning of the multi-view DiT assembled from a dataset batch, with CFG text dropout (§7.3, §2.4).

A batch (``mvmodel.data`` / upstream's ``Dataset``, collated) holds ``t5_text_embeddings`` [B, V*512, 1024],
``fps`` [B], ``padding_mask`` [B, 1, H, W], optionally ``frame_repeat`` [B, V] and ``video`` uint8
[B, 3, V*T, H, W]. ``Condition`` carries what the net consumes; ``to_kwargs()`` feeds ``MultiviewDiT.forward``.

* Training: text dropout with rate 0.2, one Bernoulli draw per batch element zeroing the whole [V*512, 1024]
  block (all views drop together); the mask is never dropped; fps / padding mask pass through.
* CFG: the conditional branch uses no dropout; the unconditional one zeroes all text, everything else identical.
* frame_repeat is divided by 10 (upstream's ``FrameRepeatAttr``); training batches carry zeros.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor


@dataclass
class Condition:
    """crossattn_emb [B, V*M, Dc]; fps [B] | None; padding_mask [B, 1, H, W] | None; frame_repeat [B, V] | None;
    condition_video_input_mask [B, 1, V*T, h, w] | None (Video2World nets' extra input channel)."""

    crossattn_emb: Tensor
    fps: Tensor | None = None
    padding_mask: Tensor | None = None
    frame_repeat: Tensor | None = None
    condition_video_input_mask: Tensor | None = None

    def to_kwargs(self) -> dict[str, Any]:
        out = {"crossattn_emb": self.crossattn_emb, "fps": self.fps, "padding_mask": self.padding_mask,
               "frame_repeat": self.frame_repeat}
        if self.condition_video_input_mask is not None:  # only Video2World nets take it
            out["condition_video_input_mask"] = self.condition_video_input_mask
        return out

    def to(self, device=None, dtype=None) -> "Condition":
        """Move tensors; ``dtype`` applies to the text embedding only (fps stays exact in fp32)."""
        def mv(t, dt=None):
            return None if t is None else t.to(device=device, dtype=dt)
        return Condition(mv(self.crossattn_emb, dtype), mv(self.fps), mv(self.padding_mask), mv(self.frame_repeat),
                         mv(self.condition_video_input_mask))

    def uncondition(self) -> "Condition":
        """The CFG unconditional branch: zero text, everything else identical (Video2World: the condition frames
        and their mask stay, upstream's add_input_frames_guidance=False)."""
        return dataclasses.replace(self, crossattn_emb=torch.zeros_like(self.crossattn_emb))

    def batch_size(self) -> int:
        return self.crossattn_emb.shape[0]


def drop_text(crossattn_emb: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero each sample's whole text block with probability ``rate``; [B, V*M, Dc] -> same."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"text dropout rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return crossattn_emb
    B = crossattn_emb.shape[0]
    gen_device = "cpu" if generator is None else generator.device
    keep = (torch.rand(B, generator=generator, device=gen_device) >= rate).to(crossattn_emb.device)
    return crossattn_emb * keep.to(crossattn_emb.dtype).reshape(B, 1, 1)


def _tensor(batch: Mapping[str, Any], key: str, device) -> Tensor | None:
    val = batch.get(key)
    if val is None:
        return None
    return torch.as_tensor(val, device=device)


def condition_from_batch(batch: Mapping[str, Any], *, n_views: int, text_dropout: float = 0.0,
                         generator: torch.Generator | None = None, device=None,
                         dtype: torch.dtype | None = None) -> Condition:
    """Build the net's condition from a collated batch; ``text_dropout`` 0.2 in training, 0 for inference."""
    if "t5_text_embeddings" not in batch:
        raise ValueError(f"batch has no 't5_text_embeddings' (keys: {sorted(batch)})")
    text = torch.as_tensor(batch["t5_text_embeddings"], device=device)
    if text.dim() == 2:
        text = text[None]
    if text.dim() != 3 or text.shape[1] % n_views:
        raise ValueError(f"t5_text_embeddings must be [B, V*M, C] with V={n_views}, got {tuple(text.shape)}")
    B = text.shape[0]
    if dtype is not None:
        text = text.to(dtype)
    fps = _tensor(batch, "fps", device)
    if fps is not None:
        fps = fps.float().reshape(-1)
        fps = fps.expand(B) if fps.numel() == 1 else fps
    padding_mask = _tensor(batch, "padding_mask", device)
    if padding_mask is not None:
        padding_mask = padding_mask.float()
        if padding_mask.dim() == 3:
            padding_mask = padding_mask[:, None] if padding_mask.shape[0] == B and B > 1 else padding_mask[None]
    frame_repeat = _tensor(batch, "frame_repeat", device)
    if frame_repeat is not None:
        frame_repeat = frame_repeat.float().reshape(B, n_views) / 10.0
    return Condition(drop_text(text, text_dropout, generator), fps, padding_mask, frame_repeat)


def condition_uncondition(batch: Mapping[str, Any], *, n_views: int, device=None,
                          dtype: torch.dtype | None = None) -> tuple[Condition, Condition]:
    """(conditional, unconditional) for classifier-free guidance (upstream ``get_condition_uncondition``)."""
    cond = condition_from_batch(batch, n_views=n_views, text_dropout=0.0, device=device, dtype=dtype)
    return cond, cond.uncondition()


def video_to_model_range(video: Tensor) -> Tensor:
    """uint8 [.., 3, T, H, W] in 0..255 -> float in [-1, 1] (upstream: x / 127.5 - 1)."""
    if video.dtype != torch.uint8:
        raise ValueError(f"video must be uint8 0..255, got {video.dtype}")
    return video.float() / 127.5 - 1.0


def latents_from_video(video: Tensor, tokenizer, n_views: int, sigma_data: float = 0.5) -> Tensor:
    """Training input x0: uint8 (or [-1, 1] float) [B, 3, V*T, H, W] -> tokenizer latents per view x sigma_data,
    [B, 16, V*T', H/8, W/8] (upstream's multi-view encode, §2.5 / §3.3)."""
    x = video_to_model_range(video) if video.dtype == torch.uint8 else video
    return tokenizer.encode_views(x, n_views).float() * sigma_data


def video_from_latents(latent: Tensor, tokenizer, n_views: int, sigma_data: float = 0.5) -> Tensor:
    """Sampled latents [B, 16, V*T', h, w] -> uint8 video [B, 3, V*T, 8h, 8w]: decode(latent / sigma_data), then
    clamp((1 + x), 0, 2) / 2 * 255 as upstream's inference (§9.2)."""
    x = tokenizer.decode_views(latent / sigma_data, n_views).float()
    return ((1.0 + x).clamp(0, 2) / 2 * 255).to(torch.uint8)  # truncation, as upstream's cast
