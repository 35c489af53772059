"""Synthetic multi-view driving dataset in upstream's layout: real H.264 mp4s of one moving scene.

    python -m mvmodel.data.synthetic --out DIR --views 5 --clips 2 --frames 24 --size 64x96 --fps 10 [--seed 0]

A ray-cast scene (numpy): a road with lane markings and grass, distant mountains, roadside poles and other
cars, driven through at constant speed. Several pinhole cameras sit on one vehicle at different yaws with
fields of view wider than their spacing, so what one camera sees at its edge, its neighbour sees too. Every
view of a clip renders the same instants, so frame i of every view shows the same moment.

Writes ``videos/<view>/<clip>.mp4`` (libx264, yuv420p, B-frames, key frame every 2 s) and
``metas/<view>/<clip>.txt`` (a caption describing the clip's scene). Output is a pure function of the
arguments and the seed (the encoder runs single-threaded so the bytes do not depend on the core count).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .layout import WAYMO_VIEW_KEYS, meta_path, video_path

CAMERA_HEIGHT = 1.6  # metres above the road
_SIX_VIEWS = (("camera_front", 0.0), ("camera_left", 60.0), ("camera_right", -60.0), ("camera_back", 180.0),
              ("camera_back_left", 120.0), ("camera_back_right", -120.0))
_FIVE_VIEWS = dict(zip(WAYMO_VIEW_KEYS, (45.0, 0.0, -45.0, 90.0, -90.0)))


def camera_rig(views: int) -> list[tuple[str, float, float]]:
    """``(view_key, yaw_deg, hfov_deg)`` per camera; yaw 0 looks forward, positive turns left.

    5 views: upstream's Waymo keys (in its view order); 6 views: the released model's camera names; other
    counts: ``camera_<i>`` spread evenly. Fields of view exceed the spacing by 20-30 degrees (overlap).
    """
    if views == 5:
        return [(k, yaw, 70.0) for k, yaw in _FIVE_VIEWS.items()]
    if views == 6:
        return [(k, yaw, 80.0) for k, yaw in _SIX_VIEWS]
    if not 1 <= views <= 8:
        raise ValueError(f"--views must be between 1 and 8, got {views}")
    return [(f"camera_{i}", 360.0 * i / views, min(110.0, 360.0 / views + 30.0)) for i in range(views)]


@dataclass
class Scene:
    """One clip's world: everything random is drawn here, from the clip's seed."""

    speed: float            # m/s along +x
    sky_top: np.ndarray     # RGB in [0, 1]
    sky_horizon: np.ndarray
    grass: np.ndarray
    objects: np.ndarray     # [N, 7]: x0, y, radius, height, speed, period, colour index
    colours: np.ndarray     # [N, 3]
    mountain_phase: np.ndarray
    caption: str


_COLOUR_NAMES = {"red": (0.85, 0.15, 0.1), "blue": (0.1, 0.25, 0.85), "yellow": (0.95, 0.8, 0.1),
                 "white": (0.92, 0.92, 0.9), "orange": (0.95, 0.5, 0.1)}
_TIMES = {"a clear day": ((0.25, 0.45, 0.85), (0.7, 0.8, 0.95)),
          "sunset": ((0.3, 0.25, 0.5), (0.95, 0.55, 0.3)),
          "an overcast day": ((0.55, 0.57, 0.6), (0.8, 0.8, 0.82))}


def make_scene(seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    time_name = list(_TIMES)[rng.integers(len(_TIMES))]
    top, hor = (np.array(c, np.float32) for c in _TIMES[time_name])
    pole_name = list(_COLOUR_NAMES)[rng.integers(len(_COLOUR_NAMES))]
    speed = float(rng.uniform(6.0, 14.0))
    objs, cols = [], []
    n_poles = 12
    for k in range(n_poles):  # roadside poles, fixed in the world, wrapping every 120 m
        side = 1.0 if k % 2 == 0 else -1.0
        objs.append([k * 10.0 + rng.uniform(0, 4), side * rng.uniform(5.0, 8.0), rng.uniform(0.25, 0.5),
                     rng.uniform(3.0, 6.0), 0.0, 120.0])
        cols.append(_COLOUR_NAMES[pole_name])
    n_cars = int(rng.integers(2, 5))
    car_cols = list(_COLOUR_NAMES)
    for k in range(n_cars):  # other cars in both lanes, moving at their own speeds
        lane = -1.75 if k % 2 == 0 else 1.75
        objs.append([rng.uniform(-40, 40), lane, 1.0, rng.uniform(1.3, 1.8), speed * rng.uniform(0.5, 1.3),
                     100.0])
        cols.append(_COLOUR_NAMES[car_cols[rng.integers(len(car_cols))]])
    objects = np.array(objs, np.float32)
    caption = (f"A video of a car driving on a two-lane road on {time_name}, past {pole_name} poles, "
               f"with {n_cars} other cars and mountains in the distance.")
    return Scene(speed, top, hor, np.array([0.25, 0.5, 0.2], np.float32), objects,
                 np.array(cols, np.float32), rng.uniform(0, 2 * math.pi, 3).astype(np.float32), caption)


def render_view(scene: Scene, yaw_deg: float, hfov_deg: float, size: tuple[int, int], times: np.ndarray):
    """Render one camera: uint8 ``[len(times), H, W, 3]``.

    The camera has no pitch, so a pixel's horizontal ray direction depends only on its column and its
    vertical slope only on its row; every intersection is then an outer product of per-row and
    per-column terms, which keeps 1920x1280 rendering cheap.
    """
    h, w = size
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    right = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / f          # [W]
    down = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / f           # [H]
    yaw = math.radians(yaw_deg)
    # ray = forward + right * (camera's right vector); right vector of yaw is (sin, -cos)
    dx = (np.float32(math.cos(yaw)) + right * np.float32(math.sin(yaw))).astype(np.float32)  # [W]
    dy = (np.float32(math.sin(yaw)) - right * np.float32(math.cos(yaw))).astype(np.float32)  # [W]
    az = np.arctan2(dy, dx)                                              # [W] azimuth of each column
    # sky with a mountain band: static (infinitely far), so identical across frames and views' overlaps
    elev = np.arctan2(-down[:, None], np.sqrt(1 + right ** 2)[None, :])  # [H, W] elevation angle
    p = scene.mountain_phase
    ridge = 0.04 + 0.025 * np.sin(3 * az + p[0]) + 0.015 * np.sin(7 * az + p[1]) + 0.008 * np.sin(17 * az + p[2])
    a = np.clip(elev / 0.6, 0, 1)[..., None]
    sky = (1 - a) * scene.sky_horizon + a * scene.sky_top
    sky = np.where((elev < ridge[None, :])[..., None], np.array([0.35, 0.4, 0.45], np.float32), sky)
    # ground: ray parameter where it hits z = 0 (rows below the horizon only)
    below = down > 1e-4
    t_row = np.where(below, CAMERA_HEIGHT / np.maximum(down, 1e-4), 1e4).astype(np.float32)  # [H]
    gx0 = t_row[:, None] * dx[None, :]
    gy = t_row[:, None] * dy[None, :]
    dist = t_row[:, None] * np.sqrt(dx ** 2 + dy ** 2)[None, :]
    fog = np.exp(-np.minimum(dist, 1e4) / 70.0)[..., None]
    out = np.empty((len(times), h, w, 3), np.uint8)
    obj = scene.objects
    for n, t in enumerate(times):
        gx = gx0 + scene.speed * t
        road = np.abs(gy) < 3.5
        img = np.where(road[..., None], np.float32(0.33), scene.grass)
        img = img * np.where((np.floor(gx / 4) + np.floor(gy / 4)) % 2 == 0, 1.0, 0.85)[..., None]
        lines = ((np.abs(np.abs(gy) - 3.4) < 0.12) | ((np.abs(gy) < 0.1) & (np.mod(gx, 6.0) < 3.0)))
        img = np.where(lines[..., None], np.float32(0.95), img)
        img = fog * img + (1 - fog) * scene.sky_horizon
        img = np.where(below[:, None, None], img, sky)
        depth = np.where(below[:, None], dist, np.inf)
        # vertical cylinders (poles, cars): solve |t (dx, dy) - c| = r per column, test height per row
        for k in range(len(obj)):
            x0, cy, r, height, v, period = obj[k, :6]
            cx = (x0 + (v - scene.speed) * t + period / 2) % period - period / 2
            a2 = dx ** 2 + dy ** 2
            b = -2 * (dx * cx + dy * cy)
            c = cx * cx + cy * cy - r * r
            disc = b * b - 4 * a2 * c
            tc = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a2), np.inf)  # [W]
            tc = np.where(tc > 0.1, tc, np.inf)
            z = CAMERA_HEIGHT - tc[None, :] * down[:, None]
            hit = (z >= 0) & (z <= height) & (tc[None, :] * np.sqrt(a2)[None, :] < depth)
            shade = 0.6 + 0.4 * np.clip(-(dx * cx + dy * cy) / (np.sqrt(a2) * math.hypot(cx, cy) + 1e-6), 0, 1)
            col = scene.colours[k][None, None, :] * shade[None, :, None]
            img = np.where(hit[..., None], col, img)
            depth = np.where(hit, tc[None, :] * np.sqrt(a2)[None, :], depth)
        out[n] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18, gop_seconds: float = 2.0):
    """Encode uint8 ``[T, H, W, 3]`` RGB frames to an H.264 mp4 (libx264 when present, else FFmpeg's h264
    encoder), yuv420p, constant frame rate ``fps``."""
    import av  # noqa: PLC0415

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs an even frame size, got {h}x{w}")
    codec = "libx264" if "libx264" in av.codecs_available else "h264"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.mp4")
    try:  # a kill or an error never leaves a half file under the final name
        with av.open(str(tmp), "w") as c:
            s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.codec_context.gop_size = max(1, int(round(gop_seconds * fps)))
            if codec == "libx264":
                s.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
            for img in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
            c.mux(s.encode(None))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_view(args) -> None:
    out, clip, scene_seed, key, yaw, hfov, size, frames, fps = args
    scene = make_scene(scene_seed)
    times = np.arange(frames, dtype=np.float32) / np.float32(fps)
    write_video(video_path(out, key, clip), render_view(scene, yaw, hfov, size, times), fps)
    mp = meta_path(out, key, clip)
    mp.parent.mkdir(parents=True, exist_ok=True)
    mp.write_text(scene.caption + "\n", encoding="utf-8")


def generate_dataset(out: str | Path, views: int = 5, clips: int = 2, frames: int = 24,
                     size: tuple[int, int] = (64, 96), fps: float = 10.0, seed: int = 0, workers: int = 1) -> dict:
    """Write the dataset; returns ``{"view_keys", "clips", "captions"}`` (captions per clip).
    ``workers`` > 1 renders and encodes (clip, view) pairs in parallel processes (same bytes as serial)."""
    out = Path(out)
    if clips < 1 or frames < 1:
        raise ValueError(f"clips and frames must be >= 1, got clips={clips} frames={frames}")
    rig = camera_rig(views)
    names = [f"clip{ci:04d}" for ci in range(clips)]
    seeds = [int(np.random.SeedSequence([seed, ci]).generate_state(1)[0]) for ci in range(clips)]
    jobs = [(out, clip, sd, key, yaw, hfov, tuple(size), frames, fps)
            for clip, sd in zip(names, seeds) for key, yaw, hfov in rig]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_view, jobs))
    else:
        for job in jobs:
            _write_view(job)
    captions = {clip: make_scene(sd).caption for clip, sd in zip(names, seeds)}
    return {"view_keys": [k for k, _, _ in rig], "clips": names, "captions": captions}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 480x848), got {text!r}") from None
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"--size {text}: height and width must be even and >= 16")
    return h, w


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dataset root to create")
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--frames", type=int, default=24, help="frames per clip and view")
    ap.add_argument("--size", type=_parse_size, default=(64, 96), help="HxW, e.g. 1280x1920")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (large sizes)")
    a = ap.parse_args(argv)
    # Checked before any file is written: one line naming the argument, not a traceback from the encoder.
    bad = next((f"--{k} {v}: expected {want}" for k, v, ok, want in (
        ("views", a.views, 1 <= a.views <= 8, "1 to 8 cameras"), ("clips", a.clips, a.clips >= 1, "a count >= 1"),
        ("frames", a.frames, a.frames >= 1, "a count >= 1"),
        ("fps", a.fps, math.isfinite(a.fps) and a.fps > 0, "a finite number > 0"),
        ("workers", a.workers, a.workers >= 1, "a count >= 1")) if not ok), None)
    if bad:
        ap.exit(2, f"{ap.prog}: error: {bad}\n")
    info = generate_dataset(a.out, a.views, a.clips, a.frames, a.size, a.fps, a.seed, a.workers)
    print(f"wrote {len(info['clips'])} clips x {len(info['view_keys'])} views "
          f"({', '.join(info['view_keys'])}) of {a.frames} frames at {a.size[0]}x{a.size[1]}, {a.fps} fps "
          f"to {a.out}")


if __name__ == "__main__":
    main()
