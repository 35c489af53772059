"""The inference CLI refuses garbage before generating: bad numbers, non-finite weights, unusable output folders,
save names escaping the folder, a missing GPU. User errors are one line on stderr and exit 2, no traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mvmodel.inference import write_model_dir
from mvmodel.inference.text2world_multiview import main, run
from mvmodel.networks import WAYMO_5VIEW_CAMERAS, MultiviewDiT, preset, to_cosmos_state_dict

pytest.importorskip("av")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FRAMES, H, W = 9, 32, 48


def _model(ck, name, edit=None):
    cfg = preset("tiny", n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False,
                 crossattn_emb_channels=1024, camera_names=WAYMO_5VIEW_CAMERAS)
    torch.manual_seed(0)
    net = MultiviewDiT(cfg)
    with torch.no_grad():
        for p in net.final_layer.parameters():
            p.normal_(0, 0.05)
        if edit:
            edit(net)
    weights = ck.parent / f"{name}.pt"
    torch.save(to_cosmos_state_dict(net), weights)
    write_model_dir(ck / name, weights, cfg, tokenizer_dir="builtin", fps=10, num_video_frames=FRAMES, height=H,
                    width=W)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mvmodel.data.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("inference_errors")
    ck = root / "checkpoints"
    _model(ck, "good")
    _model(ck, "nan", lambda net: next(net.blocks.parameters()).view(-1)[5].fill_(float("nan")))
    _model(ck, "huge", lambda net: [p.fill_(1e38) for p in net.final_layer.parameters()])  # finite, overflows
    return {"ck": ck, "t5": str(build_tiny_t5(root / "tiny_t5"))}


def _args(env, out, model="good", *extra):
    return ["--checkpoint_dir", str(env["ck"]), "--diffusion_transformer_dir", model, "--t5_dir", env["t5"],
            "--num_steps", "2", "--no_progress", "--device", "cpu", "--video_save_folder", str(out),
            "--prompt", "A road.", "--disable_guardrail", *extra]


def _main(capsys, argv):
    """Run the CLI's main(); returns (exit code, stderr). A user error must be exactly one line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err  # also holds log lines and transformers' progress bars
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert exc.value.code == 2 and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("extra, expect", [
    (["--guidance", "nan"], r"--guidance nan: must be a finite number"),
    (["--guidance", "inf"], r"--guidance inf: must be a finite number"),
    (["--fps", "nan"], r"--fps nan: must be a finite number > 0"),
    (["--fps", "0"], r"--fps 0.0: must be a finite number > 0"),
    (["--fps", "-24"], r"--fps -24.0: must be a finite number > 0"),
    (["--fps", "inf"], r"--fps inf: must be a finite number > 0"),
    (["--num_steps", "0"], r"--num_steps 0: must be an integer >= 1"),
    (["--num_steps", "-3"], r"--num_steps -3: must be an integer >= 1"),
    (["--frame_repeat_negative_condition", "nan"], r"--frame_repeat_negative_condition nan: must be finite"),
    (["--video_save_name", "../escaped"], r"--video_save_name '../escaped': must be a plain file name"),
    (["--video_save_name", "sub/name"], r"--video_save_name 'sub/name': must be a plain file name"),
    (["--video_save_name", "/tmp/abs"], r"--video_save_name '/tmp/abs': must be a plain file name"),
    (["--video_save_name", ".."], r"--video_save_name '..': must be a plain file name"),
    (["--video_save_name", ""], r"--video_save_name '': must be a plain file name"),
    (["--device", "gpu"], r"--device gpu: not a device; expected auto, cpu, cuda or cuda:N"),
])
def test_bad_options_one_line_exit_2(env, tmp_path, capsys, extra, expect):
    line = _main(capsys, _args(env, tmp_path / "out", "good", *extra))
    assert re.search(expect, line), line
    assert not any((tmp_path / "out").glob("*.mp4")) and not (tmp_path / "escaped.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_device_cuda_without_gpu(env, tmp_path, capsys):
    line = _main(capsys, _args(env, tmp_path, "good", "--device", "cuda"))
    assert "--device cuda: no CUDA GPU is visible to PyTorch" in line


def test_nan_weights_refused_before_t5_and_sampling(env, tmp_path, capsys):
    line = _main(capsys, _args(env, tmp_path / "out", "nan"))
    weights = env["ck"] / "nan" / "model.pt"
    assert line.startswith(f"error: {weights}: weight ") and "holds 1 non-finite values (NaN/inf)" in line
    assert not any((tmp_path / "out").iterdir())  # nothing written


def test_diverging_sample_is_an_error_not_a_black_video(env, tmp_path, capsys):
    line = _main(capsys, _args(env, tmp_path / "out", "huge"))
    assert "sampling produced NaN/inf at step 1/2" in line and str(env["ck"] / "huge" / "model.pt") in line
    assert not any((tmp_path / "out").iterdir())


def test_model_folder_fps_checked(env, tmp_path, capsys):
    spec = json.loads((env["ck"] / "good" / "mvworld.json").read_text())
    bad = env["ck"] / "zero_fps"
    bad.mkdir()
    os.link(env["ck"] / "good" / "model.pt", bad / "model.pt")
    (bad / "mvworld.json").write_text(json.dumps({**spec, "fps": 0}))
    line = _main(capsys, _args(env, tmp_path, "zero_fps"))
    assert f"fps 0 from {bad / 'mvworld.json'}: must be a finite number > 0 (pass --fps)" in line


def test_output_folder_checked_before_loading(env, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # the NaN model would fail at load: the folder error comes first, so nothing heavy ran
    line = _main(capsys, _args(env, blocker, "nan"))
    assert line.startswith(f"error: --video_save_folder {blocker}: cannot write there")
    line = _main(capsys, _args(env, blocker / "sub", "nan"))
    assert line.startswith(f"error: --video_save_folder {blocker / 'sub'}: cannot write there")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "cannot write there" in _main(capsys, _args(env, ro, "nan"))
    nested = tmp_path / "new" / "deeper"  # created, then the weights are refused
    assert "non-finite" in _main(capsys, _args(env, nested, "nan")) and nested.is_dir()
    assert list(nested.iterdir()) == []  # the write probe left nothing behind


def test_batch_file_names_and_seeds_checked(env, tmp_path):
    f = tmp_path / "b.jsonl"
    cases = [
        ('{"prompt": "a", "video_save_name": "../up"}', rf"{f}:1: video_save_name '../up': must be a plain file"),
        ('{"prompt": "a", "video_save_name": "x"}\n{"prompt": "b", "video_save_name": "x"}',
         rf"{f}:2: video_save_name 'x' is already used on line 1"),
        ('{"prompt": "a", "seed": "abc"}', rf"{f}:1: \"seed\" must be an integer, got 'abc'"),
        ('{"prompt": "a", "seed": null}', rf"{f}:1: \"seed\" must be an integer, got None"),
    ]
    for text, expect in cases:
        f.write_text(text + "\n")
        argv = _args(env, tmp_path / "out", "good")
        argv = argv[:argv.index("--prompt")] + ["--batch_input_path", str(f)]
        with pytest.raises(ValueError, match=expect):
            run(argv)


@pytest.mark.slow
def test_cli_process_exit_code(env, tmp_path):
    """The real command: a user error exits non-zero with one line and no traceback."""
    r = subprocess.run([sys.executable, "-m", "mvmodel.inference.text2world_multiview",
                        *_args(env, tmp_path, "good", "--guidance", "nan")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2 and r.stderr.strip() == "error: --guidance nan: must be a finite number (0 = no " \
                                                     "guidance; upstream uses 7)", r.stderr
