"""Every bad input of the data pipeline raises an error naming the file, or is skipped and counted."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from mvmodel.data import MultiviewDataset, layout
from mvmodel.data.synthetic import generate_dataset, write_video
from mvmodel.data.t5_embeddings import encode_dataset

VIEWS = ["cam_front", "cam_left"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 views x 2 clips x 12 frames at 32x48, with T5 pickles (random, writer's format)."""
    root = tmp_path_factory.mktemp("base")
    info = generate_dataset(root, views=2, clips=2, frames=12, size=(32, 48), fps=10, seed=1)
    for src, dst in zip(info["view_keys"], VIEWS):  # rename camera_0/1 to names with a direction
        for sub in ("videos", "metas"):
            (root / sub / src).rename(root / sub / dst)
    rng = np.random.default_rng(0)
    for v in VIEWS:
        layout.write_embedding(layout.prefix_path(root, v), rng.standard_normal((5, 1024)))
        for c in info["clips"]:
            layout.write_embedding(layout.t5_path(root, v, c), rng.standard_normal((9, 1024)))
    return root


@pytest.fixture
def data(base, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(base, root)
    return root


def make(root, **kw):
    kw.setdefault("decoder", "pyav")
    return MultiviewDataset(root, kw.pop("num_frames", 6), VIEWS, (16, 24), **kw)


def test_good_dataset_loads(data):
    ds = make(data)
    assert ds.stats == {"clips": 2, "samples": 14, "skipped_clips": 0, "skipped_samples": 0}
    assert ds[13]["video"].shape == (3, 12, 16, 24)


def _skip_keeps_other_clip(root, **kw):
    ds = make(root, on_error="skip", **kw)
    assert ds.clips == ["clip0000"] and ds.stats["skipped_clips"] == 1 and "clip0001" in ds.skipped_clips
    assert len(ds) == 7 and ds[0]["clip_name"] == "clip0000"


def test_missing_view_file(data):
    p = layout.video_path(data, "cam_left", "clip0001")
    p.unlink()
    with pytest.raises(FileNotFoundError, match=str(p)):
        make(data)
    _skip_keeps_other_clip(data)


def test_missing_clip_pickle(data):
    p = layout.t5_path(data, "cam_front", "clip0001")
    p.unlink()
    with pytest.raises(FileNotFoundError, match=str(p)):
        make(data)
    _skip_keeps_other_clip(data)
    make(data, caption_policy="prefix")  # the policy that does not read it does not need it


def test_missing_or_bad_prefix_pickle_is_fatal(data):
    p = layout.prefix_path(data, "cam_left")
    p.unlink()
    with pytest.raises(FileNotFoundError, match=str(p)):
        make(data, on_error="skip")  # concerns every clip: no skipping
    p.write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match=str(p)):
        make(data)
    layout.write_embedding(p, np.zeros((4, 512)))
    with pytest.raises(ValueError, match=rf"{p}.*\(4, 512\)"):
        make(data)


def test_corrupt_clip_pickle_at_load(data):
    p = layout.t5_path(data, "cam_front", "clip0001")
    p.write_bytes(p.read_bytes()[:40])  # truncated pickle
    ds = make(data)
    with pytest.raises(ValueError, match=str(p)):
        ds[10]


def test_corrupt_mp4(data):
    p = layout.video_path(data, "cam_front", "clip0001")
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=str(p)):
        make(data)
    _skip_keeps_other_clip(data)


def test_truncated_mp4(data):
    p = layout.video_path(data, "cam_left", "clip0001")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(p)):
        make(data)
    _skip_keeps_other_clip(data)


def test_clip_shorter_than_window(data):
    with pytest.raises(ValueError, match=r"clip0000\.mp4: clip has 12 frames, shorter than .*num_frames=7.*"
                                         r"sequence_interval=2"):
        make(data, num_frames=7, sequence_interval=2)
    for v in VIEWS:  # one short clip among good ones is skipped
        write_video(layout.video_path(data, v, "clip0001"), np.zeros((4, 32, 48, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="clip0001.mp4: clip has 4 frames"):
        make(data)
    _skip_keeps_other_clip(data)


def test_views_with_different_frame_counts(data):
    p = layout.video_path(data, "cam_left", "clip0001")
    write_video(p, np.zeros((10, 32, 48, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match=rf"{p}: 10 frames but .*cam_front/clip0001.mp4 has 12"):
        make(data)
    _skip_keeps_other_clip(data)


def test_views_with_different_fps(data):
    p = layout.video_path(data, "cam_left", "clip0001")
    write_video(p, np.zeros((12, 32, 48, 3), np.uint8), fps=24)
    with pytest.raises(ValueError, match=rf"{p}: 24 fps but .* has 10 fps"):
        make(data)
    _skip_keeps_other_clip(data)


def test_unreadable_caption(data):
    p = layout.meta_path(data, "cam_left", "clip0000")
    p.write_bytes(b"A video of \xff\xfe a road")
    with pytest.raises(ValueError, match=rf"{p}: caption is not valid UTF-8"):
        make(data, return_captions=True)

    class NeverCalled:
        def encode(self, texts):
            raise AssertionError("the caption must be rejected before encoding")

    with pytest.raises(ValueError, match=rf"{p}: caption is not valid UTF-8"):
        encode_dataset(data, NeverCalled(), view_keys=VIEWS, overwrite=True)
    p.write_text("   \n")
    with pytest.raises(ValueError, match=rf"{p}: caption file is empty"):
        make(data, return_captions=True)


def test_failure_while_loading_is_skipped_then_bounded(data):
    ds = make(data, on_error="skip", max_skip=3)
    layout.video_path(data, "cam_left", "clip0000").unlink()  # vanishes after indexing
    s = ds[0]
    assert s["clip_name"] == "clip0001" and ds.stats["skipped_samples"] == 1
    assert ds[3]["clip_name"] == "clip0001" and ds.stats["skipped_samples"] == 1  # bad clip remembered
    layout.video_path(data, "cam_left", "clip0001").unlink()
    with pytest.raises(RuntimeError, match=r"after 1 failed tries.*cam_left/clip0001.mp4: video file missing"):
        ds[8]  # every window is bad now: a bounded number of tries, then a clear error


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="caption_policy"):
        make(data, caption_policy="random")
    with pytest.raises(ValueError, match="on_error"):
        make(data, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="videos/cam_back"):
        MultiviewDataset(data, 4, ["cam_front", "cam_back"], (16, 24), decoder="pyav")
    with pytest.raises(ValueError, match="decoder='nvdec'"):
        make(data, decoder="nvdec")[0]
