"""Generation split over 2 processes (``torchrun ... --num_gpus 2``, gloo on CPU, the trainer's Ulysses context
parallelism): the same latent and video as one process, files written once, by rank 0."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_inference import FRAMES, H, W, _decode, env  # noqa: F401  (env: the tiny model folders + tiny T5)

REPO = Path(__file__).resolve().parents[1]


def _generate(env, out: Path, procs: int) -> subprocess.CompletedProcess:
    pyenv = dict(os.environ, OMP_NUM_THREADS="1")
    pyenv["PYTHONPATH"] = os.pathsep.join([str(REPO), pyenv.get("PYTHONPATH", "")])
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    cmd = launch + ["-m", "mvmodel.inference.text2world_multiview", "--checkpoint_dir", str(env["ck"]),
                    "--diffusion_transformer_dir", "Tiny-Multiview_post-trained", "--t5_dir", env["t5"],
                    "--prompt", "A car drives on a highway.", "--num_steps", "3", "--no_progress", "--device", "cpu",
                    "--video_save_folder", str(out), "--video_save_name", "clip", "--save_latents",
                    "--num_gpus", str(procs), "--disable_guardrail"]
    return subprocess.run(cmd, env=pyenv, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # torchrun, 2 processes: out of the quick command (-m 'not slow')
def test_two_process_generation_matches_one(env, tmp_path):
    one = _generate(env, tmp_path / "one", 1)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    two = _generate(env, tmp_path / "two", 2)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    assert "context parallel over 2 ranks" in two.stderr + two.stdout
    # Rank 0 alone writes: exactly the one-process file set.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = (torch.load(tmp_path / d / "clip_latent.pt") for d in ("one", "two"))
    assert a.shape == b.shape == (1, 16, 5 * 2, H // 8, W // 8)
    assert a.abs().mean() > 0.1  # a real sample, not zeros
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # fp32 here; bf16 on GPUs
    va, _ = _decode(tmp_path / "one" / "clip.mp4")
    vb, _ = _decode(tmp_path / "two" / "clip.mp4")
    assert va.shape == vb.shape == (5 * FRAMES, H, W, 3)
    assert np.abs(va.astype(int) - vb.astype(int)).mean() < 1.0  # equal frames up to codec noise


@pytest.mark.slow
def test_num_gpus_must_match_the_processes(env, tmp_path):
    pyenv = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "mvmodel.inference.text2world_multiview", "--checkpoint_dir",
                          str(env["ck"]), "--prompt", "x", "--num_gpus", "2"], env=pyenv, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--num_gpus 2" in res.stderr and "--nproc_per_node=2" in res.stderr
