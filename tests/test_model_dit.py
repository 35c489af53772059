"""MultiviewDiT: float64 agreement with an independent statement of upstream's forward, shapes, gradients,
activation checkpointing, 7B structure on the meta device, upstream config parsing and input errors."""
from __future__ import annotations

import math
import time

import pytest
import torch

from mvmodel.networks import (DiTConfig, MultiviewDiT, cosmos_7b_multiview_6view, cosmos_7b_multiview_waymo,
                              from_upstream_kwargs, meta_device, tiny)
from mvmodel.networks.blocks import PatchRearrange, Timesteps, unpatchify

from model_reference import randomize_, reference_forward, rope_angles_f64, sincos_f64


def _inputs(cfg: DiTConfig, B=2, T=2, H=8, W=12, M=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.n_views * T, H, W, generator=g, dtype=dtype)
    t = torch.randn(B, generator=g, dtype=dtype)
    ctx = torch.randn(B, cfg.n_views * M, cfg.crossattn_emb_channels, generator=g, dtype=dtype)
    ctx[:, M - 3:M] = 0  # zero-padded text tokens of view 0, as T5 padding (not masked)
    return x, t, ctx


def _tiny_f64(**kw) -> MultiviewDiT:
    cfg = tiny(attention_backend="sdpa", rope_bf16_quirk=False, rope_t_extrapolation_ratio=2.0, **kw)
    net = MultiviewDiT(cfg, dtype=torch.float64)
    randomize_(net, seed=1)
    return net


@pytest.mark.parametrize("extra", [True, False])
def test_forward_matches_float64_reference(extra):
    net = _tiny_f64(extra_per_block_abs_pos_emb=extra)
    x, t, ctx = _inputs(net.config)
    fr = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    out = net(x, t, ctx, fps=torch.tensor([10.0, 10.0]), frame_repeat=fr)
    ref = reference_forward(net.state_dict(), net.config, x, t, ctx, fps=10.0, frame_repeat=fr)
    assert out.shape == x.shape
    # RoPE angles come from mvkernels in float32 (bf16_quirk off): ~1e-7 relative on angles up to ~30 rad.
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, err


def test_rope_and_sincos_tables_against_formulas():
    net = _tiny_f64()
    ang = net.pos_embedder.angles(3, 2, 4, 6, fps=10.0, device=torch.device("cpu")).double()
    ref = rope_angles_f64(3, 2, 4, 6, 32, 10.0, 1.0, 1.0, 2.0)
    torch.testing.assert_close(ang, ref, rtol=1e-6, atol=1e-5)
    tab = net.extra_pos_embedder.table(3, 2, 4, 6, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(tab, sincos_f64(64, 3, 2, 4, 6), rtol=0, atol=1e-7)
    # with the quirk the sin-cos values are the bf16-rounded ones upstream adds
    q = MultiviewDiT(tiny(), dtype=torch.float64).extra_pos_embedder.table(1, 2, 4, 6, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(q, sincos_f64(64, 1, 2, 4, 6).float().bfloat16().double(), rtol=0, atol=0)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.3, -1.7], dtype=torch.float64)
    emb = Timesteps(8)(t).double()
    f = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float64) / 4)
    ref = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=1)
    torch.testing.assert_close(emb, ref, rtol=1e-6, atol=1e-6)


def test_patch_order_channel_major_and_unpatchify_spatial_major():
    x = torch.arange(2 * 3 * 2 * 4 * 4, dtype=torch.float64).reshape(2, 3, 2, 4, 4)
    y = PatchRearrange(2, 1)(x)  # [B, T, 2, 2, 12]
    b, t, h, w, c, m, n = 1, 1, 1, 0, 2, 1, 0
    assert y[b, t, h, w, c * 4 + m * 2 + n] == x[b, c, t, 2 * h + m, 2 * w + n]
    feats = torch.randn(2, 2 * 2 * 2, 4 * 3, dtype=torch.float64)  # [B, T*H*W, (p1 p2 t C)]
    img = unpatchify(feats, 2, 2, 2, 2, 1, 3)
    tt, hh, ww, p1, p2, cc = 1, 0, 1, 1, 0, 2
    assert img[0, cc, tt, 2 * hh + p1, 2 * ww + p2] == feats[0, (tt * 2 + hh) * 2 + ww, (p1 * 2 + p2) * 3 + cc]


def test_cross_attention_is_per_view_and_unmasked():
    net = _tiny_f64()
    x, t, ctx = _inputs(net.config, B=1)
    base = net(x, t, ctx, fps=24.0)
    ctx2 = ctx.clone()
    ctx2[:, 2 * 7:] = torch.randn_like(ctx2[:, 2 * 7:])  # change only view 2's text
    out = net(x, t, ctx2, fps=24.0)
    # Self-attention mixes views after the first block, so check with a single block of CA only.
    one = _tiny_f64(num_blocks=1, block_config="CA")
    a, b = one(x, t, ctx, fps=24.0), one(x, t, ctx2, fps=24.0)
    T = x.shape[2] // 3
    assert torch.equal(a[:, :, : 2 * T], b[:, :, : 2 * T]) and not torch.allclose(a[:, :, 2 * T:], b[:, :, 2 * T:])
    assert not torch.allclose(base, out)
    # appending zero text tokens changes the output: padding is not masked (it dilutes the softmax)
    c_pad = torch.cat([ctx.reshape(1, 3, 7, -1), torch.zeros(1, 3, 2, ctx.shape[-1], dtype=ctx.dtype)], 2)
    assert not torch.allclose(one(x, t, c_pad.reshape(1, 27, -1), fps=24.0), a)


def test_backward_reaches_every_parameter_and_checkpointing_is_exact():
    torch.manual_seed(0)
    net = MultiviewDiT(tiny(attention_backend="sdpa"))
    randomize_(net, seed=3)
    x, t, ctx = _inputs(net.config, dtype=torch.float32)
    grads = {}
    for mode in ("none", "subblock", "block"):
        net.zero_grad()
        net.set_activation_checkpointing(mode)
        loss = net(x, t, ctx, fps=10.0, frame_repeat=torch.ones(2, 3)).square().mean()
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads["none"].values())
    for mode in ("subblock", "block"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="checkpointing mode"):
        net.set_activation_checkpointing("everything")


def test_bf16_forward_close_to_fp32():
    net = MultiviewDiT(tiny(attention_backend="sdpa"))
    randomize_(net, seed=4)
    x, t, ctx = _inputs(net.config, dtype=torch.float32)
    ref = net(x, t, ctx, fps=24.0)
    out = net.to(torch.bfloat16)(x, t, ctx, fps=24.0)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_7b_on_meta_device_structure_and_counts():
    t0 = time.perf_counter()
    with meta_device():
        net6 = MultiviewDiT(cosmos_7b_multiview_6view())
        net5 = MultiviewDiT(cosmos_7b_multiview_waymo())
    assert time.perf_counter() - t0 < 20
    assert net6.num_parameters() == 7_234_783_280
    assert net5.num_parameters() == 7_234_734_095
    sd = net6.state_dict()
    assert sd["pos_embedder.seq"].shape == (128,) and "pos_embedder.seq" in sd
    assert sum(b.numel() for b in net6.buffers()) == 128
    expect = {
        "x_embedder.proj.1.weight": (4096, 92), "t_embedder.1.linear_1.weight": (4096, 4096),
        "t_embedder.1.linear_2.weight": (12288, 4096), "affline_norm.weight": (4096,),
        "view_embeddings.weight": (6, 6), "repeat_frame_embedding.weight": (6, 1), "repeat_frame_embedding.bias": (6,),
        "final_layer.linear.weight": (64, 4096), "final_layer.adaLN_modulation.1.weight": (256, 4096),
        "final_layer.adaLN_modulation.2.weight": (8192, 256),
    }
    for i in (0, 27):
        p = f"blocks.block{i}.blocks."
        for j in (0, 1):
            a = f"{p}{j}.block.attn."
            expect.update({a + "to_q.0.weight": (4096, 4096), a + "to_q.1.weight": (128,), a + "to_k.1.weight": (128,),
                           a + "to_k.0.weight": (4096, 4096 if j == 0 else 1024),
                           a + "to_v.0.weight": (4096, 4096 if j == 0 else 1024), a + "to_out.0.weight": (4096, 4096)})
        for j in (0, 1, 2):
            expect.update({f"{p}{j}.adaLN_modulation.1.weight": (256, 4096), f"{p}{j}.adaLN_modulation.2.weight": (12288, 256)})
        expect.update({p + "2.block.layer1.weight": (16384, 4096), p + "2.block.layer2.weight": (4096, 16384)})
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 8 + 28 * 20 + 3  # globals, 20 tensors per block, seq + 2 repeat-frame tensors
    assert not any("extra_pos" in k or "bias" in k and "repeat_frame" not in k for k in sd)
    sd5 = net5.state_dict()
    assert sd5["x_embedder.proj.1.weight"].shape == (4096, 80) and sd5["view_embeddings.weight"].shape == (5, 3)
    assert "repeat_frame_embedding.weight" not in sd5
    assert net6.fsdp_units().__len__() == 84
    assert net6.forward_flops(63_600, 512) == pytest.approx(2.71e15, rel=0.01)


def test_from_cosmos_config():
    up = dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
              patch_temporal=1, model_channels=64, block_config="FA-CA-MLP", num_blocks=2, num_heads=2,
              concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
              block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=16,
              rope_h_extrapolation_ratio=1.0, rope_w_extrapolation_ratio=1.0, rope_t_extrapolation_ratio=2.0,
              extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="sincos", n_views=5,
              view_condition_dim=3, concat_view_embedding=True, add_repeat_frame_embedding=False,
              crossattn_emb_channels=32, mlp_ratio=4.0, use_cross_attn_mask=False)
    net = MultiviewDiT.from_cosmos_config(up, attention_backend="sdpa")
    assert net.config.n_views == 5 and net.x_embedder.proj[1].weight.shape == (64, 80)
    with pytest.warns(UserWarning, match="sincos"):
        from_upstream_kwargs({**up, "extra_per_block_abs_pos_emb_type": "learnable"})
    with pytest.raises(ValueError, match="does not know.*modle_channels"):
        from_upstream_kwargs({**up, "modle_channels": 3})
    with pytest.raises(ValueError, match="use_cross_attn_mask"):
        from_upstream_kwargs({**up, "use_cross_attn_mask": True})
    with pytest.raises(ValueError, match="attention_backend"):
        MultiviewDiT.from_cosmos_config(up, attention_backend="flash")
    no_lora = MultiviewDiT.from_cosmos_config({**up, "use_adaln_lora": False}, attention_backend="sdpa")
    keys = no_lora.state_dict().keys()
    assert "t_embedder.1.linear_1.bias" in keys and "blocks.block0.blocks.0.adaLN_modulation.1.weight" in keys
    x, t, ctx = _inputs(no_lora.config, B=1, dtype=torch.float32)
    assert no_lora(x, t, ctx).shape == x.shape


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(model_channels=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown sub-block"):
        tiny(block_config="FA-XX")
    with pytest.raises(ValueError, match="camera_names"):
        tiny(camera_names=("a", "b"))
    net = MultiviewDiT(tiny(attention_backend="sdpa"))
    x, t, ctx = _inputs(net.config, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_views=3"):
        net(x[:, :, :5], t, ctx)
    with pytest.raises(ValueError, match="crossattn_emb"):
        net(x, t, ctx[:, :20])
    with pytest.raises(ValueError, match=r"x must be \[B, 16"):
        net(x[:, :8], t, ctx)
    with pytest.raises(ValueError, match="exceeds"):
        net(torch.zeros(1, 16, 3, 40, 8), t[:1], ctx[:1])
