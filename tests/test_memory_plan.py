"""The one-GPU memory plan (``mvmodel.trainer.memory_plan``): every placement of the optimizer state gives
bitwise the same update, the greedy choice fits the budget it is given, and the trainer logs and honours it.

On a CPU the plan's "device" is the CPU, so the GPU-resident code path (update in ``step()``, EMA refreshed by
the worker from the master) runs here and is compared with the host path exactly."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mvmodel.networks import MultiviewDiT, preset
from mvmodel.trainer.memory_plan import (GiB, MemoryPlan, choose_plan, device_plan, estimate_activation_bytes,
                                         host_plan)
from mvmodel.trainer.offload import OffloadedAdamW
from test_train_loop import run_tiny, tiny_dataset


def _train(plan_fn, steps: int = 4):
    torch.manual_seed(0)
    net = MultiviewDiT(preset("tiny", num_blocks=3))
    holder = torch.nn.ModuleDict({"net": net})
    opt = OffloadedAdamW(list(holder.named_parameters()), lr=1e-2, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.1,
                         ema_rate=0.1, plan=plan_fn)
    for i, block in enumerate(net.blocks.values()):  # the trainer's hooks: a forward waits for its bucket
        block.register_forward_pre_hook(lambda mod, args, i=i: opt.wait_bucket(i + 1))
    net.register_forward_pre_hook(lambda mod, args: opt.wait_bucket(0))
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 16, 6, 8, 8, generator=g), torch.randn(1, 12, 32, generator=g)
    losses = []
    for it in range(steps):
        loss = net(x, torch.full((1,), 0.1 * (it + 1)), ctx).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step(lr=1e-2, grad_scale=0.7, iteration=it)
        opt.zero_grad()
    opt.synchronize()
    return opt, holder, losses


PLANS = {
    "host": lambda n: host_plan(n, "cpu"),
    "device": lambda n: device_plan(n, "cpu"),
    "device:2, EMA of bucket 0 only": lambda n: device_plan(n, "cpu", buckets=2, ema_buckets=1),
    "device, EMA on the host": lambda n: device_plan(n, "cpu", ema_buckets=0),
}


def test_every_placement_gives_bitwise_the_same_update():
    ref_opt, ref_holder, ref_losses = _train(PLANS["host"])
    assert ref_opt.plan.device_bytes() == 0
    for name, fn in list(PLANS.items())[1:]:
        opt, holder, losses = _train(fn)
        assert opt.plan.device_bytes() > 0, name
        assert losses == ref_losses, name
        for (n, a), b in zip(ref_holder.named_parameters(), holder.parameters()):
            assert torch.equal(a, b), f"{name}: {n}"
        for what in ("master_state", "ema_state"):
            ra, rb = getattr(ref_opt, what)(ref_holder), getattr(opt, what)(holder)
            assert all(torch.equal(ra[k], rb[k]) for k in ra), f"{name}: {what}"
        sa, sb = ref_opt.state_dict()["state"], opt.state_dict()["state"]
        for k in sa:
            assert all(torch.equal(sa[k][f], sb[k][f]) for f in ("step", "exp_avg", "exp_avg_sq")), f"{name}: {k}"
    # The update did something: the EMA lags the master weights.
    m, e = ref_opt.master_state(ref_holder), ref_opt.ema_state(ref_holder)
    assert not torch.equal(m["net.final_layer.linear.weight"], e["net.final_layer.linear.weight"])


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="splits master/exp_avg/exp_avg_sq"):
        MemoryPlan(torch.device("cpu"), [10], [frozenset({"master"})])
    with pytest.raises(ValueError, match="EMA on the device but updates on the host"):
        MemoryPlan(torch.device("cpu"), [10], [frozenset({"ema"})])
    with pytest.raises(ValueError, match=r"buckets of \[1, 2\] elements"):
        _train(lambda n: host_plan([1, 2], "cpu"))


# The 7B: bucket 0 (embedders, final layer, logvar) then 28 blocks; 7.23B parameters.
_7B = [130_000_000] + [253_500_000] * 28


def test_choose_plan_7b_on_h200_and_80gb():
    n = sum(_7B)
    act = estimate_activation_bytes(63_600, 4096, 28, "selective")
    assert 24 * GiB < act < 29 * GiB  # measured on the H100: 26.3 GiB above weights + gradients
    # H200: 140 GiB, 13.5 GiB of bf16 weights already placed.
    h200 = choose_plan(_7B, "cpu", with_ema=True, gpu_free_bytes=int(126.5 * GiB), grad_bytes=2 * n,
                       activation_bytes=act, margin_bytes=6 * GiB, host_available_bytes=120 * GiB)
    on_gpu = sum(h200.updates_on_device(i) for i in range(len(_7B)))
    assert 20 <= on_gpu < 29  # most optimizer triplets fit beside the 53 GiB peak, not all
    peak = 2 * 2 * n + act + h200.device_bytes() + 4 * max(_7B)
    assert peak <= int(126.5 * GiB) + 2 * n - 6 * GiB  # within free memory (weights excluded) minus the margin
    assert h200.host_bytes() / GiB < 50  # host RSS target 64 GiB
    text = h200.describe()
    assert "exp_avg_sq" in text and "host available 120.0 GiB" in text and f"{on_gpu} of 29 buckets" in text
    # An 80 GB card (cap 76 GiB): a few buckets, the rest on the host.
    small = choose_plan(_7B, "cpu", with_ema=True, gpu_free_bytes=int(62.5 * GiB), grad_bytes=2 * n,
                        activation_bytes=act, margin_bytes=6 * GiB, host_available_bytes=120 * GiB)
    assert 0 < sum(small.updates_on_device(i) for i in range(len(_7B))) < on_gpu
    assert small.device_bytes() < h200.device_bytes()
    # A host too small for what the GPU cannot hold: a clear error naming the way out.
    with pytest.raises(ValueError, match="ema.enabled=false"):
        choose_plan(_7B, "cpu", with_ema=True, gpu_free_bytes=int(62.5 * GiB), grad_bytes=2 * n,
                    activation_bytes=act, margin_bytes=6 * GiB, host_available_bytes=64 * GiB)


def test_trainer_plans_give_identical_losses(tmp_path, capsys):
    """The real loop with the GPU-resident path (``optimizer.offload_plan=device:2``) and the all-host plan."""
    ds = tiny_dataset(tmp_path / "data")
    args = ["trainer.max_iter=4", "optimizer.cpu_offload=true", "checkpoint.save_iter=4"]
    _, host = run_tiny(ds, tmp_path / "host", args + ["optimizer.offload_plan=host"])
    trainer, dev = run_tiny(ds, tmp_path / "dev", args + ["optimizer.offload_plan=device:2"])
    assert dev["losses"] == host["losses"]
    assert "memory plan (fixed: 2 bucket(s) on the device, EMA of 2)" in capsys.readouterr().out
    cfg = json.loads((trainer.job_dir / "config.json").read_text())
    assert cfg["optimizer"]["offload_plan"] == "device:2"
    with pytest.raises(ValueError, match="optimizer.offload_plan"):
        run_tiny(ds, tmp_path / "bad", args + ["optimizer.offload_plan=gpu"])
