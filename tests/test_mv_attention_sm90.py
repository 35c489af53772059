"""The Hopper (sm_90a) CUDA forward of mv_attention (csrc/mv_attention_sm90.cu) against a float64 oracle.

GPU tests need an sm_90 device and an extension built with 90a; elsewhere they skip. Accuracy rule as in
test_mv_attention.py: err(kernel vs f64) <= 2x err(same-dtype SDPA reference vs f64) + floor. lse (base 2) is
checked against the float64 math and against the Triton forward's lse, which the Triton backward consumes.
"""
from __future__ import annotations

import math

import pytest
import torch

import mvkernels
from mvkernels.ops import mv_attention as mva
from mvkernels.ops import mv_attention_sm90 as sm90
from mvkernels.ops.mv_attention import connectivity_matrix, mv_attention, mv_attention_reference

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def requires_sm90(fn):
    """gpu marker + skips: an sm_90 device and an extension that has the sm_90a kernel."""
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU"),
                 pytest.mark.skipif(not sm90.available(), reason="extension built without the sm_90a kernel")):
        fn = mark(fn)
    return fn

FLOOR = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MVKERNELS_BACKEND", "triton")
    monkeypatch.setenv("MVKERNELS_ATTN_FWD", "sm90")
    monkeypatch.setenv("MVKERNELS_ATTN_TUNE", "first")


def _flat(connectivity, n_views):
    return [int(x) for r in connectivity_matrix(connectivity, n_views) for x in r]


def _inputs(dtype, B, n_views, Lq, Lk, H, D, seed, fused=True):
    """q, k, v on the GPU; fused=True makes them slices of one projection (strided, never contiguous)."""
    g = torch.Generator().manual_seed(seed)
    if fused and Lq == Lk:
        qkv = torch.randn(B, n_views * Lq, 3, H, D, generator=g).to("cuda", dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(B, n_views * Lq, H, D, generator=g).to("cuda", dtype)
    if fused:
        kv = torch.randn(B, n_views * Lk, 2, H, D, generator=g).to("cuda", dtype)
        return q, kv[:, :, 0], kv[:, :, 1]
    k = torch.randn(B, n_views * Lk, H, D, generator=g).to("cuda", dtype)
    v = torch.randn(B, n_views * Lk, H, D, generator=g).to("cuda", dtype)
    return q, k, v


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(dtype, B, n_views, Lq, Lk, connectivity, H=2, D=128, seed=0, fused=True, scale=None):
    q, k, v = _inputs(dtype, B, n_views, Lq, Lk, H, D, seed, fused)
    assert sm90.usable(q, k, v), "the sm90 kernel should take these inputs"
    flat = _flat(connectivity, n_views)
    dense = all(flat)
    nv, fl = (1, [1]) if dense else (n_views, flat)
    scale = scale or 1.0 / math.sqrt(D)
    out, lse = sm90.forward(q, k, v, nv, tuple(fl), scale)
    torch.cuda.synchronize()
    exact_out, exact_lse = mva._math_forward(q.double(), k.double(), v.double(), nv, fl, scale)
    ref = mv_attention_reference(q, k, v, n_views=n_views, connectivity=connectivity, softmax_scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    allowed = 2.0 * _err(ref, exact_out) + FLOOR[dtype]
    assert _err(out, exact_out) <= allowed, f"out: error {_err(out, exact_out):.3e} > allowed {allowed:.3e}"
    # lse: fp32 statistics of 16-bit inputs; scores are exact products of the inputs, so only summation order
    # and exp2 approximation differ from float64
    torch.testing.assert_close(lse, exact_lse.float(), atol=2e-3, rtol=1e-4)
    return q, k, v, out, lse, nv, fl, scale


CASES = [  # B, n_views, Lq, Lk, connectivity, H, D
    (1, 1, 64, 64, "all", 2, 128),         # tiny: one partial q tile, one partial k tile
    (2, 1, 97, 37, "all", 3, 128),         # odd lengths, cross-length, B > 1
    (1, 1, 1000, 1000, "all", 4, 128),     # dense, several tiles, partial last tile
    (1, 5, 97, 97, "ring1", 2, 128),       # segments shorter than a tile: every tile masked
    (1, 5, 256, 256, "ring1", 2, 128),     # segments of 128*k: no masking, walks 3 ranges
    (1, 5, 257, 512, "self", 2, 128),      # per-view cross-attention shape (text keys), Lq % 128 == 1
    (1, 3, 130, 70, "custom", 2, 128),     # asymmetric connectivity, cross-length
    (1, 6, 200, 200, "ring2", 2, 64),      # head dim 64
    (2, 1, 300, 300, "all", 2, 64),
]


def _conn(name, n):
    if name == "custom":
        return torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    return name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-v{c[1]}-{c[2]}x{c[3]}-{c[4]}-d{c[6]}" for c in CASES])
@pytest.mark.parametrize("fused", [True, False], ids=["strided", "contiguous"])
@pytest.mark.parametrize("block_n", ["128", "176"], ids=["n128", "n176"])
@requires_sm90
def test_sm90_matches_float64(dtype, case, fused, block_n, monkeypatch):
    """Every case with both key-tile sizes (MVKERNELS_ATTN_BLOCK_N: 176 applies at D = 128, 64 always uses 128)."""
    monkeypatch.setenv("MVKERNELS_ATTN_BLOCK_N", block_n)
    B, n_views, Lq, Lk, conn, H, D = case
    _check(dtype, B, n_views, Lq, Lk, _conn(conn, n_views), H=H, D=D, fused=fused, seed=CASES.index(case))


@requires_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sm90_lse_equals_triton_lse(dtype, monkeypatch):
    """Same (out, lse) contract as the Triton forward: its backward consumes our lse unchanged."""
    q, k, v, out, lse, nv, fl, scale = _check(dtype, 1, 5, 300, 300, "ring1", H=4, seed=21)
    from mvkernels.ops import mv_attention_triton as tri

    out_t, lse_t = tri.forward(q, k, v, nv, tuple(fl), scale)
    torch.testing.assert_close(lse, lse_t, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(out.float(), out_t.float(), atol=2e-2, rtol=2e-2)


@requires_sm90
@pytest.mark.parametrize("block_n", ["128", "176"])
def test_sm90_realistic_shape(block_n, monkeypatch):
    """A realistic slice of the workload: 5 views x 1,272 tokens (not a tile multiple), 4 heads, hd128, ring1."""
    monkeypatch.setenv("MVKERNELS_ATTN_BLOCK_N", block_n)
    _check(torch.bfloat16, 1, 5, 1272, 1272, "ring1", H=4, seed=5)


@requires_sm90
def test_sm90_nan_in_unconnected_view_is_never_read():
    """Key view 2 is seen by nobody and holds NaN: TMA boxes stop at each segment's end (zero fill), so the
    partial last tile of view 1 must not pull NaN from view 2 into P.V."""
    q, k, v = _inputs(torch.bfloat16, 1, 3, 100, 100, 2, 128, seed=3, fused=False)
    k[:, 200:], v[:, 200:] = float("nan"), float("nan")
    fl = (1, 1, 0, 1, 1, 0, 1, 1, 0)
    out, lse = sm90.forward(q, k, v, 3, fl, 0.1)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = mv_attention_reference(q.float(), k.float().nan_to_num(0.0), v.float().nan_to_num(0.0), n_views=3,
                                 connectivity=torch.tensor(fl, dtype=torch.bool).view(3, 3), softmax_scale=0.1)
    assert _err(out, ref) < 2e-2


@requires_sm90
def test_sm90_through_the_op_with_triton_backward(monkeypatch):
    """mv_attention with the sm90 forward and the Triton backward: gradients match the float64 oracle."""
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "triton")  # the sm90 backward has its own tests (..._sm90_bwd.py)
    q, k, v = _inputs(torch.bfloat16, 1, 5, 160, 160, 2, 128, seed=9)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to("cuda")

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*xs, n_views=5, connectivity="ring1")
        out.backward(grad.to(dtype))
        return [out.double()] + [t.grad.double() for t in xs]

    ours = run(mv_attention, torch.bfloat16)
    ref = run(mv_attention_reference, torch.bfloat16)
    exact = run(mv_attention_reference, torch.float64)
    for i, (o, r, e) in enumerate(zip(ours, ref, exact)):
        allowed = (2.0 if i == 0 else 3.0) * _err(r, e) + FLOOR[torch.bfloat16]
        assert _err(o, e) <= allowed, f"{['out', 'dq', 'dk', 'dv'][i]}: {_err(o, e):.3e} > {allowed:.3e}"


@requires_sm90
def test_sm90_env_switch(monkeypatch):
    q, k, v = _inputs(torch.bfloat16, 1, 1, 128, 128, 2, 128, seed=1)
    assert sm90.usable(q, k, v)
    monkeypatch.setenv("MVKERNELS_ATTN_FWD", "triton")
    assert not sm90.usable(q, k, v)
    monkeypatch.setenv("MVKERNELS_ATTN_FWD", "sm90")
    # a base that is not 16-byte aligned falls back to Triton
    buf = torch.randn(1, 129 * 2 * 128 + 1, device="cuda", dtype=torch.bfloat16)
    qm = buf[:, 1:].view(1, 129, 2, 128)[:, :128]
    assert not sm90.usable(qm, k, v)


def test_extension_exposes_sm90_kernel_when_built_with_90a():
    """CPU check: a CUDA build whose arch list has 90a must contain the sm90 forward."""
    info = mvkernels.build_info()
    if "90a" not in info["cuda_archs"]:
        pytest.skip("extension not built for sm_90a")
    assert info.get("sm90_attention") is True
    assert sm90.available()


@requires_sm90
@pytest.mark.parametrize("n_views,conn,Lq,Lk", [(1, "all", 1000, 1000), (5, "ring1", 97, 97), (5, "self", 200, 512)])
def test_pingpong_off_is_bit_identical(monkeypatch, n_views, conn, Lq, Lk):
    """The warpgroup ping-pong only reorders when each warpgroup issues its GEMMs: same math, same bits."""
    q, k, v = _inputs(torch.bfloat16, 2, n_views, Lq, Lk, 4, 128, seed=7)
    flat = _flat(conn, n_views)
    runs = []
    for pp in ("1", "0"):
        monkeypatch.setenv("MVKERNELS_ATTN_PINGPONG", pp)
        runs.append(sm90.forward(q, k, v, n_views, tuple(flat), 128 ** -0.5))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0].abs().sum() > 0  # random inputs: a real output, not zeros


def test_kernel_choice_traces_without_graph_break():
    """The model asks ``_serves`` (through ``serves``) inside blocks that torch.compile traces: it must be a traced
    constant, not a graph break (a break inside a checkpointed block measured 5% slower on the 7B train step)."""
    import torch._dynamo.testing

    def pick(q):
        ok = sm90._serves(0, 3, int(q.shape[-1]), torch.is_grad_enabled(), sm90.requested(), sm90.requested_bwd())
        return q * 2 if ok else q + 1

    counter = torch._dynamo.testing.CompileCounter()
    q = torch.randn(4, 128)
    torch._dynamo.reset()
    out = torch.compile(pick, backend=counter, fullgraph=True)(q)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, pick(q))
