"""Every CLI: --help works, user errors are one line naming the argument/file, non-zero exit, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["mvmodel.train", "mvmodel.demo", "mvmodel.download", "mvmodel.inference.text2world_multiview",
        "mvmodel.inference.video2world_multiview",
        "mvmodel.inference.model_dir", "mvmodel.data.synthetic", "mvmodel.data.t5_embeddings", "mvmodel.data.tiny_t5",
        "mvmodel.tokenizer.export"]


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env,
                          timeout=300)


@pytest.mark.parametrize("module", CLIS)
@pytest.mark.slow
def test_help(module):
    r = _run(module, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_help_lists_experiments():
    out = _run("mvmodel.train", "--help").stdout
    assert "text2world_multiview_7b_example_waymo" in out and "text2world_multiview_cpu_example" in out
    assert "video2world_multiview_7b_example_waymo" in out and "video2world_multiview_cpu_example" in out


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.slow
def test_train_errors_name_the_setting(tmp_path):
    base = ["mvmodel.train", "--config=mvmodel/configs/multiview.py", "--"]
    _one_line_error(_run(*base, "experiment=nope"), "unknown experiment 'nope'")
    _one_line_error(_run(*base, "experiment=text2world_multiview_cpu_example", "optimizer.lrr=1"), "optimizer.lrr")
    _one_line_error(_run(*base, "experiment=text2world_multiview_cpu_example", f"data.dataset_dir={tmp_path}"),
                    f"data.dataset_dir={tmp_path}", "videos/")
    _one_line_error(_run("mvmodel.train", "--bogus"), "--bogus")


@pytest.mark.slow
def test_7b_experiment_checks_before_building(tmp_path):
    """Dataset first, then tokenizer and weights; on a CPU-only machine the memory plan refuses the 7B recipe."""
    base = ["mvmodel.train", "--config=mvmodel/configs/multiview.py", "--", "experiment=text2world_multiview_7b_example_waymo"]
    _one_line_error(_run(*base), "data.dataset_dir=datasets/waymo", "no videos/ folder")
    ds = tmp_path / "ds"
    for v in ("pinhole_front_left", "pinhole_front", "pinhole_front_right", "pinhole_side_left", "pinhole_side_right"):
        (ds / "videos" / v).mkdir(parents=True)
        (ds / "videos" / v / "c.mp4").write_bytes(b"")
    (ds / "t5_xxl").mkdir()
    _one_line_error(_run(*base, f"data.dataset_dir={ds}", f"model.tokenizer_dir={tmp_path}/tok"),
                    f"model.tokenizer_dir={tmp_path}/tok", "encoder.jit")
    from mvmodel.tokenizer import SpaceToDepthTokenizer
    SpaceToDepthTokenizer(pixel_chunk_duration=57).export_torchscript(tmp_path / "tok")
    args = [*base, f"data.dataset_dir={ds}", f"model.tokenizer_dir={tmp_path}/tok"]
    _one_line_error(_run(*args, cwd=tmp_path, ), "checkpoint.load_path=checkpoints/Cosmos-Predict1-7B", "mvmodel.download")
    import torch
    from mvmodel.trainer.memory_plan import host_memory_bytes
    if not torch.cuda.is_available() and host_memory_bytes()[0] < 200 * 1024 ** 3:
        _one_line_error(_run(*args, "checkpoint.load_path=none", cwd=tmp_path), "needs ~", "GiB of host memory")


def test_memory_plan_matches_the_measured_7b_one_gpu_runs():
    from mvmodel.configs import make_config
    from mvmodel.trainer.preflight import GIB, memory_plan

    for ac, measured in (("block", 42.9), ("selective", 53.2)):  # .notes/trainer.md, H100, 63,600 tokens
        cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_7b_example_waymo_1gpu",
                          [f"parallel.activation_checkpointing={ac}", "optimizer.offload_plan=host"])
        plan = memory_plan(cfg, world=1, local_world=1, on_gpu=True)
        assert plan["tokens"] == 63_600 and plan["gpu"] / GIB == pytest.approx(measured, rel=0.15)
        assert plan["host"] / GIB == pytest.approx(108, rel=0.1)  # masters + moments + EMA: 16 B/param
        assert plan["host_min"] == plan["host"]


def test_preflight_counts_the_optimizer_state_the_gpu_keeps():
    """With the memory plan (auto), a 141 GB GPU keeps most of the optimizer state: the host needs far less than
    the all-host 108 GiB (42.3 GiB RSS measured on an H200), an 80 GB card (cap 76 GiB) keeps little of it."""
    from mvmodel.configs import make_config
    from mvmodel.trainer.preflight import GIB, memory_plan

    def plan(*overrides, gpu_gib):
        cfg = make_config("mvmodel/configs/multiview.py", "text2world_multiview_7b_example_waymo_1gpu", list(overrides))
        return memory_plan(cfg, world=1, local_world=1, on_gpu=True, gpu_bytes=int(gpu_gib * GIB))

    h200 = plan(gpu_gib=139.8)
    assert 20 < h200["host_min"] / GIB < 64 and h200["host"] / GIB == pytest.approx(108, rel=0.1)
    assert h200["gpu"] / GIB <= 139.8 - 10  # the plan's margin stays free
    capped = plan("trainer.gpu_memory_cap_gib=76", gpu_gib=139.8)
    assert 64 < capped["host_min"] / GIB < h200["host"] / GIB and capped["gpu"] / GIB <= 76 - 10


def test_load_report_says_what_was_skipped_and_why():
    from mvmodel.networks.checkpoint import LoadReport

    r = LoadReport(loaded=["x"] * 49, skipped=["net.blocks.block0.blocks.0.block.attn.to_q.0._extra_state",
                                                "logvar.0.freqs", "logvar.1.weight"])
    line = str(r).splitlines()[0]
    assert line.startswith("loaded 49 tensors, skipped 3 checkpoint entries this model does not use")
    assert "1 Transformer Engine FP8 state" in line and "2 EDM uncertainty head" in line and "logvar.0.freqs" in line
