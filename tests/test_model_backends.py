"""attention_backend="mvkernels" (mv_attention with fused QK-norm/RoPE) vs "sdpa" (torch SDPA + plain PyTorch
norm/RoPE): same outputs and gradients; view-sparse connectivity agrees between the two."""
from __future__ import annotations

import pytest
import torch

from mvmodel.networks import MultiviewDiT, tiny
from mvmodel.networks.attention import mvkernels_available

from model_reference import randomize_

pytestmark = pytest.mark.skipif(not mvkernels_available(), reason="mvkernels.mv_attention / qk_norm_rope not installed")


def _pair(dtype, backend="mvkernels", **kw):
    a = MultiviewDiT(tiny(attention_backend="sdpa", **kw), dtype=dtype)
    randomize_(a, seed=7)
    b = MultiviewDiT(tiny(attention_backend=backend, **kw), dtype=dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def _inputs(dtype, V=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, V * 2, 8, 12, generator=g).to(dtype)
    t = torch.randn(1, generator=g).to(dtype)
    ctx = torch.randn(1, V * 8, 32, generator=g).to(dtype)
    ctx[:, 5:8] = 0
    return x, t, ctx


@pytest.mark.parametrize("backend", ["mvkernels", "hybrid"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_forward_backward_equivalence(dtype, tol, backend):
    a, b = _pair(dtype, backend)
    x, t, ctx = _inputs(dtype)
    outs, grads = [], []
    for net in (a, b):
        out = net(x, t, ctx, fps=10.0)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append({n: p.grad.float() for n, p in net.named_parameters()})
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < tol, rel
    for n in ("blocks.block0.blocks.0.block.attn.to_q.1.weight", "blocks.block1.blocks.1.block.attn.to_k.0.weight",
              "x_embedder.proj.1.weight"):
        g0, g1 = grads[0][n], grads[1][n]
        assert (g0 - g1).norm() / g0.norm() < 5 * tol, n


@pytest.mark.parametrize("conn,V", [("self", 3), ("ring1", 5),
                                    ([[True, False, True], [False, True, False], [True, True, True]], 3)])
def test_sparse_connectivity_backends_agree(conn, V):
    if isinstance(conn, list):
        conn = torch.tensor(conn)
    a, b = _pair(torch.float32, self_attn_connectivity=conn, n_views=V)
    x, t, ctx = _inputs(torch.float32, V)
    with torch.no_grad():
        oa, ob = a(x, t, ctx), b(x, t, ctx)
        dense = MultiviewDiT(tiny(attention_backend="sdpa", n_views=V))
        dense.load_state_dict(a.state_dict())
        od = dense(x, t, ctx)
    torch.testing.assert_close(oa, ob, rtol=2e-4, atol=2e-4)
    assert not torch.allclose(oa, od, atol=1e-3)  # the pattern really restricts attention


@pytest.mark.slow
def test_blocks_compile_fullgraph_with_checkpointing():
    """The trainer compiles each block: it must trace without graph breaks, custom ops and checkpointing included."""
    a, b = _pair(torch.float32)
    x, t, ctx = _inputs(torch.float32)
    ref = b(x, t, ctx, fps=10.0)
    b.set_activation_checkpointing("subblock")
    for blk in b.blocks.values():
        blk.compile(backend="aot_eager", fullgraph=True)
    out = b(x, t, ctx, fps=10.0)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref)
    assert b.blocks.block0.blocks[0].block.attn.to_q[1].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["mvkernels", "hybrid"])
def test_gpu_bf16_backends_match_sdpa(backend):
    """Real kernels (Triton attention, CUDA norm+RoPE) in bf16 at head dim 128, 5 views, odd grid sizes."""
    from mvmodel.networks import DiTConfig

    cfg = dict(model_channels=512, num_heads=4, num_blocks=2, adaln_lora_dim=64, crossattn_emb_channels=128, n_views=5,
               view_condition_dim=3, add_repeat_frame_embedding=False)
    a = MultiviewDiT(DiTConfig(attention_backend="sdpa", **cfg), device="cuda", dtype=torch.bfloat16)
    randomize_(a, seed=11)
    b = MultiviewDiT(DiTConfig(attention_backend=backend, **cfg), device="cuda", dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 5 * 3, 14, 22, device="cuda", generator=g)
    t = torch.randn(1, device="cuda", generator=g)
    ctx = torch.randn(1, 5 * 64, 128, device="cuda", generator=g)
    ctx[:, 40:64] = 0
    outs = []
    for net in (a, b):
        out = net(x, t, ctx, fps=10.0).float()
        out.square().mean().backward()
        outs.append((out, net.blocks.block0.blocks[0].block.attn.to_q[0].weight.grad.float()))
    (oa, ga), (ob, gb) = outs
    assert (oa - ob).norm() / oa.norm() < 3e-2
    assert (ga - gb).norm() / ga.norm() < 1e-1


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="needs an sm_90 GPU")
def test_gpu_auto_takes_sm90_kernels(monkeypatch):
    """"auto" on Hopper runs self-attention through the sm_90a kernels, without autograd (sampling: forward) and
    with it (training: forward and backward), and matches SDPA's output and gradients; cross-attention stays on
    SDPA. With MVKERNELS_ATTN_BWD=triton (no sm90 backward wanted) training falls back to the hybrid path."""
    from mvkernels.ops import mv_attention_sm90
    from mvmodel.networks import DiTConfig

    if not mv_attention_sm90.available_bwd():
        pytest.skip("extension built without the sm_90a kernels")
    from mvmodel.networks import attention

    # the built-in choice, not the measured table (which may name another backend, e.g. FlashAttention-4)
    monkeypatch.setattr(attention, "AUTO_TABLE", attention.AUTO_TABLE.with_name("no_such_table.json"))
    calls = {"fwd": 0, "bwd": 0}
    real_forward, real_backward = mv_attention_sm90.forward, mv_attention_sm90.backward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(mv_attention_sm90, "forward", count("fwd", real_forward))
    monkeypatch.setattr(mv_attention_sm90, "backward", count("bwd", real_backward))
    cfg = dict(model_channels=512, num_heads=4, num_blocks=2, adaln_lora_dim=64, crossattn_emb_channels=128, n_views=5,
               view_condition_dim=3, add_repeat_frame_embedding=False)
    a = MultiviewDiT(DiTConfig(attention_backend="sdpa", **cfg), device="cuda", dtype=torch.bfloat16)
    randomize_(a, seed=11)
    b = MultiviewDiT(DiTConfig(attention_backend="auto", **cfg), device="cuda", dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 5 * 3, 14, 22, device="cuda", generator=g)
    t = torch.randn(1, device="cuda", generator=g)
    ctx = torch.randn(1, 5 * 64, 128, device="cuda", generator=g)
    with torch.no_grad():
        oa, ob = a(x, t, ctx, fps=10.0).float(), b(x, t, ctx, fps=10.0).float()
    assert calls == {"fwd": 2, "bwd": 0}  # one self-attention per block, cross-attention stays on SDPA
    assert (oa - ob).norm() / oa.norm() < 3e-2
    grads = []
    for net in (a, b):
        net.zero_grad()
        net(x, t, ctx, fps=10.0).float().square().mean().backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in net.parameters() if p.grad is not None]))
    assert calls == {"fwd": 4, "bwd": 2}  # training: the sm90 forward and backward in both blocks
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 1e-1
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "triton")
    b(x, t, ctx, fps=10.0).float().square().mean().backward()  # no sm90 backward wanted: hybrid, no new calls
    assert calls == {"fwd": 4, "bwd": 2}
