"""Export the built-in tokenizer as an upstream-layout TorchScript folder, normalised on a dataset.

    python -m mvmodel.tokenizer.export --dataset_path datasets/synthetic --out checkpoints/mvworld-tokenizer-synthetic \
        --num_frames 25 --size 64x96

The built-in 8x8x8 space-to-depth tokenizer has no weights, but its raw latents are far from unit variance
(per-channel std ~0.02..0.5), which the EDM sampler (sigma_data 0.5, noise from sigma 80) does not tolerate. Like
the real tokenizer's ``mean_std.pt``, this measures the latent mean and scale per channel on clips of the dataset and writes them next to ``encoder.jit`` / ``decoder.jit``, so the trainer and the inference CLI load it as they load
``Cosmos-Tokenize1-CV8x8x8-720p``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def export_normalised_tokenizer(dataset_dir: str | Path, out: str | Path, num_frames: int,
                                size: tuple[int, int], samples: int = 16) -> dict:
    """Write ``encoder.jit``, ``decoder.jit`` and ``mean_std.pt`` to ``out``; returns the latent std range."""
    from ..data import MultiviewDataset
    from ..diffusion import video_to_model_range
    from .builtin import SpaceToDepthTokenizer

    tok = SpaceToDepthTokenizer(pixel_chunk_duration=num_frames)
    data = MultiviewDataset(dataset_dir, num_frames=num_frames, video_size=tuple(size), load_t5=False)
    idx = np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int)
    z = torch.cat([tok.encode(video_to_model_range(data[int(i)]["video"][None])) for i in idx])  # [N,16,V*T',h,w]
    mean = z.mean(dim=(0, 2, 3, 4))
    # Scale each channel by the geometric mean of its std and the RMS of all channels' stds. Per-channel stds (as a
    # learned tokenizer's mean_std.pt) would blow the 13 faint high-frequency channels (std ~0.02) up to the loss
    # weight of the colour/brightness ones (std ~0.5): short CPU runs then learn invisible texture and sample
    # blotchy colour. One scale for all (latent MSE = pixel MSE, the basis being orthonormal) leaves the faint
    # channels so little weight that they stay grainy noise. Halfway: loss weight proportional to the std.
    per_channel = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    rms = per_channel.pow(2).mean().sqrt()
    std = (per_channel * rms).sqrt()
    out = Path(out)
    tok.export_torchscript(out)
    Tl = tok.latent_chunk_duration
    torch.save((mean[:, None].expand(16, Tl).clone(), std[:, None].expand(16, Tl).clone()), out / "mean_std.pt")
    return {"std_min": float(per_channel.min()), "std_max": float(per_channel.max()), "std": float(rms),
            "clips": len(idx)}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 64x96, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.tokenizer.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_path", required=True, help="upstream-layout dataset (videos/<view>/<clip>.mp4)")
    ap.add_argument("--out", required=True, help="folder to write encoder.jit, decoder.jit, mean_std.pt into")
    ap.add_argument("--num_frames", type=int, default=57, help="frames per view of the training clips (1 + 8k)")
    ap.add_argument("--size", type=_size, default=(480, 848), help="HxW the clips are resized to, as in training")
    ap.add_argument("--samples", type=int, default=16, help="clips to measure the latent statistics on")
    a = ap.parse_args(argv)
    if a.num_frames < 1 or (a.num_frames - 1) % 8:
        ap.error(f"--num_frames {a.num_frames}: expected 1 + a multiple of 8 (9, 17, 25, ..., 57)")
    if a.samples < 1:
        ap.error(f"--samples {a.samples}: expected a count >= 1")
    if not (Path(a.dataset_path) / "videos").is_dir():
        ap.error(f"--dataset_path {a.dataset_path}: no videos/ folder (expected videos/<view>/<clip>.mp4)")
    try:
        r = export_normalised_tokenizer(a.dataset_path, a.out, a.num_frames, a.size, a.samples)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"mvmodel.tokenizer.export: error: {exc}")
    print(f"built-in tokenizer -> {a.out} (encoder.jit, decoder.jit, mean_std.pt); latent std per channel "
          f"{r['std_min']:.3f}..{r['std_max']:.3f} measured on {r['clips']} windows of {a.num_frames} frames (a clip "
          f"gives several), each divided by sqrt(its std x their RMS {r['std']:.3f})")


if __name__ == "__main__":
    main()
