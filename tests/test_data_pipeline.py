"""Multi-view data pipeline on synthetic H.264 data (CPU, PyAV): layout round trip, frame alignment, resize,
caption policies, loader determinism / distribution / resume."""
from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvmodel.data import MultiviewDataset, PyAVDecoder, build_dataloader, probe, resize_video
from mvmodel.data import layout
from mvmodel.data.synthetic import camera_rig, generate_dataset, make_scene, render_view, write_video

V, CLIPS, FRAMES, SIZE = 5, 2, 24, (64, 96)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """5 views x 2 clips x 24 frames at 64x96 with random (seeded) T5 pickles in the writer's format."""
    root = tmp_path_factory.mktemp("syn")
    info = generate_dataset(root, views=V, clips=CLIPS, frames=FRAMES, size=SIZE, fps=10, seed=0)
    rng = np.random.default_rng(0)
    for view in info["view_keys"]:
        layout.write_embedding(layout.prefix_path(root, view), rng.standard_normal((7, 1024)))
        for clip in info["clips"]:
            layout.write_embedding(layout.t5_path(root, view, clip), rng.standard_normal((11, 1024)))
    return root, info


def _all_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_layout_round_trip(syn):
    root, info = syn
    assert info["view_keys"] == list(layout.WAYMO_VIEW_KEYS)
    for view in info["view_keys"]:
        for clip in info["clips"]:
            vi = probe(layout.video_path(root, view, clip))
            assert (vi.num_frames, vi.fps, vi.height, vi.width, vi.codec) == (FRAMES, 10.0, 64, 96, "h264")
            assert layout.read_caption(layout.meta_path(root, view, clip)) == info["captions"][clip]
    ds = MultiviewDataset(root, 8, info["view_keys"], SIZE, decoder="pyav", start_frame_interval=4)
    # windows of 8 frames fit at starts 0, 4, ..., 16 in each 24-frame clip, ordered by (clip, start)
    assert [(ds.clips[c], s) for c, s in ds.samples] == [(c, s) for c in info["clips"] for s in (0, 4, 8, 12, 16)]
    s = ds[6]
    assert s["video"].shape == (3, V * 8, 64, 96) and s["video"].dtype == torch.uint8
    assert s["t5_text_embeddings"].shape == (V * 512, 1024) and s["t5_text_mask"].shape == (V * 512,)
    assert (s["clip_name"], s["start_frame"], s["num_frames"], s["fps"]) == ("clip0001", 4, 8, 10.0)
    assert s["view_indices"].tolist() == [v for v in range(V) for _ in range(8)]
    assert s["frame_repeat"].tolist() == [0.0] * V
    assert s["padding_mask"].shape == (1, 64, 96) and not s["padding_mask"].any()
    assert s["image_size"].tolist() == [64, 96, 64, 96]
    assert s["frame_indices"].tolist() == list(range(4, 12))


def test_generator_is_deterministic(tmp_path):
    a = generate_dataset(tmp_path / "a", views=2, clips=1, frames=4, size=(32, 48), seed=7)
    generate_dataset(tmp_path / "b", views=2, clips=1, frames=4, size=(32, 48), seed=7)
    generate_dataset(tmp_path / "c", views=2, clips=1, frames=4, size=(32, 48), seed=8)
    for view in a["view_keys"]:
        pa, pb, pc = (layout.video_path(tmp_path / d, view, "clip0000").read_bytes() for d in "abc")
        assert pa == pb and pa != pc


def test_neighbouring_cameras_overlap():
    """Reproject camera B's pixels into camera A (same centre, so depth-free): the overlap agrees at the same
    instant and disagrees half a second later (the scene moves)."""
    h, w = 96, 144
    scene = make_scene(3)
    rig = {k: (yaw, fov) for k, yaw, fov in camera_rig(5)}
    t = np.array([0.0, 0.5], np.float32)

    def cam(key):
        yaw, fov = rig[key]
        return math.radians(yaw), (w / 2) / math.tan(math.radians(fov) / 2), render_view(scene, yaw, fov, (h, w), t)

    ya, fa, A = cam("pinhole_front")
    yb, fb, B = cam("pinhole_front_left")
    right = (np.arange(w) + 0.5 - w / 2) / fb
    down = (np.arange(h) + 0.5 - h / 2) / fb
    dx, dy = math.cos(yb) + right * math.sin(yb), math.sin(yb) - right * math.cos(yb)
    fwd = dx * math.cos(ya) + dy * math.sin(ya)                 # ray components in camera A's frame
    rgt = dx * math.sin(ya) - dy * math.cos(ya)
    ua = np.round(rgt / fwd * fa + w / 2 - 0.5).astype(int)     # [W]
    va = np.round(down[:, None] / fwd[None, :] * fa + h / 2 - 0.5).astype(int)  # [H, W]
    ok = (ua[None, :] >= 0) & (ua[None, :] < w) & (va >= 0) & (va < h) & (fwd[None, :] > 0)
    assert 0.15 < ok.mean() < 0.6  # a real but partial overlap
    rows, cols = np.nonzero(ok)
    same = np.abs(B[0][rows, cols].astype(int) - A[0][va[rows, cols], ua[cols]].astype(int)).mean()
    later = np.abs(B[0][rows, cols].astype(int) - A[1][va[rows, cols], ua[cols]].astype(int)).mean()
    assert same < 6.0 and later > 2 * same


def test_views_decoded_at_the_same_indices(tmp_path):
    """Each view's frame i carries marker level 8*i + 2*v (v: the view); windows land on the right indices in every
    view, also past key frames (GOP 1 s at 10 fps, so decoding seeks) and with sequence_interval 2."""
    n, views = 30, ["cam_front", "cam_left", "cam_right"]
    for v, view in enumerate(views):
        frames = np.stack([np.full((32, 48, 3), 8 * i + 2 * v, np.uint8) for i in range(n)])
        write_video(layout.video_path(tmp_path, view, "clip0000"), frames, fps=10, crf=0, gop_seconds=1.0)
    ds = MultiviewDataset(tmp_path, 6, views, (32, 48), sequence_interval=2, start_frame_interval=5,
                          decoder="pyav", load_t5=False)
    assert [s for _, s in ds.samples] == [0, 5, 10, 15]
    for k in range(len(ds)):
        s = ds[k]
        ids = s["frame_indices"].tolist()
        assert ids == [s["start_frame"] + 2 * j for j in range(6)]
        level = s["video"].float().mean(dim=(0, 2, 3)).view(len(views), 6)  # [V, T]
        expect = torch.tensor([[8 * i + 2 * v for i in ids] for v in range(len(views))], dtype=torch.float32)
        assert (level - expect).abs().max() <= 1.0  # YUV round trip costs at most 1 level; markers differ by 2+


def test_decoder_matches_sequential_decode(syn):
    root, info = syn
    paths = [layout.video_path(root, v, "clip0001") for v in info["view_keys"]]
    idx = [13, 15, 17, 19, 21, 23]
    got = PyAVDecoder(threads=1).decode(paths, idx)
    for p, g in zip(paths, got):
        assert torch.equal(g, torch.from_numpy(_all_frames(p)[idx]))


def test_resize_matches_upstream_formula():
    x = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8)
    out = resize_video(x, (24, 40))
    ref = F.interpolate(x.permute(0, 3, 1, 2).float() / 255, size=(24, 40), mode="bilinear",
                        align_corners=False, antialias=True)
    ref = (ref * 255).clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)
    assert out.shape == (3, 3, 24, 40) and torch.equal(out, ref)
    assert torch.equal(resize_video(x, (50, 70)), x.permute(3, 0, 1, 2))  # same size: unchanged
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        resize_video(x.float(), (24, 40))


def test_caption_policies(syn):
    root, info = syn
    keys = info["view_keys"]
    prefix = {v: layout.read_embedding(layout.prefix_path(root, v)) for v in keys}
    cap = {v: layout.read_embedding(layout.t5_path(root, v, "clip0000")) for v in keys}

    def blocks(policy, **kw):
        ds = MultiviewDataset(root, 4, keys, (32, 48), decoder="pyav", caption_policy=policy, **kw)
        emb, mask = ds.text("clip0000", range(V))
        return emb.view(V, 512, 1024), mask.view(V, 512)

    def check(e, m, parts):
        ref = np.concatenate(parts)
        n = len(ref)
        assert torch.equal(e[:n], torch.from_numpy(ref).float()) and not e[n:].any()
        assert m[:n].all() and not m[n:].any()

    e, m = blocks("front")  # upstream default: pinhole_front (index 1) gets the caption, others the prefix
    for j, v in enumerate(keys):
        check(e[j], m[j], [cap[v]] if v == "pinhole_front" else [prefix[v]])
    e, m = blocks("prefix+caption")
    for j, v in enumerate(keys):
        check(e[j], m[j], [prefix[v], cap[v]])
    e, m = blocks("per_view")
    for j, v in enumerate(keys):
        check(e[j], m[j], [cap[v]])
    e, m = blocks("front", front_view_key="pinhole_side_left")
    check(e[3], m[3], [cap["pinhole_side_left"]])
    check(e[1], m[1], [prefix["pinhole_front"]])


def test_sample_n_views_keeps_view0_and_aligns(syn):
    root, info = syn
    ds = MultiviewDataset(root, 4, info["view_keys"], (32, 48), decoder="pyav", sample_n_views=3, seed=5)
    s = ds[2]
    views = ds.views_for(2)
    assert views[0] == 0 and len(views) == 3 and views == sorted(views) and views == ds.views_for(2)
    assert s["video"].shape == (3, 12, 32, 48) and s["t5_text_embeddings"].shape == (3 * 512, 1024)
    assert s["view_indices"].tolist() == [v for v in views for _ in range(4)]


def _order(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for b in loader:
            out += list(zip(b["clip_name"], b["start_frame"].tolist()))
    return out


@pytest.mark.slow
def test_loader_deterministic_distributed_and_resumable(syn):
    root, info = syn
    ds = MultiviewDataset(root, 8, info["view_keys"], (16, 24), decoder="pyav", start_frame_interval=2,
                          load_t5=False)
    n = len(ds)  # 2 clips x 9 windows
    full = _order(build_dataloader(ds, 1, seed=3, num_workers=0), epochs=2)
    assert full == _order(build_dataloader(ds, 1, seed=3, num_workers=0), epochs=2)
    assert sorted(full[:n]) == sorted(full[n:]) and full[:n] != full[n:]  # new permutation per epoch
    assert full[:n] != _order(build_dataloader(ds, 1, seed=4, num_workers=0))

    ranks = [_order(build_dataloader(ds, 2, rank=r, world_size=3, seed=3, num_workers=0)) for r in range(3)]
    assert sum(ranks, []) and len(set(sum(ranks, []))) == sum(len(r) for r in ranks)  # disjoint
    assert set(sum(ranks, [])) <= set(full[:n])

    # stop after 3 batches of 2, save, resume in a fresh loader: the rest of the epoch is unchanged
    ref = _order(build_dataloader(ds, 2, seed=3, num_workers=0))
    a = build_dataloader(ds, 2, seed=3, num_workers=0)
    seen = []
    for i, b in enumerate(a):
        seen += list(zip(b["clip_name"], b["start_frame"].tolist()))
        if i == 2:
            break
    state = a.state_dict()
    assert state["epoch"] == 0 and state["samples_consumed"] == 6
    b = build_dataloader(ds, 2, seed=3, num_workers=2)  # workers give the same batches
    b.load_state_dict(state)
    assert seen + _order(b) == ref
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["samples_consumed"] == 0

    # the same global position restored under world size 2: rank r continues its share at 6 // 2 = 3
    perm = a.sampler.indices(0)
    for r in range(2):
        c = build_dataloader(ds, 1, rank=r, world_size=2, seed=3, num_workers=0)
        c.load_state_dict(state)
        got = _order(c)
        want = [(ds.clips[ds.samples[i][0]], ds.samples[i][1]) for i in perm[r::2][3:]]
        assert got == want
    with pytest.raises(ValueError, match="seed"):
        build_dataloader(ds, 2, seed=9).load_state_dict(state)


def test_batch_is_collated(syn):
    root, info = syn
    ds = MultiviewDataset(root, 4, info["view_keys"], (32, 48), decoder="pyav", return_captions=True)
    b = next(iter(build_dataloader(ds, 2, seed=0, num_workers=0)))
    assert b["video"].shape == (2, 3, V * 4, 32, 48) and b["t5_text_embeddings"].shape == (2, V * 512, 1024)
    assert b["t5_text_mask"].shape == (2, V * 512) and b["view_indices"].shape == (2, V * 4)
    assert len(b["captions"]) == 2 and len(b["captions"][0]) == V
    assert b["captions"][0][0] == info["captions"][b["clip_name"][0]]


def test_generator_cli(tmp_path, capsys):
    from mvmodel.data.synthetic import main

    main(["--out", str(tmp_path / "d"), "--views", "6", "--clips", "1", "--frames", "3", "--size", "32x48"])
    assert "1 clips x 6 views" in capsys.readouterr().out
    assert layout.list_views(tmp_path / "d") == sorted(k for k, _, _ in camera_rig(6))
    assert probe(layout.video_path(tmp_path / "d", "camera_back_left", "clip0000")).num_frames == 3
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--size", "31x48"])
    assert "even" in capsys.readouterr().err
