"""The embedded end-to-end demo: data -> post-training -> checkpoints -> multi-view sample, in a few minutes.

    python -m mvmodel.demo [--out outputs/demo] [--steps 800] [--device auto]

1. writes a synthetic 5-camera driving dataset in upstream's layout (real H.264 mp4s, captions);
2. builds a tiny T5 encoder offline and writes the T5 embedding pickles, as for a real dataset; fits a linear
   8x8x8 tokenizer to the dataset (PCA of its patches, ``mvmodel.tokenizer.fitted``) and exports it in upstream's
   TorchScript layout (encoder.jit, decoder.jit, mean_std.pt; the arrays also in basis.npz) with per-channel
   latent statistics measured on the dataset, so latents have unit variance as with the real one;
3. post-trains a small multi-view DiT through the same trainer as ``mvmodel.train`` (experiment
   ``text2world_multiview_demo``), writing checkpoints in upstream's layout;
4. loads the EMA checkpoint into a fresh network and samples a 5-view video with the EDM Euler sampler and
   classifier-free guidance, decodes it and writes an mp4 grid (plus the real clip's grid for comparison);
5. prints where everything is and the loss going down.

Runs on the GPU when there is one, else on the CPU (about 4 minutes on 2 idle cores). The sample is 25 frames
(2.5 s at 10 fps) per camera: 4 latent frames (the first frame, then 3 groups of 8), each group decoded frame by
frame by the fitted tokenizer, so the picture moves from frame to frame (the fixed DCT basis of the built-in
tokenizer shows 8x8 blocks and one still picture per group).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .device import resolve_device

# 25 frames per camera = 4 latent frames (the tokenizer's causal 1 + 8 + 8 + 8 grouping): 2.5 s at 10 fps. One
# 4-second drive (16 windows): the small net learns one scene in 300 steps; with 2-4 clips its samples stay blotchy.
FRAMES, CLIP_FRAMES, CLIPS, SIZE = 25, 40, 1, (64, 96)
GRID = [["pinhole_front_left", "pinhole_front", "pinhole_front_right"],
        ["pinhole_side_left", None, "pinhole_side_right"]]


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _idle_cores(window_s: float = 0.3) -> int:
    """Cores nobody else is using now (Linux: /proc/stat over ``window_s``; elsewhere the 1-minute load average,
    which lags: right after a build it still counts the compiler)."""
    n = os.cpu_count() or 1

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all jiffies, idle + iowait

    try:
        t0, i0 = busy_idle()
        time.sleep(window_s)
        t1, i1 = busy_idle()
        return round(n * (i1 - i0) / max(1, t1 - t0))
    except (OSError, ValueError, IndexError):
        return round(n - os.getloadavg()[0]) if hasattr(os, "getloadavg") else n


def prepare_data(out: Path, clips: int, frames: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """Synthetic dataset + tiny T5 + embedding pickles (skipped when already there)."""
    from .data import synthetic
    from .data.t5_embeddings import T5TextEncoder, encode_dataset
    from .data.tiny_t5 import build_tiny_t5

    ds, t5 = out / "dataset", out / "tiny_t5"
    if not (ds / "videos").is_dir():
        t0 = time.time()
        info = synthetic.generate_dataset(ds, views=5, clips=clips, frames=frames, size=size, fps=10.0, seed=0)
        _log(f"synthetic dataset: {clips} clips x 5 cameras x {frames} frames at {size[0]}x{size[1]} -> {ds} "
             f"({time.time() - t0:.0f}s); e.g. \"{next(iter(info['captions'].values()))}\"")
    if not (t5 / "config.json").is_file():
        build_tiny_t5(t5)
        _log(f"tiny T5 encoder (2 layers, width 1024, SentencePiece tokenizer) -> {t5}")
    if not (ds / "cache").is_dir():
        counts = encode_dataset(ds, T5TextEncoder(t5, device="cpu"))
        _log(f"T5 embeddings: {counts['pickles_written']} pickles under {ds}/t5_xxl and {ds}/cache")
    return ds, t5


def export_tokenizer(ds: Path, out: Path, num_frames: int, size: tuple[int, int]) -> Path:
    """The dataset-fitted tokenizer as a TorchScript checkpoint folder whose mean_std.pt normalises its latents."""
    from .tokenizer.export import export_normalised_tokenizer

    tok_dir = out / "tokenizer"
    if (tok_dir / "mean_std.pt").is_file():
        return tok_dir
    r = export_normalised_tokenizer(ds, tok_dir, num_frames, size)
    _log(f"tokenizer: 8x8x8 PCA basis fitted to the dataset, exported to {tok_dir} (TorchScript, upstream layout; "
         f"basis.npz), latent std per channel {r['std_min']:.3f}..{r['std_max']:.3f} (RMS {r['std']:.3f}), "
         f"normalised; reconstruction PSNR {r['psnr']:.1f} dB (fixed DCT basis: {r['psnr_dct']:.1f} dB)")
    return tok_dir


def train(ds: Path, tok_dir: Path, out: Path, steps: int, device: str, fresh: bool,
          extra_overrides: tuple[str, ...] = ()) -> tuple[dict, Path]:
    from .configs import make_config
    from .trainer import Trainer

    overrides = [f"data.dataset_dir={ds}", f"model.tokenizer_dir={tok_dir}", "model.tokenizer_dtype=float32",
                 f"job.output_root={out / 'checkpoints'}", f"trainer.max_iter={steps}",
                 f"trainer.device={device}", f"checkpoint.save_iter={max(1, steps // 2)}", *extra_overrides]
    cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_demo", overrides)
    if fresh and cfg.job.path_local.exists():
        shutil.rmtree(cfg.job.path_local)
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    return summary, cfg.job.path_local


def loss_table(metrics_file: Path, rows: int = 6) -> list[tuple[int, int, float, float]]:
    """(first, last iteration, mean loss, mean weighted denoising error) over ``rows`` windows of the run."""
    by_iter = {}
    for line in metrics_file.read_text().splitlines():
        r = json.loads(line)
        by_iter[r["iteration"]] = (r["loss"], r["edm"])
    its = sorted(by_iter)
    chunks = np.array_split(np.array(its), min(rows, len(its)))
    return [(int(c[0]), int(c[-1]), float(np.mean([by_iter[i][0] for i in c])),
             float(np.mean([by_iter[i][1] for i in c]))) for c in chunks if len(c)]


def to_grid(video: torch.Tensor, view_keys: list[str]) -> np.ndarray:
    """[3, V*T, H, W] in [-1, 1] -> uint8 [T, 2H, 3W, 3]: front cameras on top, side cameras below."""
    V = len(view_keys)
    C, VT, H, W = video.shape
    T = VT // V
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.reshape(C, V, T, H, W).permute(1, 2, 3, 4, 0).numpy()  # [V, T, H, W, 3]
    grid = np.zeros((T, 2 * H, 3 * W, 3), np.uint8)
    for r, row in enumerate(GRID):
        for c, key in enumerate(row):
            if key in view_keys:
                grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = frames[view_keys.index(key)]
    return grid


@torch.no_grad()
def sample(job_dir: Path, ds: Path, out: Path, device: str, num_steps: int, guidance: float, seed: int) -> dict:
    """Sample a 5-view clip from the newest EMA checkpoint; write sample and reference mp4 grids."""
    from .configs import Config
    from .data import MultiviewDataset
    from .data.synthetic import write_video
    from .diffusion import Denoiser, condition_uncondition, initial_noise, sample_euler, video_to_model_range
    from .networks import MultiviewDiT, load_cosmos_checkpoint, preset
    from .tokenizer import load_tokenizer
    from .trainer.checkpoint import Checkpointer, iter_name

    cfg_d = json.loads((job_dir / "config.json").read_text())
    cfg = Config()
    cfg.model.net, cfg.model.net_overrides = cfg_d["model"]["net"], cfg_d["model"]["net_overrides"]
    d = cfg_d["data"]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    ck = Checkpointer(job_dir / "checkpoints")
    n = ck.latest()
    ema_path = ck.dir / iter_name(n, "ema_model")
    overrides = dict(cfg.model.net_overrides)
    overrides["camera_names"] = tuple(overrides.get("camera_names") or ())
    net = MultiviewDiT(preset(cfg.model.net, **overrides)).eval()
    load_cosmos_checkpoint(net, ema_path, strict=True)  # the checkpoint is what inference loads
    net.to(dev)
    tok = load_tokenizer(cfg_d["model"]["tokenizer_dir"], pixel_chunk_duration=d["num_frames"], device=dev,
                         dtype=torch.float32)
    dataset = MultiviewDataset(ds, num_frames=d["num_frames"], view_keys=d["view_keys"],
                               video_size=tuple(d["video_size"]), return_captions=True)
    item = dataset[0]
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
    V = len(d["view_keys"])
    cond, uncond = condition_uncondition(batch, n_views=V, device=dev)
    shape = (1, 16, V * (1 + (d["num_frames"] - 1) // 8), d["video_size"][0] // 8, d["video_size"][1] // 8)
    gen = torch.Generator().manual_seed(seed)
    latent = sample_euler(Denoiser(net), initial_noise(shape, generator=gen, device=dev), cond, uncond,
                          guidance=guidance, num_steps=num_steps)
    video = tok.decode_views(latent / 0.5, V)[0].cpu()  # latents were scaled by sigma_data in training
    fps = float(item["fps"])
    sample_path, ref_path = out / "sample_grid.mp4", out / "reference_grid.mp4"
    write_video(sample_path, to_grid(video, d["view_keys"]), fps)
    real = video_to_model_range(item["video"])
    write_video(ref_path, to_grid(real, d["view_keys"]), fps)
    captions = item.get("captions") or []
    return {"sample": sample_path, "reference": ref_path, "checkpoint": ema_path, "iteration": n,
            "caption": captions[1] if len(captions) > 1 else "", "frames": video.shape[1] // V,
            "psnr": psnr_per_view(video, real, d["view_keys"])}


def psnr_per_view(video: torch.Tensor, real: torch.Tensor, view_keys: list[str]) -> dict[str, float]:
    """PSNR (dB) of each camera's sampled frames against the real clip whose caption prompted them ([3, V*T, H, W]
    in [-1, 1]): how much of the drive (road, lane marks, poles in their places) the sample reproduces."""
    V = len(view_keys)
    err = (video.float().clamp(-1, 1) - real.float()).pow(2).reshape(3, V, -1).mean(dim=(0, 2))
    return {k: float(10 * torch.log10(4.0 / e.clamp_min(1e-12))) for k, e in zip(view_keys, err)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/demo", help="folder for the dataset, checkpoints and videos")
    ap.add_argument("--steps", type=int, default=250, help="training iterations (of 2 windows each)")
    ap.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    ap.add_argument("--sample_steps", type=int, default=35, help="Euler steps of the sampler (upstream: 35)")
    ap.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (upstream: 7)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue a previous demo run instead of starting over")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    if a.device not in ("auto", "cpu", "cuda"):  # the trainer's trainer.device values
        ap.exit(2, f"{ap.prog}: error: --device {a.device!r}: expected auto, cpu or cuda\n")
    try:  # before any data is built: a wrong device is one line, as in mvmodel.train
        resolve_device(a.device)
    except ValueError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
        # Intra-op threads pay only on idle cores: measured on 2 cores, 0.77 s/step with 2 threads vs 1.15 s with 1
        # when idle, but 2.1 s vs 0.7 s when other processes keep the cores busy. So one thread per idle core.
        torch.set_num_threads(max(1, min(_idle_cores(), torch.get_num_threads())))
        _log(f"CPU run: {torch.get_num_threads()} thread(s), one per idle core")
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, _ = prepare_data(out, clips=CLIPS, frames=CLIP_FRAMES, size=SIZE)
    tok_dir = export_tokenizer(ds, out, num_frames=FRAMES, size=SIZE)
    t1 = time.time()
    summary, job_dir = train(ds, tok_dir, out, a.steps, a.device, fresh=not a.resume)
    t2 = time.time()
    res = sample(job_dir, ds, out, a.device, a.sample_steps, a.guidance, a.seed)
    t3 = time.time()
    table = loss_table(job_dir / "metrics.jsonl")
    print("\n" + "=" * 78)
    print(f"mvworld demo finished in {t3 - t0:.0f}s (data {t1 - t0:.0f}s, training {t2 - t1:.0f}s, "
          f"sampling {t3 - t2:.0f}s)")
    print("training loss, mean per window (loss = weighted error * exp(-u) + u with the learned uncertainty u,\n"
          "so it can go negative; 'error' = the EDM-weighted denoising error lambda(sigma) * (x0 - D)^2):")
    for first, last, loss, err in table:
        bar = "#" * max(1, int(round(40 * err / max(1e-9, table[0][3]))))
        print(f"  iterations {first:5d}-{last:5d}: loss {loss:8.4f}  error {err:7.4f} {bar}")
    print(f"dataset            {ds}  (videos/, metas/, t5_xxl/, cache/)")
    print(f"tiny T5 encoder    {out / 'tiny_t5'}")
    print(f"tokenizer          {tok_dir}  (encoder.jit, decoder.jit, mean_std.pt: upstream's layout)")
    print(f"job folder         {job_dir}  (config.json, metrics.jsonl)")
    print(f"checkpoints        {job_dir / 'checkpoints'}  (iter_*_reg_model.pt, iter_*_ema_model.pt, ...)")
    print(f"sampled video      {res['sample']}  (5 cameras: front row left/front/right, side cameras below)")
    print(f"real clip          {res['reference']}  (sample vs this clip, PSNR per camera: "
          + ", ".join(f"{k.removeprefix('pinhole_')} {v:.1f} dB" for k, v in res["psnr"].items()) + ")")
    print(f"more samples       python -m mvmodel.inference.text2world_multiview --checkpoint_dir "
          f"{job_dir.parent} --diffusion_transformer_dir {job_dir.name} --t5_dir {out / 'tiny_t5'} --guidance 2 "
          f"--disable_guardrail "
          f"--prompt \"{res['caption'] or 'A video of a car driving on a road.'}\"")
    print("=" * 78)
    return {"summary": summary, "losses": table, **res, "job_dir": job_dir}


if __name__ == "__main__":
    main()
