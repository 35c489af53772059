"""FlashAttention-4 as an attention backend and the measured "auto" table.

CPU: the backend's errors, the table's format and the CPU choice. GPU (skipped where flash-attn-4 is absent):
FA4 against a float64 reference with flash-attention's rule, forward and gradients, dense and per-view, strided
inputs, odd lengths; the model's "fa4" backend against SDPA; and torch.compile over the op without graph breaks.
"""
import json

import pytest
import torch

from mvkernels.ops import fa4_attention as fa4
from mvmodel.networks import attention
from mvmodel.networks.attention import BACKENDS, Attention, auto_case, choose_auto
from tolerance import assert_close_rule

needs_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and fa4.available()),
                               reason="needs a CUDA GPU and flash-attn-4")


def test_table_names_known_backends_and_cases():
    table = json.loads(attention.AUTO_TABLE.read_text())
    cases = {auto_case(s, c, t) for s in (True, False) for c in ("all", "self", "ring1") for t in (True, False)}
    for gpu, rows in table["gpus"].items():
        for case, order in rows.items():
            assert case in cases, f"{gpu}: unknown case {case!r}"
            assert order and set(order) <= set(BACKENDS) - {"auto"}, f"{gpu} {case}: {order}"


def test_auto_case_keys():
    assert auto_case(True, "all", True) == "self/dense/train"
    assert auto_case(False, "self", False) == "cross/views/fwd"
    assert auto_case(True, "ring1", False) == "self/sparse/fwd"
    assert auto_case(True, torch.ones(2, 2, dtype=torch.bool), True) == "self/sparse/train"


def test_auto_on_cpu_is_sdpa():
    q = torch.randn(1, 8, 2, 16)
    assert choose_auto(q, True, True, "all") == "sdpa"


@pytest.mark.skipif(fa4.available(), reason="flash-attn-4 is installed")
def test_missing_fa4_says_how_to_install():
    attn = Attention(32, None, 2, 16, backend="fa4")
    x = torch.randn(1, 6, 32)
    with pytest.raises(RuntimeError, match=r'pip install "mvworld\[flash\]"'):
        attn(x, rope_angles=torch.zeros(6, 16))
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        fa4.fa4_attention(*(torch.randn(1, 6, 2, 16, dtype=torch.bfloat16),) * 3)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q.float(), k, v), "bf16/fp16"),
    (lambda q, k, v: (q.transpose(-1, -2), k, v), "unit last stride"),
    (lambda q, k, v: (q, k[:, :, :1], v), "matching q"),
    (lambda q, k, v: (q[0], k, v), r"\[B, S, H, D\]"),
])
def test_bad_inputs_are_named(bad, match):
    q = k = v = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        fa4.fa4_attention(*bad(q, k, v))


def test_reference_per_view_equals_separate_attentions():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3 * n, 2, 16, generator=g, dtype=torch.float64) for n in (5, 4, 4))
    out = fa4.fa4_attention_reference(q, k, v, n_views=3, connectivity="self")
    for i in range(3):
        want = fa4.fa4_attention_reference(q[:, 5 * i:5 * i + 5], k[:, 4 * i:4 * i + 4], v[:, 4 * i:4 * i + 4])
        torch.testing.assert_close(out[:, 5 * i:5 * i + 5], want)
    from mvkernels import mv_attention_reference
    ring = fa4.fa4_attention_reference(q, k[:, :15], v[:, :15], n_views=3, connectivity=[[1, 1, 0], [0, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(ring, mv_attention_reference(q, k[:, :15], v[:, :15], n_views=3,
                                                            connectivity=[[1, 1, 0], [0, 1, 0], [1, 1, 1]]))


@pytest.mark.parametrize("V, L, conn", [(5, 300, "ring1"), (3, 100, "self"), (4, 640, [[1, 1, 0, 0], [0, 1, 0, 0],
                                                                                      [1, 1, 1, 1], [0, 0, 0, 1]])])
def test_block_classes_match_the_token_mask(V, L, conn):
    """The 128 x 128 block maps FA4 gets (full / partial / skipped) agree with the token-level view mask."""
    from mvkernels.ops.fa4_sparsity import BLOCK, block_classes
    from mvkernels.ops.mv_attention import _expanded_mask, connectivity_matrix

    flat = tuple(b for row in connectivity_matrix(conn, V) for b in row)
    partial, full = block_classes(V, flat, V * L, V * L)
    S, nb = V * L, -(-V * L // BLOCK)
    mask = torch.zeros(nb * BLOCK, nb * BLOCK, dtype=torch.bool)
    mask[:S, :S] = _expanded_mask(V, flat, S, S, "cpu")
    valid = torch.zeros_like(mask)
    valid[:S, :S] = True
    blocks, vblocks = mask.view(nb, BLOCK, nb, BLOCK), valid.view(nb, BLOCK, nb, BLOCK)
    any_ = blocks.any(3).any(1)
    all_ = (blocks | ~vblocks).all(3).all(1)
    assert torch.equal(full, all_) and torch.equal(partial, any_ & ~all_)
    assert not (partial & full).any()


def _qkv(B, Sq, Sk, H, D, strided, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if strided:  # slices of one fused projection, as the model hands them over
        qkv = torch.randn(B, Sq, 3, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
        return qkv[:, :, 0], qkv[:, :Sk, 1], qkv[:, :Sk, 2]
    return tuple(torch.randn(B, s, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for s in (Sq, Sk, Sk))


def _check_against_float64(q, k, v, n_views, conn):
    """FA4's output and q/k/v gradients vs a float64 reference, within flash-attention's rule (2x / 3x bf16)."""
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], device="cuda", dtype=torch.bfloat16)

    def run(fn, xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs, n_views=n_views, connectivity=conn)
        return (out, *torch.autograd.grad(out, xs, grad.to(out.dtype)))

    ours = run(fa4.fa4_attention, (q, k, v))
    pt = run(fa4.fa4_attention_reference, (q, k, v))
    ref = run(fa4.fa4_attention_reference, [t.double() for t in (q, k, v)])
    for name, o, p, r, factor in zip(("out", "dq", "dk", "dv"), ours, pt, ref, (2, 3, 3, 3)):
        assert_close_rule(o, p, r, factor, name)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("B, Sq, Sk, H, D, n_views, conn, strided", [
    (1, 128, 128, 2, 128, 1, "all", False),       # tiny
    (1, 5 * 97, 5 * 97, 3, 128, 1, "all", True),   # odd length, strided q/k/v
    (2, 1025, 1025, 4, 64, 1, "all", False),       # odd length, head dim 64
    (1, 5 * 240, 5 * 64, 4, 128, 5, "self", False),  # per-view cross-attention shape
])
def test_gpu_fa4_matches_float64(B, Sq, Sk, H, D, n_views, conn, strided):
    _check_against_float64(*_qkv(B, Sq, Sk, H, D, strided), n_views, conn)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("V, L, conn", [(5, 300, "ring1"), (5, 12 * 20, "ring1"), (4, 257, [[1, 1, 0, 0], [0, 1, 0, 0],
                                                                                        [1, 1, 1, 1], [0, 0, 0, 1]])])
def test_gpu_fa4_view_sparse_matches_float64(V, L, conn):
    """Block sparsity + the CuTe view mask: odd view lengths (blocks straddling views), forward and gradients."""
    _check_against_float64(*_qkv(1, V * L, V * L, 2, 128, strided=True, seed=3), V, conn)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("self_attn", [True, False])
def test_gpu_model_fa4_backend_matches_sdpa(self_attn):
    """The model's "fa4" backend (fused QK-norm/RoPE pre-pass + FA4) against the plain SDPA backend."""
    torch.manual_seed(0)
    attn = Attention(256, None if self_attn else 64, 2, 128, backend="sdpa", device="cuda", dtype=torch.bfloat16)
    for m in (attn.to_q[1], attn.to_k[1]):
        m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 5 * 77, 256, device="cuda", dtype=torch.bfloat16)
    ctx = None if self_attn else torch.randn(1, 5 * 32, 64, device="cuda", dtype=torch.bfloat16)
    ang = (torch.rand(5 * 77, 64, device="cuda") * 30).repeat(1, 2) if self_attn else None
    conn = "all" if self_attn else "self"
    outs = []
    for backend in ("sdpa", "fa4"):
        attn.backend = backend
        attn.zero_grad()
        out = attn(x, ctx, ang, n_views=5, connectivity=conn).float()
        out.square().mean().backward()
        outs.append((out, attn.to_q[0].weight.grad.float(), attn.to_k[1].weight.grad.float()))
    for a, b in zip(*outs):
        assert (a - b).norm() / a.norm() < 2e-2


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_compiles_without_graph_breaks():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 256, 256, 2, 128, strided=False))
    f = torch.compile(lambda q, k, v: fa4.fa4_attention(q, k, v).float().square().sum(), fullgraph=True)
    loss = f(q, k, v)
    loss.backward()
    torch.testing.assert_close(loss, fa4.fa4_attention(q, k, v).float().square().sum(), rtol=1e-3, atol=1e-3)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
@needs_fa4
def test_gpu_auto_follows_the_measured_table(tmp_path, monkeypatch):
    """With a table naming fa4 first for this GPU, "auto" runs FA4 (the per-case choice really is read)."""
    name = torch.cuda.get_device_name()
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"gpus": {name: {"self/dense/fwd": ["fa4", "sdpa"], "self/dense/train": ["sdpa"]}}}))
    monkeypatch.setattr(attention, "AUTO_TABLE", table)
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert choose_auto(q, True, True, "all") == "fa4"
    with torch.enable_grad():
        assert choose_auto(q, True, True, "all") == "sdpa"


def test_selective_checkpointing_keeps_every_attention_kernel():
    """Selective recompute must keep the outputs of each attention backend "auto" can pick, FA4's op included (it
    was missing: every backward of a block ran FA4's forward again)."""
    from mvmodel.trainer.parallelize import _attention_ops

    ops = _attention_ops()
    assert torch.ops.mvkernels.fa4_attention in ops and torch.ops.mvkernels.mv_attention in ops
