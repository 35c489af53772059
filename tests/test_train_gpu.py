"""GPU checks of the trainer (skipped without CUDA): the CPU-offloaded optimizer's streams, events and forward
hooks against the plain FSDP path, resume with the offloaded state, and the tiny bf16 + compile recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvmodel.trainer.checkpoint import iter_name

from test_train_loop import run_tiny, tiny_dataset

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


def test_offloaded_optimizer_matches_fsdp_path(dataset, tmp_path):
    # Random init differs by path (the offloaded one initialises on the GPU, the FSDP one on the CPU: other RNG
    # streams), so both start from the same saved weights.
    _, seed = run_tiny(dataset, tmp_path / "seed", ["trainer.device=cuda", "trainer.max_iter=1"])
    start = Path(seed["checkpoint_dir"]) / iter_name(1, "reg_model")
    common = ["trainer.device=cuda", "trainer.max_iter=6", "trainer.tf32=false", f"checkpoint.load_path={start}"]
    _, plain = run_tiny(dataset, tmp_path / "plain", common)
    _, off = run_tiny(dataset, tmp_path / "off", common + ["optimizer.cpu_offload=true"])
    # Same fp32 math; the offloaded update is torch._fused_adamw_ on the CPU instead of the fused CUDA kernel.
    torch.testing.assert_close(torch.tensor(off["losses"]), torch.tensor(plain["losses"]), rtol=1e-3, atol=1e-4)


def test_offloaded_resume_is_exact(dataset, tmp_path):
    args = ["trainer.device=cuda", "trainer.max_iter=6", "optimizer.cpu_offload=true", "checkpoint.save_iter=3",
            "model.precision=bfloat16", "checkpoint.reg_model_dtype=bfloat16", "parallel.compile=true",
            "parallel.activation_checkpointing=block"]
    _, full = run_tiny(dataset, tmp_path / "full", args)
    _, first = run_tiny(dataset, tmp_path / "split", args + ["trainer.max_steps_per_run=3"])
    trainer, second = run_tiny(dataset, tmp_path / "split", args)
    assert trainer.iteration == 6 and len(second["losses"]) == 3
    # Bitwise on CPU (test_train_resume); on a GPU some backward kernels (attention) may reduce in any order.
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(full["losses"]),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("ac", ["subblock", "selective"])
def test_bf16_fsdp_recipe_trains(dataset, tmp_path, ac):
    _, s = run_tiny(dataset, tmp_path, ["trainer.device=cuda", "model.precision=bfloat16", "trainer.max_iter=12",
                                        "parallel.compile=true", f"parallel.activation_checkpointing={ac}"])
    assert s["skipped_steps"] == 0 and all(l == l for l in s["losses"])
    assert sum(s["losses"][-4:]) < sum(s["losses"][:4])


def test_demo_on_gpu(tmp_path):
    from mvmodel import demo

    res = demo.main(["--out", str(tmp_path), "--steps", "30", "--sample_steps", "5", "--device", "cuda"])
    assert res["iteration"] == 30 and res["sample"].is_file()
