"""The Hopper (sm_90a) CUDA backward of mv_attention (csrc/mv_attention_sm90_bwd.cu) against a float64 oracle.

GPU tests need an sm_90 device and an extension built with 90a; elsewhere they skip. Accuracy rule as in
test_mv_attention.py: err(kernel grads vs f64) <= 3x err(same-dtype PyTorch reference grads vs f64) + floor.
The kernel is called directly (``sm90.backward`` on the forward's out/lse) and through the autograd path, where it
is also compared with the Triton backward. dQ comes from the kernel's own bulk reduce-adds (the fixture's default)
or the Triton dQ kernel. The dQ block layout is also checked on the CPU (it runs everywhere).
"""
from __future__ import annotations

import math

import pytest
import torch

from mvkernels.ops import mv_attention as mva
from mvkernels.ops import mv_attention_sm90 as sm90
from mvkernels.ops.mv_attention import connectivity_matrix, mv_attention, mv_attention_reference

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def requires_sm90(fn):
    """gpu marker + skips: an sm_90 device and an extension that has the sm_90a backward."""
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU"),
                 pytest.mark.skipif(not sm90.available_bwd(), reason="extension built without the sm_90a backward")):
        fn = mark(fn)
    return fn


FLOOR = {torch.bfloat16: 2e-3, torch.float16: 5e-4}
NAMES = ("dq", "dk", "dv")


@pytest.mark.parametrize("D,Lq,n_views", [(128, 150, 3), (64, 64, 2), (128, 1, 1), (128, 97, 1)])
def test_dq_block_order_round_trip(D, Lq, n_views):
    """_dq_from_blocks inverts the kernel's dQ store order: a known dq is scattered exactly as the kernel's consumer
    threads store it (thread (w, lane) writes float4 j = fragment values 4j..4j+3 at 16-byte chunk (8w + j) * 32 +
    lane of its 64 x 64 block; value 4j + 2r + e is row 16w + lane/4 + 8r, column 8j + 2(lane%4) + e) and read back."""
    B, H = 2, 3
    T = -(-Lq // 64)
    g = torch.Generator().manual_seed(5)
    dq = torch.randn(B, n_views, T * 64, H, D, generator=g)  # padded rows included
    acc = torch.empty(B * H, n_views, T, D // 64, 64 * 64)
    w, j, lane, r, e = torch.meshgrid(*(torch.arange(n) for n in (4, 8, 32, 2, 2)), indexing="ij")
    pos = (((w * 8 + j) * 32 + lane) * 4 + 2 * r + e).flatten()
    row = (16 * w + lane // 4 + 8 * r).flatten()
    col = (8 * j + 2 * (lane % 4) + e).flatten()
    for b in range(B):
        for h in range(H):
            for s in range(n_views):
                for t in range(T):
                    for cb in range(D // 64):
                        block = dq[b, s, 64 * t:64 * t + 64, h, 64 * cb:64 * cb + 64]
                        acc[b * H + h, s, t, cb, pos] = block[row, col]
    got = sm90._dq_from_blocks(acc, B, H, n_views, Lq, torch.float32)
    assert got.shape == (B, n_views * Lq, H, D) and got.is_contiguous()
    assert torch.equal(got, dq[:, :, :Lq].reshape(B, n_views * Lq, H, D))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MVKERNELS_BACKEND", "triton")
    monkeypatch.setenv("MVKERNELS_ATTN_FWD", "sm90")
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "sm90")
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_DQ", "atomic")
    monkeypatch.setenv("MVKERNELS_ATTN_TUNE", "first")


def _flat(connectivity, n_views):
    return [int(x) for r in connectivity_matrix(connectivity, n_views) for x in r]


def _conn(name):
    if name == "custom":  # asymmetric: key view 0 is seen by query views 0 and 2, key view 1 by views 1 and 2
        return torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    return name


def _inputs(dtype, B, n_views, Lq, Lk, H, D, seed, fused=True):
    """q, k, v, dO on the GPU (random, never zeros); fused=True makes q/k/v slices of one projection."""
    g = torch.Generator().manual_seed(seed)
    if fused and Lq == Lk:
        qkv = torch.randn(B, n_views * Lq, 3, H, D, generator=g).to("cuda", dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = torch.randn(B, n_views * Lq, H, D, generator=g).to("cuda", dtype)
        if fused:
            kv = torch.randn(B, n_views * Lk, 2, H, D, generator=g).to("cuda", dtype)
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            k = torch.randn(B, n_views * Lk, H, D, generator=g).to("cuda", dtype)
            v = torch.randn(B, n_views * Lk, H, D, generator=g).to("cuda", dtype)
    do = torch.randn(B, n_views * Lq, H, D, generator=g).to("cuda", dtype)
    return q, k, v, do


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _reference_grads(q, k, v, do, n_views, connectivity, scale, dtype):
    """dq, dk, dv of the plain SDPA reference in ``dtype`` (float64 for the oracle)."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = mv_attention_reference(*xs, n_views=n_views, connectivity=connectivity, softmax_scale=scale)
    out.backward(do.to(dtype))
    return [t.grad for t in xs]


def _check_grads(ours, q, k, v, do, n_views, connectivity, scale, what=""):
    exact = _reference_grads(q, k, v, do, n_views, connectivity, scale, torch.float64)
    ref = _reference_grads(q, k, v, do, n_views, connectivity, scale, q.dtype)
    for name, o, r, e in zip(NAMES, ours, ref, exact):
        assert o.dtype == q.dtype and o.is_contiguous()
        assert torch.isfinite(o).all(), f"{what} {name}: non-finite values"
        allowed = 3.0 * _err(r, e) + FLOOR[q.dtype]
        assert _err(o, e) <= allowed, f"{what} {name}: error {_err(o, e):.3e} > allowed {allowed:.3e}"


def _direct(dtype, B, n_views, Lq, Lk, connectivity, H=2, D=128, seed=0, fused=True, scale=None):
    """sm90 forward + sm90 backward called directly; returns the inputs and the gradients."""
    q, k, v, do = _inputs(dtype, B, n_views, Lq, Lk, H, D, seed, fused)
    assert sm90.usable_bwd(q, k, v), "the sm90 backward should take these inputs"
    flat = _flat(connectivity, n_views)
    nv, fl = (1, [1]) if all(flat) else (n_views, flat)
    scale = scale or 1.0 / math.sqrt(D)
    out, lse = sm90.forward(q, k, v, nv, tuple(fl), scale)
    grads = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
    torch.cuda.synchronize()
    _check_grads(grads, q, k, v, do, n_views, connectivity, scale, what=f"{n_views}v {Lq}x{Lk} {connectivity}")
    return (q, k, v, do, out, lse, nv, fl, scale), grads


CASES = [  # B, n_views, Lq, Lk, connectivity, H, D
    (1, 1, 64, 64, "all", 2, 128),         # one query tile, one partial key tile
    (2, 1, 97, 37, "all", 3, 128),         # odd lengths, Sk != Sq, B > 1
    (1, 1, 1000, 1000, "all", 2, 128),     # dense, many tiles, partial last tiles
    (1, 5, 97, 97, "ring1", 2, 128),       # odd segments: every tile masked on both sides
    (1, 5, 256, 256, "ring1", 2, 128),     # tile-multiple segments: no padding, 3 ranges per key tile
    (1, 5, 200, 512, "self", 2, 128),      # per-view cross-attention (5 x 512 text keys), Lq % 64 != 0
    (1, 3, 130, 70, "custom", 2, 128),     # asymmetric connectivity
    (1, 6, 200, 200, "ring2", 2, 64),      # head dim 64
    (2, 1, 300, 300, "all", 2, 64),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-v{c[1]}-{c[2]}x{c[3]}-{c[4]}-d{c[6]}" for c in CASES])
@pytest.mark.parametrize("fused", [True, False], ids=["strided", "contiguous"])
@requires_sm90
def test_sm90_bwd_matches_float64(dtype, case, fused):
    B, n_views, Lq, Lk, conn, H, D = case
    _direct(dtype, B, n_views, Lq, Lk, _conn(conn), H=H, D=D, fused=fused, seed=CASES.index(case))


@requires_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_bwd_triton_dq_variant(dtype, D, monkeypatch):
    """MVKERNELS_ATTN_BWD_DQ=triton: dK/dV from the sm90 kernel, dQ from the Triton kernel; dK/dV are the same
    bits as with the in-kernel dQ (its reduce-adds only touch dQ)."""
    args, atomic = _direct(dtype, 1, 5, 150, 150, "ring1", D=D, seed=31)
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_DQ", "triton")
    q, k, v, do, out, lse, nv, fl, scale = args
    grads = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
    _check_grads(grads, q, k, v, do, 5, "ring1", scale, what="triton dQ")
    assert torch.equal(grads[1], atomic[1]) and torch.equal(grads[2], atomic[2])


PINGPONG_CASES = [  # B, n_views, Lq, Lk, connectivity, H, D
    (1, 1, 1000, 1000, "all", 2, 128),     # dense, 16 query tiles per key tile: many turns
    (2, 1, 97, 37, "all", 3, 128),         # odd lengths, one query tile per CTA (3 turns each)
    (1, 5, 97, 97, "ring1", 2, 128),       # odd segments, 5 views
    (1, 5, 200, 512, "self", 2, 128),      # Sk != Sq: 4 key tiles per view, 4 query tiles each
    (1, 3, 100, 100, "unseen", 2, 128),    # key view 2 seen by nobody: CTAs with 0 tiles (no turn at all)
    (2, 1, 300, 300, "all", 2, 64),        # head dim 64
    (1, 6, 200, 200, "ring2", 2, 64),
]


def _pingpong_conn(name):
    if name == "unseen":
        return torch.tensor((1, 1, 0, 1, 1, 0, 1, 1, 0), dtype=torch.bool).view(3, 3)
    return _conn(name)


@requires_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PINGPONG_CASES,
                         ids=[f"b{c[0]}-v{c[1]}-{c[2]}x{c[3]}-{c[4]}-d{c[6]}" for c in PINGPONG_CASES])
def test_sm90_bwd_pingpong_is_bit_identical(dtype, case, monkeypatch):
    """MVKERNELS_ATTN_BWD_PINGPONG=1 (turn-taking of the consumer warpgroups, Triton dQ) changes only when each
    warpgroup issues its GEMMs, never what it computes: dK/dV/dQ must be the same bits as the lockstep kernel's,
    and within the float64 rule. A hang here would mean unbalanced named barriers."""
    B, n_views, Lq, Lk, conn, H, D = case
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_DQ", "triton")
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_PINGPONG", "0")
    connectivity = _pingpong_conn(conn)
    args, lockstep = _direct(dtype, B, n_views, Lq, Lk, connectivity, H=H, D=D,
                             seed=100 + PINGPONG_CASES.index(case))
    q, k, v, do, out, lse, nv, fl, scale = args
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_PINGPONG", "1")
    for rep in range(2):  # twice: a race between the warpgroups would likely show as a difference
        grads = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
        torch.cuda.synchronize()
        for name, a, b in zip(NAMES, grads, lockstep):
            assert torch.equal(a, b), f"run {rep} {name}: ping-pong differs from lockstep"
    _check_grads(grads, q, k, v, do, n_views, connectivity, scale, what="ping-pong")
    if conn == "unseen":
        assert grads[1][:, 200:].abs().sum() == 0 and grads[2][:, 200:].abs().sum() == 0


@requires_sm90
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_bwd_pingpong_ignored_with_atomic_dq(D, monkeypatch):
    """The in-kernel-dQ kernel synchronises its warpgroups per tile (dS barrier), so the switch must fall back to
    the lockstep kernel there: same dK/dV bits, dQ within the float64 rule (its reduce order varies run to run)."""
    args, atomic = _direct(torch.bfloat16, 1, 5, 150, 150, "ring1", D=D, seed=41)
    q, k, v, do, out, lse, nv, fl, scale = args
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_PINGPONG", "1")
    grads = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
    _check_grads(grads, q, k, v, do, 5, "ring1", scale, what="atomic dQ + ping-pong switch")
    assert torch.equal(grads[1], atomic[1]) and torch.equal(grads[2], atomic[2])


@requires_sm90
def test_sm90_bwd_realistic_shape():
    """5 views x 1,272 tokens (not a tile multiple), 4 heads, hd128, ring1, fused QKV."""
    _direct(torch.bfloat16, 1, 5, 1272, 1272, "ring1", H=4, seed=5)


@requires_sm90
def test_sm90_bwd_unseen_key_view_gets_zero_grads():
    """Key view 2 is seen by no query view: its CTAs walk no query tile and must still write dK = dV = 0."""
    flat = (1, 1, 0, 1, 1, 0, 1, 1, 0)
    conn = torch.tensor(flat, dtype=torch.bool).view(3, 3)
    (q, k, v, do, *_), (dq, dk, dv) = _direct(torch.bfloat16, 1, 3, 100, 100, conn, seed=4)
    assert dk[:, 200:].abs().sum() == 0 and dv[:, 200:].abs().sum() == 0
    assert dk[:, :200].abs().sum() > 0


@requires_sm90
def test_sm90_bwd_nan_in_unconnected_view_is_never_read():
    """Views 2 of q/dO (query side) and of k/v (key side) are connected to nobody and hold NaN: TMA boxes stop at
    each segment's end and padded rows have P = 0, so no NaN reaches any gradient of the connected views."""
    q, k, v, do = _inputs(torch.bfloat16, 1, 3, 100, 100, 2, 128, seed=3, fused=False)
    fl = (1, 1, 0, 1, 1, 0, 0, 0, 1)  # views 0, 1 see each other; view 2 sees only itself
    for t in (q, k, v, do):
        t[:, 200:] = float("nan")
    out, lse = sm90.forward(q, k, v, 3, fl, 0.1)
    dq, dk, dv = sm90.backward(do, q, k, v, out, lse, 3, fl, 0.1)
    for name, g in zip(NAMES, (dq, dk, dv)):
        assert torch.isfinite(g[:, :200]).all(), f"{name}: NaN leaked into connected views"
    conn = torch.tensor(fl, dtype=torch.bool).view(3, 3)
    clean = [t[:, :200].float() for t in (q, k, v, do)]
    ref = _reference_grads(*clean[:3], clean[3], 2, conn[:2, :2], 0.1, torch.float32)
    for name, g, r in zip(NAMES, (dq, dk, dv), ref):
        assert _err(g[:, :200], r) < 3e-2, f"{name}: {_err(g[:, :200], r):.3e}"


@requires_sm90
@pytest.mark.parametrize("n_views,conn,Lq,Lk,D", [(1, "all", 300, 300, 128), (5, "ring1", 97, 97, 128),
                                                  (5, "self", 100, 512, 128), (6, "ring2", 130, 130, 64)])
def test_sm90_bwd_through_autograd_vs_triton_backward(monkeypatch, n_views, conn, Lq, Lk, D):
    """mv_attention(...).backward with the sm90 backward vs the Triton backward (same sm90 forward): both within
    the float64 rule, and close to each other."""
    q, k, v, do = _inputs(torch.bfloat16, 2, n_views, Lq, Lk, 2, D, seed=11)

    def run(bwd):
        monkeypatch.setenv("MVKERNELS_ATTN_BWD", bwd)
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        mv_attention(*xs, n_views=n_views, connectivity=conn).backward(do)
        return [t.grad for t in xs]

    ours, tri = run("sm90"), run("triton")
    scale = 1.0 / math.sqrt(D)
    _check_grads(ours, q, k, v, do, n_views, conn, scale, what="autograd sm90")
    _check_grads(tri, q, k, v, do, n_views, conn, scale, what="autograd triton")
    for name, a, b in zip(NAMES, ours, tri):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=f"{name}: sm90 vs triton")


@requires_sm90
def test_sm90_bwd_noncontiguous_grad_out():
    """A dO that TMA cannot read (here: stride 0 from out.sum()) is copied once; gradients stay right."""
    q, k, v, _ = _inputs(torch.bfloat16, 1, 1, 200, 200, 2, 128, seed=13)
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mv_attention(*xs).float().sum().backward()
    ones = torch.ones(q.shape, device="cuda", dtype=torch.bfloat16)
    _check_grads([t.grad for t in xs], q, k, v, ones, 1, "all", 1.0 / math.sqrt(128), what="sum()")


@requires_sm90
def test_sm90_bwd_env_switch(monkeypatch):
    q, k, v, _ = _inputs(torch.bfloat16, 1, 1, 128, 128, 2, 128, seed=1)
    assert sm90.usable_bwd(q, k, v)
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "triton")
    assert not sm90.usable_bwd(q, k, v)
    assert sm90.usable(q, k, v)  # the forward switch is independent
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "bogus")
    with pytest.raises(ValueError, match="MVKERNELS_ATTN_BWD"):
        sm90.usable_bwd(q, k, v)


def test_extension_exposes_sm90_backward_when_built_with_90a():
    """CPU check: a CUDA build whose arch list has 90a must contain the sm90 backward."""
    import mvkernels

    info = mvkernels.build_info()
    if "90a" not in info["cuda_archs"]:
        pytest.skip("extension not built for sm_90a")
    assert sm90.available_bwd()


def test_bwd_env_values_are_validated(monkeypatch):
    """CPU check: the switches are read at each call and reject unknown values."""
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "triton")
    assert sm90.requested_bwd() == "triton"
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "")
    assert sm90.requested_bwd() == "sm90"
    monkeypatch.setenv("MVKERNELS_ATTN_BWD", "cudnn")
    with pytest.raises(ValueError):
        sm90.requested_bwd()


def test_math_backward_is_the_oracle_we_compare_with():
    """CPU check of the test's own oracle: _reference_grads in float64 equals mva._math_backward."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 3 * 20, 2, 16, generator=g, dtype=torch.float64) for _ in range(4))
    exact = mva._math_backward(do, q, k, v, 3, [1, 0, 1, 0, 1, 0, 1, 1, 0], 0.3)
    ours = _reference_grads(q, k, v, do, 3, _conn("custom"), 0.3, torch.float64)
    for a, b in zip(exact, ours):
        torch.testing.assert_close(a, b)


@requires_sm90
def test_sm90_bwd_deterministic_mode_uses_triton_dq(monkeypatch):
    """torch.use_deterministic_algorithms(True) overrides the in-kernel dQ (its reduce order varies): two backward
    runs give the same dQ bits, and they equal the explicit MVKERNELS_ATTN_BWD_DQ=triton result."""
    monkeypatch.delenv("MVKERNELS_ATTN_BWD_DQ")
    assert sm90._dq_in_kernel()
    args, _ = _direct(torch.bfloat16, 1, 1, 1000, 1000, "all", seed=51)
    q, k, v, do, out, lse, nv, fl, scale = args
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not sm90._dq_in_kernel()
        first = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
        second = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
    finally:
        torch.use_deterministic_algorithms(prev)
    monkeypatch.setenv("MVKERNELS_ATTN_BWD_DQ", "triton")
    explicit = sm90.backward(do, q, k, v, out, lse, nv, tuple(fl), scale)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, explicit))
