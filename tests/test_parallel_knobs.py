"""FSDP2 throughput knobs on CPU (gloo, 2 processes): every recompute mode x reshard_after_forward (True / False
/ a group size) x explicit prefetch trains to the same losses as one process, the knobs reach FSDP2, and a
2-process checkpoint resumes in the 1-process trainer (plain AdamW and the offloaded one) exactly where the
2-process run would have gone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mvmodel.configs import make_config
from mvmodel.trainer import Trainer
from mvmodel.trainer.parallelize import resolve_gpu_kind
from test_context_parallel import _spawn
from test_train_loop import CONFIG, EXPERIMENT, run_tiny, tiny_dataset

BASE = ["trainer.max_iter=3", "checkpoint.save_iter=3", "checkpoint.async_save=false"]
# (name, context_parallel_size, overrides): cp=2 runs see the one-process run's samples (dp=1), cp=1 runs are
# 2-way data parallel and are compared with each other.
COMBOS = [
    ("cp2_none_reshard_prefetch0", 2, ["parallel.activation_checkpointing=none", "parallel.reshard_after_forward=true"]),
    ("cp2_selective_keep_prefetch1", 2, ["parallel.activation_checkpointing=selective",
                                         "parallel.reshard_after_forward=false", "parallel.forward_prefetch=1",
                                         "parallel.backward_prefetch=1"]),
    ("cp2_subblock_group2_prefetch2", 2, ["parallel.activation_checkpointing=subblock",
                                          "parallel.reshard_after_forward=2", "parallel.forward_prefetch=2",
                                          "parallel.backward_prefetch=2", "parallel.fsdp_unit=subblock"]),
    ("dp2_subblock", 1, ["parallel.activation_checkpointing=subblock"]),
    ("dp2_selective_keep_prefetch1", 1, ["parallel.activation_checkpointing=selective",
                                         "parallel.reshard_after_forward=false", "parallel.forward_prefetch=1",
                                         "parallel.backward_prefetch=1"]),
]


def _worker(rank: int, world: int, port: int, dataset: str, out: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rows = {}
    for i, (name, cp, overrides) in enumerate(COMBOS):
        cfg = make_config(CONFIG, EXPERIMENT, [f"data.dataset_dir={dataset}", f"job.output_root={out}/{name}",
                                               "trainer.device=cpu", f"parallel.context_parallel_size={cp}",
                                               *BASE, *overrides])
        trainer = Trainer(cfg, progress=False)  # the process group outlives it: the next combination reuses it
        summary = trainer.train()
        trainer.checkpointer.close()
        trainer.monitor.close()
        units = list(trainer.model.net.blocks.values()) if cfg.parallel.fsdp_unit == "block" else \
            trainer.model.net.fsdp_units()
        state = units[0]._get_fsdp_state()
        rows[name] = {"losses": summary["losses"], "forward_prefetch": len(state._states_to_forward_prefetch),
                      "backward_prefetch": len(units[-1]._get_fsdp_state()._states_to_backward_prefetch),
                      "resharded": state._fsdp_param_group.post_forward_mesh_info is not None}
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "train_tiny_data")


@pytest.mark.slow
def test_knob_combinations_match_and_checkpoints_load_in_one_process(dataset, tmp_path):
    _, ref = run_tiny(dataset, tmp_path / "ref", BASE[1:] + ["trainer.max_iter=5"])  # 1 process, 5 steps
    result = tmp_path / "combos.json"
    _spawn(_worker, 2, str(dataset), str(tmp_path / "two"), str(result))
    rows = json.loads(result.read_text())

    for name, cp, _ in COMBOS:
        assert len(rows[name]["losses"]) == 3 and all(x == x for x in rows[name]["losses"]), name
        want = ref["losses"][:3] if cp == 2 else rows["dp2_subblock"]["losses"]
        torch.testing.assert_close(torch.tensor(rows[name]["losses"]), torch.tensor(want), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The knobs reached FSDP2.
    assert rows["cp2_none_reshard_prefetch0"]["resharded"] and rows["cp2_none_reshard_prefetch0"]["forward_prefetch"] == 0
    assert not rows["cp2_selective_keep_prefetch1"]["resharded"]
    assert rows["cp2_selective_keep_prefetch1"]["forward_prefetch"] == rows["cp2_selective_keep_prefetch1"]["backward_prefetch"] == 1
    assert rows["cp2_subblock_group2_prefetch2"]["resharded"]  # 2 = the world size: reshard fully
    assert rows["cp2_subblock_group2_prefetch2"]["forward_prefetch"] == rows["cp2_subblock_group2_prefetch2"]["backward_prefetch"] == 2

    # The 2-process (cp=2) checkpoint of iteration 3 continues in ONE process to iteration 5, with plain AdamW and
    # with the offloaded optimizer, exactly as the one-process run did.
    job = Path("posttraining/diffusion_text2world/text2world_multiview_tiny_example")
    src = tmp_path / "two" / "cp2_selective_keep_prefetch1"
    for name, extra in (("plain", []), ("offloaded", ["optimizer.cpu_offload=true"])):
        shutil.copytree(src, tmp_path / name)
        trainer, summary = run_tiny(dataset, tmp_path / name, BASE[1:] + ["trainer.max_iter=5", *extra])
        assert trainer.iteration == 5 and len(summary["losses"]) == 2, name
        torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref["losses"][3:]), rtol=1e-4,
                                   atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        rows = [json.loads(line) for line in (tmp_path / name / job / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]


def test_per_gpu_kind_table(tmp_path):
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo", ["parallel.reshard_after_forward=true"])
    table = cfg.parallel.per_gpu_kind
    assert table["130"]["activation_checkpointing"] == "selective" and table["130"]["reshard_after_forward"] is False
    # No GPU: the experiment's fields stay.
    assert "no GPU" in resolve_gpu_kind(cfg.parallel, torch.device("cpu"))
    assert cfg.parallel.activation_checkpointing == "subblock"
    # An H200 (139.8 GiB) gets the 130 class, except the field given on the command line.
    note = resolve_gpu_kind(cfg.parallel, torch.device("cuda"), explicit=cfg.overrides, memory_gib=139.8)
    assert "class 130 GiB" in note and "reshard_after_forward" not in note
    assert cfg.parallel.activation_checkpointing == "selective" and cfg.parallel.compile is True
    assert cfg.parallel.reshard_after_forward is True and cfg.parallel.forward_prefetch == 1
    # The same H200 capped to 76 GiB: the 80 GB class; a 40 GiB card: below every class.
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo", [])
    assert "class 75 GiB" in resolve_gpu_kind(cfg.parallel, torch.device("cuda"), cap_gib=76, memory_gib=139.8)
    assert cfg.parallel.reshard_after_forward is True
    cfg = make_config(CONFIG, "text2world_multiview_7b_example_waymo", [])
    assert "below every" in resolve_gpu_kind(cfg.parallel, torch.device("cuda"), memory_gib=40)
    assert cfg.parallel.activation_checkpointing == "subblock"
    with pytest.raises(ValueError, match="parallel.per_gpu_kind"):
        make_config(CONFIG, EXPERIMENT, ['parallel.per_gpu_kind={"130": {"reshard": false}}'])
    with pytest.raises(ValueError, match="parallel.reshard_after_forward"):
        make_config(CONFIG, EXPERIMENT, ["parallel.reshard_after_forward=-1"])
    assert make_config(CONFIG, "text2world_multiview_7b_example_waymo_1gpu", []).parallel.per_gpu_kind == {}
