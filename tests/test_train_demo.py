"""``python -m mvmodel.demo`` end to end, shortened (a few steps): data, tiny T5, tokenizer export, training
through the trainer, checkpoints in upstream's layout, a sampled 5-view mp4 grid."""
from __future__ import annotations

import av
import numpy as np
import pytest

from mvmodel import demo
from mvmodel.trainer.checkpoint import iter_name


@pytest.mark.slow  # the demo end to end: out of the quick command (-m 'not slow')
def test_demo_end_to_end(tmp_path, capsys):
    res = demo.main(["--out", str(tmp_path), "--steps", "4", "--sample_steps", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    for what in ("sampled video", "checkpoints", "training loss", str(res["sample"])):
        assert what in printed
    ck = res["job_dir"] / "checkpoints"
    assert str(ck).endswith("checkpoints/posttraining/diffusion_text2world/text2world_multiview_demo/checkpoints")
    for kind in ("", "reg_model", "ema_model", "optim"):
        assert (ck / iter_name(4, kind)).is_file()
    assert res["iteration"] == 4 and len(res["summary"]["losses"]) == 4
    tok = tmp_path / "tokenizer"
    assert {p.name for p in tok.iterdir()} >= {"encoder.jit", "decoder.jit", "mean_std.pt"}
    for path in (res["sample"], res["reference"]):
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 25 and frames[0].shape == (128, 288, 3)  # 2x3 grid of 64x96 views, 25 frames
        assert np.asarray(frames).std() > 1.0  # not a blank video


def test_demo_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--steps", "0"])


@pytest.mark.slow  # the default demo: ~4.5 minutes on 2 cores
def test_default_demo_sample_shows_the_drive(tmp_path, capsys):
    """The embedded default is worth watching: the front cameras' sampled frames reproduce the drive they were
    prompted with (road, lane marks, poles in place). Measured 19.6-20.2 dB per front camera (two runs); a sample
    without the road (the 300-step model of the CPU example's noise levels, one window per step) 17.2-17.9 dB."""
    res = demo.main(["--out", str(tmp_path)])
    assert "PSNR per camera" in capsys.readouterr().out
    front = {k: v for k, v in res["psnr"].items() if "front" in k}
    assert len(front) == 3 and min(front.values()) > 18.8, res["psnr"]
