"""README's Video2World CPU walk-through, run as written, then measured: the continuation of the synthetic drive
from its first 9 frames per camera must match the drive's real frames 9-24 (frames the model is not given)
better than a Text2World sample does.

The Text2World sample is the same trained net with no condition frames (upstream's training draws 0-2 condition
latent frames per sample, so one third of its training is exactly Text2World on the same data), same prompt,
seed, guidance and steps: the only difference is the given frames. The figure is the mean squared error in
8-bit pixel values over frames 9-24 of all 5 cameras against the real frames passed through the walk-through's
tokenizer (encode + decode: what a perfect model could output; the built-in tokenizer alone leaves an error of
~450 against the raw frames, which would hide most of the difference), also reported against the raw frames.

    python tests/test_video2world_walkthrough.py --measure FOLDER   # the numbers for a folder the block ran in
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_readme import _frames, walkthrough_commands  # noqa: E402

MARKER = "<!-- tests/test_video2world_walkthrough.py runs the next code block line by line -->"
JOB = "checkpoints/posttraining/diffusion_video2world/video2world_multiview_cpu_example"
# Views of continuation.mp4 in prompt order (front, left, right, back_left, back_right) -> dataset cameras.
SLOT_CAMERAS = ["pinhole_front", "pinhole_front_left", "pinhole_front_right", "pinhole_side_left", "pinhole_side_right"]
GIVEN, FRAMES = 9, 25
PROMPT = "A video of a car driving on a two-lane road on an overcast day, past red poles."


def _real(folder: Path) -> np.ndarray:
    """The drive's real frames 0..24 per camera, prompt order: [5, 25, H, W, 3] float."""
    return np.stack([_frames(folder / "datasets/synthetic/videos" / cam / "clip0000.mp4")[0][:FRAMES]
                     for cam in SLOT_CAMERAS])


def _text2world_sample(folder: Path, seed: int = 1) -> np.ndarray:
    """The same net, prompt, seed, guidance and steps as the README command, with no condition frames."""
    import torch

    from mvmodel.inference.model_dir import resolve_model
    from mvmodel.inference.pipeline import MultiviewGenerationPipeline
    from mvmodel.inference.video_io import in_prompt_order

    cwd = os.getcwd()
    os.chdir(folder)  # the job config's relative paths (dataset, tokenizer), as for the README command
    try:
        spec = resolve_model(JOB.rsplit("/", 1)[0], JOB.rsplit("/", 1)[1])
        pipe = MultiviewGenerationPipeline(spec, t5_dir="checkpoints/tiny-t5", tokenizer_dir=spec.tokenizer_dir,
                                           device="cpu", progress=False)
        dummy = torch.zeros(spec.n_views, 1, 64, 96, 3, dtype=torch.uint8)  # unused: 0 condition frames
        video, = pipe.generate([{s: PROMPT for s in spec.slots}], seeds=[seed], guidance=2.0,
                               fps=spec.defaults["fps"], num_video_frames=FRAMES, height=64, width=96,
                               input_frames=[dummy], num_input_frames=0)
    finally:
        os.chdir(cwd)
    return in_prompt_order(video.numpy(), spec.slots)[0].astype(np.float32)


def _tokenized(folder: Path, real: np.ndarray) -> np.ndarray:
    """The real frames through the walk-through's tokenizer (encode, decode): what a perfect model could output."""
    import torch

    from mvmodel.tokenizer import load_tokenizer

    tok = load_tokenizer(str(folder / "checkpoints/mvworld-tokenizer-synthetic"), pixel_chunk_duration=FRAMES,
                         device="cpu", dtype=torch.float32)
    x = torch.from_numpy(real).permute(0, 4, 1, 2, 3) / 127.5 - 1
    with torch.no_grad():
        y = tok.decode(tok.encode(x))
    return ((y + 1).clamp(0, 2) / 2 * 255).permute(0, 2, 3, 4, 1).numpy()


def measure(folder: Path) -> dict[str, float]:
    real = _real(folder)
    target = _tokenized(folder, real)
    cont = _frames(folder / "outputs/v2w_cpu_example/continuation.mp4")[0].reshape(5, FRAMES, 64, 96, 3)
    t2w = _text2world_sample(folder)
    out = {}
    for name, video in (("video2world", cont), ("text2world", t2w)):
        mse = float(((video[:, GIVEN:] - target[:, GIVEN:]) ** 2).mean())
        out[f"{name}_mse"], out[f"{name}_psnr"] = mse, float(10 * np.log10(255.0**2 / mse))
        out[f"{name}_mse_raw"] = float(((video[:, GIVEN:] - real[:, GIVEN:]) ** 2).mean())
        out[f"{name}_mse_next8"] = float(((video[:, GIVEN:GIVEN + 8] - target[:, GIVEN:GIVEN + 8]) ** 2).mean())
        out[f"{name}_given_mse"] = float(((video[:, :GIVEN] - target[:, :GIVEN]) ** 2).mean())
    out["tokenizer_floor_raw"] = float(((target[:, GIVEN:] - real[:, GIVEN:]) ** 2).mean())
    out["ratio"] = out["video2world_mse"] / out["text2world_mse"]
    out["ratio_raw"] = out["video2world_mse_raw"] / out["text2world_mse_raw"]
    return out


@pytest.mark.slow
def test_video2world_walkthrough_continues_the_drive(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell: torchrun sets its own
    cmds = walkthrough_commands((ROOT / "README.md").read_text(), MARKER)
    assert cmds[-2].startswith("torchrun --nproc_per_node=2 -m mvmodel.train") and cmds[-1].startswith(
        "python -m mvmodel.inference.video2world_multiview")
    times = []
    for cmd in cmds:
        t0 = time.time()
        r = subprocess.run(shlex.split(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
        times.append((round(time.time() - t0), cmd[:60]))
        assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"{cmd}\n{r.stderr[-3000:]}"
    print("Video2World walk-through timings (s):", times)
    assert (tmp_path / JOB / "checkpoints").is_dir()
    m = measure(tmp_path)
    print("continuation vs real frames 9-24:", {k: round(v, 3) for k, v in m.items()})
    # Measured with the fitted tokenizer: 0.952 (502 vs 527; raw frames 0.963); with the earlier fixed DCT
    # tokenizer it was 0.75. The claim tested is the issue's: the continuation matches better than the sample.
    assert m["ratio"] < 1.0 and m["ratio_raw"] < 1.0, m
    assert m["video2world_given_mse"] < 20 < m["text2world_given_mse"]  # the given frames are reproduced


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="measure a folder the README's Video2World block ran in")
    ap.add_argument("--measure", required=True, type=Path)
    print(measure(ap.parse_args().measure.resolve()))
