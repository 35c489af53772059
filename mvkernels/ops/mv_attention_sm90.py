"""Hopper (sm_90a) forward and backward of ``mvkernels.mv_attention``: csrc/mv_attention_sm90{,_bwd}.cu through
``mvkernels._C``.

Same contracts as ``mv_attention_triton.forward`` / ``backward``: out [B, Sq, H, D] contiguous in q's dtype, lse
[B, H, Sq] fp32 in base 2; dq, dk, dv contiguous in the inputs' dtype. q, k, v (and dO) are read in place through
their strides (TMA maps).

``MVKERNELS_ATTN_FWD=sm90|triton`` picks the forward and ``MVKERNELS_ATTN_BWD=sm90|triton`` the backward on Hopper
(default ``sm90`` for both when it can run the inputs; read at each call). The sm90 backward computes dK/dV and,
by default, dQ in the same kernel: each CTA stages its fp32 dQ block in shared memory and adds it to a global
accumulator with a bulk reduce-add in the L2 (H100, 63,600 tokens: backward 322 ms vs 396 ms with dQ from the
Triton kernel, which recomputes S and dP). The order of those additions varies run to run, so dQ is not bitwise
reproducible; ``MVKERNELS_ATTN_BWD_DQ=triton`` or ``torch.use_deterministic_algorithms(True)`` selects the
deterministic Triton dQ kernel instead.
"""
from __future__ import annotations

import os

import torch

from .. import _ext

_DTYPE_CODE = {torch.float16: 2, torch.bfloat16: 3}  # mvkernels::DType


def _env_choice(var: str, choices: tuple[str, ...]) -> str:
    name = os.environ.get(var, choices[0]).strip().lower() or choices[0]
    if name not in choices:
        raise ValueError(f"{var}={name!r} is not one of {', '.join(choices)}")
    return name


def requested() -> str:
    """The forward asked for by MVKERNELS_ATTN_FWD (sm90 | triton)."""
    return _env_choice("MVKERNELS_ATTN_FWD", ("sm90", "triton"))


def requested_bwd() -> str:
    """The backward asked for by MVKERNELS_ATTN_BWD (sm90 | triton)."""
    return _env_choice("MVKERNELS_ATTN_BWD", ("sm90", "triton"))


def available() -> bool:
    """The extension was built with the sm_90a kernel."""
    return _ext.has_cuda() and hasattr(_ext.lib(), "mv_attention_fwd_sm90")


def available_bwd() -> bool:
    """The extension was built with the sm_90a backward kernel."""
    return available() and hasattr(_ext.lib(), "mv_attention_bwd_sm90")


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte multiple strides and unit stride on D."""
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


def _kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Device, dtype, head dim, sizes and TMA layout rules shared by the forward and the backward."""
    if q.device.type != "cuda" or q.dtype not in _DTYPE_CODE:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0) or not available():
        return False
    D = q.shape[-1]
    if not _ext.lib().mv_attention_sm90_supported(D, _DTYPE_CODE[q.dtype]):
        return False
    if q.shape[1] >= 2**31 or k.shape[1] >= 2**31 or q.shape[0] * q.shape[2] >= 65536:
        return False
    return all(_tma_ok(t) for t in (q, k, v))


def serves(q: torch.Tensor, backward: bool) -> bool:
    """The sm90 kernels will take q's kind of input: Hopper, 16-bit, head dim 64/128, built and not switched off
    (``backward``: the backward kernel too). Reads only metadata, and no extension call is traced, so a module can
    ask while torch.compile traces it without a graph break; the op itself still checks every tensor's layout at
    run time and falls back to the Triton kernels when TMA cannot read it."""
    if q.device.type != "cuda" or q.dtype not in _DTYPE_CODE:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _serves(index, _DTYPE_CODE[q.dtype], int(q.shape[-1]), bool(backward), requested(), requested_bwd())


@torch.compiler.assume_constant_result
def _serves(device_index: int, dtype_code: int, head_dim: int, backward: bool, fwd_choice: str,
            bwd_choice: str) -> bool:
    # evaluated once per trace as a constant (it calls into the extension, which dynamo cannot trace)
    if fwd_choice != "sm90" or not available() or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    if backward and (bwd_choice != "sm90" or not available_bwd()):
        return False
    return bool(_ext.lib().mv_attention_sm90_supported(head_dim, dtype_code))


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the sm90 forward can run these inputs and the user did not ask for Triton."""
    return requested() == "sm90" and _kernel_fits(q, k, v)


def usable_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the sm90 backward can run these inputs and the user did not ask for Triton (dO that TMA cannot
    read is copied once by ``backward``)."""
    return requested_bwd() == "sm90" and available_bwd() and _kernel_fits(q, k, v)


def forward(q, k, v, n_views: int, conn: tuple[int, ...], scale: float):
    """out [B, Sq, H, D] (contiguous, q's dtype), lse [B, H, Sq] float32 (base 2). Caller checked ``usable``."""
    from .mv_attention_triton import _tables  # int32 (count, ids) table per query segment, cached per device

    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sq == 0 or B * H == 0:
        return out, lse
    rows, _ = _tables(n_views, tuple(conn), q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        _ext.lib().mv_attention_fwd_sm90(
            stream, _DTYPE_CODE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
            [q.stride(0), q.stride(1), q.stride(2)], [k.stride(0), k.stride(1), k.stride(2)],
            [v.stride(0), v.stride(1), v.stride(2)], out.data_ptr(), lse.data_ptr(), rows.data_ptr(),
            [B, Sq, Sk, H, D], n_views, float(scale))
    return out, lse


_BLOCK_M = 64  # query rows per tile of the backward kernel: lse/delta are padded per segment to a multiple


def _pad_rows(x: torch.Tensor, B: int, H: int, n_views: int, Lq: int, Lq_pad: int, value: float) -> torch.Tensor:
    """[B, H, Sq] -> [B * H, n_views, Lq_pad] contiguous fp32, rows past each segment's end = ``value``, and each
    64-row tile permuted for the kernel's vector loads: row 8j + 2q + e of a tile goes to 16q + 2j + e, so the 16
    rows that lane quad q of a warp needs are contiguous."""
    x = x.reshape(B * H, n_views, Lq)
    if Lq_pad != Lq:
        x = torch.nn.functional.pad(x, (0, Lq_pad - Lq), value=value)
    tiles = x.view(B * H, n_views, Lq_pad // _BLOCK_M, 8, 4, 2)  # (.., j, q, e)
    return tiles.transpose(3, 4).contiguous().view(B * H, n_views, Lq_pad)


def _dq_in_kernel() -> bool:
    """dQ inside the dK/dV kernel (bulk reduce-adds, the default) unless MVKERNELS_ATTN_BWD_DQ=triton or PyTorch's
    deterministic mode is on (the reduce order varies run to run; the Triton dQ kernel is deterministic)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return _env_choice("MVKERNELS_ATTN_BWD_DQ", ("atomic", "triton")) == "atomic"


def _dq_from_blocks(acc: torch.Tensor, B: int, H: int, n_views: int, Lq: int, dtype) -> torch.Tensor:
    """The kernel's dQ accumulator -> dq [B, Sq, H, D] in ``dtype``.

    acc is [B * H, n_views, tiles, D / 64, 4096] fp32 (already scaled): one 64 x 64 block per (query tile, 64
    columns), stored in the wgmma accumulator's fragment order, float4 (w, j, lane, r, e) with lane = 4 lq + lm
    for row 16 w + 8 r + lq and column 8 j + 2 lm + e (thread-contiguous stores in the kernel). One strided copy
    puts rows and columns back in place; the padded rows past each segment's end are then cut off."""
    T, CB = acc.shape[2], acc.shape[3]
    blocks = acc.view(B, H, n_views, T, CB, 4, 8, 8, 4, 2, 2)  # (.., w, j, lq, lm, r, e)
    # -> (B, n_views, T, w, r, lq, H, CB, j, lm, e) = [B, n_views, T * 64, H, D]
    rows = torch.empty((B, n_views, T, 4, 2, 8, H, CB, 8, 4, 2), dtype=dtype, device=acc.device)
    rows.copy_(blocks.permute(0, 2, 3, 5, 9, 7, 1, 4, 6, 8, 10))
    rows = rows.view(B, n_views, T * 64, H, CB * 64)
    if T * 64 == Lq:
        return rows.view(B, n_views * Lq, H, CB * 64)
    return rows[:, :, :Lq].contiguous().view(B, n_views * Lq, H, CB * 64)


def backward(do, q, k, v, out, lse, n_views: int, conn: tuple[int, ...], scale: float):
    """dq [B, Sq, H, D], dk, dv [B, Sk, H, D], contiguous in the inputs' dtype (``mv_attention_triton.backward``'s
    contract). Caller checked ``usable_bwd``. delta = rowsum(dO * O) comes from the Triton pre-pass."""
    from . import mv_attention_triton as tri

    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    dk = torch.empty((B, Sk, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Sk, H, D), dtype=v.dtype, device=q.device)
    if Sq == 0 or B * H == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_()
    if not _tma_ok(do) or 0 in do.stride():  # e.g. the expanded gradient of out.sum(): one copy
        do = do.contiguous()
    rows, cols = tri._tables(n_views, tuple(conn), q.device)
    Lq = Sq // n_views
    Lq_pad = -(-Lq // _BLOCK_M) * _BLOCK_M
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    tri._bwd_delta[(-(-Sq // 128), B * H)](out, do, delta, *tri._strides(out), *tri._strides(do), H, Sq,
                                           HEAD_DIM=D, BLOCK=128)
    lse_pad = _pad_rows(lse, B, H, n_views, Lq, Lq_pad, float("inf"))
    delta_pad = _pad_rows(delta, B, H, n_views, Lq, Lq_pad, 0.0)
    atomic_dq = _dq_in_kernel()
    dq_accum = (torch.zeros((B * H, n_views, Lq_pad // _BLOCK_M, D // 64, 64 * 64), dtype=torch.float32,
                            device=q.device) if atomic_dq else None)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        _ext.lib().mv_attention_bwd_sm90(
            stream, _DTYPE_CODE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), do.data_ptr(),
            [q.stride(0), q.stride(1), q.stride(2)], [k.stride(0), k.stride(1), k.stride(2)],
            [v.stride(0), v.stride(1), v.stride(2)], [do.stride(0), do.stride(1), do.stride(2)],
            lse_pad.data_ptr(), delta_pad.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            dq_accum.data_ptr() if atomic_dq else 0, cols.data_ptr(), [B, Sq, Sk, H, D], n_views, float(scale))
    if atomic_dq:
        return _dq_from_blocks(dq_accum, B, H, n_views, Lq, q.dtype), dk, dv
    dq = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    Lk = Sk // n_views
    tri._mv_attn_bwd_dq[lambda m: (n_views * -(-Lq // m["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, rows, *tri._strides(q), *tri._strides(k), *tri._strides(v), *tri._strides(do),
        *tri._strides(dq), H, Sq, Lq, Lk, scale, scale * tri.LOG2E, NV=n_views, HEAD_DIM=D, IS_FP32=False)
    return dq, dk, dv


__all__ = ["available", "available_bwd", "backward", "forward", "requested", "requested_bwd", "serves", "usable",
           "usable_bwd"]
