"""Inference precision on a GPU: torchao FP8 linears and the 8-bit attention inside the DiT blocks (each part
skipped where it cannot run: FP8 GEMMs need compute capability >= 8.9 and torchao, 8-bit attention a Hopper GPU
and mvkernels.ops.mv_attention_int8), including the per-step switch under torch.compile (inductor)."""
from __future__ import annotations

import pytest
import torch

from mvmodel.networks import MultiviewDiT, Precision, apply_precision, preset, set_sampling_step
from mvmodel.networks.attention import choose_auto
from mvmodel.networks.precision import Fp8Switch, fp8_linear_status, int8_attention_status

pytestmark = pytest.mark.gpu


def _net(**over):
    torch.manual_seed(0)
    net = MultiviewDiT(preset("small", num_blocks=4, **over), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # fresh init zeroes the AdaLN gates and the final layer: give every part real work
        for tb in net.blocks.values():
            for b in tb.blocks:
                b.adaLN_modulation[-1].weight.normal_(0, 0.02)
        for p in net.final_layer.parameters():
            p.normal_(0, 0.02)
    return net.eval().requires_grad_(False)


def _inputs(net):
    V = net.config.n_views
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, V * 2, 16, 16, device="cuda", generator=g)
    return x, torch.full((1,), 0.5, device="cuda"), torch.randn(1, V * 8, 1024, device="cuda", generator=g)


def _need(status):
    ok, why = status(torch.device("cuda"))
    if not ok:
        pytest.skip(why)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linears_match_bf16_and_switch_without_recompiling():
    _need(fp8_linear_status)
    from torch._dynamo.testing import CompileCounterWithBackend

    net = _net()
    x, t, c = _inputs(net)
    with torch.no_grad():
        ref = net(x, t, c)
    assert apply_precision(net, Precision("fp8-linear", bf16_blocks=(0, -1), bf16_steps=1)).mode == "fp8-linear"
    switches = [m for m in net.modules() if isinstance(m, Fp8Switch)]
    assert len(switches) == 2 * 5 and all(type(m.weight_fp8) is not torch.Tensor for m in switches)  # torchao's
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    for name, blk in list(net.blocks.items()):
        net.blocks[name] = torch.compile(blk, backend=counter)
    outs, counts = [], []
    with torch.no_grad():
        for step in (0, 1, 0, 1):
            set_sampling_step(net, step)
            outs.append(net(x, t, c))
            counts.append(counter.frame_count)
    assert counts[2:] == [counts[1]] * 2, counts
    assert _rel(outs[0], ref) < 1e-2  # bf16 step: the bf16 net (compiled)
    assert 1e-4 < _rel(outs[1], ref) < 5e-2 and torch.isfinite(outs[1]).all()
    torch._dynamo.reset()


def test_int8_attention_runs_in_the_blocks():
    _need(int8_attention_status)
    net = _net(num_heads=6)  # head dim 128, as the 7B
    x, t, c = _inputs(net)
    with torch.no_grad():
        ref = net(x, t, c)
        q = torch.randn(1, 640, 6, 128, device="cuda", dtype=torch.bfloat16)
        assert choose_auto(q, True, True, "all", eight_bit=True) == "int8"
    assert apply_precision(net, Precision("fp8-attn", bf16_blocks=(0,))).mode == "fp8-attn"
    set_sampling_step(net, 0)
    on = [tb.blocks[0].block.attn.attn_8bit for tb in net.blocks.values()]
    assert on == [False, True, True, True] and not any(tb.blocks[1].block.attn.attn_8bit for tb in net.blocks.values())
    with torch.no_grad():
        y = net(x, t, c)
    assert torch.isfinite(y).all() and 0 < _rel(y, ref) < 5e-2
