"""text2world_multiview inference on CPU: tiny nets saved in upstream's key layout, a tiny T5, the built-in
tokenizer; real mp4 files decoded back with PyAV."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mvmodel.diffusion import Denoiser, sample_euler
from mvmodel.inference import resolve_model, write_model_dir
from mvmodel.inference.pipeline import MultiviewGenerationPipeline, euler_step_cfg, make_condition
from mvmodel.inference.text2world_multiview import run
from mvmodel.networks import (RELEASED_6VIEW_CAMERAS, WAYMO_5VIEW_CAMERAS, MultiviewDiT, preset,
                              to_cosmos_state_dict)

av = pytest.importorskip("av")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FRAMES, H, W = 9, 32, 48  # 2 latent frames x 4 x 6 latents per view


def _tiny(n_views: int, cams, **kw):
    return preset("tiny", n_views=n_views, camera_names=cams, crossattn_emb_channels=1024, **kw)


def _save_net(cfg, path, seed):
    torch.manual_seed(seed)
    net = MultiviewDiT(cfg)
    with torch.no_grad():  # trained-looking final layer: fresh init zeroes it, which would make F identically 0
        for p in net.final_layer.parameters():
            p.normal_(0, 0.05)
    torch.save(to_cosmos_state_dict(net), path)
    return net


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mvmodel.data.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("inference")
    t5 = build_tiny_t5(root / "tiny_t5")
    ck = root / "checkpoints"
    cfg5 = _tiny(5, WAYMO_5VIEW_CAMERAS, view_condition_dim=3, add_repeat_frame_embedding=False)
    _save_net(cfg5, root / "w5.pt", 0)
    write_model_dir(ck / "Tiny-Multiview_post-trained", root / "w5.pt", cfg5, tokenizer_dir="builtin", fps=10,
                    num_video_frames=FRAMES, height=H, width=W)
    cfg6 = _tiny(6, RELEASED_6VIEW_CAMERAS, view_condition_dim=6, add_repeat_frame_embedding=True)
    _save_net(cfg6, root / "w6.pt", 1)
    d6 = ck / "tiny6"
    d6.mkdir(parents=True)
    (d6 / "model.pt").write_bytes((root / "w6.pt").read_bytes())
    (d6 / "mvworld.json").write_text(json.dumps({  # the short form: a preset plus overrides
        "format": "mvworld.model/1", "net": {"preset": "tiny", "overrides": {
            "n_views": 6, "view_condition_dim": 6, "add_repeat_frame_embedding": True, "crossattn_emb_channels": 1024,
            "camera_names": list(RELEASED_6VIEW_CAMERAS)}}, "tokenizer_dir": "builtin"}))
    return {"root": root, "t5": str(t5), "ck": ck}


def _cli(env, out, *extra):
    return run(["--checkpoint_dir", str(env["ck"]), "--t5_dir", env["t5"], "--num_steps", "3", "--no_progress",
                "--video_save_folder", str(out), "--disable_guardrail", *extra])


def _decode(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, float(s.average_rate)


def test_cli_5view_post_trained_outputs(env, tmp_path):
    paths = _cli(env, tmp_path, "--diffusion_transformer_dir", "Tiny-Multiview_post-trained",
                 "--prompt", "A car drives on a highway on a clear day.", "--prompt_left", "Left camera.",
                 "--video_save_name", "clip")[0]
    video, fps = _decode(paths["video"])
    assert video.shape == (5 * FRAMES, H, W, 3) and fps == 10  # views in time, the model folder's fps
    grid, _ = _decode(paths["grid"])
    assert grid.shape == (FRAMES, 2 * H, 3 * W, 3)
    views = video.reshape(5, FRAMES, H, W, 3).astype(np.float32)  # prompt order: front, left, right, b_left, b_right
    tiles = {(r, c): grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W].astype(np.float32)
             for r in (0, 1) for c in (0, 1, 2)}
    for (r, c), v in {(0, 1): 0, (0, 0): 1, (0, 2): 2, (1, 0): 3, (1, 2): 4}.items():
        diff = np.abs(tiles[r, c] - views[v]).mean()
        others = min(np.abs(tiles[r, c] - views[u]).mean() for u in range(5) if u != v)
        assert diff < 6 and diff < others, (r, c, diff, others)  # H.264 noise only, and the right view
    assert tiles[1, 1].mean() < 2 and tiles[1, 1][:, 8:-8, 8:-8].max() <= 16  # the 5-view grid's black slot
    lines = paths["prompts"].read_text().splitlines()
    assert lines[0].startswith("A car drives") and lines[1] == "Left camera." and len(lines) == 5
    assert "rear left" in lines[3] and "rear right" in lines[4]


def test_cli_6view_batch_jsonl(env, tmp_path):
    jsonl = tmp_path / "batch.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Night city street.", "prompt_back": "Behind the car."}) + "\n\n"
                     + json.dumps({"prompt": "Snowy road.", "video_save_name": "snow", "seed": 7}) + "\n")
    out = _cli(env, tmp_path / "out", "--diffusion_transformer_dir", "tiny6", "--batch_input_path", str(jsonl),
               "--num_video_frames", str(FRAMES), "--height", str(H), "--width", str(W), "--n_views", "6")
    assert [p["video"].name for p in out] == ["0.mp4", "snow.mp4"]
    video, fps = _decode(out[0]["video"])
    assert video.shape == (6 * FRAMES, H, W, 3) and fps == 24
    grid, _ = _decode(out[1]["grid"])
    assert grid.shape == (FRAMES, 2 * H, 3 * W, 3) and grid[:, H:, W:2 * W].max() > 16  # "back" is a real view
    assert out[0]["prompts"].read_text().splitlines()[3] == "Behind the car."


@pytest.mark.slow
def test_same_seed_same_video(env, tmp_path):
    """Generated frames are bit-identical for a seed (fresh pipelines); the mp4s agree up to the H.264 encoder,
    which is not bit-reproducible under CPU load here; another seed gives another video."""
    prompts = {s: f"A truck, {s} camera." for s in ("front", "left", "right", "back_left", "back_right")}
    kw = dict(num_steps=3, fps=10, num_video_frames=FRAMES, height=H, width=W)
    a, = _pipe(env).generate([prompts], seeds=[5], **kw)
    b, c = _pipe(env).generate([prompts, prompts], seeds=[5, 6], **kw)
    assert a.shape == (5, FRAMES, H, W, 3) and torch.equal(a, b)
    assert (a.int() - c.int()).abs().float().mean() > 2
    args = ["--diffusion_transformer_dir", "Tiny-Multiview_post-trained", "--prompt", "A truck.", "--seed", "5"]
    va, vb = (_decode(_cli(env, tmp_path / d, *args)[0]["video"])[0].astype(int) for d in "ab")
    assert np.abs(va - vb).mean() < 0.5


def _pipe(env, name="Tiny-Multiview_post-trained", device="cpu", **kw):
    spec = resolve_model(env["ck"], name)
    return MultiviewGenerationPipeline(spec, t5_dir=env["t5"], tokenizer_dir="builtin", device=device,
                                       progress=False, **kw)


def test_batched_cfg_matches_two_forwards_and_reference_sampler(env):
    """One B=2 forward == two forwards; guidance on F == the diffusion package's guidance on D."""
    pipe = _pipe(env)
    V = pipe.spec.n_views
    text = torch.randn(V * 512, 1024, generator=torch.Generator().manual_seed(0)) * (torch.rand(V * 512, 1) < 0.1)
    kw = dict(seed=3, num_steps=4, guidance=7.0, fps=10, num_video_frames=FRAMES, height=H, width=W)
    z_batched = pipe.sample(text, **kw)
    pipe.batch_cfg = False
    z_seq = pipe.sample(text, **kw)
    torch.testing.assert_close(z_batched, z_seq, rtol=1e-4, atol=1e-4)
    net = pipe.network()
    cond, uncond = make_condition(text, V, 10, H, W, [0.0] * V, torch.device("cpu"), torch.float32)
    noise = torch.randn(z_batched.shape, generator=torch.Generator().manual_seed(3)) * math.sqrt(80**2 + 1)
    ref = sample_euler(Denoiser(net), noise, cond, uncond, guidance=7.0, num_steps=4)
    torch.testing.assert_close(z_batched, ref, rtol=1e-3, atol=1e-3)
    assert z_batched.abs().max() < 20 and z_batched.std() > 0.05  # a finished sample, not noise at sigma 80


def test_euler_step_formula(env):
    """Last step (sigma -> 0) lands on D = c_skip x + c_out (F_c + g (F_c - F_u)), computed here by hand."""
    pipe = _pipe(env)
    net, V = pipe.network(), pipe.spec.n_views
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, V * 2, 4, 6, generator=g)
    cond, uncond = make_condition(torch.randn(V * 512, 1024, generator=g), V, 24, H, W, [0, 0, 0, 10, 10],
                                  torch.device("cpu"), torch.float32)
    s, sd = 0.7, 0.5
    c_in, c_skip, c_out = 1 / math.sqrt(s**2 + sd**2), sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
    t = torch.tensor([0.25 * math.log(s)])
    f_c = net(x * c_in, t, **cond.to_kwargs())
    f_u = net(x * c_in, t, **uncond.to_kwargs())
    want = c_skip * x + c_out * (f_c + 2.5 * (f_c - f_u))
    got = euler_step_cfg(net, x, s, 0.0, cond, uncond, 2.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    half = euler_step_cfg(net, x, s, s / 2, cond, uncond, 2.5)  # halfway: x + (x - D)/s * (-s/2) = (x + D)/2
    torch.testing.assert_close(half, (x + want) / 2, rtol=1e-5, atol=1e-5)


def test_tokenizer_dir_is_honoured(env, tmp_path):
    """A TorchScript tokenizer folder (upstream's file layout) is what decodes: its mean_std.pt takes effect."""
    from mvmodel.tokenizer import SpaceToDepthTokenizer

    tok_dir = tmp_path / "tok"
    SpaceToDepthTokenizer(pixel_chunk_duration=FRAMES).export_torchscript(tok_dir)
    torch.save((torch.zeros(16, 2), torch.full((16, 2), 2.0)), tok_dir / "mean_std.pt")  # std 2: latents x 2
    z = torch.randn(1, 16, 5 * 2, H // 8, W // 8, generator=torch.Generator().manual_seed(0)) * 0.2
    builtin = _pipe(env).decode(z * 2, FRAMES)
    spec = resolve_model(env["ck"], "Tiny-Multiview_post-trained")
    jit = MultiviewGenerationPipeline(spec, t5_dir=env["t5"], tokenizer_dir=str(tok_dir), device="cpu",
                                      progress=False).decode(z, FRAMES)
    assert jit.shape == (5, FRAMES, H, W, 3) and jit.dtype == torch.uint8
    assert (jit.int() - builtin.int()).abs().max() <= 1  # same decode up to uint8 truncation of float noise
    assert (builtin.int() - _pipe(env).decode(z, FRAMES).int()).abs().float().mean() > 1


@pytest.mark.gpu
def test_cli_on_gpu_bf16_deterministic_and_offloaded(env, tmp_path):
    args = ["--diffusion_transformer_dir", "Tiny-Multiview_post-trained", "--prompt", "A bus.", "--device", "cuda"]
    a = _cli(env, tmp_path / "a", *args)[0]
    b = _cli(env, tmp_path / "b", *args)[0]
    assert np.abs(_decode(a["video"])[0].astype(int) - _decode(b["video"])[0].astype(int)).mean() < 0.5
    assert _decode(a["video"])[0].shape == (5 * FRAMES, H, W, 3)
    pipe = _pipe(env, device="cuda")
    pipe.generate([{s: "A bus." for s in pipe.spec.slots}], seeds=[0], num_steps=2, fps=10, num_video_frames=FRAMES,
                  height=H, width=W)
    assert next(pipe._net.parameters()).device.type == "cpu"  # the DiT left the GPU for the decode
    assert next(pipe._net.parameters()).dtype == torch.bfloat16
