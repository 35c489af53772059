"""LoRA post-training on CPU: the adapters' math (against the float64 reference forward of the merged weights),
a tiny LoRA run that trains only the adapters, exact resume, merge tool == unmerged inference, one-line config
errors, and the recipe the preflight picks for a GPU's memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mvmodel.configs import make_config
from mvmodel.networks import MultiviewDiT, tiny
from mvmodel.networks.checkpoint import to_cosmos_state_dict
from mvmodel.networks.lora import TARGETS, add_lora, lora_modules, merge_state_dict
from mvmodel.trainer.recipes import GIB, choose, resolve_recipe
from model_reference import randomize_, reference_forward
from test_model_dit import _inputs
from test_train_loop import CONFIG, run_tiny, tiny_dataset

LORA = ["model.lora.enabled=true"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A "pretrained" tiny net (the trainer's tiny experiment net, random weights) saved in upstream's layout."""
    from mvmodel.configs.multiview import _TINY_NET
    from mvmodel.networks import preset

    torch.manual_seed(3)
    net = MultiviewDiT(preset("tiny", **{**_TINY_NET, "camera_names": tuple(_TINY_NET["camera_names"])}))
    path = tmp_path_factory.mktemp("base") / "model.pt"
    torch.save(to_cosmos_state_dict(net), path)
    return path


def _randomize_adapters(net, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(net).values():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("targets", [["to_q", "to_v"], list(TARGETS)])
def test_adapters_equal_merged_weights_in_the_float64_reference(targets):
    """The fused self-attention q/k/v GEMM gets the adapters on its slices: the LoRA net equals the independent
    float64 reference forward run on the merged weights (W + scale B A), for the default and for every target."""
    cfg = tiny(attention_backend="sdpa", rope_bf16_quirk=False)
    net = MultiviewDiT(cfg, dtype=torch.float64)
    randomize_(net, seed=1)
    names = add_lora(net, rank=3, alpha=6.0, targets=targets)
    # q, v of the self- and the cross-attention per block; all: 4 + 4 attention linears and 2 MLP linears
    assert len(names) == cfg.num_blocks * (4 if len(targets) == 2 else 10)
    assert all(not p.requires_grad for n, p in net.named_parameters() if "_lora." not in n)
    assert all(p.requires_grad and p.dtype == torch.float32 for n, p in net.named_parameters() if "_lora." in n)
    x, t, ctx = _inputs(cfg)
    start = net(x, t, ctx, fps=10.0)  # B = 0: the adapted net starts as the base
    base_sd = {k: v for k, v in net.state_dict().items() if "_lora." not in k}
    torch.testing.assert_close(start, reference_forward(base_sd, cfg, x, t, ctx, fps=10.0), rtol=2e-5, atol=2e-5)
    _randomize_adapters(net)
    out = net(x, t, ctx, fps=10.0)
    merged = merge_state_dict(base_sd, {k: v for k, v in net.state_dict().items() if "_lora." in k}, scale=2.0)
    ref = reference_forward(merged, cfg, x, t, ctx, fps=10.0)
    assert (out - start).abs().max() > 1e-3  # the adapters do change every path they are on
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, err


def test_tiny_lora_run_trains_only_the_adapters(dataset, base_file, tmp_path):
    trainer, summary = run_tiny(dataset, tmp_path, [*LORA, f"checkpoint.load_path={base_file}"])
    base = torch.load(base_file)
    own = trainer.model.state_dict()
    for k, v in base.items():  # every base tensor bit-identical after 8 steps
        assert torch.equal(own[k].to(v.dtype), v), k
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    ck = Path(summary["checkpoint_dir"])
    for kind in ("reg_model", "ema_model"):
        sd = torch.load(ck / f"iter_000000008_{kind}.pt")
        assert sd and all("_lora.net." in k for k in sd), kind  # adapters only: no base, no logvar, no buffers
        assert all(v.dtype == torch.float32 for v in sd.values())
    reg = torch.load(ck / "iter_000000008_reg_model.pt")
    assert any(v.abs().max() > 0 for k, v in reg.items() if k.endswith("net.1.weight"))  # B left zero: trained
    optim = torch.load(ck / "iter_000000008_optim.pt")["optimizer"]
    assert set(optim["state"]) == set(reg)
    state = torch.load(ck / "iter_000000008.pt", weights_only=False)
    assert state["lora"] == {"base": str(base_file), "rank": 8, "alpha": None, "scale": 1.0,
                             "targets": ["to_q", "to_v"]}
    assert json.loads((ck / "iter_000000008_manifest.json").read_text())["files"]  # committed set


def test_lora_resume_is_exact(dataset, base_file, tmp_path):
    extra = [*LORA, f"checkpoint.load_path={base_file}"]
    _, full = run_tiny(dataset, tmp_path / "a", extra)
    _, first = run_tiny(dataset, tmp_path / "b", [*extra, "trainer.max_steps_per_run=4"])
    trainer, second = run_tiny(dataset, tmp_path / "b", extra)
    assert trainer.resumed_from == 4
    assert first["losses"] + second["losses"] == full["losses"]
    a = torch.load(Path(full["checkpoint_dir"]) / "iter_000000008_ema_model.pt")
    b = torch.load(Path(second["checkpoint_dir"]) / "iter_000000008_ema_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The base of a LoRA job is part of what it computes: a resume on another base is refused.
    other = tmp_path / "other.pt"
    other.write_bytes(base_file.read_bytes())
    with pytest.raises(ValueError, match="checkpoint.load_path"):
        run_tiny(dataset, tmp_path / "b", [*LORA, f"checkpoint.load_path={other}", "trainer.max_iter=9"])


def test_merged_model_equals_base_plus_adapters(dataset, base_file, tmp_path):
    from mvmodel.inference import resolve_model
    from mvmodel.inference.pipeline import build_network
    from mvmodel.lora_merge import main as merge_main

    trainer, summary = run_tiny(dataset, tmp_path, [*LORA, f"checkpoint.load_path={base_file}",
                                                    "model.lora.alpha=16", "trainer.max_iter=4"])
    job = trainer.job_dir
    merge_main(["--job", str(job), "--out", str(tmp_path / "merged")])
    merged_sd = torch.load(tmp_path / "merged" / "model.pt")
    assert set(merged_sd) == set(torch.load(base_file))  # the base's own (upstream) keys, nothing else
    unmerged = build_network(resolve_model(job.parent, job.name), torch.device("cpu"), torch.float32, "sdpa")
    assert lora_modules(unmerged)  # the job folder itself runs as base + adapters
    merged = build_network(resolve_model(tmp_path, "merged"), torch.device("cpu"), torch.float32, "sdpa")
    assert not lora_modules(merged)
    x, t, ctx = _inputs(merged.config, dtype=torch.float32, T=2, H=4, W=6, M=4)
    a, b = unmerged(x, t, ctx, fps=10.0), merged(x, t, ctx, fps=10.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    spec = resolve_model(tmp_path, "merged")
    spec.weights = base_file
    base_net = build_network(spec, torch.device("cpu"), torch.float32, "sdpa")
    assert (base_net(x, t, ctx, fps=10.0) - a).abs().max() > 1e-4  # the trained adapters matter


@pytest.mark.parametrize("override, key", [
    ("model.lora.rank=0", "model.lora.rank"),
    ("model.lora.targets=[to_q,to_qq]", "model.lora.targets"),
    ("model.lora.alpha=-1", "model.lora.alpha"),
    ("trainer.recipe=full", "model.lora.enabled"),
    ("optimizer.cpu_offload=true", "model.lora.enabled"),
    ("model.lora.ranks=4", "model.lora.ranks"),
    ("trainer.recipe=huge", "trainer.recipe"),
])
def test_bad_lora_configs_are_one_line_errors(override, key):
    with pytest.raises(ValueError) as err:
        make_config(CONFIG, "text2world_multiview_cpu_lora_example", [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg, msg


def test_lora_key_group_needs_a_sub_key():
    with pytest.raises(ValueError, match="model.lora.enabled"):
        make_config(CONFIG, "text2world_multiview_tiny_example", ["model.lora=true"])


@pytest.mark.parametrize("cap, recipe, ac", [
    (139.8, "full_offload", "selective"),  # H200
    (76, "full_offload", "selective"),     # 80 GB card
    (44, "lora", "block"),                 # 48 GB card
    (37, "lora", "block"),                 # 40 GB card
])
def test_recipe_for_the_card(cap, recipe, ac):
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo_1gpu", ["trainer.recipe=auto"])
    choice = choose(cfg, int(cap * GIB), 125 * GIB)
    assert (choice.recipe, choice.ac) == (recipe, ac), choice.note
    assert choice.gpu_bytes + 5 * GIB <= cap * GIB
    note = resolve_recipe(cfg, "cuda", gpu_bytes=int(cap * GIB), host_bytes=125 * GIB)
    assert cfg.trainer.recipe == recipe and cfg.parallel.activation_checkpointing == ac and recipe in note
    assert cfg.model.lora.enabled == (recipe == "lora") and cfg.optimizer.cpu_offload == (recipe != "lora")


def test_recipe_refuses_with_numbers_when_nothing_fits():
    cfg = make_config(CONFIG, "text2world_multiview_7b_lora_example_waymo_1gpu", [])
    with pytest.raises(ValueError) as err:
        choose(cfg, 22 * GIB, 125 * GIB)
    msg = str(err.value)
    assert "nothing fits a 22.0 GiB GPU" in msg and "lora+block: GPU 29.6+5 GiB, host 15.5 GiB" in msg, msg
    # A small host refuses the offloaded full recipe on its host figure, and LoRA fits.
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo_1gpu", ["trainer.recipe=auto"])
    assert choose(cfg, 76 * GIB, 64 * GIB).recipe == "lora"
    # The command line's AC policy is kept (and checked), not chosen.
    cfg = make_config(CONFIG, "text2world_multiview_7b_lora_example_waymo_1gpu",
                      ["parallel.activation_checkpointing=selective"])
    with pytest.raises(ValueError, match="lora\\+selective: GPU 40.1"):
        choose(cfg, 37 * GIB, 125 * GIB)


@pytest.mark.slow
def test_two_process_lora_run(dataset, base_file, tmp_path):
    """torchrun, 2 processes (gloo): the base replicated and frozen (no FSDP), the adapters' gradients averaged over
    the ranks, rank 0 writes adapter-only sets that resume in the same 2-process job."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])

    def run(max_iter: int) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "mvmodel.train", "--config=mvmodel/configs/multiview.py", "--",
               "experiment=text2world_multiview_tiny_example", f"data.dataset_dir={dataset}", f"job.output_root={tmp_path}",
               "trainer.device=cpu", f"trainer.max_iter={max_iter}", "checkpoint.save_iter=2", *LORA,
               f"checkpoint.load_path={base_file}", "model.precision=bfloat16"]
        res = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        return res.stdout + res.stderr

    out = run(2)
    assert "2 process(es) on cpu (gloo)" in out and "trained (LoRA)" in out and "base frozen in bfloat16" in out
    ck = tmp_path / "posttraining/diffusion_text2world/text2world_multiview_tiny_example/checkpoints"
    sd = torch.load(ck / "iter_000000002_ema_model.pt")
    assert sd and all("_lora.net." in k and v.dtype == torch.float32 for k, v in sd.items())
    assert "resumed from iteration 2" in run(4)
    assert (ck / "latest_checkpoint.txt").read_text() == "iter_000000004.pt\n"
