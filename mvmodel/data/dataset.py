"""Multi-view dataset over upstream's folder layout (see :mod:`mvmodel.data.layout`).

Samples. For every clip (the ``*.mp4`` basenames found in any view's folder) every start frame
``s in range(0, n_frames, start_frame_interval)`` whose window ``s, s+si, ..., s+(num_frames-1)*si``
(``si = sequence_interval``) fits in the clip is one sample, ordered by (clip, start) as upstream. Every view of
a sample is decoded at those same indices; views of a clip must agree in frame count and fps.

Returned dict (V = number of views, T = num_frames, (h, w) = video_size)::

    video               uint8 [3, V*T, h, w]   views concatenated along time in view_keys order
    t5_text_embeddings  float [V*512, D]       per-view blocks, zero-padded / truncated to 512 tokens
    t5_text_mask        int64 [V*512]          1 for real tokens, 0 for padding
    fps                 float                  the clips' frame rate (all views agree)
    num_frames          int                    T
    image_size          int64 [4]              (h, w, h, w) (upstream hard-codes 704x1280; unused by the net)
    padding_mask        float32 [1, h, w]      zeros
    view_indices        int64 [V*T]            each frame's view index (view_index_map, else position)
    frame_repeat        float32 [V]            zeros unless ``frame_repeat`` is given
    clip_name, start_frame, frame_indices      which clip (collated as a list of str; its files:
                                               ``clip_files(clip)``), first frame, int64 [T] frame indices decoded
    skipped             list[dict]             only with on_error="skip": the sample this one replaced, if any
                                               ({"index", "clip", "error", "counted"}); see Errors
    captions            list[str] (V)          only with return_captions=True (metas/<view>/<clip>.txt)

Caption policy (which T5 embedding each view gets; ``prefix`` = ``cache/prefix_t5_embeddings_<view>.pickle``,
``caption`` = ``t5_xxl/<view>/<clip>.pickle``):

* ``"front"`` (upstream's default): the front view (``front_view_key``; by default ``pinhole_front`` or the
  single view whose name says front without left/right) gets its clip caption, every other view only its
  camera prefix ("... The camera is facing to the left.").
* ``"prefix+caption"`` (upstream's ``load_mv_emb=True``): every view gets its prefix followed by its own clip
  caption along the token axis, truncated to 512 tokens.
* ``"per_view"``: every view gets its own clip caption only (captions that already name the camera).
* ``"prefix"``: every view gets only its camera prefix (no clip text at all).

Errors. A clip missing from some cameras (clips are listed from every view folder), a missing view file or
pickle, an unreadable/corrupt/truncated mp4, a clip shorter than one window, views of one clip with different
frame counts or fps, a malformed T5 pickle (structure, shape, dtype, NaN/inf: every pickle is read once while
indexing) or an unreadable caption raise an error naming the file and what was expected (``on_error="raise"``).
With ``on_error="skip"``, a bad clip found while indexing is dropped and recorded in ``skipped_clips`` (clip ->
why). A sample that fails while loading is replaced by the next good sample (another window, never a mix of
views), at most ``max_skip`` failed tries, then RuntimeError, so a wholly broken dataset fails instead of
retrying forever. The replaced sample is counted exactly once wherever it was loaded: the replacement carries a
``skipped`` record, and :class:`mvmodel.data.MultiviewLoader` counts records made in DataLoader worker processes
(those made in this process are counted at once). :attr:`stats` and :meth:`skip_summary` report the totals.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import layout
from .decoders import VideoDecoder, get_decoder, probe, resize_video

log = logging.getLogger("mvmodel.data")

CAPTION_POLICIES = ("front", "prefix+caption", "per_view", "prefix")
_SAMPLE_ERRORS = (ValueError, OSError, RuntimeError)


def _default_front(view_keys: Sequence[str]) -> str:
    if "pinhole_front" in view_keys:
        return "pinhole_front"
    fronts = [k for k in view_keys if "front" in k and "left" not in k and "right" not in k]
    if len(fronts) == 1:
        return fronts[0]
    raise ValueError(f"caption_policy='front' needs front_view_key: none of {list(view_keys)} is the single "
                     f"front camera")


class MultiviewDataset(torch.utils.data.Dataset):
    """Upstream-layout multi-view video dataset; see the module docstring for samples, keys and policies.

    Args:
        dataset_dir: root holding videos/, metas/, t5_xxl/, cache/.
        num_frames: frames per view T. view_keys: camera folders in view-index order (None: sorted folders).
        video_size: (h, w) every view is stretched to. sequence_interval / start_frame_interval: as upstream.
        decoder: "auto" (DALI with CUDA, else PyAV), "pyav", "dali" or a VideoDecoder.
        caption_policy / front_view_key: see module docstring. load_t5: False skips text entirely.
        sample_n_views: >0 keeps view 0 plus a random sorted subset (seeded by ``seed`` and the index).
        on_error: "raise" or "skip"; max_skip bounds replacements per sample.
    """

    def __init__(self, dataset_dir: str | Path, num_frames: int, view_keys: Sequence[str] | None = None,
                 video_size: tuple[int, int] = (480, 848), sequence_interval: int = 1,
                 start_frame_interval: int = 1, decoder: str | VideoDecoder = "auto",
                 caption_policy: str = "front", front_view_key: str | None = None, load_t5: bool = True,
                 return_captions: bool = False, sample_n_views: int = -1, view_index_map: dict | None = None,
                 frame_repeat: Sequence[float] | None = None, on_error: str = "raise", max_skip: int = 16,
                 seed: int = 0, text_dim: int = layout.T5_DIM, embedding_dtype: torch.dtype = torch.float32,
                 decoder_kwargs: dict | None = None, index_threads: int = 8):
        self.root = Path(dataset_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder missing")
        if num_frames < 1 or sequence_interval < 1 or start_frame_interval < 1:
            raise ValueError(f"num_frames, sequence_interval and start_frame_interval must be >= 1, got "
                             f"{num_frames}, {sequence_interval}, {start_frame_interval}")
        if caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"caption_policy={caption_policy!r}: expected one of {CAPTION_POLICIES}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
        if len(video_size) != 2 or min(video_size) < 1:
            raise ValueError(f"video_size must be (height, width), got {video_size!r}")
        self.view_keys = list(view_keys) if view_keys else layout.list_views(self.root)
        if not self.view_keys or len(set(self.view_keys)) != len(self.view_keys):
            raise ValueError(f"view_keys must be non-empty and unique, got {self.view_keys}")
        self.num_frames, self.video_size = int(num_frames), (int(video_size[0]), int(video_size[1]))
        self.sequence_interval, self.start_frame_interval = int(sequence_interval), int(start_frame_interval)
        self.caption_policy, self.load_t5, self.return_captions = caption_policy, load_t5, return_captions
        self.front_view_key = None
        if load_t5 and caption_policy == "front":
            self.front_view_key = front_view_key or _default_front(self.view_keys)
            if self.front_view_key not in self.view_keys:
                raise ValueError(f"front_view_key={self.front_view_key!r} is not in view_keys {self.view_keys}")
        V = len(self.view_keys)
        if sample_n_views > V:
            raise ValueError(f"sample_n_views={sample_n_views} exceeds the {V} view_keys")
        self.sample_n_views = int(sample_n_views)
        self.view_index_map = dict(view_index_map) if view_index_map else {k: i for i, k in enumerate(self.view_keys)}
        missing = [k for k in self.view_keys if k not in self.view_index_map]
        if missing:
            raise ValueError(f"view_index_map lacks view keys {missing}")
        if frame_repeat is not None and len(frame_repeat) != V:
            raise ValueError(f"frame_repeat needs one value per view ({V}), got {len(frame_repeat)}")
        self.frame_repeat = torch.tensor(frame_repeat if frame_repeat is not None else [0.0] * V, dtype=torch.float32)
        self.on_error, self.max_skip, self.seed = on_error, int(max_skip), int(seed)
        self.text_dim, self.embedding_dtype = int(text_dim), embedding_dtype
        self._decoder_spec, self._decoder_kwargs, self._decoder = decoder, dict(decoder_kwargs or {}), None
        self.skipped_clips: dict[str, str] = {}  # clip -> why, dropped while indexing
        self.skipped_samples = 0  # samples replaced while loading, counted by record_skip
        self.load_failures: dict[str, list] = {}  # clip -> [samples replaced, first error], by record_skip
        self._bad_clips: dict[str, str] = {}  # clips that failed to load in this process (worker) -> error
        for v in self.view_keys:
            if not (self.root / "videos" / v).is_dir():
                raise FileNotFoundError(f"{self.root / 'videos' / v}: view folder missing (view key {v!r})")
        self._prefix = self._load_prefixes()
        self.clips, self.fps, self.samples = self._build_index(index_threads)

    # ------------------------------------------------------------------ indexing
    def _needs(self, view: str) -> tuple[bool, bool]:
        """(prefix embedding, clip caption embedding) needed for ``view`` under the caption policy."""
        if not self.load_t5:
            return False, False
        p = self.caption_policy
        if p == "front":
            return view != self.front_view_key, view == self.front_view_key
        return p in ("prefix+caption", "prefix"), p in ("prefix+caption", "per_view")

    def _load_prefixes(self) -> dict[str, np.ndarray]:
        # a missing prefix concerns every clip, so it is fatal even with on_error="skip"
        return {v: layout.read_embedding(layout.prefix_path(self.root, v), self.text_dim)
                for v in self.view_keys if self._needs(v)[0]}

    def _check_clip(self, clip: str) -> tuple[float, int]:
        """Validate one clip's files; returns (fps, frame count) or raises naming the offending file."""
        missing = [v for v in self.view_keys if not layout.video_path(self.root, v, clip).is_file()]
        if missing:  # the clip was listed from another camera's folder
            present = [v for v in self.view_keys if v not in missing]
            raise FileNotFoundError(
                f"clip {clip} is missing from camera(s) {missing} (expected "
                f"{layout.video_path(self.root, missing[0], clip)}); present in {present}")
        infos = [probe(layout.video_path(self.root, v, clip)) for v in self.view_keys]
        ref = infos[0]
        for info in infos[1:]:
            if info.num_frames != ref.num_frames:
                raise ValueError(f"{info.path}: {info.num_frames} frames but {ref.path} has {ref.num_frames}; "
                                 f"views of one clip must have the same frame count")
            if abs(info.fps - ref.fps) > 1e-3 * ref.fps:
                raise ValueError(f"{info.path}: {info.fps:g} fps but {ref.path} has {ref.fps:g} fps; "
                                 f"views of one clip must have the same frame rate")
        span = (self.num_frames - 1) * self.sequence_interval + 1
        if ref.num_frames < span:
            raise ValueError(f"{ref.path}: clip has {ref.num_frames} frames, shorter than one window of "
                             f"num_frames={self.num_frames} at sequence_interval={self.sequence_interval} "
                             f"({span} frames)")
        for v in self.view_keys:
            if self._needs(v)[1]:
                p = layout.t5_path(self.root, v, clip)
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: T5 embedding pickle missing (run python -m "
                                            f"mvmodel.data.t5_embeddings --dataset_path {self.root})")
                # read once here (small: <= 1 MB) so that a malformed or non-finite pickle is found before
                # training reaches it; read_embedding checks structure, shape, dtype and finiteness
                layout.read_embedding(p, self.text_dim)
            if self.return_captions:
                layout.read_caption(layout.meta_path(self.root, v, clip))
        return ref.fps, ref.num_frames

    def _build_index(self, threads: int):
        # listed from every camera folder, so a clip missing from some cameras (even the first) is reported
        # by _check_clip, never silently dropped
        clips = sorted(set().union(*(layout.list_clips(self.root, v) for v in self.view_keys)))
        if not clips:
            raise ValueError(f"{self.root / 'videos'}: no .mp4 clips found in the camera folders {self.view_keys}")

        def check(clip):
            try:
                return clip, self._check_clip(clip), None
            except _SAMPLE_ERRORS as e:
                return clip, None, e

        with ThreadPoolExecutor(max(1, min(threads, len(clips), os.cpu_count() or 1))) as ex:
            results = list(ex.map(check, clips))
        good, fps, samples = [], {}, []
        span = (self.num_frames - 1) * self.sequence_interval + 1
        for clip, ok, err in results:  # in clip order, so the first error raised is deterministic
            if err is not None:
                if self.on_error == "raise":
                    raise err
                log.warning("skipping clip %s: %s", clip, err)
                self.skipped_clips[clip] = str(err)
                continue
            fps[clip], n = ok
            ci = len(good)
            good.append(clip)
            samples.extend((ci, s) for s in range(0, n - span + 1, self.start_frame_interval))
        if not samples:
            raise ValueError(f"{self.root}: no usable samples ({len(self.skipped_clips)} clips skipped: "
                             f"{next(iter(self.skipped_clips.values()), '')})")
        return good, fps, samples

    # ------------------------------------------------------------------ loading
    @property
    def decoder(self) -> VideoDecoder:
        if self._decoder is None:  # created lazily, so each DataLoader worker builds its own
            self._decoder = get_decoder(self._decoder_spec, **self._decoder_kwargs)
        return self._decoder

    @property
    def stats(self) -> dict:
        return {"clips": len(self.clips), "samples": len(self.samples), "skipped_clips": len(self.skipped_clips),
                "skipped_samples": self.skipped_samples}

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"MultiviewDataset({str(self.root)!r}, views={self.view_keys}, num_frames={self.num_frames}, "
                f"video_size={self.video_size}, samples={len(self)}, clips={len(self.clips)})")

    def views_for(self, index: int) -> list[int]:
        """Positions in view_keys of the views sample ``index`` uses (all, or view 0 + a seeded subset)."""
        V = len(self.view_keys)
        if self.sample_n_views <= 0 or self.sample_n_views == V:
            return list(range(V))
        rng = np.random.default_rng([self.seed, index])
        rest = rng.choice(np.arange(1, V), size=self.sample_n_views - 1, replace=False)
        return [0] + sorted(int(r) for r in rest)

    def frame_indices(self, index: int) -> list[int]:
        _, start = self.samples[index]
        return [start + k * self.sequence_interval for k in range(self.num_frames)]

    def _view_text(self, clip: str, view: str) -> np.ndarray:
        use_prefix, use_caption = self._needs(view)
        parts = []
        if use_prefix:
            parts.append(self._prefix[view])
        if use_caption:
            parts.append(layout.read_embedding(layout.t5_path(self.root, view, clip), self.text_dim))
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def text(self, clip: str, views: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[len(views)*512, D]`` embeddings and ``[len(views)*512]`` mask for one clip."""
        L = layout.T5_MAX_LENGTH
        emb = torch.zeros(len(views) * L, self.text_dim, dtype=self.embedding_dtype)
        mask = torch.zeros(len(views) * L, dtype=torch.int64)
        for j, v in enumerate(views):
            e = self._view_text(clip, self.view_keys[v])[:L]
            emb[j * L:j * L + len(e)] = torch.from_numpy(np.ascontiguousarray(e)).to(self.embedding_dtype)
            mask[j * L:j * L + len(e)] = 1
        return emb, mask

    def sample_paths(self, index: int) -> tuple[str, list[Path], list[int]]:
        ci, _ = self.samples[index]
        clip = self.clips[ci]
        views = self.views_for(index)
        return clip, [layout.video_path(self.root, self.view_keys[v], clip) for v in views], views

    def assemble(self, index: int, frames: list[torch.Tensor]) -> dict:
        """Build the sample dict from the decoded frames of ``sample_paths(index)`` (any device)."""
        clip, _, views = self.sample_paths(index)
        T = self.num_frames
        video = torch.cat([resize_video(f, self.video_size) for f in frames], dim=1)
        h, w = self.video_size
        out = {
            "video": video,
            "fps": float(self.fps[clip]),
            "num_frames": T,
            "image_size": torch.tensor([h, w, h, w], dtype=torch.int64),
            "padding_mask": torch.zeros(1, h, w, dtype=torch.float32),
            "view_indices": torch.tensor([self.view_index_map[self.view_keys[v]] for v in views],
                                         dtype=torch.int64).repeat_interleave(T),
            "frame_repeat": self.frame_repeat[views].clone(),
            "clip_name": clip,
            "start_frame": self.samples[index][1],
            "frame_indices": torch.tensor(self.frame_indices(index), dtype=torch.int64),
        }
        if self.load_t5:
            out["t5_text_embeddings"], out["t5_text_mask"] = self.text(clip, views)
        if self.return_captions:
            out["captions"] = [layout.read_caption(layout.meta_path(self.root, self.view_keys[v], clip))
                               for v in views]
        return out

    def load(self, index: int) -> dict:
        """Load sample ``index`` without any skipping."""
        _, paths, _ = self.sample_paths(index)
        frames = self.decoder.decode(paths, self.frame_indices(index))
        if len(frames) != len(paths):
            raise RuntimeError(f"decoder returned {len(frames)} views for {len(paths)} paths")
        return self.assemble(index, frames)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample index {index} out of range [0, {len(self.samples)})")
        if self.on_error == "raise":
            return self.load(index)
        try:
            out = self.load(index)
            out["skipped"] = []
            return out
        except _SAMPLE_ERRORS as e:
            record = self._failed(index, e)
        out = self._replacement(index)
        # The record travels with the sample, so that the loader can count skips made in worker processes;
        # here (no worker) it is counted at once and marked so.
        record["counted"] = torch.utils.data.get_worker_info() is None
        if record["counted"]:
            self.record_skip(record)
        out["skipped"] = [record]
        return out

    def _failed(self, index: int, err: Exception) -> dict:
        """Remember (in this process) that sample ``index``'s clip failed to load; returns its skip record."""
        clip = self.clips[self.samples[index][0]]
        self._bad_clips.setdefault(clip, str(err))
        log.warning("skipping sample %d (clip %s): %s", index, clip, err)
        return {"index": int(index), "clip": clip, "error": str(err)}

    def _replacement(self, index: int) -> dict:
        """The next loadable sample after ``index`` (another window; never a mix of clips), bounded by max_skip.

        Clips that failed in this process are passed over without a try: their files are bad."""
        tries, last = 1, self._bad_clips.get(self.clips[self.samples[index][0]])
        for k in range(1, len(self.samples)):  # finite: at most one pass over the samples
            j = (index + k) % len(self.samples)
            if self.clips[self.samples[j][0]] in self._bad_clips:
                continue
            try:
                return self.load(j)
            except _SAMPLE_ERRORS as e:
                self._failed(j, e)
                last, tries = str(e), tries + 1
                if tries > self.max_skip:
                    break
        raise RuntimeError(f"{self.root}: no loadable sample from index {index} on after {tries} failed tries "
                           f"(max_skip={self.max_skip}); last error: {last}")

    def record_skip(self, record: dict) -> None:
        """Count one replaced sample (called in the process that owns the counts: see MultiviewLoader)."""
        self.skipped_samples += 1
        self.load_failures.setdefault(record["clip"], [0, record["error"]])[0] += 1

    def skip_summary(self) -> str:
        """Every skip so far: clips dropped while indexing and samples replaced while loading, with the reasons."""
        lines = []
        if self.skipped_clips:
            lines.append(f"{len(self.skipped_clips)} clip(s) skipped while indexing:")
            lines += [f"  {clip}: {why}" for clip, why in self.skipped_clips.items()]
        if self.load_failures:
            lines.append(f"{self.skipped_samples} sample(s) replaced while loading:")
            lines += [f"  {clip} ({n} sample(s)): {why}" for clip, (n, why) in self.load_failures.items()]
        return "\n".join(lines) if lines else "nothing skipped"

    def clip_files(self, clip: str) -> list[Path]:
        """The files a sample of ``clip`` reads (videos, then T5 pickles), to name them when a step goes wrong."""
        files = [layout.video_path(self.root, v, clip) for v in self.view_keys]
        files += [layout.t5_path(self.root, v, clip) for v in self.view_keys if self._needs(v)[1]]
        files += [layout.prefix_path(self.root, v) for v in self.view_keys if self._needs(v)[0]]
        return files
