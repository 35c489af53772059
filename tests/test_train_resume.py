"""Kill a training process (SIGKILL, at random points of its checkpoint saves) and restart the same command: it
resumes from the last complete checkpoint and reproduces the uninterrupted run's losses exactly; a kill never
leaves a partial file behind or a pointer to an incomplete set."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvmodel.trainer.checkpoint import Checkpointer
from test_train_loop import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
JOB = Path("posttraining/diffusion_text2world/text2world_multiview_tiny_example")


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


def kill_during_save(cmd: list[str], ckdir: Path, after: int, rng: random.Random) -> str:
    """Start ``cmd``; as soon as a checkpoint file of an iteration >= ``after`` is being written (its temporary
    exists), wait a random 0-40 ms (inside or just past that save) and SIGKILL the process. Returns what was on
    disk at the kill, for messages."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    seen = None
    while time.time() < deadline and proc.poll() is None and seen is None:
        with contextlib.suppress(FileNotFoundError):
            seen = next((e.name for e in os.scandir(ckdir) if e.name.startswith(".iter_")
                         and int(e.name[6:15]) >= after), None)
        time.sleep(0.001)
    assert proc.poll() is None and seen, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    time.sleep(rng.uniform(0, 0.04))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed while writing {seen}; left {sorted(p.name for p in ckdir.iterdir())}"


def check_after_kill(ckdir: Path, where: str) -> int:
    """Whatever a kill interrupted: no final name holds a partial file, the pointer names an intact set."""
    for p in ckdir.glob("iter_*.pt"):
        torch.load(p, map_location="cpu", weights_only=False)
    cp = Checkpointer(ckdir)
    n = cp.pointer()
    assert n is not None and cp.verify(n) is None, where
    return n


@pytest.mark.slow  # three training processes, one killed: out of the quick command (-m 'not slow')
def test_kill_during_saves_and_resume_reproduces_losses(dataset, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    ref = subprocess.run(command(dataset, tmp_path / "ref"), env=env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = losses(tmp_path / "ref" / JOB)
    assert sorted(reference) == list(range(1, 11))

    out = tmp_path / "killed"
    ckdir = out / JOB / "checkpoints"
    where = kill_during_save(command(dataset, out), ckdir, 4, rng)  # the save of 4 (or 6): 2 is complete
    done = check_after_kill(ckdir, f"{where} (seed {seed})")
    where = kill_during_save(command(dataset, out), ckdir, done + 2, rng)  # the restarted run, killed again
    done = check_after_kill(ckdir, f"{where} (seed {seed})")
    assert done < 10, "the kill came too late to test resuming"

    again = subprocess.run(command(dataset, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from iteration {done}" in again.stderr + again.stdout
    assert "took over the lock" in again.stderr + again.stdout  # the killed run's lock, left behind
    resumed = losses(out / JOB)
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == reference, f"seed {seed}"  # bitwise: same data order, same noise, same updates
    assert not list(ckdir.glob(".*.tmp*"))
    cp = Checkpointer(ckdir)
    assert cp.pointer() == 10 and all(cp.verify(n) is None for n in range(2, 11, 2))
    # Restarting a finished run does nothing more.
    third = subprocess.run(command(dataset, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and losses(out / JOB) == reference
