"""Experiment configs, the command line, overrides and the schedule/EMA formulas (no training here)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mvmodel.configs import make_config, parse_cli
from mvmodel.trainer import power_ema_beta, power_ema_gamma, warmup_multiplier
from mvmodel.trainer.ema import PowerEMA

CONFIG = "mvmodel/configs/multiview.py"


def test_waymo_experiment_has_upstream_values(monkeypatch):
    monkeypatch.delenv("OUTPUT_ROOT", raising=False)
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo", [])
    assert (cfg.job.project, cfg.job.group, cfg.job.name) == (
        "posttraining", "diffusion_text2world", "text2world_multiview_7b_example_waymo")
    assert str(cfg.job.path_local) == "checkpoints/posttraining/diffusion_text2world/text2world_multiview_7b_example_waymo"
    assert cfg.optimizer.lr == 2 ** -14.3 and abs(cfg.optimizer.lr - 4.9576e-5) < 1e-8
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.optimizer.eps == 1e-10 and cfg.optimizer.weight_decay == 0.1
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.warmup_start, cfg.optimizer.grad_clip) == (2500, 1e-6, 1.0)
    assert (cfg.trainer.max_iter, cfg.checkpoint.save_iter, cfg.trainer.logging_iter) == (2000, 200, 200)
    assert cfg.data.view_keys[0] == "pinhole_front_left" and len(cfg.data.view_keys) == 5
    assert (cfg.data.num_frames, tuple(cfg.data.video_size)) == (57, (480, 848))
    assert cfg.checkpoint.load_path == "checkpoints/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview/model.pt"
    assert cfg.ema.rate == 0.1 and cfg.parallel.activation_checkpointing == "subblock"
    monkeypatch.setenv("OUTPUT_ROOT", "/data/runs")
    assert str(cfg.job.path_local).startswith("/data/runs/posttraining/")


def test_overrides_are_typed():
    cfg = make_config(CONFIG, "text2world_multiview_tiny_example",
                      ["optimizer.lr=3e-4", "data.video_size=[32,48]", "optimizer.betas=0.8,0.9",
                       'model.net_overrides={"num_blocks": 3}', "checkpoint.load_path=none",
                       "ema.enabled=false", "trainer.max_iter=5", "job.name=run 2"])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.video_size == (32, 48) and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.model.net_overrides == {"num_blocks": 3} and cfg.checkpoint.load_path is None
    assert cfg.ema.enabled is False and cfg.trainer.max_iter == 5 and cfg.job.name == "run 2"


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lrr=1"], "valid keys of 'optimizer' are ['betas', 'cpu_offload'"),
    (["foo.bar=1"], "section one of ['checkpoint', 'data', 'ema', 'job', 'model', 'optimizer', 'parallel', 'trainer']"),
    (["lr=1"], "unknown config key 'lr'"),
    (["optimizer.lr"], "must look like section.key=value"),
    (["optimizer.lr=fast"], "optimizer.lr='fast': expected float"),
    (["ema.enabled=maybe"], "expected a bool"),
    (["data.num_frames=10"], "data.num_frames: 10 must be 1 + a multiple of 8"),
    (["parallel.activation_checkpointing=all"], "is not one of ('none', 'block', 'subblock', 'selective')"),
    (["data.video_size=[64]"], "expected 2 values"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ValueError) as exc:
        make_config(CONFIG, "text2world_multiview_tiny_example", overrides)
    assert message in str(exc.value)


def test_unknown_or_missing_experiment_lists_valid_ones():
    for name in ("nope", None):
        with pytest.raises(ValueError) as exc:
            make_config(CONFIG, name, [])
        assert "text2world_multiview_7b_example_waymo" in str(exc.value)
        assert "text2world_multiview_tiny_example" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        make_config("mvmodel/configs/no_such.py", "x", [])


def test_cli_with_and_without_separator():
    a = parse_cli(["--config=mvmodel/configs/multiview.py", "--", "experiment=e", "trainer.max_iter=3"])
    b = parse_cli(["--config", "mvmodel/configs/multiview.py", "experiment=e", "trainer.max_iter=3"])
    assert a == b == ("mvmodel/configs/multiview.py", "e", ["trainer.max_iter=3"], False)
    with pytest.raises(ValueError, match="missing --config"):
        parse_cli(["experiment=e"])
    with pytest.raises(ValueError, match="unknown option '--foo'"):
        parse_cli(["--config=x.py", "--foo"])


@pytest.mark.slow
def test_train_cli_errors_and_dryrun():
    bad = subprocess.run([sys.executable, "-m", "mvmodel.train", f"--config={CONFIG}", "--",
                          "experiment=text2world_multiview_tiny_example", "optimizer.nope=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "valid keys of 'optimizer'" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "mvmodel.train", f"--config={CONFIG}", "--dryrun", "--",
                         "experiment=text2world_multiview_7b_example_waymo", "trainer.max_iter=7"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["trainer"]["max_iter"] == 7


def test_warmup_schedule():
    assert warmup_multiplier(0, 2500, 1e-6) == 1e-6
    assert math.isclose(warmup_multiplier(1250, 2500, 1e-6), 1e-6 + (1 - 1e-6) * 0.5)
    assert math.isclose(warmup_multiplier(1999, 2500, 1e-6), 0.7996 + 1e-6 * 0.2004, rel_tol=1e-9)
    assert warmup_multiplier(2500, 2500, 1e-6) == 1.0 and warmup_multiplier(5, 0, 1e-6) == 1.0


def test_power_ema_constants():
    gamma = power_ema_gamma(0.1)
    assert abs(gamma - 6.9372) < 1e-4
    s2 = 0.1 ** -2
    assert abs(gamma ** 3 + 7 * gamma ** 2 + (16 - s2) * gamma + (12 - s2)) < 1e-6
    assert power_ema_beta(0, gamma) == 0.0
    for it, beta in ((9, 0.43), (99, 0.923), (999, 0.9921), (1999, 0.9960)):  # cosmos-multiview.md §8.4
        assert abs(power_ema_beta(it, gamma) - beta) < 5e-3, it
    with pytest.raises(ValueError, match="sigma_rel"):
        power_ema_gamma(0.5)


def test_power_ema_update_matches_formula():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    ema = PowerEMA(p, rate=0.1)
    ema.update(p, 0)  # beta 0: copy
    with torch.no_grad():
        p[0].fill_(3.0)
    beta = ema.update(p, 9)
    torch.testing.assert_close(ema.shadow[0], beta * torch.tensor([1.0, 2.0]) + (1 - beta) * 3.0)
