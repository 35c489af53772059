"""Real 6-camera driving footage (9 frames per view, 848x480, 30 fps H.264): decoding, view alignment,
upstream resize and T5 preprocessing on real data.

The folder comes from ``$MVWORLD_REAL_MULTIVIEW_DIR`` or ``shared/data/real-multiview-6cam`` beside the
repository; the tests skip (with the reason) where neither exists.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mvmodel.data import MultiviewDataset, build_dataloader, layout, probe, resize_video

VIEWS = ["camera_front", "camera_left", "camera_right", "camera_back", "camera_back_left", "camera_back_right"]


def _real_dir() -> Path | None:
    env = os.environ.get("MVWORLD_REAL_MULTIVIEW_DIR")
    cand = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/real-multiview-6cam"
    return cand if (cand / "videos").is_dir() else None


REAL = _real_dir()
pytestmark = pytest.mark.skipif(REAL is None, reason="real footage folder not found: set MVWORLD_REAL_MULTIVIEW_DIR "
                                                     "or place shared/data/real-multiview-6cam beside the repo")


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_real_views_decode_align_and_resize():
    infos = [probe(layout.video_path(REAL, v, "clip0000")) for v in VIEWS]
    assert {(i.num_frames, round(i.fps), i.width, i.height) for i in infos} == {(9, 30, 848, 480)}
    ds = MultiviewDataset(REAL, 5, VIEWS, (240, 424), decoder="pyav", load_t5=False, start_frame_interval=2,
                          return_captions=True)
    assert [s for _, s in ds.samples] == [0, 2, 4]
    s = ds[1]
    assert s["video"].shape == (3, 6 * 5, 240, 424) and s["fps"] == pytest.approx(30.0)
    assert s["captions"] == ["A video of car driving on a snowy road at sunset."] * 6
    video = s["video"].view(3, 6, 5, 240, 424)
    for j, v in enumerate(VIEWS):  # every view at frames 2..6, resized as upstream
        ref = torch.from_numpy(_frames(layout.video_path(REAL, v, "clip0000"))[2:7])
        assert torch.equal(video[:, j], resize_video(ref, (240, 424)))
    # the six cameras really are different images (not one view repeated), and motion is visible in time
    per_view = video.float().mean(dim=0)  # [6, 5, h, w]
    for a in range(6):
        for b in range(a + 1, 6):
            assert (per_view[a] - per_view[b]).abs().mean() > 5.0
    assert (per_view[0, 0] - per_view[0, 4]).abs().mean() > 0.5


def test_real_native_size_is_untouched():
    ds = MultiviewDataset(REAL, 9, VIEWS, (480, 848), decoder="pyav", load_t5=False)
    s = ds[0]
    ref = np.concatenate([_frames(layout.video_path(REAL, v, "clip0000")) for v in VIEWS])  # [54, H, W, 3]
    assert torch.equal(s["video"], torch.from_numpy(ref).permute(3, 0, 1, 2))


def test_real_t5_preprocessing_and_loader(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from mvmodel.data.t5_embeddings import main
    from mvmodel.data.tiny_t5 import build_tiny_t5

    root = tmp_path / "real"
    shutil.copytree(REAL, root)  # never write into the shared folder
    main(["--dataset_path", str(root), "--t5_dir", str(build_tiny_t5(tmp_path / "t5")), "--device", "cpu"])
    ds = MultiviewDataset(root, 8, VIEWS, (120, 212), decoder="pyav", front_view_key="camera_front")
    batch = next(iter(build_dataloader(ds, 2, seed=0, num_workers=0)))
    assert batch["video"].shape == (2, 3, 48, 120, 212)
    assert batch["t5_text_embeddings"].shape == (2, 6 * 512, 1024)
    lengths = batch["t5_text_mask"].view(2, 6, 512).sum(-1)
    assert (lengths > 0).all() and (lengths[:, 0] != lengths[:, 1]).all()  # caption vs camera prefix
