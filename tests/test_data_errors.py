"""Every bad input of the data pipeline raises an error naming the file, or is skipped and counted."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mvmodel.data import MultiviewDataset, build_dataloader, layout
from mvmodel.data.decoders import PyAVDecoder, probe
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
    assert "clip0001" in ds.skip_summary() and "1 clip(s) skipped while indexing" in ds.skip_summary()
    return ds


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


def test_corrupt_clip_pickle_found_at_index_and_at_load(data):
    p = layout.t5_path(data, "cam_front", "clip0001")
    good = p.read_bytes()
    p.write_bytes(good[:40])  # truncated pickle: found while indexing, before training reaches it
    with pytest.raises(ValueError, match=rf"{p}: not a readable T5 embedding pickle"):
        make(data)
    _skip_keeps_other_clip(data)
    p.write_bytes(good)
    ds = make(data)
    p.write_bytes(good[:40])  # damaged after indexing: the load names it
    with pytest.raises(ValueError, match=str(p)):
        ds[10]


@pytest.mark.parametrize("bad, expect", [
    (np.zeros((9, 512), np.float16), r"expected a float array \[L>=1, 1024\], got float16 \(9, 512\)"),
    (np.zeros((9, 1024), np.int64), r"expected a float array \[L>=1, 1024\], got int64"),
    (np.zeros((0, 1024), np.float16), r"expected a float array .*got float16 \(0, 1024\)"),
    ([np.zeros((9, 1024), np.float16)] * 2, "expected a list holding one"),
    ("a caption", "expected a float array .* got str"),
    (np.where(np.arange(9)[:, None] == 4, np.nan, np.ones((9, 1024))).astype(np.float16),
     r"1024 non-finite values \(first: nan at token 4, channel 0\); expected a finite T5 embedding"),
    (np.where(np.arange(1024) == 7, np.inf, np.ones((9, 1024))).astype(np.float32),
     r"9 non-finite values \(first: inf at token 0, channel 7\)"),
])
def test_malformed_t5_pickle_named_at_index(data, bad, expect):
    p = layout.t5_path(data, "cam_front", "clip0001")
    with open(p, "wb") as f:  # real pickles, written as another tool might have
        pickle.dump(bad if isinstance(bad, list) else [bad], f)
    with pytest.raises(ValueError, match=rf"{p}: {expect}"):
        make(data)
    assert str(p) in _skip_keeps_other_clip(data).skipped_clips["clip0001"]  # the reason names the file


def test_nan_prefix_pickle_named(data):
    p = layout.prefix_path(data, "cam_left")
    e = np.ones((5, 1024), np.float16)
    e[2, 3] = np.nan
    layout.write_embedding(p, e)
    with pytest.raises(ValueError, match=rf"{p}: 1 non-finite values \(first: nan at token 2, channel 3\)"):
        make(data, on_error="skip")  # the prefix concerns every clip: fatal


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
    assert s["skipped"] == [{"index": 0, "clip": "clip0000", "counted": True,
                             "error": f"{layout.video_path(data, 'cam_left', 'clip0000')}: video file missing"}]
    s = ds[3]  # every replaced sample counts once (the count used to stop at the first of a clip)
    assert s["clip_name"] == "clip0001" and ds.stats["skipped_samples"] == 2 and s["skipped"][0]["index"] == 3
    assert ds[9]["skipped"] == [] and ds.stats["skipped_samples"] == 2
    assert "2 sample(s) replaced while loading:\n  clip0000 (2 sample(s)): " in ds.skip_summary()
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


def _atoms(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level mp4 boxes: {type: (offset, size)}."""
    out, i = {}, 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        out[data[i + 4:i + 8]] = (i, size)
        if size < 8:
            break
        i += size
    return out


def _sweep_moov_cuts(src, work, stride=3):
    """Cut ``src`` at every ``stride``-th byte of its trailing moov atom: each cut must fail naming the file, or (a cut in
    trailing user data) decode every frame identical to the whole file. Returns the failure kinds seen."""
    whole = src.read_bytes()
    moov, size = _atoms(whole)[b"moov"]
    assert moov + size == len(whole), "expected the moov atom last (as FFmpeg writes mp4 by default)"
    n = probe(src).num_frames
    ref = PyAVDecoder().decode([src], range(n))[0]
    cut_file = work / "cut.mp4"
    messages = set()
    for cut in range(moov, len(whole), stride):
        cut_file.write_bytes(whole[:cut])
        try:
            frames = PyAVDecoder().decode([cut_file], range(probe(cut_file).num_frames))[0]
        except ValueError as e:
            assert str(e).startswith(f"{cut_file}: "), e
            messages.add(str(e).split(": ", 1)[1].split(" (")[0].split(";")[0])
            continue
        assert torch.equal(frames, ref), cut  # readable means intact
    return messages


def test_mp4_cut_inside_trailing_moov_is_named(data):
    """One such cut used to raise AttributeError with no file name, which also defeated on_error="skip"."""
    p = layout.video_path(data, "cam_left", "clip0001")
    messages = _sweep_moov_cuts(p, data)
    assert "video stream without codec parameters" in messages, messages  # the former AttributeError case
    whole = p.read_bytes()
    moov, size = _atoms(whole)[b"moov"]
    p.write_bytes(whole[:moov + size // 3])
    with pytest.raises(ValueError, match=str(p)):
        make(data)
    _skip_keeps_other_clip(data)


def test_real_footage_cut_inside_moov_is_named(tmp_path):
    real = Path(os.environ.get("MVWORLD_REAL_MULTIVIEW_DIR") or
                Path(__file__).resolve().parents[2] / "shared/data/real-multiview-6cam")
    src = real / "videos" / "camera_front" / "clip0000.mp4"
    if not src.is_file():
        pytest.skip(f"real footage not found at {src} (set MVWORLD_REAL_MULTIVIEW_DIR)")
    assert "video stream without codec parameters" in _sweep_moov_cuts(src, tmp_path, stride=7)


def test_clip_missing_from_first_camera_is_reported(data, caplog):
    p = layout.video_path(data, "cam_front", "clip0001")
    p.unlink()  # used to be dropped silently: clips were listed from the first camera only
    with pytest.raises(FileNotFoundError, match=rf"clip clip0001 is missing from camera\(s\) \['cam_front'\] "
                                                rf"\(expected {p}\); present in \['cam_left'\]"):
        make(data)
    with caplog.at_level(logging.WARNING, logger="mvmodel.data"):
        _skip_keeps_other_clip(data)
    assert "skipping clip clip0001: clip clip0001 is missing from camera(s) ['cam_front']" in caplog.text
    # a clip only the second camera has, beside complete ones
    for v in VIEWS:
        shutil.copy(layout.video_path(data, "cam_left", "clip0000"), layout.video_path(data, v, "clip0001"))
    shutil.copy(layout.video_path(data, "cam_left", "clip0000"), layout.video_path(data, "cam_left", "clip0002"))
    with pytest.raises(FileNotFoundError, match=r"clip clip0002 is missing from camera\(s\) \['cam_front'\]"):
        make(data)


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_counted_once_with_any_number_of_workers(data, workers):
    """Samples replaced inside DataLoader worker processes are counted in this process, each exactly once."""
    ds = make(data, on_error="skip")
    layout.video_path(data, "cam_left", "clip0000").unlink()  # all 7 windows of clip0000 now fail to load
    loader = build_dataloader(ds, batch_size=3, shuffle=False, drop_last=False, num_workers=workers)
    clips = [c for batch in loader for c in batch["clip_name"]]
    assert clips == ["clip0001"] * 14  # each failed window replaced by a window of the good clip
    assert ds.stats["skipped_samples"] == 7 and ds.load_failures["clip0000"][0] == 7
    summary = ds.skip_summary()
    assert "7 sample(s) replaced while loading:" in summary
    assert f"clip0000 (7 sample(s)): {layout.video_path(data, 'cam_left', 'clip0000')}: video file missing" in summary


def test_batch_names_its_clips(data):
    ds = make(data)
    batch = next(iter(build_dataloader(ds, batch_size=2, shuffle=False, num_workers=0)))
    assert batch["clip_name"] == ["clip0000", "clip0000"] and batch["start_frame"].tolist() == [0, 1]
    assert ds.clip_files("clip0000") == [layout.video_path(data, v, "clip0000") for v in VIEWS] + [
        layout.t5_path(data, "cam_front", "clip0000"), layout.prefix_path(data, "cam_left")]


def test_trainer_config_enables_skipping(tmp_path):
    """data.on_error reaches the dataset the trainer builds: a clip missing from the first camera is skipped
    and reported instead of stopping the run (and stops it by default, naming the clip)."""
    from mvmodel.configs import make_config
    from mvmodel.demo import prepare_data
    from mvmodel.trainer import Trainer

    root, _ = prepare_data(tmp_path / "data", clips=2, frames=12, size=(64, 96))
    layout.video_path(root, layout.WAYMO_VIEW_KEYS[0], "clip0001").unlink()
    over = [f"data.dataset_dir={root}", f"job.output_root={tmp_path / 'out'}", "trainer.device=cpu"]
    cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_tiny_example", over)
    with pytest.raises(FileNotFoundError, match=r"clip clip0001 is missing from camera\(s\) \['pinhole_front_left'\]"):
        Trainer(cfg, progress=False)
    cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_tiny_example", over + ["data.on_error=skip"])
    trainer = Trainer(cfg, progress=False)
    try:
        assert trainer.dataset.on_error == "skip" and list(trainer.dataset.skipped_clips) == ["clip0001"]
        assert trainer.dataset.clips == ["clip0000"]
    finally:
        trainer.close()
