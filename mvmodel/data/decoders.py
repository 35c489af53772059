"""Video decoders behind one interface, plus upstream's resize.

Every decoder takes the views' mp4 paths of one clip and ONE list of frame indices, and returns each view's
frames at exactly those indices, so a sample never mixes instants across cameras:

    decoder.decode(paths, frame_indices) -> list of V uint8 tensors [T, H_v, W_v, 3] on ``decoder.device``

* :class:`PyAVDecoder` (CPU, FFmpeg through the ``av`` package): seeks to the key frame before the first
  index and decodes forward, matching frames to indices by their presentation timestamps.
* ``DALIDecoder`` (GPU, NVDEC; in :mod:`mvmodel.data.dali`): used when ``nvidia.dali`` is installed and CUDA
  is present. DALI's CPU video decoder cannot decode H.264, so there is no DALI CPU path.

:func:`resize_video` then stretches each view to ``video_size`` exactly as upstream's
``Resize_Preprocess`` (torchvision ``resize(..., antialias=True)``, bilinear, aspect ratio not kept) on float
frames in [0, 1], followed by ``*255``, clamp and a truncating cast to uint8 — on whatever device the frames
live, so both decoders share one resize.
"""
from __future__ import annotations

import abc
import functools
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("mvmodel.data")

DECODERS = ("auto", "pyav", "dali")


def _import_av():
    try:
        import av  # noqa: PLC0415  (optional dependency: pip install mvworld[video])
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("PyAV is needed to decode mp4 on the CPU: pip install av  (or mvworld[video])") from e
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the sample index needs to know about one mp4."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str


class _NotAVideo(ValueError):
    """Raised by our own checks inside a PyAV block, so the block's broad handler passes it through unchanged."""


def _unreadable(path: str, e: Exception) -> ValueError:
    """The error for any exception out of a block that only calls PyAV on ``path``. PyAV raises FFmpegError for
    most damage, but damaged metadata also surfaces as other exceptions (an mp4 cut inside its trailing moov atom
    used to reach us as AttributeError), so every exception there means the file is unreadable."""
    if isinstance(e, _NotAVideo):
        return e
    return ValueError(f"{path}: unreadable video container ({type(e).__name__}: {e}); expected an mp4 with a "
                      f"decodable video stream (is the file truncated or corrupt?)")


def _video_stream(c, path: str):
    """The first video stream of an open container, or _NotAVideo naming the file."""
    if not c.streams.video:
        raise _NotAVideo(f"{path}: no video stream; expected an mp4 holding one (is the file truncated?)")
    s = c.streams.video[0]
    if s.codec_context is None:  # seen with an mp4 cut inside its trailing moov atom
        raise _NotAVideo(f"{path}: video stream without codec parameters; the container metadata is incomplete "
                         f"(file truncated?)")
    return s


def _frame_pts(path: str) -> tuple[int, ...]:
    """Presentation timestamps of every frame of ``path`` in index order (cached per file version)."""
    st = Path(path).stat()
    return _frame_pts_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _frame_pts_cached(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    """Presentation timestamps of every video packet of ``path``, sorted (= frame index order).

    Demuxing only (no decoding), so it is cheap; it counts frames exactly even where the container's
    frame count is missing or wrong, and lets the decoder map decoded frames back to indices.
    """
    av = _import_av()
    try:
        with av.open(path) as c:
            s = _video_stream(c, path)
            pts = [p.pts for p in c.demux(s) if p.pts is not None and p.size > 0]
    except Exception as e:  # noqa: BLE001 - PyAV calls only; see _unreadable
        raise _unreadable(path, e) from None
    if not pts:
        raise ValueError(f"{path}: video stream holds no frames")
    return tuple(sorted(pts))


def probe(path: str | Path) -> VideoInfo:
    """Frame count, fps and size of an mp4; ``ValueError`` naming the file when it cannot be read."""
    av = _import_av()
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: video file missing")
    try:
        with av.open(path) as c:
            s = _video_stream(c, path)
            rate = s.average_rate or s.guessed_rate or s.base_rate
            fps = float(Fraction(rate)) if rate else 0.0
            w, h, codec = s.codec_context.width, s.codec_context.height, s.codec_context.name
    except Exception as e:  # noqa: BLE001 - PyAV calls only; see _unreadable
        raise _unreadable(path, e) from None
    if fps <= 0 or w <= 0 or h <= 0:
        raise ValueError(f"{path}: video stream without a frame rate or size (fps={fps}, {w}x{h})")
    return VideoInfo(path, len(_frame_pts(path)), fps, w, h, codec)


class VideoDecoder(abc.ABC):
    """Decode the same frame indices from every view of a clip."""

    name: str = "base"
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def decode(self, paths: Sequence[str | Path], frame_indices: Sequence[int]) -> list[torch.Tensor]:
        """Return one uint8 tensor ``[T, H_v, W_v, 3]`` (RGB) per path, at ``frame_indices`` (length T).

        Raises ``ValueError`` naming the file when a requested frame cannot be decoded.
        """


class PyAVDecoder(VideoDecoder):
    """CPU decoding with FFmpeg (PyAV). ``threads``: FFmpeg decoding threads per stream (0 = FFmpeg's choice;
    keep 1 inside DataLoader workers so that N workers use about N cores)."""

    name = "pyav"

    def __init__(self, threads: int = 1):
        self.threads = int(threads)
        self.device = torch.device("cpu")

    def decode(self, paths, frame_indices):
        idx = [int(i) for i in frame_indices]
        if not idx or min(idx) < 0:
            raise ValueError(f"frame_indices must be a non-empty list of non-negative ints, got {idx[:8]}")
        return [self._decode_one(str(p), idx) for p in paths]

    def _decode_one(self, path: str, idx: list[int]) -> torch.Tensor:
        av = _import_av()
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: video file missing")
        pts = _frame_pts(path)
        if max(idx) >= len(pts):
            raise ValueError(f"{path}: frame {max(idx)} requested but the video has {len(pts)} frames")
        index_of = {p: i for i, p in enumerate(pts)}
        wanted = set(idx)
        last = max(idx)
        got: dict[int, np.ndarray] = {}
        try:
            with av.open(path) as c:
                s = _video_stream(c, path)
                if self.threads != 1:
                    s.thread_type = "AUTO"
                s.codec_context.thread_count = self.threads
                first = min(idx)
                if first > 0:
                    # lands on the key frame at or before the first wanted frame; frames are then
                    # identified by pts, so an imprecise seek can cost time but never a wrong frame
                    c.seek(pts[first], stream=s, backward=True, any_frame=False)
                for frame in c.decode(s):
                    i = index_of.get(frame.pts)
                    if i is None:
                        continue
                    if i in wanted and i not in got:
                        got[i] = frame.reformat(format="rgb24").to_ndarray()
                    if i >= last:
                        break
        except Exception as e:  # noqa: BLE001 - PyAV calls only; see _unreadable
            if isinstance(e, _NotAVideo):
                raise
            raise ValueError(f"{path}: decoding failed ({type(e).__name__}: {e}); the file is corrupt or "
                             f"truncated") from None
        missing = [i for i in sorted(wanted) if i not in got]
        if missing:
            raise ValueError(
                f"{path}: decoded {len(got)} of {len(wanted)} requested frames, frames {missing[:6]} missing; "
                f"the file is corrupt or truncated"
            )
        return torch.from_numpy(np.stack([got[i] for i in idx]))


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports and a CUDA device is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def get_decoder(decoder: str | VideoDecoder = "auto", **kwargs) -> VideoDecoder:
    """``"auto"`` picks DALI when :func:`dali_available`, else PyAV; ``"dali"`` fails loudly without it."""
    if isinstance(decoder, VideoDecoder):
        return decoder
    name = str(decoder).lower()
    if name not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS} or a VideoDecoder instance")
    if name == "auto":
        name = "dali" if dali_available() else "pyav"
    if name == "dali":
        from .dali import DALIDecoder  # noqa: PLC0415  (imports nvidia.dali)

        return DALIDecoder(**kwargs)
    return PyAVDecoder(**kwargs)


def resize_video(frames: torch.Tensor, size: tuple[int, int], chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Upstream's per-frame resize: uint8 ``[T, H, W, 3]`` -> uint8 ``[3, T, h, w]`` (``size = (h, w)``).

    float/255 -> bilinear antialiased stretch (torchvision's tensor resize) -> *255 -> clamp -> truncate.
    Same size in and out is returned unchanged (x/255*255 is exact in float32 for all uint8 x). Works in
    chunks of frames so the float copy stays under ``chunk_bytes``.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    h, w = int(size[0]), int(size[1])
    x = frames.permute(0, 3, 1, 2)  # [T, 3, H, W]
    if tuple(x.shape[-2:]) == (h, w):
        return x.permute(1, 0, 2, 3).contiguous()
    out = torch.empty((x.shape[0], 3, h, w), dtype=torch.uint8, device=x.device)
    per_frame = 4 * 3 * max(x.shape[2] * x.shape[3], h * w)
    step = max(1, chunk_bytes // per_frame)
    for t0 in range(0, x.shape[0], step):
        f = x[t0:t0 + step].contiguous().float().div_(255.0)  # contiguous first: strided casts are slow
        f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[t0:t0 + step] = f.mul_(255.0).clamp_(0.0, 255.0).to(torch.uint8)
    return out.permute(1, 0, 2, 3).contiguous()
