"""Upstream's multi-view dataset folder layout and the T5 pickle format, shared by reader and writers.

Layout (one mp4 per camera per clip, the same basename in every camera folder)::

    <root>/videos/<view>/<clip>.mp4
    <root>/metas/<view>/<clip>.txt                       one caption (UTF-8 text)
    <root>/t5_xxl/<view>/<clip>.pickle                   T5 embedding of that caption
    <root>/cache/prefix_t5_embeddings_<view>.pickle      T5 embedding of the view's camera-prefix prompt

Pickle format (upstream's writer): a Python ``list`` holding one ``np.ndarray`` of dtype float16 and shape
``[L, 1024]``, ``L <= 512`` (the valid tokens only, EOS included). Upstream's reader used other names
(``prefix_<view>.pkl``, ``<clip>.pkl``) and expected a bare array for prefixes; our writer and reader agree
on the writer's names, and the reader also accepts a bare ``[L, D]`` array or a ``[1, L, D]`` array.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

T5_MAX_LENGTH = 512
T5_DIM = 1024

#: Upstream's Waymo example order (view index 0 = front_left); see the spec's note on the view-order conflict.
WAYMO_VIEW_KEYS = (
    "pinhole_front_left",
    "pinhole_front",
    "pinhole_front_right",
    "pinhole_side_left",
    "pinhole_side_right",
)

_PREFIX_LEAD = "The video is captured from a camera mounted on a car. The camera is facing "
# Direction phrases of upstream's prefix prompts, keyed by the direction words found in a view key.
_DIRECTIONS = {
    ("front",): "forward.",
    ("front", "left"): "forward and slightly to the left.",
    ("front", "right"): "forward and slightly to the right.",
    ("left",): "to the left.",
    ("right",): "to the right.",
    ("back",): "backward.",
    ("back", "left"): "backward and slightly to the left.",
    ("back", "right"): "backward and slightly to the right.",
}


def video_path(root: str | Path, view: str, clip: str) -> Path:
    return Path(root) / "videos" / view / f"{clip}.mp4"


def meta_path(root: str | Path, view: str, clip: str) -> Path:
    return Path(root) / "metas" / view / f"{clip}.txt"


def t5_path(root: str | Path, view: str, clip: str) -> Path:
    return Path(root) / "t5_xxl" / view / f"{clip}.pickle"


def prefix_path(root: str | Path, view: str) -> Path:
    return Path(root) / "cache" / f"prefix_t5_embeddings_{view}.pickle"


def list_views(root: str | Path) -> list[str]:
    """Camera folders under ``videos/``, sorted by name (pass ``view_keys`` explicitly to fix the view order)."""
    vdir = Path(root) / "videos"
    if not vdir.is_dir():
        raise FileNotFoundError(f"{vdir}: no 'videos' folder; expected the layout videos/<view>/<clip>.mp4")
    return sorted(p.name for p in vdir.iterdir() if p.is_dir())


def list_clips(root: str | Path, view: str) -> list[str]:
    """Clip names (mp4 basenames without extension) of one view folder, sorted.

    Upstream listed every file of the first view's folder; we keep ``*.mp4`` only so that stray files
    (``.DS_Store``, partial downloads) do not become samples.
    """
    vdir = Path(root) / "videos" / view
    if not vdir.is_dir():
        raise FileNotFoundError(f"{vdir}: view folder missing (view key {view!r})")
    return sorted(p.stem for p in vdir.iterdir() if p.suffix == ".mp4" and p.is_file())


def prefix_prompt(view: str) -> str:
    """Upstream's camera-prefix prompt for a view key (``pinhole_front_left`` -> "... forward and slightly to
    the left."). Keys are matched by their direction words (front/back/rear, left/right; ``side`` alone
    means plain left/right), so ``camera_back_left`` works too."""
    words = set(re.split(r"[^a-z]+", view.lower()))
    if "rear" in words:
        words.add("back")
    key = tuple(w for w in ("front", "back", "left", "right") if w in words)
    if key not in _DIRECTIONS:
        raise ValueError(
            f"no camera-prefix prompt for view key {view!r}: expected its name to contain a direction "
            f"(front, back/rear, left, right), e.g. 'pinhole_front_left'"
        )
    return _PREFIX_LEAD + _DIRECTIONS[key]


def read_caption(path: str | Path) -> str:
    """One caption from ``metas/<view>/<clip>.txt``: UTF-8, surrounding whitespace stripped, non-empty."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: caption file missing") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not valid UTF-8 text ({e})") from None
    except OSError as e:
        raise OSError(f"{path}: caption unreadable ({e})") from None
    text = text.strip()
    if not text:
        raise ValueError(f"{path}: caption file is empty")
    return text


def write_embedding(path: str | Path, emb: np.ndarray) -> None:
    """Write ``emb`` ``[L, D]`` in upstream's writer format: ``[float16 array [L, D]]``."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] > T5_MAX_LENGTH:
        raise ValueError(f"{path}: embedding must be [L<={T5_MAX_LENGTH}, D], got {tuple(emb.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump([emb.astype(np.float16)], f)
    tmp.replace(path)  # atomic: a crash never leaves a half-written pickle under the real name


def read_embedding(path: str | Path, dim: int = T5_DIM) -> np.ndarray:
    """Read a T5 pickle and return ``[L, dim]`` float16/float32 (as stored).

    Accepts the writer's ``[array(L, D)]``, a bare ``array(L, D)`` and the toolkit's ``array(1, L, D)``.
    Anything else, or any NaN/inf value, raises ``ValueError`` naming the file and what was found.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: T5 embedding pickle missing") from None
    except Exception as e:  # truncated/corrupt pickles raise many exception types
        raise ValueError(f"{path}: not a readable T5 embedding pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, (list, tuple)):
        if len(obj) != 1:
            raise ValueError(f"{path}: expected a list holding one [L, {dim}] array, got a list of {len(obj)}")
        obj = obj[0]
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray):  # a torch tensor pickled by other tools
        obj = obj.detach().cpu().numpy()
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{path}: expected a float array [L, {dim}], got {type(obj).__name__}")
    if obj.ndim == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.ndim != 2 or obj.shape[1] != dim or obj.shape[0] == 0 or not np.issubdtype(obj.dtype, np.floating):
        raise ValueError(f"{path}: expected a float array [L>=1, {dim}], "
                         f"got {obj.dtype} {tuple(obj.shape)}")
    bad = ~np.isfinite(obj)
    if bad.any():  # a NaN here would only show up as non-finite training steps that never name the file
        tok, ch = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{path}: {int(bad.sum())} non-finite values (first: {obj[tok, ch]} at token {tok}, "
                         f"channel {ch}); expected a finite T5 embedding")
    return obj
