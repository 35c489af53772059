"""Model folders (released / post-trained / ours / trainer jobs), prompt slots, and the CLI's argument errors."""
from __future__ import annotations

import json

import pytest
import torch

from mvmodel.inference import resolve_model, slot_of_camera, write_model_dir
from mvmodel.inference.model_dir import infer_released_config
from mvmodel.inference.text2world_multiview import build_parser, prompt_sets, run
from mvmodel.networks import WAYMO_5VIEW_CAMERAS, MultiviewDiT, preset, to_cosmos_state_dict


def test_camera_names_to_prompt_slots():
    table = {"front": "front", "pinhole_front": "front", "pinhole_front_left": "left", "camera_left": "left",
             "front_right": "right", "back": "back", "camera_rear": "back", "back_left": "back_left",
             "pinhole_side_left": "back_left", "pinhole_side_right": "back_right", "rear_right": "back_right"}
    assert {k: slot_of_camera(k) for k in table} == table
    with pytest.raises(ValueError, match="direction word"):
        slot_of_camera("cam0")


@pytest.mark.parametrize("name,views,slots", [
    ("cosmos_7b_multiview_6view", 6, ("front", "left", "right", "back", "back_left", "back_right")),
    ("cosmos_7b_multiview_waymo", 5, ("left", "front", "right", "back_left", "back_right")),
])
def test_configless_7b_checkpoints_are_recognised_by_shape(name, views, slots):
    """The released folder (and upstream's `_post-trained` copy) has no config: the view embedding decides."""
    with torch.device("meta"):
        net = MultiviewDiT(preset(name))
    sd = to_cosmos_state_dict(net)
    cfg = infer_released_config(sd, "model.pt")
    assert cfg.n_views == views and cfg == preset(name)
    assert tuple(slot_of_camera(c) for c in cfg.camera_names) == slots


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_dir")
    cfg = preset("tiny", n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False,
                 crossattn_emb_channels=1024, camera_names=WAYMO_5VIEW_CAMERAS)
    torch.manual_seed(0)
    torch.save(to_cosmos_state_dict(MultiviewDiT(cfg)), root / "w.pt")
    return root, cfg


def test_configless_unknown_net_asks_for_mvworld_json(tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    (tmp_path / "Some_post-trained").mkdir()
    (tmp_path / "Some_post-trained" / "model.pt").write_bytes((root / "w.pt").read_bytes())
    with pytest.raises(ValueError, match="mvworld.json"):
        resolve_model(tmp_path, "Some_post-trained")


def test_trainer_job_folder_and_export(tiny_ckpt, tmp_path):
    """A trainer job (config.json + checkpoints/iter_*_ema_model.pt) loads directly, via its checkpoints folder,
    via one .pt file, and after export with `python -m mvmodel.inference.model_dir`."""
    from mvmodel.configs.multiview import text2world_multiview_tiny_example
    from mvmodel.inference.model_dir import main as export_main

    root, cfg = tiny_ckpt
    job = tmp_path / "posttraining" / "diffusion_text2world" / "job"
    (job / "checkpoints").mkdir(parents=True)
    (job / "config.json").write_text(json.dumps(text2world_multiview_tiny_example().to_dict(), default=str))
    for n in (4, 8):
        (job / "checkpoints" / f"iter_{n:09d}_ema_model.pt").write_bytes((root / "w.pt").read_bytes())
    spec = resolve_model(tmp_path, "posttraining/diffusion_text2world/job")
    assert spec.weights.name == "iter_000000008_ema_model.pt" and spec.n_views == 5
    assert spec.slots == ("left", "front", "right", "back_left", "back_right") and spec.tokenizer_dir == "builtin"
    assert spec.defaults == {"num_video_frames": 9, "height": 64, "width": 96}
    assert spec.net_config == cfg
    assert resolve_model(job, "checkpoints").weights == spec.weights
    assert resolve_model(job / "checkpoints", "iter_000000004_ema_model.pt").net_config == cfg
    export_main(["--job", str(job), "--out", str(tmp_path / "ck" / "Exported_post-trained"), "--fps", "10"])
    exported = resolve_model(tmp_path / "ck", "Exported_post-trained")
    assert exported.net_config == cfg and exported.defaults["fps"] == 10 and exported.slots == spec.slots


def test_write_model_dir_rejects_bad_descriptions(tiny_ckpt, tmp_path):
    root, cfg = tiny_ckpt
    with pytest.raises(ValueError, match="share a prompt slot"):
        write_model_dir(tmp_path / "x", root / "w.pt", cfg, prompt_slots=["front"] * 5)
    d = write_model_dir(tmp_path / "y", root / "w.pt", cfg)
    meta = json.loads((d / "mvworld.json").read_text())
    meta["net"]["num_blockz"] = 3
    (d / "mvworld.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_blockz"):
        resolve_model(tmp_path, "y")


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_prompt_sets_from_cli_and_jsonl(tmp_path, caplog):
    slots = ("left", "front", "right", "back_left", "back_right")
    (name, seed, ps), = prompt_sets(_args("--prompt", "F", "--prompt_right", "R", "--seed", "3"), slots)
    assert (name, seed, ps["front"], ps["right"]) == ("output", 3, "F", "R") and set(ps) == set(slots)
    assert ps["left"].endswith("facing to the left. ")
    (_, _, ps), = prompt_sets(_args("--prompt", "F", "--prompt_back", "B"), slots)  # kept: ignored, said plainly
    assert "B" not in ps.values() and set(ps) == set(slots)
    assert ("--prompt_back is not used: this model has 5 cameras (left, front, right, back_left, back_right) and "
            "none of them is 'back', so no back view is generated") in caplog.text
    caplog.clear()
    with pytest.raises(ValueError, match="--prompt .* is required"):
        prompt_sets(_args(), slots)
    f = tmp_path / "b.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt_left": "only left"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: no \"prompt\""):
        prompt_sets(_args("--batch_input_path", str(f)), slots)
    f.write_text('{"prompt": "a", "promt_left": "typo"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1: unknown keys \['promt_left'\]"):
        prompt_sets(_args("--batch_input_path", str(f)), slots)
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": 9}\n')
    sets = prompt_sets(_args("--batch_input_path", str(f), "--seed", "4"), slots)
    assert [(n, s) for n, s, _ in sets] == [("0", 4), ("1", 9)] and not caplog.text


def test_cli_argument_errors(tiny_ckpt, tmp_path):
    root, cfg = tiny_ckpt
    write_model_dir(tmp_path / "ck" / "Tiny_post-trained", root / "w.pt", cfg, tokenizer_dir="builtin")
    base = ["--checkpoint_dir", str(tmp_path / "ck"), "--diffusion_transformer_dir", "Tiny_post-trained",
            "--prompt", "x", "--t5_dir", str(tmp_path / "no_t5"), "--disable_guardrail"]
    with pytest.raises(FileNotFoundError, match="--checkpoint_dir .*missing_dir does not exist"):
        run(["--checkpoint_dir", str(tmp_path / "missing_dir"), "--prompt", "x"])
    with pytest.raises(FileNotFoundError, match="Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview not found"):
        run(["--checkpoint_dir", str(tmp_path / "ck"), "--prompt", "x"])
    with pytest.raises(ValueError, match="--n_views 6 does not match the model: .* 5-view net"):
        run(base + ["--n_views", "6"])
    with pytest.raises(ValueError, match="--num_video_frames 10: must be 1 \\+ a multiple of 8"):
        run(base + ["--num_video_frames", "10"])
    with pytest.raises(ValueError, match="multiples of 16"):
        run(base + ["--height", "40"])
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere does not exist"):
        run(base + ["--tokenizer_dir", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="no T5 checkpoint"):
        run(base)
    with pytest.raises(ValueError, match=r"no prompt for view slot\(s\) \['left'\]"):
        run(base + ["--prompt_left", " "])
    with pytest.raises(ValueError, match="--num_gpus 8"):
        run(base + ["--num_gpus", "8"])
    with pytest.raises(SystemExit):  # argparse: the usage message and exit 2
        build_parser().parse_args(["--guidance", "lots"])


def test_latest_ema_takes_the_newest_committed_set(tmp_path, caplog):
    """An EMA file whose set was never committed (no manifest: a killed save) or whose size differs from its
    manifest is skipped with a warning naming it; folders without manifests (upstream) give their newest file."""
    import json
    import logging

    from mvmodel.inference.model_dir import latest_ema

    def ema(n, data=b"weights"):
        (tmp_path / f"iter_{n:09d}_ema_model.pt").write_bytes(data)

    def manifest(n, size):
        (tmp_path / f"iter_{n:09d}_manifest.json").write_text(
            json.dumps({"files": {f"iter_{n:09d}_ema_model.pt": {"size": size, "sha256": "-"}}}))

    ema(100), ema(200), ema(300, b"cut")
    assert latest_ema(tmp_path).name == "iter_000000300_ema_model.pt"  # no manifests: upstream layout
    manifest(100, 7), manifest(300, 7)
    with caplog.at_level(logging.WARNING):
        assert latest_ema(tmp_path).name == "iter_000000100_ema_model.pt"
    assert "iter_000000300_ema_model.pt (3 bytes, its manifest says 7)" in caplog.text
    assert "iter_000000200_ema_model.pt (no manifest lists it" in caplog.text
    (tmp_path / "iter_000000100_ema_model.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no committed EMA checkpoint"):
        latest_ema(tmp_path)
