"""Inference precision (mvmodel.networks.precision) on CPU: option checks, which layers go 8-bit, the per-step /
per-block switch (with a plain-PyTorch e4m3 weight rounding standing in for torchao, which refuses the CPU), the
torch.compile guard behaviour of the switch, and the CLI flags with their one-line fallback."""
from __future__ import annotations

import logging
import types

import pytest
import torch

from mvmodel.networks import MultiviewDiT, Precision, apply_precision, preset, set_sampling_step
from mvmodel.networks import attention as attention_mod
from mvmodel.networks import precision as precision_mod
from mvmodel.networks.attention import Attention
from mvmodel.networks.precision import Fp8Switch, fp8_linear_targets, parse_blocks, resolve_precision


def e4m3_rowwise(w: torch.Tensor) -> torch.Tensor:
    """Weight rounding of FP8 rowwise quantization (per-row amax scale to e4m3's 448, round, scale back): the
    weight half of what torchao's float8 linear computes, runnable on the CPU."""
    scale = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
    return ((w.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(w.dtype)


def _net(blocks=4, seed=0):
    torch.manual_seed(seed)
    net = MultiviewDiT(preset("tiny", num_blocks=blocks)).eval().requires_grad_(False)
    with torch.no_grad():  # fresh init zeroes the AdaLN gates; give every sub-block real work
        for tb in net.blocks.values():
            for b in tb.blocks:
                b.adaLN_modulation[-1].weight.normal_(0, 0.05)
        for p in net.final_layer.parameters():
            p.normal_(0, 0.05)
    return net


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3 * 2, 8, 8, generator=g), torch.full((1,), 0.5),
            torch.randn(1, 3 * 8, 32, generator=g))


# ------------------------------------------------------------------------------------------------ option checks
@pytest.mark.parametrize("kw, match", [
    (dict(mode="fp4"), r"precision='fp4' is not one of 'bf16', 'fp8', 'fp8-attn', 'fp8-linear'"),
    (dict(mode="fp8", bf16_steps=-1), r"bf16_steps=-1: expected an integer >= 0"),
    (dict(mode="fp8", bf16_steps=1.5), r"bf16_steps=1.5: expected an integer"),
    (dict(mode="fp8", bf16_blocks="0,1"), r"bf16_blocks='0,1': expected a tuple of block indices"),
    (dict(mode="fp8", bf16_blocks=(0, 1.0)), r"bf16_blocks=\(0, 1.0\): expected a tuple"),
])
def test_precision_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        Precision(**kw)
    assert "\n" not in str(e.value)


def test_block_indices_checked_against_the_net():
    p = Precision("fp8", bf16_blocks=(0, -1, 2))
    assert p.block_set(28) == {0, 27, 2} and p.block_set(3) == {0, 2}
    for bad in (28, -29):
        with pytest.raises(ValueError, match=rf"bf16_blocks: block {bad} is out of range for a 28-block net "
                                             r"\(expected 0..27, or -28..-1 from the end\)"):
            Precision("fp8", bf16_blocks=(bad,)).block_set(28)
    with pytest.raises(ValueError, match="out of range for a 4-block net"):
        apply_precision(_net(), Precision("fp8", bf16_blocks=(4,)))


def test_parse_blocks():
    assert parse_blocks(None) == (0, -1) and parse_blocks("none") == () and parse_blocks("") == ()
    assert parse_blocks("0, 1,-2") == (0, 1, -2)
    with pytest.raises(ValueError, match=r"--bf16_blocks 'first': expected comma-separated block indices"):
        parse_blocks("first")


def test_fp32_net_keeps_fp8_linears_off(caplog, monkeypatch):
    monkeypatch.setattr(precision_mod, "fp8_linear_status", lambda device: (True, ""))  # as on an H200
    with caplog.at_level(logging.WARNING, logger="mvmodel.precision"):
        p = resolve_precision(Precision("fp8-linear"), torch.device("cpu"), torch.float32)
    assert p.mode == "bf16" and [r.getMessage() for r in caplog.records] == [
        "precision fp8-linear: FP8 linears take a bf16 net, this one is torch.float32 (--dtype); linears run in bf16"]


def test_cpu_falls_back_to_bf16_with_one_line_each(caplog):
    with caplog.at_level(logging.WARNING, logger="mvmodel.precision"):
        p = resolve_precision(Precision("fp8", bf16_steps=2), torch.device("cpu"))
    assert p == Precision("bf16", bf16_steps=2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in m for m in lines)
    assert "attention runs in bf16" in lines[0] and "linears run in bf16" in lines[1]
    assert "compute capability >= 8.9" in lines[1] and "cpu" in lines[1]


# ------------------------------------------------------------------------------------------------ which layers
def test_fp8_linear_targets_skip_bf16_blocks_adaln_text_kv_and_io():
    net = _net()
    names = set(fp8_linear_targets(net, Precision("fp8").block_set(4)))
    per_block = {"blocks.0.block.attn.qkv", "blocks.0.block.attn.to_out.0", "blocks.1.block.attn.to_q.0",
                 "blocks.1.block.attn.to_out.0", "blocks.2.block.layer1", "blocks.2.block.layer2"}
    assert names == {f"blocks.block{i}.{n}" for i in (1, 2) for n in per_block}
    # a width that _scaled_mm cannot take (not a multiple of 16) stays bf16
    odd = MultiviewDiT(preset("tiny", num_blocks=2, model_channels=72, num_heads=2, mlp_ratio=4.0)).eval()
    assert not any("to_out" in n or "layer" in n for n in fp8_linear_targets(odd, frozenset()))


# ------------------------------------------------------------------------------------------------ the switch
def test_steps_and_blocks_switch_fp8_linears():
    ref, net = _net(), _net()
    x, t, c = _inputs()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    p = apply_precision(net, Precision("fp8-linear", bf16_blocks=(0, -1), bf16_steps=2), quantize=e4m3_rowwise)
    assert p.mode == "fp8-linear"
    assert net.state_dict().keys() == state.keys()  # upstream's keys; the FP8 copies are not persistent
    switches = [m for m in net.modules() if isinstance(m, Fp8Switch)]
    fused = [m for m in net.modules() if isinstance(m, Attention) and hasattr(m, "qkv_fp8")]
    assert len(switches) == 2 * 5 and len(fused) == 2  # blocks 1, 2 only: to_out x2, ca to_q, mlp x2; fa qkv
    with torch.no_grad():
        y_ref = ref(x, t, c)
        outs = []
        for step in range(4):
            assert set_sampling_step(net, step) is (step >= 2)
            assert all(m.fp8 is (step >= 2) for m in switches) and all(m.qkv_fp8_on is (step >= 2) for m in fused)
            outs.append(net(x, t, c))
    assert torch.equal(outs[0], y_ref) and torch.equal(outs[1], y_ref)  # bf16 steps: the unconverted net exactly
    rel = ((outs[2] - y_ref).norm() / y_ref.norm()).item()
    assert 1e-4 < rel < 0.05 and torch.equal(outs[2], outs[3])
    set_sampling_step(net, 0)  # back to bf16 (a new video)
    with torch.no_grad():
        assert torch.equal(net(x, t, c), y_ref)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bf16_mode_converts_nothing():
    net = _net()
    assert apply_precision(net, Precision("bf16")).mode == "bf16"
    assert not any(isinstance(m, Fp8Switch) for m in net.modules())
    assert not set_sampling_step(net, 5)
    assert not any(getattr(m, "attn_8bit", False) for m in net.modules())


def test_switch_under_compile_makes_one_graph_per_setting():
    """The per-step flags are guarded Python bools: after the first bf16 and the first 8-bit step, flipping them
    (every video starts in bf16 again) never compiles anything new."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = _net()
    apply_precision(net, Precision("fp8-linear", bf16_blocks=(0,), bf16_steps=1), quantize=e4m3_rowwise)
    counter = CompileCounter()
    for name, blk in list(net.blocks.items()):
        net.blocks[name] = torch.compile(blk, backend=counter)
    x, t, c = _inputs()
    counts = []
    with torch.no_grad():
        for step in (0, 1, 0, 1, 2, 0, 3):
            set_sampling_step(net, step)
            net(x, t, c)
            counts.append(counter.frame_count)
    assert counts[1] > counts[0] > 0  # one more graph set for the 8-bit setting
    assert counts[-1] == counts[1], counts  # and nothing after both were seen
    torch._dynamo.reset()


def test_int8_attention_path_with_the_reference_kernel(monkeypatch):
    """The 8-bit self-attention path of the blocks, run with the kernel's PyTorch reference where the op exists."""
    mod = precision_mod.int8_attention_module()
    if isinstance(mod, str) or not hasattr(mod, "mv_attention_int8_reference"):
        pytest.skip("mvkernels.ops.mv_attention_int8 (with its reference) is not installed")
    calls = []

    def reference(*args, **kw):
        calls.append(kw.get("n_views"))
        return mod.mv_attention_int8_reference(*args, **kw)

    # The reference runs on the CPU; the GPU gate (Hopper + kernel) is what the stand-in replaces.
    monkeypatch.setattr(precision_mod, "int8_attention_status", lambda device: (True, ""))
    monkeypatch.setattr(attention_mod, "_INT8", types.SimpleNamespace(mv_attention_int8=reference))
    monkeypatch.setattr(attention_mod, "_int8_serves", lambda q: True)
    ref, net = _net().bfloat16(), _net().bfloat16()  # the 8-bit path takes bf16/fp16 nets
    x, t, c = _inputs()
    assert apply_precision(net, Precision("fp8-attn", bf16_blocks=(-1,), bf16_steps=1)).mode == "fp8-attn"
    with torch.no_grad():
        y_ref = ref(x, t, c)
        set_sampling_step(net, 0)
        assert torch.equal(net(x, t, c), y_ref) and not calls
        set_sampling_step(net, 1)
        y = net(x, t, c)
    assert calls == [3, 3, 3]  # self-attention of blocks 0..2 (block 3 is bf16), the net's 3 views
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    assert 0 < rel < 0.05


def test_set_precision_mode_selects_converted_parts():
    from mvmodel.networks.precision import set_precision_mode

    ref, net = _net(), _net()
    x, t, c = _inputs()
    apply_precision(net, Precision("fp8-linear"), quantize=e4m3_rowwise)
    with torch.no_grad():
        y_ref, y8 = ref(x, t, c), (set_sampling_step(net, 0), net(x, t, c))[1]
        set_precision_mode(net, "bf16")
        set_sampling_step(net, 0)
        assert torch.equal(net(x, t, c), y_ref)
        set_precision_mode(net, "fp8-linear")
        set_sampling_step(net, 0)
        assert torch.equal(net(x, t, c), y8) and not torch.equal(y8, y_ref)
    with pytest.raises(ValueError, match=r"precision mode 'fp8-attn': the net was converted for 'fp8-linear'"):
        set_precision_mode(net, "fp8-attn")
    with pytest.raises(ValueError, match="converted for 'nothing'"):
        set_precision_mode(ref, "bf16")


def test_more_bf16_blocks_and_steps_at_run_time():
    from mvmodel.networks.precision import set_precision_mode

    net = _net()
    x, t, c = _inputs()
    apply_precision(net, Precision("fp8-linear", bf16_blocks=(0,)), quantize=e4m3_rowwise)
    with torch.no_grad():
        set_sampling_step(net, 0)
        y_all = net(x, t, c)
        set_precision_mode(net, "fp8-linear", bf16_blocks=(0, 1, 2, 3))  # every block bf16: the bf16 net
        set_sampling_step(net, 0)
        y_none = net(x, t, c)
        set_precision_mode(net, "bf16")
        set_sampling_step(net, 0)
        assert torch.equal(net(x, t, c), y_none)
        set_precision_mode(net, "fp8-linear", bf16_steps=2)
        assert not set_sampling_step(net, 1) and set_sampling_step(net, 2)
        assert torch.equal(net(x, t, c), y_all)
    with pytest.raises(ValueError, match=r"blocks \[0\] were kept bf16 when the net was converted"):
        set_precision_mode(net, "fp8-linear", bf16_blocks=())


def test_torchao_fp8_weights_keep_zero_rows_finite():
    """torchao's real float8 quantization (its CUDA hardware gate lifted: the math is plain PyTorch and runs on the
    CPU): a zero activation row - the unconditional pass's cross-attention output is exactly 0 - stays 0, not
    0/0 = NaN; a layer with an all-zero weight row stays bf16."""
    pytest.importorskip("torchao")
    from torchao.quantization import quant_api

    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao has no hardware gate to lift")
    from mvmodel.networks.precision import quantize_weight_fp8

    mp = pytest.MonkeyPatch()
    mp.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    try:
        net = _net().bfloat16()
        x, t, c = _inputs()
        with torch.no_grad():
            net.blocks.block2.blocks[2].block.layer2.weight[3] = 0
            y_ref = net(torch.cat([x, x]), t.expand(2), torch.cat([c, torch.zeros_like(c)]))
            apply_precision(net, Precision("fp8-linear", bf16_blocks=()), quantize=quantize_weight_fp8)
            set_sampling_step(net, 0)
            y = net(torch.cat([x, x]), t.expand(2), torch.cat([c, torch.zeros_like(c)]))
    finally:
        mp.undo()
    assert not isinstance(net.blocks.block2.blocks[2].block.layer2, Fp8Switch)
    assert type(net.blocks.block1.blocks[2].block.layer2.weight_fp8) is not torch.Tensor  # torchao's float8 tensor
    assert torch.isfinite(y).all() and 0 < _rel32(y, y_ref) < 0.05


def _rel32(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
