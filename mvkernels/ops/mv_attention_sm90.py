"""Hopper (sm_90a) forward of ``mvkernels.mv_attention``: csrc/mv_attention_sm90.cu through ``mvkernels._C``.

Same contract as ``mv_attention_triton.forward``: out [B, Sq, H, D] contiguous in q's dtype, lse [B, H, Sq] fp32
in base 2 (what the Triton backward consumes). q, k, v are read in place through their strides (TMA maps).

``MVKERNELS_ATTN_FWD=sm90|triton`` picks the forward on Hopper (default ``sm90`` when it can run the inputs);
the backward is always Triton.
"""
from __future__ import annotations

import os

import torch

from .. import _ext

_DTYPE_CODE = {torch.float16: 2, torch.bfloat16: 3}  # mvkernels::DType


def requested() -> str:
    name = os.environ.get("MVKERNELS_ATTN_FWD", "sm90").strip().lower() or "sm90"
    if name not in ("sm90", "triton"):
        raise ValueError(f"MVKERNELS_ATTN_FWD={name!r} is not one of sm90, triton")
    return name


def available() -> bool:
    """The extension was built with the sm_90a kernel."""
    return _ext.has_cuda() and hasattr(_ext.lib(), "mv_attention_fwd_sm90")


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte multiple strides and unit stride on D."""
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the sm90 kernel can run these inputs and the user did not ask for Triton."""
    if requested() != "sm90" or q.device.type != "cuda" or q.dtype not in _DTYPE_CODE:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0) or not available():
        return False
    D = q.shape[-1]
    if not _ext.lib().mv_attention_sm90_supported(D, _DTYPE_CODE[q.dtype]):
        return False
    if q.shape[1] >= 2**31 or q.shape[0] * q.shape[2] >= 65536:
        return False
    return all(_tma_ok(t) for t in (q, k, v))


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


__all__ = ["available", "forward", "requested", "usable"]
