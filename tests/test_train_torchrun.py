"""The tiny experiment under ``torchrun --nproc_per_node=2`` on CPU (gloo, FSDP2 fully_shard): ranks see
different samples, rank 0 writes consolidated checkpoints that load into a single-process model, and the
two-process run resumes from its own checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvmodel.configs import make_config
from mvmodel.networks import MultiviewDiT, load_cosmos_checkpoint, preset
from mvmodel.trainer.checkpoint import iter_name
from test_train_loop import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
JOB = Path("posttraining/diffusion_text2world/text2world_multiview_tiny_example")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


def torchrun(dataset: Path, out: Path, max_iter: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mvmodel.train", "--config=mvmodel/configs/multiview.py", "--", "experiment=text2world_multiview_tiny_example",
           f"data.dataset_dir={dataset}", f"job.output_root={out}", "trainer.device=cpu",
           f"trainer.max_iter={max_iter}", "checkpoint.save_iter=3",
           "model.precision=bfloat16", "checkpoint.reg_model_dtype=bfloat16"]  # the GPU recipe's mixed precision
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # torchrun, 2 processes: out of the quick command (-m 'not slow')
def test_two_process_fsdp_training(dataset, tmp_path):
    res = torchrun(dataset, tmp_path, 3)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "2 process(es) on cpu (gloo)" in res.stderr + res.stdout
    job = tmp_path / JOB
    d = job / "checkpoints"
    assert (d / "latest_checkpoint.txt").read_text() == "iter_000000003.pt\n"
    state = torch.load(d / iter_name(3), weights_only=False)
    assert state["world_size"] == 2 and len(state["data"]) == 2 and len(state["rng"]) == 2
    # 8 samples over 2 ranks: each rank consumed 3 of its 4; the stored position is global.
    assert [s["samples_consumed"] for s in state["data"]] == [6, 6]

    reg = torch.load(d / iter_name(3, "reg_model"), weights_only=True)
    ema = torch.load(d / iter_name(3, "ema_model"), weights_only=True)
    assert reg["net.final_layer.linear.weight"].dtype == torch.bfloat16  # upstream's reg file: bf16 weights
    assert reg["logvar.1.weight"].dtype == ema["net.final_layer.linear.weight"].dtype == torch.float32
    cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_tiny_example", [])
    ov = dict(cfg.model.net_overrides, camera_names=tuple(cfg.model.net_overrides["camera_names"]))
    net = MultiviewDiT(preset(cfg.model.net, **ov))
    assert load_cosmos_checkpoint(net, reg, strict=True).ok  # full (unsharded) tensors
    assert set(reg) == set(ema) and all(reg[k].shape == ema[k].shape for k in reg)
    optim = torch.load(d / iter_name(3, "optim"), weights_only=True)
    for name, st in optim["optimizer"]["state"].items():
        assert st["exp_avg"].shape == reg[name].shape, name
    master = optim["master_weights"]  # fp32 masters for an exact resume, rounding to the bf16 reg weights
    assert master["net.final_layer.linear.weight"].dtype == torch.float32
    torch.testing.assert_close(master["net.final_layer.linear.weight"].bfloat16(), reg["net.final_layer.linear.weight"])

    # Continue the same two-process job to iteration 5: it resumes from iteration 3.
    res = torchrun(dataset, tmp_path, 5)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "resumed from iteration 3" in res.stderr + res.stdout
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] for r in rows)
    assert (d / "latest_checkpoint.txt").read_text() == "iter_000000005.pt\n"
