"""Export a linear 8x8x8 tokenizer fitted to a dataset as an upstream-layout TorchScript folder, normalised on it.

    python -m mvmodel.tokenizer.export --dataset_path datasets/synthetic --out checkpoints/mvworld-tokenizer-synthetic \
        --num_frames 25 --size 64x96 [--basis fitted|dct]

``--basis fitted`` (default): the PCA basis of the dataset's patches with a least-squares decoder (``fitted.py``;
the arrays also go to ``basis.npz``); ``--basis dct``: the fixed weight-free DCT basis (``builtin.py``: 8x8 blocks,
each 8-frame group one still picture). Either way the raw latents are far from unit variance, which the EDM
sampler (sigma_data 0.5, noise from sigma 80) does not tolerate; like the real tokenizer's ``mean_std.pt``, this
measures the latent mean and scale per channel on windows of the dataset and writes them next to ``encoder.jit`` /
``decoder.jit``, so the trainer and the inference CLI load it as they load ``Cosmos-Tokenize1-CV8x8x8-720p``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

BASES = ("fitted", "dct")


@torch.no_grad()
def export_normalised_tokenizer(dataset_dir: str | Path, out: str | Path, num_frames: int,
                                size: tuple[int, int], samples: int = 16, basis: str = "fitted") -> dict:
    """Write ``encoder.jit``, ``decoder.jit`` and ``mean_std.pt`` (and ``basis.npz`` for the fitted basis) to
    ``out``; returns the latent std range and the reconstruction PSNR of the dataset's first clip, fitted vs DCT."""
    from ..data import MultiviewDataset
    from ..diffusion import video_to_model_range
    from .builtin import SpaceToDepthTokenizer
    from .fitted import FittedTokenizer, reconstruction_psnr

    if basis not in BASES:
        raise ValueError(f"basis={basis!r}: expected one of {', '.join(BASES)}")
    data = MultiviewDataset(dataset_dir, num_frames=num_frames, video_size=tuple(size), load_t5=False)
    idx = np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int)
    V = len(data.view_keys)
    # [V, 3, T, H, W] per sampled window (views as a batch: the tokenizer encodes each view on its own)
    clips = [SpaceToDepthTokenizer._views_to_batch(video_to_model_range(data[int(i)]["video"][None]), V) for i in idx]
    dct = SpaceToDepthTokenizer(pixel_chunk_duration=num_frames)
    tok = FittedTokenizer.fit(clips, num_frames) if basis == "fitted" else dct
    z = torch.cat([tok.encode(c) for c in clips])  # [N, 16, T', h, w]
    # Statistics per latent frame position: the fitted basis codes the causal first frame (one frame) and the
    # 8-frame groups with different components, whose magnitudes differ ~sqrt(8)x.
    Tl = tok.latent_chunk_duration
    mean, std, per_channel = torch.zeros(16, Tl), torch.zeros(16, Tl), []
    for cols in (slice(0, 1), slice(1, Tl)):
        zc = z[:, :, cols]
        # Scale each channel by the geometric mean of its std and the RMS of all channels' stds. Per-channel stds
        # (as a learned tokenizer's mean_std.pt) would blow the faint channels (std ~0.02 for the DCT) up to the
        # loss weight of the colour/brightness ones (std ~0.5): short CPU runs then learn invisible texture and
        # sample blotchy colour. One scale for all (latent MSE ~ pixel MSE, the bases being orthonormal) leaves
        # the faint channels so little weight that they stay grainy noise. Halfway: loss weight proportional to std.
        pc = zc.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
        rms = pc.pow(2).mean().sqrt()
        mean[:, cols] = zc.mean(dim=(0, 2, 3, 4))[:, None]
        std[:, cols] = (pc * rms).sqrt()[:, None]
        per_channel.append(pc)
    per_channel = torch.cat(per_channel)
    out = Path(out)
    tok.export_torchscript(out)
    torch.save((mean, std), out / "mean_std.pt")
    ref = SpaceToDepthTokenizer._batch_to_views(clips[0], V)  # the first window, views along time
    return {"std_min": float(per_channel.min()), "std_max": float(per_channel.max()),
            "std": float(per_channel.pow(2).mean().sqrt()), "clips": len(idx), "windows": len(data),
            "psnr": reconstruction_psnr(tok, ref, V), "psnr_dct": reconstruction_psnr(dct, ref, V)}


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
    ap.add_argument("--samples", type=int, default=16,
                    help="windows (num_frames long) of the dataset to fit the basis and measure the latent statistics on")
    ap.add_argument("--basis", choices=BASES, default="fitted",
                    help="fitted: PCA of the dataset's 8x8x8 patches (basis.npz); dct: the fixed built-in basis")
    a = ap.parse_args(argv)
    if a.num_frames < 1 or (a.num_frames - 1) % 8:
        ap.error(f"--num_frames {a.num_frames}: expected 1 + a multiple of 8 (9, 17, 25, ..., 57)")
    if a.samples < 1:
        ap.error(f"--samples {a.samples}: expected a count >= 1")
    if not (Path(a.dataset_path) / "videos").is_dir():
        ap.error(f"--dataset_path {a.dataset_path}: no videos/ folder (expected videos/<view>/<clip>.mp4)")
    try:
        r = export_normalised_tokenizer(a.dataset_path, a.out, a.num_frames, a.size, a.samples, a.basis)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"mvmodel.tokenizer.export: error: {exc}")
    files = "encoder.jit, decoder.jit, mean_std.pt" + (", basis.npz" if a.basis == "fitted" else "")
    print(f"{a.basis} tokenizer -> {a.out} ({files}); {'fitted and ' if a.basis == 'fitted' else ''}normalised on "
          f"{r['clips']} of the dataset's {r['windows']} {a.num_frames}-frame windows: latent std per channel "
          f"{r['std_min']:.3f}..{r['std_max']:.3f}, each divided by sqrt(its std x their RMS {r['std']:.3f}); "
          f"reconstruction PSNR of the first window {r['psnr']:.1f} dB (fixed DCT basis: {r['psnr_dct']:.1f} dB)")


if __name__ == "__main__":
    main()
