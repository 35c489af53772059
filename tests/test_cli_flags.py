"""Every flag a CLI's ``--help`` offers works, and a CLI with a device option refuses a missing GPU in one line.

``RUNS`` is the command lines the chain test runs, in order, on one small workspace (the README walk-through's
steps at toy size: synthetic data, tiny T5, embeddings, tokenizer export, one training step, export of the job,
generation, the demo, the download CLI's offline paths). ``test_runs_cover_every_flag`` checks, without running
anything, that they use every flag each ``--help`` lists, so a new flag must get a run here.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VIEWS = "pinhole_front_left,pinhole_front,pinhole_front_right,pinhole_side_left,pinhole_side_right"
JOB = "ck/posttraining/diffusion_text2world/text2world_multiview_cpu_example"
TRAIN = ["--config=mvmodel/configs/multiview.py", "--", "experiment=text2world_multiview_cpu_example",
         "data.dataset_dir={W}/data/dataset", "model.tokenizer_dir={W}/data/tokenizer", "job.output_root={W}/ck",
         "trainer.max_iter=1", "checkpoint.save_iter=1", "trainer.device=cpu"]
PROMPTS = ["--prompt", "A car on a road.", "--prompt_left", "l", "--prompt_right", "r", "--prompt_back", "b",
           "--prompt_back_left", "bl", "--prompt_back_right", "br"]
UPSTREAM_NOOPS = ["--negative_prompt", "x", "--disable_prompt_upsampler", "--disable_guardrail",
                  "--offload_diffusion_transformer", "--offload_tokenizer", "--offload_text_encoder_model",
                  "--offload_prompt_upsampler", "--offload_guardrail_models"]
# (module, argv); {W} is the workspace. The demo's --out is {W}/data: it reuses the data made by the first steps.
RUNS = [
    ("mvmodel.data.synthetic", ["--out", "{W}/data/dataset", "--views", "5", "--clips", "1", "--frames", "40",
                                "--size", "64x96", "--fps", "10", "--seed", "0", "--workers", "1"]),
    ("mvmodel.data.tiny_t5", ["--out", "{W}/data/tiny_t5", "--seed", "0"]),
    ("mvmodel.data.t5_embeddings", ["--dataset_path", "{W}/data/dataset", "--t5_dir", "{W}/data/tiny_t5",
                                    "--prompt", "A road.", "--view_keys", VIEWS, "--device", "cpu", "--dtype",
                                    "float32", "--batch_size", "4", "--overwrite"]),
    ("mvmodel.tokenizer.export", ["--dataset_path", "{W}/data/dataset", "--out", "{W}/data/tokenizer",
                                  "--num_frames", "25", "--size", "64x96", "--samples", "2", "--basis", "fitted"]),
    ("mvmodel.train", ["--dryrun", *TRAIN]),
    ("mvmodel.train", ["--no_preflight", *TRAIN]),
    ("mvmodel.train", TRAIN),  # the same command again: nothing to do
    ("mvmodel.inference.model_dir", ["--job", "{W}/" + JOB, "--out", "{W}/models/exported", "--iteration", "1",
                                     "--fps", "12"]),
    ("mvmodel.inference.text2world_multiview", [
        "--checkpoint_dir", "{W}/models", "--diffusion_transformer_dir", "exported", "--n_views", "5", *PROMPTS,
        "--frame_repeat_negative_condition", "10", "--height", "64", "--width", "96", "--num_video_frames", "25",
        "--num_steps", "1", "--guidance", "2", "--fps", "10", "--seed", "3", "--t5_dir", "{W}/data/tiny_t5",
        "--tokenizer_dir", "{W}/data/tokenizer", "--video_save_name", "one", "--video_save_folder", "{W}/out",
        "--device", "cpu", "--dtype", "float32", "--t5_dtype", "float32", "--attention_backend", "sdpa",
        "--no-compile", "--sequential_cfg", "--no_offload", "--no_progress", "--save_latents", "--num_gpus", "1",
        "--precision", "fp8", "--bf16_blocks", "0,-1", "--bf16_steps", "1", *UPSTREAM_NOOPS]),
    ("mvmodel.inference.text2world_multiview", [
        "--checkpoint_dir", "{W}/ck/posttraining/diffusion_text2world", "--diffusion_transformer_dir",
        "text2world_multiview_cpu_example", "--t5_dir", "{W}/data/tiny_t5", "--batch_input_path", "{W}/batch.jsonl",
        "--num_steps", "1", "--video_save_folder", "{W}/out", "--compile", "--no_progress",
        "--guardrail_dir", "{W}/guard", "--offload_guardrail_models"]),  # test guard weights (guardrail_fixtures)
    ("mvmodel.demo", ["--out", "{W}/data", "--steps", "1", "--device", "cpu", "--sample_steps", "1", "--guidance",
                      "2", "--seed", "0"]),
    ("mvmodel.demo", ["--out", "{W}/data", "--steps", "1", "--sample_steps", "1", "--resume"]),
    ("mvmodel.download", ["--model_sizes", "7B", "--model_types", "Text2World-Sample-AV-Multiview",
                          "--checkpoint_dir", "{W}/hub", "--dry_run", "--skip_guardrail"]),
    ("mvmodel.download", ["--checkpoint_dir", "{W}/hub", "--from_dir", "{W}/copy", "--skip_guardrail"]),
]
CLIS = sorted({m for m, _ in RUNS})
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _help(module: str, capsys) -> str:
    """The module's --help text, from its own entry point (in this process: nine interpreters would cost ~30 s)."""
    main = importlib.import_module(module).main
    # mvmodel.train's main(argv) returns after printing its help; the argparse CLIs exit
    with contextlib.nullcontext() if module == "mvmodel.train" else pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


def _used(module: str) -> set[str]:
    return {a.split("=", 1)[0] for m, argv in RUNS if m == module for a in argv if FLAG.fullmatch(a.split("=")[0])}


@pytest.mark.parametrize("module", CLIS)
def test_runs_cover_every_flag(module, capsys):
    # The option list: lines that start with a flag, its first column ("  -h, --help", "  --compile, --no-compile",
    # "  --config=FILE"); flags named in prose (torchrun's, another CLI's) are not this CLI's.
    lines = [ln.strip().split("  ")[0] for ln in _help(module, capsys).splitlines() if ln.lstrip().startswith("-")]
    offered = {f for ln in lines for f in FLAG.findall(ln)} - {"--help"}
    assert offered, f"{module} --help lists no flags"
    missing = offered - _used(module)
    assert not missing, f"{module} --help offers {sorted(missing)}, which no run of RUNS exercises"


@pytest.fixture
def dynamo_off():
    """--compile takes its real path up to torch.compile, which then runs eagerly: inductor's CPU code generation
    costs minutes on 2 cores (the compiled sampling step is measured on the GPU, benches/bench_inference_step.py).
    Afterwards dynamo is reset: code it met while off stays marked "skip", and a later test's ``fullgraph=True``
    compile would find no frame to compile."""
    import torch._dynamo

    was = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = was
    torch._dynamo.reset()


@pytest.mark.slow
def test_every_offered_flag_works(tmp_path, capsys, monkeypatch, dynamo_off):
    """RUNS in order through each CLI's main(), checking what each wrote."""
    import test_download as hub  # the Hub listing and the 7B-shaped offline copy that test already builds

    from mvmodel import download
    from mvmodel.networks import preset

    W = tmp_path
    monkeypatch.chdir(ROOT)  # train's --config path is relative to the repository
    monkeypatch.setattr(download, "hub_listing", lambda repo, token=None: hub.LISTING[repo])
    # --compile takes its real path up to torch.compile, which then runs eagerly: inductor's CPU code generation
    # costs minutes on 2 cores (the compiled sampling step is measured on the GPU, benches/bench_inference_step.py).
    hub._make_copy(W / "copy", hub._fake_7b_state_dict(preset("cosmos_7b_multiview_6view")))
    from guardrail_fixtures import simple_lemmas, write_guardrail_dir  # small guard models in the released layout

    from mvmodel.guardrail import blocklist

    write_guardrail_dir(W / "guard")
    monkeypatch.setattr(blocklist, "nltk_lemmatizer", lambda data: simple_lemmas)  # nltk's data is not offline
    (W / "batch.jsonl").write_text('{"prompt": "a road", "seed": 5, "video_save_name": "batch0"}\n')
    outputs = []
    for module, argv in RUNS:
        t0 = time.time()
        ret = importlib.import_module(module).main([a.replace("{W}", str(W)) for a in argv])
        assert ret in (None, 0) or isinstance(ret, dict), (module, argv, ret)
        outputs.append((module, time.time() - t0, capsys.readouterr()))
    text = {i: o.out + o.err for i, (_, _, o) in enumerate(outputs)}

    assert (W / "data/dataset/t5_xxl/pinhole_front").is_dir() and (W / "data/tokenizer/mean_std.pt").is_file()
    assert "5 clip captions (5 from metas/, 0 written with --prompt)" in text[2]
    assert "normalised on 2 of the dataset's 16 25-frame windows" in text[3]
    assert '"max_iter": 1' in text[4]  # --dryrun prints the composed config
    assert (W / JOB / "checkpoints/iter_000000001_ema_model.pt").is_file()
    assert "nothing to do: job text2world_multiview_cpu_example already at iteration 1 = trainer.max_iter=1" in text[6]
    meta = json.loads((W / "models/exported/mvworld.json").read_text())
    assert meta["fps"] == 12 and meta["num_video_frames"] == 25  # --fps over the job data's 10 fps
    assert {p.name for p in (W / "out").iterdir()} >= {"one.mp4", "one_grid.mp4", "one.txt", "one_latent.pt",
                                                       "batch0.mp4", "batch0_grid.mp4", "batch0.txt"}
    assert (W / "data/sample_grid.mp4").is_file() and "resumed from iteration 1" in text[11]
    assert "dry run: nothing downloaded" in text[12] and "total 60.1 GB" in text[12]
    assert (W / "hub/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview/model.pt").is_file()
    print("".join(f"{m}: {s:.1f} s\n" for m, s, _ in outputs))  # per-run times, shown with -s


def _run(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """(result, CPU seconds the command used): CPU time, not wall time, so a busy machine does not fail the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
@pytest.mark.parametrize("argv,named", [
    (["mvmodel.demo", "--device", "cuda", "--out", "work"], "--device cuda"),
    (["mvmodel.inference.text2world_multiview", "--device", "cuda", "--prompt", "x", "--video_save_folder", "work"],
     "--device cuda"),
    (["mvmodel.data.t5_embeddings", "--device", "cuda", "--dataset_path", "work"], "--device cuda"),
    (["mvmodel.train", f"--config={ROOT}/mvmodel/configs/multiview.py", "--",
      "experiment=text2world_multiview_cpu_example", "trainer.device=cuda", "job.output_root=work"],
     "trainer.device=cuda"),
], ids=["demo", "text2world_multiview", "t5_embeddings", "train"])
@pytest.mark.slow
def test_wrong_device_is_one_line_before_any_work(tmp_path, argv, named):
    r, seconds = _run(*argv, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named in err and "no CUDA GPU" in err, err
    assert not (tmp_path / "work").exists(), "files were written before the device was checked"
    assert seconds < 15, f"{seconds:.1f} CPU s before the device error"  # the imports only: ~3-6 CPU s


@pytest.mark.slow
def test_model_dir_runs_as_a_module_without_runpy_warning(tmp_path):
    """`python -m mvmodel.inference.model_dir`: the package no longer imports it before runpy runs it."""
    r, _ = _run("mvmodel.inference.model_dir", "--job", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                cwd=tmp_path)
    assert r.returncode == 2 and "RuntimeWarning" not in r.stderr, r.stderr
    assert r.stderr.startswith("python -m mvmodel.inference.model_dir: error: --job"), r.stderr


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_torchscript_deprecation_is_not_shown(tmp_path, monkeypatch, category):
    """Upstream's tokenizer files are TorchScript, deprecated in torch: some releases warn with a
    DeprecationWarning, others with a FutureWarning (shown in every command). Both stay hidden around our
    TorchScript calls, whatever the category; other warnings still show."""
    import warnings

    from mvmodel.tokenizer import SpaceToDepthTokenizer, load_tokenizer

    real_load = torch.jit.load

    def load_as_that_release(*a, **k):  # the message torch's jit.load gives, in the category under test
        warnings.warn("`torch.jit.load` is deprecated. Please switch to `torch.export`.", category, stacklevel=2)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=2)
        return real_load(*a, **k)

    monkeypatch.setattr(torch.jit, "load", load_as_that_release)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        SpaceToDepthTokenizer(pixel_chunk_duration=9).export_torchscript(tmp_path)
        load_tokenizer(str(tmp_path), pixel_chunk_duration=9, device="cpu", dtype=torch.float32)
    shown = [str(w.message) for w in seen]
    assert not [m for m in shown if "torch.jit" in m], shown
    assert "an unrelated warning" in shown
