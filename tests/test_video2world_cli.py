"""``python -m mvmodel.inference.video2world_multiview``: input parsing (upstream's concatenated mp4 with 1 and 9
input frames, a per-camera folder, our dataset layout), one-line errors for wrong frame / view counts, and a full
CPU generation with a tiny Video2World net (real mp4 encode/decode, real T5 and tokenizer code paths)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvmodel.data.synthetic import write_video
from mvmodel.inference import write_model_dir
from mvmodel.inference.video2world_input import frames_to_model_input, load_input_frames
from mvmodel.inference.video2world_multiview import main, run
from mvmodel.networks import RELEASED_6VIEW_CAMERAS, MultiviewDiT, preset, to_cosmos_state_dict

pytest.importorskip("av")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

H, W, PER = 32, 48, 9
SLOTS6 = ("front", "left", "right", "back", "back_left", "back_right")


def _clip(view: int, n: int = PER) -> np.ndarray:
    """Flat frames whose colour names the view (red) and the frame (green): survives H.264."""
    f = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        f[i] = (20 + 30 * view, 10 + 18 * i, 128)
    return f


def _ids(frames: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(view, frame) read back from each decoded frame's colour."""
    c = frames.float().mean((2, 3))  # [V, N, 3]
    return [[(round((float(p[0]) - 20) / 30), round((float(p[1]) - 10) / 18)) for p in v] for v in c]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2w_inputs")
    write_video(root / "concat.mp4", np.concatenate([_clip(v) for v in range(6)]), 10)
    write_video(root / "concat53.mp4", np.concatenate([_clip(v) for v in range(6)])[:53], 10)
    write_video(root / "short.mp4", np.concatenate([_clip(v, 5) for v in range(6)]), 10)
    for v, slot in enumerate(SLOTS6):  # per-camera folder, named by prompt slot
        write_video(root / "slots" / f"{slot}.mp4", _clip(v, 12), 10)
    for v, cam in enumerate(RELEASED_6VIEW_CAMERAS):  # dataset layout, named by camera
        write_video(root / "ds" / "videos" / cam / "clip0000.mp4", _clip(v, 12), 10)
    return root


@pytest.mark.parametrize("n", [1, 9])
def test_concatenated_mp4_takes_the_last_frames_of_each_view(inputs, n):
    got = load_input_frames(inputs / "concat.mp4", slots=SLOTS6, cameras=RELEASED_6VIEW_CAMERAS,
                            num_input_frames=n, n_views=6)
    assert got.shape == (6, n, H, W, 3) and got.dtype == torch.uint8
    assert _ids(got) == [[(v, f) for f in range(PER - n, PER)] for v in range(6)]


def test_concatenated_blocks_are_in_prompt_order_reordered_to_the_net():
    """A 5-view net whose view 0 is front_left: the mp4's blocks are front, left, right, back_left, back_right."""
    from mvmodel.inference.video2world_input import _prompt_order

    assert _prompt_order(("left", "front", "right", "back_left", "back_right")) == \
        ["front", "left", "right", "back_left", "back_right"]


def test_folder_inputs(inputs):
    by_slot = load_input_frames(inputs / "slots", slots=SLOTS6, cameras=RELEASED_6VIEW_CAMERAS, num_input_frames=9)
    assert _ids(by_slot) == [[(v, f) for f in range(3, 12)] for v in range(6)]  # default: the last frames
    ds = load_input_frames(inputs / "ds", slots=SLOTS6, cameras=RELEASED_6VIEW_CAMERAS, num_input_frames=1, start=0)
    assert _ids(ds) == [[(v, 0)] for v in range(6)]
    x = frames_to_model_input(ds, 9, 64, 96)  # x/128 - 1, resized, zero-padded to 9 frames per view
    assert x.shape == (1, 3, 6 * 9, 64, 96)
    assert (x.reshape(3, 6, 9, 64, 96)[:, :, 1:] == 0).all()
    assert abs(float(x[0, 0, 0].mean()) - (20 / 128 - 1)) < 0.02


@pytest.mark.parametrize("path,kw,expect", [
    ("concat53.mp4", {}, r"concat53.mp4: 53 frames is not a multiple of --n_views 6"),
    ("concat.mp4", {"n_views": 5}, r"--n_views 5 does not match the model's 6 views"),
    ("short.mp4", {"num_input_frames": 9}, r"each of the 6 views \(blocks of 5 frames\): has 5 frames, fewer than the 9"),
    ("slots", {"num_input_frames": 9, "start": 5}, r"front.mp4: has 12 frames, fewer than the 9 input frames needed "
                                                   r"from frame 5"),
    ("nothing.mp4", {}, r"--input_image_or_video_path .*nothing.mp4 does not exist"),
])
def test_bad_inputs_name_file_and_expectation(inputs, path, kw, expect):
    kw = {"num_input_frames": 1, **kw}
    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        load_input_frames(inputs / path, slots=SLOTS6, cameras=RELEASED_6VIEW_CAMERAS, **kw)


def test_folder_missing_a_camera(inputs, tmp_path):
    (tmp_path / "front.mp4").write_bytes((inputs / "slots" / "front.mp4").read_bytes())
    with pytest.raises(ValueError, match=r"no video for camera 'front_left' \(expected front_left.mp4 or left.mp4"):
        load_input_frames(tmp_path, slots=SLOTS6, cameras=RELEASED_6VIEW_CAMERAS, num_input_frames=1)


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def env(tmp_path_factory, inputs):
    from mvmodel.data.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("v2w_cli")
    ck = root / "checkpoints"
    for name, v2w in (("v2w", True), ("t2w", False)):
        cfg = preset("tiny", n_views=6, view_condition_dim=6, crossattn_emb_channels=1024,
                     camera_names=RELEASED_6VIEW_CAMERAS, video2world=v2w)
        torch.manual_seed(0)
        net = MultiviewDiT(cfg)
        torch.save(to_cosmos_state_dict(net), root / f"{name}.pt")
        write_model_dir(ck / name, root / f"{name}.pt", cfg, tokenizer_dir="builtin", fps=10, num_video_frames=PER,
                        height=H, width=W)
    return {"ck": ck, "t5": str(build_tiny_t5(root / "tiny_t5")), "inputs": inputs}


def _args(env, out, *extra, model="v2w"):
    return ["--checkpoint_dir", str(env["ck"]), "--diffusion_transformer_dir", model, "--t5_dir", env["t5"],
            "--disable_guardrail", "--num_steps", "2", "--no_progress", "--device", "cpu", "--video_save_folder", str(out),
            "--prompt", "A road.", *extra]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("extra,expect", [
    (["--input_image_or_video_path", "{i}/concat53.mp4"], "53 frames is not a multiple of --n_views 6"),
    (["--input_image_or_video_path", "{i}/concat.mp4", "--n_views", "5"], "--n_views 5 does not match"),
    (["--input_image_or_video_path", "{i}/short.mp4", "--num_input_frames", "9"], "fewer than the 9 input frames"),
    ([], "--input_image_or_video_path is required"),
])
def test_cli_errors_are_one_line(env, capsys, tmp_path, extra, expect):
    extra = [e.replace("{i}", str(env["inputs"])) for e in extra]
    assert expect in _error(capsys, _args(env, tmp_path, *extra))


def test_cli_refuses_the_wrong_model_family(env, capsys, tmp_path):
    from mvmodel.inference.text2world_multiview import main as t2w_main

    line = _error(capsys, _args(env, tmp_path, "--input_image_or_video_path", str(env["inputs"] / "concat.mp4"),
                                model="t2w"))
    assert "is a Text2World net" in line and "text2world_multiview" in line
    with pytest.raises(SystemExit):
        t2w_main(_args(env, tmp_path, model="v2w"))
    assert "is a Video2World net" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generates_from_concatenated_mp4_and_batch_jsonl(env, tmp_path):
    import av

    out = tmp_path / "out"
    paths, = run(_args(env, out, "--input_image_or_video_path", str(env["inputs"] / "concat.mp4"),
                       "--num_input_frames", "9", "--video_save_name", "cont"))
    with av.open(str(paths["video"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6 * PER
    assert paths["grid"].is_file() and paths["prompts"].is_file()
    jl = tmp_path / "batch.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": "A road.", "visual_input": str(env["inputs"] / p)})
                            for p in ("concat.mp4", "slots")) + "\n")
    written = run(_args(env, tmp_path / "batch", "--batch_input_path", str(jl), "--num_input_frames", "1"))
    assert [p["video"].name for p in written] == ["0.mp4", "1.mp4"]
