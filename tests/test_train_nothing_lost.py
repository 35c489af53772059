"""Issue 14, trainer half: checkpoints that survive a full disk, a restart and a diverged run, and no silent wrong
result from bad flags. Real files, real file systems (a small tmpfs as root), real processes and locks."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvmodel.configs import make_config
from mvmodel.trainer import CheckpointError, Trainer, TrainingError
from mvmodel.trainer.checkpoint import LATEST, Checkpointer, iter_name, manifest_name
from test_train_loop import CONFIG, EXPERIMENT, run_tiny, tiny_dataset
from test_train_resume import REPO, command, env

KINDS = ("reg_model", "ema_model", "optim", "")
JOB = Path("posttraining/diffusion_text2world/text2world_multiview_tiny_example")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


def tiny_config(dataset: Path, out: Path, *overrides: str):
    return make_config(CONFIG, EXPERIMENT, [f"data.dataset_dir={dataset}", f"job.output_root={out}",
                                            "trainer.device=cpu", *overrides])


def save_set(cp: Checkpointer, n: int, numel: int = 16) -> None:
    """One checkpoint set of small real tensors (the weights' values say which iteration wrote them)."""
    w = {"net.w": torch.full((numel,), float(n))}
    cp.write(n, "reg_model", w)
    cp.write(n, "ema_model", w)
    cp.write(n, "optim", {"optimizer": {"state": {}, "param_groups": []}, "master": w})
    cp.commit(n, {"iteration": n})


def files_of(d: Path, n: int) -> list[str]:
    return sorted(p.name for p in d.glob(f"iter_{n:09d}*"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A real file system of ``size`` (needs root / CAP_SYS_ADMIN; the test is skipped with the reason otherwise)."""
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs for a real full disk (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=inf", "optimizer.lr"), ("optimizer.lr=nan", "optimizer.lr"), ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas"), ("optimizer.betas=[nan,0.99]", "optimizer.betas"),
    ("optimizer.eps=0", "optimizer.eps"), ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"), ("optimizer.grad_clip=inf", "optimizer.grad_clip"),
    ("optimizer.warmup_start=2", "optimizer.warmup_start"), ("model.sigma_data=nan", "model.sigma_data"),
    ("trainer.max_nonfinite_steps=-1", "trainer.max_nonfinite_steps"), ("ema.rate=nan", "ema.rate"),
])
def test_bad_numeric_options_are_refused(override, key):
    with pytest.raises(ValueError, match=f"config {key}"):
        make_config(CONFIG, EXPERIMENT, [override])


# ---------------------------------------------------------------------------------------------- keep policy
def test_default_keep_policy_keeps_every_model_file(tmp_path):
    """The seed's workflow copies iter_000001000_ema_model.pt after a 2000-iteration run: with the default
    (keep_last=3) every model file stays; only optimizer/trainer state beyond the newest 3 goes."""
    cp = Checkpointer(tmp_path, keep_last=3)
    for n in range(200, 2001, 200):
        save_set(cp, n)
    cp.close()
    ema = torch.load(tmp_path / "iter_000001000_ema_model.pt", weights_only=True)
    assert torch.equal(ema["net.w"], torch.full((16,), 1000.0))
    for n in range(200, 2001, 200):
        assert (tmp_path / iter_name(n, "reg_model")).is_file() and (tmp_path / iter_name(n, "ema_model")).is_file()
        whole = n >= 1600
        assert (tmp_path / iter_name(n, "optim")).is_file() == whole and (tmp_path / iter_name(n)).is_file() == whole
    man = json.loads((tmp_path / manifest_name(1000)).read_text())
    assert man["pruned"] == [iter_name(1000, "optim"), iter_name(1000)]
    assert sorted(man["files"]) == [iter_name(1000, "ema_model"), iter_name(1000, "reg_model")]
    assert Checkpointer(tmp_path).find_resumable() == (2000, [])

    # prune_models=true: older sets go entirely; the newest 3 stay whole.
    cp = Checkpointer(tmp_path / "lean", keep_last=3, prune_models=True)
    for n in range(200, 2001, 200):
        save_set(cp, n)
    assert sorted({int(p.name[5:14]) for p in (tmp_path / "lean").glob("iter_*")}) == [1600, 1800, 2000]


def test_pruning_never_touches_sets_newer_than_the_run(tmp_path):
    """A pointer moved back by hand (or a fallback) resumes an older set: the newer ones are neither resumed nor
    pruned; pruning only looks at this run's own sets."""
    cp = Checkpointer(tmp_path, keep_last=0)
    for n in range(1, 6):
        save_set(cp, n)
    (tmp_path / LATEST).write_text(iter_name(3) + "\n")
    cp = Checkpointer(tmp_path, keep_last=1)
    n, notes = cp.find_resumable()
    assert n == 3 and "newer than latest_checkpoint.txt ([4, 5])" in notes[0]
    save_set(cp, 4)
    assert files_of(tmp_path, 5) == sorted([iter_name(5, k) for k in KINDS] + [manifest_name(5)])
    assert cp.verify(5) is None and cp.verify(4) is None
    assert not (tmp_path / iter_name(3, "optim")).exists() and (tmp_path / iter_name(3, "ema_model")).exists()
    assert (tmp_path / LATEST).read_text() == iter_name(4) + "\n"


# ---------------------------------------------------------------------------------------------- verification
def test_resume_verifies_sizes_and_checksums(tmp_path):
    cp = Checkpointer(tmp_path, keep_last=0)
    for n in (1, 2, 3):
        save_set(cp, n, numel=4096)
    # Truncated latest: falls back to 2, naming the file.
    optim3 = tmp_path / iter_name(3, "optim")
    optim3.write_bytes(optim3.read_bytes()[:-100])
    n, notes = Checkpointer(tmp_path).find_resumable()
    assert n == 2 and str(optim3) in notes[-1] and "truncated" in notes[-1]
    # Bytes flipped inside a file (same size): the checksum catches it; falls back to 1.
    reg2 = tmp_path / iter_name(2, "reg_model")
    data = bytearray(reg2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    reg2.write_bytes(bytes(data))
    n, notes = Checkpointer(tmp_path).find_resumable()
    assert n == 1 and str(reg2) in notes[-1] and "sha256" in notes[-1]
    # Nothing intact: a clear error listing every set.
    (tmp_path / iter_name(1)).unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        Checkpointer(tmp_path).find_resumable()
    assert all(str(p) in str(err.value) for p in (optim3, reg2, tmp_path / iter_name(1)))


# ---------------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, async_save):
    """A real full file system: the failed set is removed, the pointer stays, nothing is pruned, and the error
    names the file and says "disk full"."""
    with small_tmpfs(tmp_path / "small", "2m") as d:
        cp = Checkpointer(d / "ck", keep_last=1, async_save=async_save)
        save_set(cp, 1, numel=64 << 10)  # 4 x 256 KiB
        cp.drain()
        assert not cp.failed()
        save_set(cp, 2, numel=256 << 10)  # 4 x 1 MiB: does not fit
        cp.drain()
        assert cp.failed()
        with pytest.raises(CheckpointError, match="disk full") as err:
            cp.check()
        msg = str(err.value)
        assert "checkpoint of iteration 2 not saved" in msg and "iter_000000002_" in msg and "free on" in msg
        assert "needs ~" in msg
        assert (d / "ck" / LATEST).read_text() == iter_name(1) + "\n"
        assert cp.verify(1) is None  # the previous set is whole (keep_last=1 pruned nothing)
        assert files_of(d / "ck", 2) == [] and not list((d / "ck").glob(".*tmp*"))
        save_set(cp, 3)  # after a failure nothing more is written
        assert files_of(d / "ck", 3) == []
        cp.close()


@pytest.mark.slow
def test_async_save_on_full_disk_stops_the_run(dataset, tmp_path):
    """The default async save on a real full disk: the run stops at the next step with exit status 1 and an
    error naming the file; the previous checkpoint is whole, the pointer names it."""
    with small_tmpfs(tmp_path / "small", "10m") as out:  # one tiny set (~7 MB) fits, not two
        cmd = [c for c in command(dataset, out) if not c.startswith(("trainer.max_iter", "checkpoint.keep_last"))]
        r = subprocess.run(cmd + ["trainer.max_iter=10", "checkpoint.keep_last=1"], env=env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-3000:]
        assert "mvmodel.train: error: checkpoint of iteration 4 not saved" in r.stderr and "disk full" in r.stderr
        assert "iter_000000004_" in r.stderr
        ck = Checkpointer(out / JOB / "checkpoints")
        assert ck.pointer() == 2 and ck.verify(2) is None and files_of(ck.dir, 4) == []
        assert not list(ck.dir.glob(".*tmp*"))
        rows = [json.loads(line) for line in (out / JOB / "metrics.jsonl").read_text().splitlines()]
        # Stopped at the first step after the failure was known (a 7 kB/ms write: step 5), not at the end.
        assert 4 <= rows[-1]["iteration"] <= 5


@pytest.mark.slow
def test_file_size_limit_stops_the_async_run(dataset, tmp_path):
    """No mount needed: a file-size limit (EFBIG) in the training process. The background write fails, the run
    exits 1 naming the file, and no pointer or manifest names the failed set."""
    def limit():  # in the child: 1 MB per file; EFBIG instead of the SIGXFSZ that would kill the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    cmd = [c for c in command(dataset, tmp_path) if not c.startswith("trainer.max_iter")]
    r = subprocess.run(cmd + ["trainer.max_iter=4"], env=env(), cwd=REPO, capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "file too large" in r.stderr and "iter_000000002_reg_model.pt" in r.stderr, r.stderr[-3000:]
    d = tmp_path / JOB / "checkpoints"
    assert not (d / LATEST).exists() and list(d.iterdir()) == []


# ---------------------------------------------------------------------------------------------- job folder
def test_new_run_refuses_a_folder_with_checkpoints(dataset, tmp_path, capsys):
    run_tiny(dataset, tmp_path, ["trainer.max_iter=2", "checkpoint.save_iter=2"])
    d = tmp_path / JOB / "checkpoints"
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of iteration\(s\) \[2\]") as err:
        Trainer(tiny_config(dataset, tmp_path, "checkpoint.resume=false"), progress=False)
    for hint in ("checkpoint.resume=true", "job.name", "checkpoint.overwrite=true"):
        assert hint in str(err.value)
    assert sorted(p.name for p in d.iterdir()) == before

    # A folder copied without latest_checkpoint.txt: resuming finds the newest intact set and says so.
    (d / LATEST).unlink()
    t = Trainer(tiny_config(dataset, tmp_path, "trainer.max_iter=2"), progress=False)
    t.close()
    assert t.iteration == 2 and "latest_checkpoint.txt is missing" in capsys.readouterr().out

    # The explicit overwrite moves the old run aside (nothing deleted) and starts at 0.
    trainer, summary = run_tiny(dataset, tmp_path, ["checkpoint.resume=false", "checkpoint.overwrite=true",
                                                    "trainer.max_iter=2", "checkpoint.save_iter=2"])
    assert "checkpoint.overwrite=true: moved the checkpoints of iteration(s) [2]" in capsys.readouterr().out
    assert len(summary["losses"]) == 2 and trainer.checkpointer.verify(2) is None
    (moved,) = (tmp_path / JOB).glob("replaced_*")
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == sorted(set(before) - {LATEST})
    assert (moved / "config.json").is_file() and (moved / "metrics.jsonl").is_file()


def test_second_launch_is_rejected_by_the_lock(dataset, tmp_path, capsys):
    first = Trainer(tiny_config(dataset, tmp_path), progress=False)
    try:
        with pytest.raises(CheckpointError, match=f"in use by another training run \\(host {socket.gethostname()} "
                                                  f"pid {os.getpid()} "):
            Trainer(tiny_config(dataset, tmp_path), progress=False)
    finally:
        first.close()
    # A lock left by a process that is gone (killed: its flock died with it) is taken over with a warning.
    lock = tmp_path / JOB / "train.lock"
    lock.write_text("host elsewhere pid 4194304 since yesterday\n")
    third = Trainer(tiny_config(dataset, tmp_path), progress=False)
    third.close()
    out = capsys.readouterr().out
    assert "took over the lock" in out and "host elsewhere pid 4194304" in out
    assert lock.read_text() == ""  # released


def test_resume_falls_back_and_refuses_breaking_config_changes(dataset, tmp_path, capsys):
    _, full = run_tiny(dataset, tmp_path, ["trainer.max_iter=4", "checkpoint.save_iter=2", "checkpoint.keep_last=0"])
    job = tmp_path / JOB
    config = (job / "config.json").read_bytes()
    for bad, key in ([f"data.view_keys={json.dumps(list(reversed(json.loads(config)['data']['view_keys'])))}",
                      "data.view_keys"], ["data.batch_size=2", "data.batch_size"]):
        with pytest.raises(ValueError, match=f"settings that change the run \\({key}\\)"):
            Trainer(tiny_config(dataset, tmp_path, bad), progress=False)
    # A damaged latest set: resume falls back to iteration 2 with a warning naming the file, and redoing
    # iterations 3-4 reproduces the uninterrupted losses.
    optim4 = job / "checkpoints" / iter_name(4, "optim")
    optim4.write_bytes(optim4.read_bytes()[:1000])
    capsys.readouterr()
    trainer, again = run_tiny(dataset, tmp_path, ["trainer.max_iter=4", "checkpoint.save_iter=2",
                                                  "checkpoint.keep_last=0"])
    out = capsys.readouterr().out
    assert "resumed from iteration 2" in out and f"{optim4}: 1000 bytes" in out
    assert again["losses"] == full["losses"][2:]
    assert trainer.checkpointer.verify(4) is None
    # Allowed changes resume, keep config.json and write the new config beside it.
    trainer, more = run_tiny(dataset, tmp_path, ["trainer.max_iter=5", "checkpoint.save_iter=2"])
    assert len(more["losses"]) == 1 and (job / "config.json").read_bytes() == config
    assert json.loads((job / "config_resume_000000004.json").read_text())["trainer"]["max_iter"] == 5
    assert "trainer.max_iter: 4 -> 5" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- diverged runs
def test_consecutive_non_finite_steps_stop_the_run(dataset, tmp_path):
    trainer = Trainer(tiny_config(dataset, tmp_path, "trainer.max_nonfinite_steps=2"), progress=False)
    try:
        batches = trainer._batches()
        trainer.train_step(next(batches))
        for k in range(2):
            bad = next(batches)
            bad["t5_text_embeddings"] = torch.full_like(bad["t5_text_embeddings"], float("nan"))
            if k == 0:
                trainer.train_step(bad)
            else:
                with pytest.raises(TrainingError, match="iteration 3: 2 consecutive steps") as err:
                    trainer.train_step(bad)
        assert f"clip {bad['clip_name'][0]}, start frame {int(bad['start_frame'][0])}" in str(err.value)
        assert str(dataset / "t5_xxl" / "*" / f"{bad['clip_name'][0]}.pickle") in str(err.value)
        # Weights that are not finite are never written.
        with torch.no_grad():
            trainer.params[0].view(-1)[0] = float("nan")
        with pytest.raises(TrainingError, match="refusing to save non-finite weights \\(net\\."):
            trainer.save()
        assert not list(trainer.checkpointer.dir.glob("iter_*"))
    finally:
        trainer.close()


@pytest.mark.slow
def test_diverged_run_exits_non_zero_and_saves_nothing_non_finite(dataset, tmp_path):
    cmd = [c for c in command(dataset, tmp_path) if not c.startswith(("trainer.max_iter", "checkpoint.save_iter"))]
    r = subprocess.run(cmd + ["trainer.max_iter=8", "checkpoint.save_iter=1", "optimizer.lr=1e30",
                              "optimizer.warmup_steps=0", "trainer.max_nonfinite_steps=3"],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "consecutive steps with a non-finite loss" in r.stderr and "clip clip000" in r.stderr
    d = tmp_path / JOB / "checkpoints"
    for p in d.glob("iter_*_model.pt"):
        assert all(torch.isfinite(t).all() for t in torch.load(p, weights_only=True).values()), p
    assert Checkpointer(d).pointer() in (None, 1, 2, 3, 4)
