"""The guardrails inside ``python -m mvmodel.inference.text2world_multiview`` (CPU, tiny models, guardrail
checkpoints in the released layout made by tests/guardrail_fixtures.py): a blocked prompt or video writes nothing
and exits 3 with the guard's message, missing checkpoints are one error line, faces are pixelated in what is
written, and --disable_guardrail generates without them.

nltk's tokenizer and WordNet data ship inside Cosmos-Guardrail1 and are not available offline, so the blocklist's
lemmatiser is replaced by a small one here (the rest of the blocklist is the real code on real list files)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from guardrail_fixtures import simple_lemmas, write_guardrail_dir
from mvmodel.inference.text2world_multiview import main, run
from test_inference_errors import FRAMES, H, W, _model  # the tiny 5-view model folder those tests use

av = pytest.importorskip("av")
pytest.importorskip("sentencepiece")
pytest.importorskip("better_profanity")

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mvmodel.data.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("guard_cli")
    ck = root / "checkpoints"
    _model(ck, "Tiny_post-trained")
    guards = {"safe": write_guardrail_dir(root / "g_safe"),
              "llama_unsafe": write_guardrail_dir(root / "g_llama", answer="unsafe"),
              "video_unsafe": write_guardrail_dir(root / "g_video", verdict=2),
              "faces": write_guardrail_dir(root / "g_faces", faces=True)}
    return {"ck": ck, "t5": str(build_tiny_t5(root / "tiny_t5")), "guards": guards}


@pytest.fixture(autouse=True)
def _lemmatiser(monkeypatch):
    from mvmodel.guardrail import blocklist

    monkeypatch.setattr(blocklist, "nltk_lemmatizer", lambda data: simple_lemmas)


def _args(env, out, guard: str | None, *extra):
    g = ["--disable_guardrail"] if guard is None else ["--guardrail_dir", str(env["guards"][guard])]
    return ["--checkpoint_dir", str(env["ck"]), "--diffusion_transformer_dir", "Tiny_post-trained",
            "--t5_dir", env["t5"], "--num_steps", "2", "--no_progress", "--device", "cpu",
            "--video_save_folder", str(out), "--video_save_name", "clip", "--prompt", "A car on a quiet road.", *g,
            *extra]


def _exit(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error", "blocked"))]
    assert len(err) == 1
    return e.value.code, err[0]


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32)


def test_blocklist_blocks_a_view_prompt(env, tmp_path, capsys):
    code, line = _exit(capsys, _args(env, tmp_path, "safe", "--prompt_left", "a badword painted on a wall"))
    assert code == 3 and line.startswith("blocked: blocklist blocked the prompt of video 'clip', left camera")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_llama_guard_blocks_with_categories(env, tmp_path, capsys):
    code, line = _exit(capsys, _args(env, tmp_path, "llama_unsafe"))
    assert code == 3 and "Llama Guard 3 blocked the prompt of video 'clip', front camera" in line
    assert "S1 Violent Crimes, S10 Hate" in line and not any(tmp_path.iterdir())


def test_video_filter_blocks_and_writes_nothing(env, tmp_path, capsys):
    code, line = _exit(capsys, _args(env, tmp_path, "video_unsafe", "--save_latents"))
    assert code == 3 and line == ("blocked: video content safety filter blocked the video: video 'clip', front "
                                  "camera, frame 0 classified Violence")
    assert not any(tmp_path.iterdir())


def test_missing_checkpoints_is_one_line(env, tmp_path, capsys):
    argv = _args(env, tmp_path / "out", None)
    argv[argv.index("--disable_guardrail")] = "--offload_guardrail_models"
    code, line = _exit(capsys, argv)  # --guardrail_dir defaults to --checkpoint_dir, which holds none
    assert code == 2 and "guardrail checkpoints missing" in line and "meta-llama/Llama-Guard-3-8B" in line
    assert "python -m mvmodel.download" in line and "--disable_guardrail" in line


@pytest.mark.slow
def test_faces_are_pixelated_in_what_is_written(env, tmp_path, caplog):
    plain = run(_args(env, tmp_path / "off", None))[0]
    with caplog.at_level(logging.INFO, logger="mvmodel"):
        safe = run(_args(env, tmp_path / "safe", "safe", "--offload_guardrail_models"))[0]
        faces = run(_args(env, tmp_path / "faces", "faces"))[0]
    assert "pixelated" in caplog.text and "guardrails:" in caplog.text
    a, b, c = (_frames(p["video"]) for p in (plain, safe, faces))
    assert a.shape == b.shape == c.shape == (5 * FRAMES, H, W, 3)
    assert np.abs(a - b).max() == 0  # no face found: the guarded video is the unguarded one
    assert np.abs(a - c).mean() > 2  # every 32 px prior a face: pixelated
    # 5 x 5 blocks: neighbouring pixels inside a block are equal, so the pixelated video has much less detail
    detail = lambda v: np.abs(np.diff(v, axis=2)).mean()  # noqa: E731
    assert detail(c) < 0.6 * detail(a)
    assert safe["prompts"].read_text() == plain["prompts"].read_text()


def test_disabled_guardrail_warns(env, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mvmodel"):
        paths = run(_args(env, tmp_path, None))
    assert paths[0]["video"].is_file() and "guardrails disabled (--disable_guardrail)" in caplog.text


@pytest.mark.slow
def test_context_parallel_ranks_share_the_verdict(env, tmp_path):
    """Under torchrun the prompt guards run on rank 0 only and every rank stops with rank 0's verdict. In a fresh
    process the blocklist uses nltk, whose data this test folder lacks: a guard that cannot load, on rank 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pyenv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mvmodel.inference.text2world_multiview", *_args(env, tmp_path, "safe", "--num_gpus", "2")]
    r = subprocess.run(cmd, env=pyenv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: guardrail blocklist could not be loaded")]
    assert len(lines) == 2, r.stderr[-3000:]  # both ranks, the same line
    assert lines[0] == lines[1] and not any(tmp_path.iterdir())


@pytest.mark.gpu
def test_guards_run_on_the_gpu(env, tmp_path, capsys, caplog):
    def on_cuda(argv):
        argv[argv.index("--device") + 1] = "cuda"
        return argv

    code, line = _exit(capsys, on_cuda(_args(env, tmp_path / "v", "video_unsafe")))
    assert code == 3 and line.endswith("frame 0 classified Violence")
    code, line = _exit(capsys, on_cuda(_args(env, tmp_path / "p", "llama_unsafe")))
    assert code == 3 and "S1 Violent Crimes, S10 Hate" in line
    with caplog.at_level(logging.INFO, logger="mvmodel"):
        paths = run(on_cuda(_args(env, tmp_path / "f", "faces")))
    assert paths[0]["video"].is_file() and "pixelated" in caplog.text
