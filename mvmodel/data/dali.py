"""GPU video decoding with NVIDIA DALI (NVDEC). Importing this module needs ``nvidia.dali`` and CUDA.

One DALI pipeline per decoder decodes all V views of a sample in one batch: ``external_source`` feeds every
view's encoded mp4 bytes and the SAME frame-index array for each of them into ``fn.decoders.video``
(``device="mixed"``: demuxing on the CPU, decoding on NVDEC, RGB conversion on the GPU), so all views come
out at the same instants. The frames are copied into torch CUDA tensors on the caller's current stream;
resizing then happens in torch on the GPU (:func:`mvmodel.data.decoders.resize_video`), the same code as
the CPU path, so both decoders resize identically.

Install: ``pip install nvidia-dali-cuda130`` (CUDA 13; ``-cuda120`` for CUDA 12). DALI's CPU video decoder
does not decode H.264, so there is no CPU fallback here: use :class:`PyAVDecoder` on CPU machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .decoders import VideoDecoder

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as e:  # pragma: no cover - only on machines without DALI
    raise ImportError("DALI is not installed: pip install nvidia-dali-cuda130 (or use decoder='pyav')") from e


def _video_op():
    # DALI >= 2.0 names it fn.decoders.video; 1.4x only had the experimental name
    dec = getattr(fn, "decoders", None)
    if dec is not None and hasattr(dec, "video"):
        return dec.video
    return fn.experimental.decoders.video


class DALIDecoder(VideoDecoder):
    """NVDEC decoding of several views at one shared list of frame indices.

    Args:
        device_id: CUDA device (default: torch's current device).
        max_views: largest number of views decoded together (the pipeline's batch size).
        num_threads: DALI CPU threads (demuxing, feeding NVDEC); 2 keeps the loader within 2 cores.
    """

    name = "dali"

    def __init__(self, device_id: int | None = None, max_views: int = 8, num_threads: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("DALIDecoder needs a CUDA device; use decoder='pyav' on CPU-only machines")
        self.device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        self.device = torch.device("cuda", self.device_id)
        self.max_views, self.num_threads = int(max_views), int(num_threads)
        self._pipe = None

    def _build(self):
        video = _video_op()

        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1, device="cpu")
            # pad_mode="none": an index past the end is an error, never a silently padded frame
            return video(encoded, device="mixed", frames=frames, pad_mode="none")

        base = dict(batch_size=self.max_views, num_threads=self.num_threads, device_id=self.device_id,
                    prefetch_queue_depth=1)
        # synchronous execution keeps feed_input/run one-to-one; overlap comes from the loader's thread
        for extra in (dict(exec_async=False, exec_pipelined=False), {}):
            try:
                p = pipeline_def(graph, **base, **extra)()
                p.build()
                return p
            except TypeError:
                continue
        raise RuntimeError("could not build the DALI video pipeline")

    def __getstate__(self):  # a built pipeline cannot be pickled; rebuild lazily after unpickling
        state = dict(self.__dict__)
        state["_pipe"] = None
        return state

    def decode(self, paths: Sequence[str | Path], frame_indices: Sequence[int]) -> list[torch.Tensor]:
        idx = np.asarray([int(i) for i in frame_indices], dtype=np.int32)
        if idx.size == 0 or idx.min() < 0:
            raise ValueError(f"frame_indices must be a non-empty list of non-negative ints, got {idx[:8]}")
        if len(paths) > self.max_views:
            raise ValueError(f"{len(paths)} views exceed max_views={self.max_views} of this DALIDecoder")
        encoded = []
        for p in paths:
            data = np.fromfile(str(p), dtype=np.uint8)  # FileNotFoundError names the path
            if data.size == 0:
                raise ValueError(f"{p}: empty video file")
            encoded.append(data)
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", encoded)
        self._pipe.feed_input("frames", [idx] * len(encoded))
        try:
            (out,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # a failed iteration can leave the pipeline unusable; rebuild next time
            raise ValueError(f"DALI could not decode frames {idx[:4].tolist()}... of {[str(p) for p in paths]}: "
                             f"{e}") from None
        stream = torch.cuda.current_stream(self.device)
        result = []
        for i, p in enumerate(paths):
            t = out[i]
            shape = tuple(t.shape())
            if len(shape) != 4 or shape[0] != idx.size or shape[-1] != 3:
                raise ValueError(f"{p}: DALI returned frames of shape {shape}, expected ({idx.size}, H, W, 3)")
            dst = torch.empty(shape, dtype=torch.uint8, device=self.device)
            feed_ndarray(t, dst, cuda_stream=stream)  # copy: DALI reuses its buffers on the next run
            result.append(dst)
        return result
