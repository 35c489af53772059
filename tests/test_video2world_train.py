"""Video2World post-training on the same trainer: the tiny example trains, saves upstream-format checkpoints whose
EMA loads strictly into the Video2World net (mask channel included), resumes with the same losses as an
uninterrupted run (the condition draws come from the per-step generator), and the 7B experiments compose."""
from __future__ import annotations

import pytest
import torch

from mvmodel.configs import make_config
from mvmodel.networks import MultiviewDiT, load_cosmos_checkpoint, preset
from mvmodel.trainer import Trainer
from mvmodel.trainer.checkpoint import iter_name
from test_train_loop import tiny_dataset

CONFIG = "mvmodel/configs/multiview.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


def _run(dataset, out, *overrides):
    cfg = make_config(CONFIG, "video2world_multiview_tiny_example",
                      [f"data.dataset_dir={dataset}", f"job.output_root={out}", "trainer.device=cpu", *overrides])
    trainer = Trainer(cfg, progress=False)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def test_tiny_video2world_trains_saves_and_resumes(dataset, tmp_path):
    full, s_full = _run(dataset, tmp_path / "full", "trainer.max_iter=6", "checkpoint.save_iter=3")
    assert full.model.net.config.video2world and all(map(torch.isfinite, map(torch.tensor, s_full["losses"])))
    ckpt = tmp_path / "full/posttraining/diffusion_video2world/video2world_multiview_tiny_example/checkpoints"
    net = MultiviewDiT(full.model.net.config)
    report = load_cosmos_checkpoint(net, ckpt / iter_name(6, "ema_model"), strict=True)
    assert report.ok and net.x_embedder.proj[1].weight.shape[1] == (16 + 1 + 1 + 3) * 4

    _, first = _run(dataset, tmp_path / "split", "trainer.max_iter=3", "checkpoint.save_iter=3")
    _, second = _run(dataset, tmp_path / "split", "trainer.max_iter=6", "checkpoint.save_iter=3")
    assert first["losses"] + second["losses"] == pytest.approx(s_full["losses"], rel=1e-5)


def test_text2world_checkpoint_starts_a_video2world_run(dataset, tmp_path, capsys):
    """checkpoint.load_path = a Text2World checkpoint: the mask channel starts at zero and the trainer says so."""
    from mvmodel.networks import to_cosmos_state_dict

    cfg = make_config(CONFIG, "video2world_multiview_tiny_example", [])
    t2w_cfg = preset(cfg.model.net, **{**cfg.model.net_overrides, "video2world": False})
    torch.save(to_cosmos_state_dict(MultiviewDiT(t2w_cfg)), tmp_path / "t2w.pt")
    trainer, _ = _run(dataset, tmp_path / "out", "trainer.max_iter=1", f"checkpoint.load_path={tmp_path / 't2w.pt'}")
    assert trainer._start_note.startswith("initialised from")
    out = capsys.readouterr().out
    assert "condition-mask input channel" in out and "zero-initialised" in out
    assert (trainer.model.net.x_embedder.proj[1].weight[:, 64:68].abs().max() < 0.05)  # one small step from 0


@pytest.mark.parametrize("name,n_views,load", [
    ("video2world_multiview_7b_example_waymo", 5, "Video2World-Sample-AV-Multiview/model.pt"),
    ("video2world_multiview_7b_example_waymo_1gpu", 5, "Video2World-Sample-AV-Multiview/model.pt"),
])
def test_7b_experiments_compose(name, n_views, load):
    cfg = make_config(CONFIG, name, [])
    net_cfg = preset(cfg.model.net, **cfg.model.net_overrides)
    assert net_cfg.video2world and net_cfg.n_views == n_views and net_cfg.patch_in_channels == 16 + 1 + 1 + 3
    assert cfg.checkpoint.load_path.endswith(load) and cfg.job.group == "diffusion_video2world"
    assert (cfg.model.condition_frames_max, cfg.model.condition_augment_p_mean, cfg.model.condition_augment_p_std) \
        == (2, -3.0, 2.0)
    t2w = make_config(CONFIG, name.replace("video2world", "text2world"), [])
    assert cfg.data == t2w.data and cfg.optimizer == t2w.optimizer and cfg.parallel == t2w.parallel
