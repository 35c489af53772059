"""mvkernels.mv_attention: the Triton kernels against a float64 oracle, every connectivity, fused and unfused.

Without a GPU the real Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (fp32, tiny shapes); with one,
the same cases run compiled on CUDA in bf16 (marked ``gpu``), plus larger hd128 shapes and torch.compile.
Accuracy rule (FlashAttention's): the kernel's error against float64 is at most 2x (forward) / 3x (gradients)
the error of the plain PyTorch reference run in the kernel's own dtype, plus a small floor.
"""
from __future__ import annotations

import os

import pytest
import torch

from mvkernels.ops import mv_attention as mva
from mvkernels.ops.mv_attention import connectivity_matrix, mv_attention, mv_attention_reference

# One autotune config per kernel in test processes: correctness does not depend on the tile choice, and on a GPU
# each extra config costs a compile (the Triton module reads this when first imported, lazily, by the op).
os.environ.setdefault("MVKERNELS_ATTN_TUNE", "first")
HAS_CUDA = torch.cuda.is_available()
# On a GPU machine the CPU-interpreter variants are skipped: the same kernel code runs compiled there, and the
# interpreter decides per process whether triton.jit functions are interpreted.
CPU = pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the kernels run compiled "
                                                                    "(gpu tests)"))
GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("MVKERNELS_BACKEND", "triton")  # forced: a missing Triton path fails instead of falling back
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _inputs(device, dtype, n_views, Lq, Lk, H, D, fused, seed):
    """q, k, v as strided slices of fused projections (never contiguous), plus fusion kwargs."""
    g = torch.Generator().manual_seed(seed)
    if Lq == Lk:
        qkv = torch.randn(2, n_views * Lq, 3, H, D, generator=g).to(device, dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = torch.randn(2, n_views * Lq, H, D, generator=g).to(device, dtype)
        kv = torch.randn(2, n_views * Lk, 2, H, D, generator=g).to(device, dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
    kw = {}
    if fused:
        kw = dict(rope_angles=torch.rand(n_views * Lq, D, generator=g) * 20.0,
                  q_norm_weight=torch.rand(D, generator=g) + 0.5, k_norm_weight=torch.rand(D, generator=g) + 0.5)
    return q, k, v, {n: t.to(device) for n, t in kw.items()}


def _leaves(tensors, dtype):
    """Fresh leaf copies in ``dtype``; keeps q/k/v strided when the dtype is unchanged (slices of one buffer)."""
    out = []
    for t in tensors:
        x = t.detach().to(dtype) if t.dtype != dtype else t.detach()
        out.append(x.requires_grad_())
    return out


def _run(fn, q, k, v, kw, dtype, grad, **attn):
    """Forward + backward of ``fn`` in ``dtype``; returns [out, dq, dk, dv, (dwq, dwk)] as float64."""
    wts = {n: t for n, t in kw.items() if n != "rope_angles"}
    qx, kx, vx = _leaves((q, k, v), dtype)
    wx = dict(zip(wts, _leaves(wts.values(), dtype if dtype == torch.float64 else torch.float32)))
    out = fn(qx, kx, vx, **attn, **wx, **({"rope_angles": kw["rope_angles"]} if "rope_angles" in kw else {}))
    out.backward(grad.to(dtype))
    return [out.double()] + [t.grad.double() for t in (qx, kx, vx, *wx.values())]


def _err(a, b):
    return (a - b).abs().max().item()


def _check(device, n_views, Lq, Lk, connectivity, fused, H=2, D=32, seed=0, dtype=None):
    dtype = dtype or _dtype(device)
    q, k, v, kw = _inputs(device, dtype, n_views, Lq, Lk, H, D, fused, seed)
    attn = dict(n_views=n_views, connectivity=connectivity)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    ours = _run(mv_attention, q, k, v, kw, dtype, grad, **attn)
    ref = _run(mv_attention_reference, q, k, v, kw, dtype, grad, **attn)
    exact = _run(mv_attention_reference, q, k, v, kw, torch.float64, grad, **attn)
    names = ["out", "dq", "dk", "dv", "dq_norm_weight", "dk_norm_weight"]
    for i, (o, r, e) in enumerate(zip(ours, ref, exact)):
        assert torch.isfinite(o).all(), f"{names[i]} has non-finite values"
        # norm-weight grads are sums over B*S*H rows: scale the floor with their magnitude
        floor = FLOOR[dtype] * (1.0 if i < 4 else max(1.0, e.abs().max().item()))
        allowed = (2.0 if i == 0 else 3.0) * _err(r, e) + floor
        assert _err(o, e) <= allowed, f"{names[i]}: error {_err(o, e):.3e} > allowed {allowed:.3e} " \
                                      f"(reference error {_err(r, e):.3e})"


CASES = [  # n_views, Lq, Lk, connectivity, fused
    (1, 97, 37, "all", False),          # dense cross-length, both lengths odd
    (2, 97, 37, "self", False),         # per-view text cross-attention shape, odd segments
    (3, 24, 24, "all", True),           # joint self-attention with norm + RoPE (dense fast path)
    (4, 20, 20, "ring1", False),
    (5, 16, 16, "ring1", True),
    (6, 12, 12, "ring2", False),
    (1, 40, 40, "self", True),          # one view: "self" is dense
    (2, 33, 33, "ring1", True),         # ring1 on two views covers everything
    (3, 17, 9, "custom", False),        # asymmetric bool matrix, cross-length
    (6, 11, 11, "random", True),        # random bool matrix with a full diagonal
]


def _conn(name, n_views, seed=0):
    if name == "custom":
        return torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    if name == "random":
        m = torch.rand(n_views, n_views, generator=torch.Generator().manual_seed(seed)) < 0.4
        return m | torch.eye(n_views, dtype=torch.bool)
    return name


def _case_id(c) -> str:
    return f"v{c[0]}-{c[1]}x{c[2]}-{c[3]}{'-fused' if c[4] else ''}"


QUICK_CASES = {"v1-40x40-self-fused", "v3-17x9-custom"}  # in the quick command; the others in the full suite


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c), marks=() if _case_id(c) in QUICK_CASES
                                               else pytest.mark.slow) for c in CASES])
def test_matches_float64(device, case):
    n_views, Lq, Lk, conn, fused = case
    _check(device, n_views, Lq, Lk, _conn(conn, n_views), fused)


@pytest.mark.skipif(HAS_CUDA, reason="CPU path; GPU half precision is test_gpu_hd128")
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_half_precision_on_cpu(dtype):
    """16-bit inputs on CPU: the Triton kernels run (in fp32 inside the interpreter) and round once."""
    _check("cpu", 3, 24, 24, "ring1", True, dtype=dtype)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.slow
def test_pointer_and_descriptor_paths(device, tma, monkeypatch):
    """The forward kernel's two K/V load paths (plain pointers; tensor descriptors = TMA on Hopper)."""
    monkeypatch.setenv("MVKERNELS_ATTN_TMA", tma)
    _check(device, 3, 29, 21, "ring1", False, seed=13)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.slow
def test_atomic_dq_variant(device, monkeypatch):
    """dQ accumulated with atomics inside the dK/dV kernel (MVKERNELS_ATTN_DQ=atomic)."""
    monkeypatch.setenv("MVKERNELS_ATTN_DQ", "atomic")
    _check(device, 3, 29, 21, "ring1", False, seed=17)
    _check(device, 1, 45, 45, "all", True, seed=18)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 1000, 1000, "all", False), (5, 300, 300, "ring1", True),
                                  (5, 257, 512 // 4, "self", False), (6, 130, 130, "ring1", False)])
def test_gpu_hd128(dtype, case):
    n_views, Lq, Lk, conn, fused = case
    _check("cuda", n_views, Lq, Lk, conn, fused, H=4, D=128, dtype=dtype)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.slow
def test_unconnected_keys_are_never_read(device):
    """Key view 2 is seen by nobody: NaN there must not reach any output, and its dk/dv are exactly zero."""
    dtype = _dtype(device)
    q, k, v, _ = _inputs(device, dtype, 3, 19, 19, 2, 32, False, seed=3)
    q, k, v = (t.clone() for t in (q, k, v))
    k[:, 38:], v[:, 38:] = float("nan"), float("nan")
    conn = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    qx, kx, vx = _leaves((q, k, v), dtype)
    out = mv_attention(qx, kx, vx, n_views=3, connectivity=conn)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(qx.grad).all()
    assert (kx.grad[:, 38:] == 0).all() and (vx.grad[:, 38:] == 0).all()
    assert torch.isfinite(kx.grad[:, :38]).all() and kx.grad[:, :38].abs().sum() > 0


def test_connectivity_matrix():
    ring = connectivity_matrix("ring1", 5)
    assert ring[0] == (True, True, False, False, True) and ring[2] == (False, True, True, True, False)
    assert connectivity_matrix("self", 3) == ((True, False, False), (False, True, False), (False, False, True))
    assert all(all(r) for r in connectivity_matrix("ring2", 5))
    assert connectivity_matrix([[1, 0], [1, 1]], 2) == ((True, False), (True, True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_views=4), "Sq=18 .* not divisible by n_views=4"),
    (dict(n_views=2, connectivity="ringX"), "connectivity must be"),
    (dict(n_views=2, connectivity=torch.ones(3, 3, dtype=torch.bool)),
     r"connectivity must have shape \[n_views, n_views\] = \[2, 2\]"),
    (dict(n_views=2, connectivity=torch.ones(2, 2)), "connectivity tensor must be bool"),
    (dict(n_views=2, connectivity=torch.tensor([[True, False], [False, False]])), r"row\(s\) \[1\] see no key view"),
    (dict(n_views=0), "n_views must be a positive int"),
    (dict(rope_angles=torch.zeros(18, 16)), r"rope_angles must be \[Sq, D\] = \[18, 32\]"),
    (dict(q_norm_weight=torch.ones(16)), r"q_norm_weight must be a \[32\] tensor"),
    (dict(softmax_scale=-1.0), "softmax_scale must be a positive float"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = torch.randn(1, 18, 2, 32), torch.randn(1, 18, 2, 32), torch.randn(1, 18, 2, 32)
    with pytest.raises(ValueError, match=match):
        mv_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q = torch.randn(1, 18, 2, 32)
    with pytest.raises(ValueError, match="head dim mismatch: k has D=64, expected q's D=32"):
        mv_attention(q, torch.randn(1, 18, 2, 64), torch.randn(1, 18, 2, 64))
    with pytest.raises(ValueError, match="k has dtype torch.float16, expected q's dtype torch.float32"):
        mv_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match=r"v must have k's shape"):
        mv_attention(q, q, torch.randn(1, 17, 2, 32))
    with pytest.raises(ValueError, match="rope_angles is for self-attention only"):
        mv_attention(q, torch.randn(1, 6, 2, 32), torch.randn(1, 6, 2, 32), rope_angles=torch.zeros(18, 32))
    with pytest.raises(ValueError, match="q must be \\[B, S, H, D\\]"):
        mv_attention(q[0], q, q)
    with pytest.raises(ValueError, match="head dim D must be one of"):
        mv_attention(torch.randn(1, 4, 2, 48), torch.randn(1, 4, 2, 48), torch.randn(1, 4, 2, 48))
    if HAS_CUDA:
        with pytest.raises(ValueError, match="k is on cpu, expected q's device cuda"):
            mv_attention(q.cuda(), q, q)


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.slow
def test_opcheck(device):
    dtype = _dtype(device)
    q, k, v, _ = _inputs(device, dtype, 2, 13, 7, 2, 32, False, seed=5)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.mvkernels.mv_attention.default, (q, k, v, 2, [1, 0, 1, 1], 0.2))
    do = torch.randn(q.shape, dtype=dtype, device=device)
    out, lse = torch.ops.mvkernels.mv_attention(q, k, v, 2, [1, 0, 1, 1], 0.2)
    torch.library.opcheck(torch.ops.mvkernels.mv_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, 2, [1, 0, 1, 1], 0.2))


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """The op traces as one opaque node with its backward (no graph break), fused prepass included."""
    dtype = _dtype(device)
    q, k, v, kw = _inputs(device, dtype, 2, 16, 16, 2, 32, True, seed=7)

    def f(q, k, v, ang, wq, wk):
        return mv_attention(q, k, v, n_views=2, connectivity="self", rope_angles=ang, q_norm_weight=wq,
                            k_norm_weight=wk).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    args = [t.detach().clone().requires_grad_(t.is_floating_point() and n != "ang")
            for n, t in zip(["q", "k", "v", "ang", "wq", "wk"], (q, k, v, kw["rope_angles"], kw["q_norm_weight"],
                                                               kw["k_norm_weight"]))]
    eager = [t.detach().clone().requires_grad_(t.requires_grad) for t in args]
    compiled(*args).backward()
    f(*eager).backward()
    for a, b in zip(args, eager):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2)


def test_reference_backend_matches_sdpa(monkeypatch):
    """The op's own 'reference' backend (explicit math, used where Triton cannot run) agrees with SDPA."""
    monkeypatch.setenv("MVKERNELS_BACKEND", "reference")
    q, k, v, _ = _inputs("cpu", torch.float32, 3, 10, 6, 2, 16, False, seed=9)
    grad = torch.randn(q.shape[0], q.shape[1], 2, 16)
    got = _run(mv_attention, q, k, v, {}, torch.float32, grad, n_views=3, connectivity="ring1")
    want = _run(mv_attention_reference, q, k, v, {}, torch.float32, grad, n_views=3, connectivity="ring1")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert mva._choose(q) == "reference"


def test_fused_prepass_uses_qk_norm_rope(monkeypatch):
    """Unforced backend: norm + RoPE go through mvkernels.qk_norm_rope; values and all grads match the oracle."""
    monkeypatch.setenv("MVKERNELS_BACKEND", "auto")
    q, k, v, kw = _inputs("cpu", torch.float32, 2, 12, 12, 2, 32, True, seed=11)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    attn = dict(n_views=2, connectivity="self")
    got = _run(mv_attention, q, k, v, kw, torch.float32, grad, **attn)
    want = _run(mv_attention_reference, q, k, v, kw, torch.float64, grad, **attn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
