"""Fused QK-RMSNorm + RoPE against a float64 reference (flash-attention's rule), gradients, opcheck, compile."""
import pytest
import torch

import mvkernels
from mvkernels.ops.qk_norm_rope import qk_norm_rope_reference
from tolerance import assert_close_rule

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# tiny, realistic-small (views x frames x H x W tokens of a small DiT) and odd shapes
SHAPES = [(1, 4, 1, 8), (2, 2 * 2 * 4 * 6, 4, 64), (1, 97, 3, 64), (2, 97, 3, 128), (1, 33, 5, 32)]


def make(B, S, H, D, dtype, device, fused_qkv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused_qkv:  # q and k as strided views of one [B, S, 3, H, D] projection output
        qkv = torch.randn(B, S, 3, H, D, generator=g).mul(3).to(device=device, dtype=dtype)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        q = torch.randn(B, S, H, D, generator=g).mul(3).to(device=device, dtype=dtype)
        k = torch.randn(B, S, H, D, generator=g).add(0.5).to(device=device, dtype=dtype)
    wq = (1 + 0.3 * torch.randn(D, generator=g)).to(device=device, dtype=dtype)
    wk = (1 + 0.3 * torch.randn(D, generator=g)).to(device=device, dtype=dtype)
    phi = torch.rand(S, D // 2, generator=g) * 60  # angles up to 60 rad, as far-away positions give
    angles = torch.cat([phi, phi], -1).to(device)
    return q, k, wq, wk, angles


def ref64(q, k, wq, wk, angles):
    return qk_norm_rope_reference(q.double(), k.double(), wq.double(), wk.double(), angles)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_forward_matches_float64(shape, dtype, fused_qkv, device, backend):
    backend("csrc")
    q, k, wq, wk, angles = make(*shape, dtype, device, fused_qkv)
    q_out, k_out = mvkernels.qk_norm_rope(q, k, wq, wk, angles)
    assert q_out.dtype == dtype and q_out.shape == q.shape and q_out.is_contiguous()
    pt = qk_norm_rope_reference(q, k, wq, wk, angles)
    r = ref64(q, k, wq, wk, angles)
    assert_close_rule(q_out, pt[0], r[0], 2, "q")
    assert_close_rule(k_out, pt[1], r[1], 2, "k")


@pytest.mark.parametrize("shape", [(1, 4, 1, 8), (2, 97, 3, 64), (1, 30, 2, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64(shape, dtype, device, backend):
    backend("csrc")
    q, k, wq, wk, angles = make(*shape, dtype, device, fused_qkv=True, seed=1)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def grads(fn, *xs):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        qo, ko = fn(*leaves, angles)
        return torch.autograd.grad((qo, ko), leaves, (gq.to(qo.dtype), gk.to(ko.dtype)))

    ours = grads(mvkernels.qk_norm_rope, q, k, wq, wk)
    pt = grads(qk_norm_rope_reference, q, k, wq, wk)
    r = grads(qk_norm_rope_reference, q.double(), k.double(), wq.double(), wk.double())
    for name, o, p, rr in zip(("dq", "dk", "dq_weight", "dk_weight"), ours, pt, r):
        assert o.dtype == dtype
        assert_close_rule(o, p, rr, 3, name)


@pytest.mark.parametrize("name", ["csrc", "reference"])
def test_gradcheck_float64(name, backend):
    backend(name)
    q, k, wq, wk, angles = make(2, 5, 3, 8, torch.float64, "cpu", fused_qkv=True, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, wq, wk)]
    assert torch.autograd.gradcheck(lambda *x: mvkernels.qk_norm_rope(*x, angles), leaves)


def test_upstream_table_and_reference_backend_agree(backend):
    """With upstream's own angle table, the kernel equals the reference backend (both fp32)."""
    angles = mvkernels.rope3d_angles(2, 2, 3, 4, 64, fps=10, t_extrapolation_ratio=2.0)
    q, k, wq, wk, _ = make(1, angles.shape[0], 2, 64, torch.float32, "cpu")
    backend("csrc")
    ours = mvkernels.qk_norm_rope(q, k, wq, wk, angles)
    backend("reference")
    ref = mvkernels.qk_norm_rope(q, k, wq, wk, angles)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_opcheck(device, backend):
    backend("csrc")
    q, k, wq, wk, angles = make(1, 6, 2, 16, torch.float32, device, fused_qkv=True)
    q.requires_grad_(False)
    args = (q, k, wq.requires_grad_(), wk.requires_grad_(), angles, 1e-6)
    torch.library.opcheck(torch.ops.mvkernels.qk_norm_rope.default, args)


def test_compile_fullgraph(backend):
    backend("csrc")
    q, k, wq, wk, angles = make(1, 6, 2, 16, torch.float32, "cpu")

    def f(q, k):
        a, b = mvkernels.qk_norm_rope(q * 2, k, wq, wk, angles)
        return (a * b).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, wq, wk, a: (q.to(torch.int32), k, wq, wk, a), "dtype"),
    (lambda q, k, wq, wk, a: (q, k, wq, wk, a.double()), "angles must be float32"),
    (lambda q, k, wq, wk, a: (q[..., :7], k[..., :7], wq[:7], wk[:7], a[:, :7]), "even"),
    (lambda q, k, wq, wk, a: (q, k[..., :4], wq, wk, a), r"k must have q's shape"),
    (lambda q, k, wq, wk, a: (q, k, wq[:4], wk, a), r"q_weight must have shape \[8\]"),
    (lambda q, k, wq, wk, a: (q, k, wq, wk, a[:3]), r"angles must have shape \[S, D\] = \[5, 8\]"),
    (lambda q, k, wq, wk, a: (q, k, wq, wk, a.to("meta")), "one device"),
    (lambda q, k, wq, wk, a: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, wq, wk, a), "contiguous last dim"),
])
def test_bad_input(bad, match):
    q, k, wq, wk, a = make(1, 5, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        mvkernels.qk_norm_rope(*bad(q, k, wq, wk, a))


def test_forced_backend_missing_raises(backend):
    backend("triton")
    q, k, wq, wk, a = make(1, 5, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="no 'triton' backend"):
        mvkernels.qk_norm_rope(q, k, wq, wk, a)


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_unaligned_views_use_narrower_vectors(offset, device, backend):
    """Views starting off a 16-byte boundary (vector widths 1, 2, 4 on CUDA) give the same result."""
    backend("csrc")
    B, S, H, D = 1, 9, 3, 64
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(B, S, H, D + 8, generator=g).to(device=device, dtype=torch.bfloat16)
    q = buf[..., offset:offset + D]
    k = (buf[..., offset:offset + D] * 0.5 + 1)
    _, _, wq, wk, angles = make(B, S, H, D, torch.bfloat16, device)
    ours = mvkernels.qk_norm_rope(q, k, wq, wk, angles)
    pt = qk_norm_rope_reference(q, k, wq, wk, angles)
    r = ref64(q, k, wq, wk, angles)
    for o, p, rr in zip(ours, pt, r):
        assert_close_rule(o, p, rr, 2, f"offset {offset}")


def _angle_views(angles):
    """The same [S, D] table as column-major, column-sliced and row-expanded views."""
    S, D = angles.shape
    column_major = angles.t().contiguous().t()
    wide = torch.cat([angles, angles.flip(-1)], -1)
    sliced = wide[:, :D]
    expanded = angles[:1].expand(S, D)
    return {"column_major": (column_major, angles), "column_sliced": (sliced, angles),
            "expanded": (expanded, expanded.contiguous()), "every_other_column": (wide[:, ::2], wide[:, ::2].contiguous())}


@pytest.mark.parametrize("view", ["column_major", "column_sliced", "expanded", "every_other_column"])
@pytest.mark.parametrize("name", ["csrc", "reference"])
def test_any_angle_strides(view, name, device, backend):
    """Every strided view of the angle table gives what its contiguous copy gives (it used to read wrong values)."""
    backend(name)
    q, k, wq, wk, angles = make(2, 12, 3, 16, torch.float32, device, fused_qkv=True, seed=4)
    strided, dense = _angle_views(angles)[view]
    assert not strided.is_contiguous()
    got = mvkernels.qk_norm_rope(q, k, wq, wk, strided)
    want = mvkernels.qk_norm_rope(q, k, wq, wk, dense)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    r = ref64(q, k, wq, wk, dense)
    pt = qk_norm_rope_reference(q, k, wq, wk, dense)
    assert_close_rule(got[0], pt[0], r[0], 2, view)


@pytest.mark.parametrize("name", ["csrc", "reference"])
def test_any_tensor_strides_forward_and_gradients(name, device, backend):
    """q/k permuted out of [B, H, S, D], sliced weights, a strided angle table and non-contiguous output gradients
    give the results of contiguous copies of the same values."""
    backend(name)
    B, S, H, D = 2, 11, 3, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, S, D, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, H, S, D, generator=g).add(0.5).to(device).transpose(1, 2)
    wq = (1 + 0.3 * torch.randn(2 * D, generator=g)).to(device)[::2]
    wk = (1 + 0.3 * torch.randn(2 * D, generator=g)).to(device)[1::2]
    angles = (torch.rand(D, S, generator=g) * 60).to(device).t()
    gq = torch.randn(B, H, S, D, generator=g).to(device).transpose(1, 2)
    gk = torch.randn(B, S, H, 2 * D, generator=g).to(device)[..., :D]

    def run(tensors, grads):
        leaves = [t.detach().clone() if t.is_contiguous() else t.detach() for t in tensors]
        leaves = [t.requires_grad_() for t in leaves]
        qo, ko = mvkernels.qk_norm_rope(*leaves, angles if not tensors[0].is_contiguous() else angles.contiguous())
        return (qo, ko) + torch.autograd.grad((qo, ko), leaves, grads)

    strided = run([q, k, wq, wk], (gq, gk))
    dense = run([t.contiguous() for t in (q, k, wq, wk)], (gq.contiguous(), gk.contiguous()))
    for name_, s, d in zip(("q", "k", "dq", "dk", "dq_weight", "dk_weight"), strided, dense):
        torch.testing.assert_close(s, d, rtol=1e-6, atol=1e-6, msg=name_)


def test_mv_attention_fused_prepass_takes_strided_angles():
    """The same table bug reached mv_attention's fused QK-norm/RoPE path: a strided table must match its copy."""
    q, k, wq, wk, angles = make(1, 12, 2, 16, torch.float32, "cpu", fused_qkv=True, seed=6)
    v = torch.randn_like(q)
    strided = angles.t().contiguous().t()
    kw = dict(n_views=2, q_norm_weight=wq, k_norm_weight=wk)
    got = mvkernels.mv_attention(q, k, v, rope_angles=strided, **kw)
    want = mvkernels.mv_attention(q, k, v, rope_angles=angles, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
