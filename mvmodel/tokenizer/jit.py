"""Loader for upstream's TorchScript video tokenizer (``Cosmos-Tokenize1-CV8x8x8-720p``, cosmos-multiview.md §3).

A checkpoint directory holds ``encoder.jit`` and ``decoder.jit`` (TorchScript; the encoder returns a tuple whose
element 0 is the latent) and ``mean_std.pt`` (a ``(mean, std)`` tuple, viewed as [16, -1] and cut to the latent
frames of one chunk). Modules are frozen (eval, no grad) and cast to ``dtype`` (bf16 as upstream by default).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .base import VideoTokenizer

REQUIRED_FILES = ("encoder.jit", "decoder.jit", "mean_std.pt")


def _check_directory(directory: str | os.PathLike) -> str:
    d = os.fspath(directory)
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(d, f))]
    if not os.path.isdir(d) or missing:
        what = "does not exist" if not os.path.isdir(d) else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(f"tokenizer directory {d!r} {what}; expected the files {', '.join(REQUIRED_FILES)} "
                                "(e.g. checkpoints/Cosmos-Tokenize1-CV8x8x8-720p)")
    return d


def _load_mean_std(path: str) -> tuple[Tensor, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj)):
        raise ValueError(f"{path} must hold a (mean, std) tuple of tensors, got {type(obj).__name__}")
    return obj[0], obj[1]


class JITVideoTokenizer(VideoTokenizer):
    """Upstream's encoder/decoder TorchScript modules behind the chunked, normalised, per-view interface."""

    def __init__(self, encoder: torch.jit.ScriptModule, decoder: torch.jit.ScriptModule, mean: Tensor, std: Tensor,
                 pixel_chunk_duration: int = 57, max_enc_batch_size: int = 8, max_dec_batch_size: int = 4,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(pixel_chunk_duration, max_enc_batch_size, max_dec_batch_size, mean=mean, std=std)
        self.encoder, self.decoder, self.dtype = encoder, decoder, dtype

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.bfloat16, pixel_chunk_duration: int = 57,
                       max_enc_batch_size: int = 8, max_dec_batch_size: int = 4) -> "JITVideoTokenizer":
        d = _check_directory(directory)
        mods = []
        for name in ("encoder.jit", "decoder.jit"):
            path = os.path.join(d, name)
            try:
                with warnings.catch_warnings():  # TorchScript is deprecated, but it is upstream's file format
                    warnings.filterwarnings("ignore", message=r".*torch\.jit")  # Deprecation-/FutureWarning by release
                    mod = torch.jit.load(path, map_location=device)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot load TorchScript module {path}: {exc}") from exc
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)
            mods.append(mod.to(dtype))
        mean, std = _load_mean_std(os.path.join(d, "mean_std.pt"))
        tok = cls(mods[0], mods[1], mean, std, pixel_chunk_duration, max_enc_batch_size, max_dec_batch_size, dtype)
        return tok.to(device)

    def encode_chunk(self, x: Tensor) -> Tensor:
        out = self.encoder(x.to(self.dtype))
        return out[0] if isinstance(out, (tuple, list)) else out

    def decode_chunk(self, z: Tensor) -> Tensor:
        return self.decoder(z.to(self.dtype))
