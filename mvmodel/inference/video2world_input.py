"""Input frames of a Video2World generation: ``--input_image_or_video_path`` in either of two forms.

* One mp4 with the views concatenated in time (upstream's input and our ``{name}.mp4`` output): V equal blocks in
  prompt order (front, left, right, back, back_left, back_right, skipping slots the model lacks). From each block the
  LAST ``num_input_frames`` frames are taken, as upstream's ``get_condition_latent_multiview``.
* A folder with one mp4 per camera: either ``<folder>/<camera>.mp4`` (camera = the model's camera name or prompt
  slot, e.g. ``pinhole_front.mp4`` or ``front.mp4``), or our dataset layout ``<folder>/videos/<camera>/<clip>.mp4``
  (``clip``: the only one, or ``--input_clip``). ``start`` picks the first frame (default: the last
  ``num_input_frames`` frames, as the concatenated form).

Returns uint8 [V, N, H, W, 3] in the NET's view order. Every mismatch (frame count, view count, sizes) is a
one-line ``ValueError`` naming the file and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.decoders import PyAVDecoder, probe
from .model_dir import SLOTS


def _decode(path: Path, indices: Sequence[int]) -> torch.Tensor:
    return PyAVDecoder(threads=0).decode([path], list(indices))[0]  # [N, H, W, 3]


def _pick(n_frames: int, num_input_frames: int, start: int | None, what: str) -> list[int]:
    if start is None:
        start = n_frames - num_input_frames
    if start < 0 or start + num_input_frames > n_frames:
        raise ValueError(f"{what}: has {n_frames} frames, fewer than the {num_input_frames} input frames needed"
                         + (f" from frame {start}" if start > 0 else "") + " (--num_input_frames)")
    return list(range(start, start + num_input_frames))


def _from_concatenated(path: Path, slots: Sequence[str], num_input_frames: int) -> torch.Tensor:
    total = probe(path).num_frames
    V = len(slots)
    if total % V:
        raise ValueError(f"{path}: {total} frames is not a multiple of --n_views {V} (expected the {V} views "
                         f"concatenated in time, {' | '.join(_prompt_order(slots))}, in equal blocks)")
    per = total // V
    idx = _pick(per, num_input_frames, None, f"{path}: each of the {V} views (blocks of {per} frames)")
    frames = _decode(path, [b * per + i for b in range(V) for i in idx])
    blocks = frames.reshape(V, num_input_frames, *frames.shape[1:])  # prompt order
    order = _prompt_order(slots)
    return torch.stack([blocks[order.index(s)] for s in slots])  # net order


def _prompt_order(slots: Sequence[str]) -> list[str]:
    return sorted(slots, key=SLOTS.index)


def _camera_files(folder: Path, cameras: Sequence[str], slots: Sequence[str], clip: str | None) -> list[Path]:
    """The mp4 of each net view in ``folder`` (``<camera>.mp4``) or in its dataset layout ``videos/<camera>/``."""
    if (folder / "videos").is_dir():
        root = folder / "videos"
        missing = [c for c in cameras if not (root / c).is_dir()]
        if missing:
            raise ValueError(f"{root}: no folder for camera(s) {missing}; the model's cameras are {list(cameras)} "
                             f"(found {sorted(p.name for p in root.iterdir() if p.is_dir())})")
        clips = sorted(p.stem for p in (root / cameras[0]).glob("*.mp4"))
        if clip is None:
            if len(clips) != 1:
                raise ValueError(f"{root / cameras[0]}: {len(clips)} clips {clips[:5]}; choose one with --input_clip")
            clip = clips[0]
        return [root / c / f"{clip}.mp4" for c in cameras]
    out = []
    for cam, slot in zip(cameras, slots):
        cands = [folder / f"{cam}.mp4", folder / f"{slot}.mp4"]
        hit = next((p for p in cands if p.is_file()), None)
        if hit is None:
            have = sorted(p.name for p in folder.glob("*.mp4"))
            raise ValueError(f"{folder}: no video for camera {cam!r} (expected {cands[0].name} or {cands[1].name}; "
                             f"the folder holds {have}); a folder input needs one mp4 per camera: {list(cameras)}")
        out.append(hit)
    return out


def load_input_frames(path: str | Path, *, slots: Sequence[str], cameras: Sequence[str] | None,
                      num_input_frames: int, n_views: int | None = None, start: int | None = None,
                      clip: str | None = None) -> torch.Tensor:
    """uint8 [V, N, H, W, 3] (net view order) from a concatenated mp4 or a per-camera folder (module docstring)."""
    path = Path(path)
    V = len(slots)
    if n_views is not None and n_views != V:
        raise ValueError(f"--n_views {n_views} does not match the model's {V} views ({list(slots)})")
    if num_input_frames < 1:
        raise ValueError(f"--num_input_frames {num_input_frames}: must be >= 1")
    if not path.exists():
        raise FileNotFoundError(f"--input_image_or_video_path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".mp4":
            raise ValueError(f"--input_image_or_video_path {path}: expected an .mp4 (views concatenated in time) or "
                             f"a folder with one mp4 per camera")
        if start is not None:
            raise ValueError("--input_start_frame applies to a per-camera folder; a concatenated mp4 gives the "
                             "last frames of each view")
        return _from_concatenated(path, slots, num_input_frames)
    files = _camera_files(path, list(cameras or slots), slots, clip)
    views, size = [], None
    for f in files:
        info = probe(f)
        idx = _pick(info.num_frames, num_input_frames, start, str(f))
        frames = _decode(f, idx)
        if size is None:
            size = tuple(frames.shape[1:3])
        elif tuple(frames.shape[1:3]) != size:
            raise ValueError(f"{f}: {frames.shape[2]}x{frames.shape[1]} frames, but {files[0]} is "
                             f"{size[1]}x{size[0]}; every camera must have the same size")
        views.append(frames)
    return torch.stack(views)


def frames_to_model_input(frames: torch.Tensor, num_video_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 [V, N, H, W, 3] -> float [1, 3, V*num_video_frames, height, width]: x/128 - 1 (upstream's V2W input
    normalisation), bicubic antialiased resize when the size differs, then zero-padded after the N input frames
    (upstream's ``create_condition_latent_from_input_frames``)."""
    V, N = frames.shape[:2]
    if N > num_video_frames:
        raise ValueError(f"{N} input frames do not fit a {num_video_frames}-frame video")
    x = frames.permute(0, 1, 4, 2, 3).float() / 128.0 - 1.0  # [V, N, 3, H, W]
    if tuple(x.shape[-2:]) != (height, width):
        x = torch.nn.functional.interpolate(x.reshape(V * N, 3, *x.shape[-2:]), size=(height, width),
                                            mode="bicubic", antialias=True, align_corners=False)
        x = x.reshape(V, N, 3, height, width)
    out = torch.zeros(V, num_video_frames, 3, height, width)
    out[:, :N] = x
    return out.permute(2, 0, 1, 3, 4).reshape(1, 3, V * num_video_frames, height, width)
