"""Output files of a multi-view generation, laid out as upstream's ``text2world_multiview.py`` (spec §9.3).

* ``{name}.mp4``: the views one after the other in time, in prompt order front, left, right, back, back_left,
  back_right (views the model lacks are skipped): V*T frames of H x W.
* ``{name}_grid.mp4``: T frames of a 2 x 3 mosaic (2H x 3W): top row left | front | right, bottom row
  back_left | back | back_right; a slot the model lacks is black (the 5-view grid's black middle).
* ``{name}.txt``: the prompts, one per line, in the same order as the views of ``{name}.mp4``.

Videos are H.264 (yuv420p) written with PyAV at ``fps``: crf 15 for the per-view video and 20 for the grid
(upstream writes imageio quality 10 and 5).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.synthetic import write_video
from .model_dir import SLOTS

GRID = (("left", "front", "right"), ("back_left", "back", "back_right"))


def in_prompt_order(videos: torch.Tensor | np.ndarray, slots: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """[V, T, H, W, 3] in net view order -> (same, reordered by SLOTS order), and the slot of each."""
    order = sorted(range(len(slots)), key=lambda v: SLOTS.index(slots[v]))
    arr = np.asarray(videos)
    return arr[order], [slots[v] for v in order]


def concat_in_time(videos: np.ndarray) -> np.ndarray:
    """[V, T, H, W, 3] -> [V*T, H, W, 3] (view-major)."""
    V, T = videos.shape[:2]
    return videos.reshape(V * T, *videos.shape[2:])


def grid(videos: np.ndarray, slots: Sequence[str]) -> np.ndarray:
    """[V, T, H, W, 3] with the slot of each view -> [T, 2H, 3W, 3] mosaic (black where a slot is absent)."""
    V, T, H, W, C = videos.shape
    if len(slots) != V:
        raise ValueError(f"{V} videos but {len(slots)} slots")
    out = np.zeros((T, 2 * H, 3 * W, C), np.uint8)
    for r, row in enumerate(GRID):
        for c, slot in enumerate(row):
            if slot in slots:
                out[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = videos[list(slots).index(slot)]
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int) -> None:
    """uint8 [T, H, W, 3] RGB -> H.264 mp4 at ``fps``: the data package's writer (temporary name, then renamed)."""
    write_video(path, frames, fps, crf=crf)


def check_save_name(name: str, what: str) -> str:
    """A video name is a plain file name: outputs never land outside --video_save_folder."""
    if (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ValueError(f"{what} {name!r}: must be a plain file name (no '/', '\\', '..' or absolute path); "
                         f"outputs are written inside --video_save_folder")
    return name


def save_outputs(folder: str | Path, name: str, videos: torch.Tensor | np.ndarray, slots: Sequence[str],
                 prompts: dict[str, str], fps: float) -> dict[str, Path]:
    """Write ``{name}.mp4``, ``{name}_grid.mp4`` and ``{name}.txt``; videos uint8 [V, T, H, W, 3] in net order."""
    check_save_name(name, "video name")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered, order_slots = in_prompt_order(videos, slots)
    paths = {"video": folder / f"{name}.mp4", "grid": folder / f"{name}_grid.mp4", "prompts": folder / f"{name}.txt"}
    write_mp4(paths["video"], concat_in_time(ordered), fps, crf=15)
    write_mp4(paths["grid"], grid(ordered, order_slots), fps, crf=20)
    paths["prompts"].write_text("".join(prompts[s].replace("\n", " ") + "\n" for s in order_slots), encoding="utf-8")
    return paths
