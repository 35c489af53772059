"""Kill a training process (SIGKILL, mid-run) and restart the same command: it resumes from the last complete
checkpoint and reproduces the uninterrupted run's losses exactly; a kill never leaves a partial file behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_loop import tiny_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


def command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mvmodel.train", "--config=mvmodel/configs/multiview.py", "--",
            "experiment=text2world_multiview_tiny_example", f"data.dataset_dir={dataset}", f"job.output_root={out}",
            "trainer.device=cpu", "trainer.max_iter=10", "checkpoint.save_iter=2", "checkpoint.keep_last=0"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def losses(job: Path) -> dict[int, float]:
    """Iteration -> loss; a resumed run re-logs iterations after its checkpoint, the last entry wins."""
    out = {}
    for line in (job / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["iteration"]] = row["loss"]
    return out


def test_kill_and_resume_reproduces_losses(dataset, tmp_path):
    job_rel = Path("posttraining/diffusion_text2world/text2world_multiview_tiny_example")
    ref = subprocess.run(command(dataset, tmp_path / "ref"), env=env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = losses(tmp_path / "ref" / job_rel)
    assert sorted(reference) == list(range(1, 11))

    out = tmp_path / "killed"
    ckdir = out / job_rel / "checkpoints"
    proc = subprocess.Popen(command(dataset, out), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    latest = None
    while time.time() < deadline and proc.poll() is None:
        f = ckdir / "latest_checkpoint.txt"
        if f.is_file() and f.read_text().strip() >= "iter_000000004.pt":
            latest = f.read_text().strip()
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest is not None
    done = (ckdir / "latest_checkpoint.txt").read_text().strip()
    assert done < "iter_000000010.pt", "the kill came too late to test resuming"
    for p in ckdir.glob("iter_*.pt"):  # whatever the kill interrupted, no final name holds a partial file
        torch.load(p, map_location="cpu", weights_only=False)

    again = subprocess.run(command(dataset, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from iteration {int(done[5:14])}" in again.stderr + again.stdout
    resumed = losses(out / job_rel)
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == reference  # bitwise: same data order, same noise, same updates
    assert not list(ckdir.glob(".*.tmp*"))
    # Restarting a finished run does nothing more.
    third = subprocess.run(command(dataset, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and losses(out / job_rel) == reference
