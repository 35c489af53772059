"""Fused per-head RMSNorm + rotate-half RoPE on q and k, in one pass (cosmos-multiview.md §5.3, §6.1).

Upstream runs TE RMSNorm on q and k, then TE's fused RoPE: separate passes over memory. Here one kernel reads
q and k once (from strided views such as slices of a fused QKV projection) and writes the results once.

Backends: ``csrc`` (our CUDA kernels on GPU tensors, the CPU build of the same math on CPU tensors) and
``reference`` (plain PyTorch below). Math is done in fp32 (fp64 for fp64 inputs), rounded once on output.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _backend, _ext

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def qk_norm_rope_reference(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, angles: Tensor,
                           eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, in the inputs' dtype (what a straightforward port does): RMSNorm then rotate-half RoPE."""
    ang = angles.double() if q.dtype == torch.float64 else angles
    cos, sin = ang.cos().to(q.dtype)[:, None, :], ang.sin().to(q.dtype)[:, None, :]

    def one(x, w):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(x.dtype)
        y1, y2 = y.chunk(2, dim=-1)
        return y * cos + torch.cat([-y2, y1], dim=-1) * sin

    return one(q, q_weight), one(k, k_weight)


def _reference_backward(grad_q, grad_k, q, k, q_weight, k_weight, angles, eps):
    """Explicit gradients in PyTorch (autograd is not recorded inside a custom op's implementation)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ang = angles.to(acc)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def one(x, w, g):
        x, w, g = x.to(acc), w.to(acc), g.to(acc)
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * r
        u1, u2 = (g * sin).chunk(2, dim=-1)
        dy = g * cos + torch.cat([u2, -u1], dim=-1)  # transpose of the rotate-half rotation
        dxhat = dy * w
        dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dy * xhat).sum(dim=(0, 1, 2))

    dq, dwq = one(q, q_weight, grad_q)
    dk, dwk = one(k, k_weight, grad_k)
    return dq.to(q.dtype), dk.to(k.dtype), dwq.to(q_weight.dtype), dwk.to(k_weight.dtype)


def _validate(q, k, q_weight, k_weight, angles):
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("angles", angles)):
        if not isinstance(t, Tensor):
            raise ValueError(f"qk_norm_rope: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"qk_norm_rope: q must be [B, S, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"qk_norm_rope: k must have q's shape {tuple(q.shape)} [B, S, H, D], got {tuple(k.shape)}")
    B, S, H, D = q.shape
    if D % 2:
        raise ValueError(f"qk_norm_rope: head dim D must be even for rotate-half pairs, got q of shape {tuple(q.shape)}")
    if q.dtype not in _DTYPE_CODES or k.dtype != q.dtype:
        raise ValueError(f"qk_norm_rope: q and k must share a dtype among bf16/fp16/fp32/fp64, got {q.dtype}, {k.dtype}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"qk_norm_rope: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (D,):
            raise ValueError(f"qk_norm_rope: {name} must have shape [{D}] (head dim), got {tuple(w.shape)}")
    if angles.shape != (S, D):
        raise ValueError(f"qk_norm_rope: angles must have shape [S, D] = [{S}, {D}], got {tuple(angles.shape)}")
    if angles.dtype != torch.float32:
        raise ValueError(f"qk_norm_rope: angles must be float32, got {angles.dtype}")
    devs = {t.device for t in (q, k, q_weight, k_weight, angles)}
    if len(devs) != 1:
        raise ValueError(f"qk_norm_rope: q, k, q_weight, k_weight and angles must be on one device, got {sorted(map(str, devs))}")


def _vector_width(tensors: list[Tensor], D: int) -> int | None:
    """Elements per access for the CUDA kernel: 16 bytes when every row start is aligned, fewer otherwise.
    None when no width gives a power-of-two threads-per-row <= 32 (e.g. D = 96)."""
    elem = tensors[0].element_size()
    vec = 16 // elem
    while vec > 1:
        nbytes = vec * elem
        if all(t.data_ptr() % nbytes == 0 and all((s * elem) % nbytes == 0 for s in t.stride()[:-1]) for t in tensors) \
                and (D // 2) % vec == 0:
            break
        vec //= 2
    tpr = D // 2 // vec
    return vec if tpr * vec * 2 == D and tpr <= 32 and (tpr & (tpr - 1)) == 0 else None


def _csrc_available(q: Tensor) -> bool:
    if not _backend.csrc_usable(q.device):
        return False
    return q.device.type == "cpu" or _vector_width([q], q.shape[-1]) is not None


def _choose(q: Tensor) -> str:
    return _backend.select("qk_norm_rope", q.device, {"csrc": _csrc_available(q), "reference": True},
                           auto_order=("csrc", "reference"))


def _launch_common(q: Tensor):
    if q.device.type == "cuda":
        return q.device.index if q.device.index is not None else torch.cuda.current_device(), \
            torch.cuda.current_stream(q.device).cuda_stream
    return -1, 0


def _acc_weights(q: Tensor, q_weight: Tensor, k_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weights in the kernel's accumulation type: fp64 for fp64 inputs, fp32 otherwise."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q_weight.to(acc).contiguous(), k_weight.to(acc).contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return tuple(t.stride()[:3])


@torch.library.custom_op("mvkernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, angles: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    if _choose(q) == "reference":
        qo, ko = qk_norm_rope_reference(q, k, q_weight, k_weight, angles, eps)
        return qo.contiguous(), ko.contiguous()
    B, S, H, D = q.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    wq, wk = _acc_weights(q, q_weight, k_weight)
    dev, stream = _launch_common(q)
    vec = _vector_width([q, k], D) or 1
    with torch.cuda.device(q.device) if dev >= 0 else _nullctx():
        _ext.lib().qk_norm_rope_fwd(dev, vec, stream, _DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), _strides(q),
                                    _strides(k), q_out.data_ptr(), k_out.data_ptr(), wq.data_ptr(), wk.data_ptr(),
                                    angles.data_ptr(), angles.stride(0), (B, S, H, D), float(eps))
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, angles, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("mvkernels::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                         angles: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _choose(q) == "reference":
        return _reference_backward(grad_q, grad_k, q, k, q_weight, k_weight, angles, eps)
    B, S, H, D = q.shape
    gq, gk = grad_q.contiguous(), grad_k.contiguous()
    dq, dk = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    wq, wk = _acc_weights(q, q_weight, k_weight)
    dev, stream = _launch_common(q)
    n_tokens = B * S
    if dev >= 0:
        n_chunks = min(n_tokens, 16 * torch.cuda.get_device_properties(q.device).multi_processor_count)
    else:
        n_chunks = min(n_tokens, 4 * (os.cpu_count() or 1))
    partial = torch.zeros((max(n_chunks, 1), 2, D), dtype=torch.float32, device=q.device)
    vec = _vector_width([q, k, gq, gk], D) or 1
    with torch.cuda.device(q.device) if dev >= 0 else _nullctx():
        _ext.lib().qk_norm_rope_bwd(dev, vec, stream, _DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), _strides(q),
                                    _strides(k), gq.data_ptr(), gk.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                    wq.data_ptr(), wk.data_ptr(), angles.data_ptr(), angles.stride(0),
                                    partial.data_ptr(), n_chunks, (B, S, H, D), float(eps))
    dw = partial.sum(0, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return dq, dk, dw[0].to(q_weight.dtype, copy=True), dw[1].to(k_weight.dtype, copy=True)


@_qk_norm_rope_bwd_op.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, angles, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape)


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, angles, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, angles)
    ctx.eps = eps


def _backward(ctx, grad_q, grad_k):
    q, k, q_weight, k_weight, angles = ctx.saved_tensors
    dq, dk, dwq, dwk = _qk_norm_rope_bwd_op(grad_q, grad_k, q, k, q_weight, k_weight, angles, ctx.eps)
    return dq, dk, dwq, dwk, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, angles: Tensor,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm (affine ``[D]`` weights) then rotate-half RoPE on q and k.

    q, k: ``[B, S, H, D]`` bf16/fp16/fp32(/fp64), last dim contiguous (ValueError otherwise), other strides
    arbitrary. angles: ``[S, D]`` fp32 (e.g. :func:`mvkernels.rope3d_angles`), any strides. Returns contiguous
    ``(q_out, k_out)``. Differentiable in q, k and both weights.
    """
    _validate(q, k, q_weight, k_weight, angles)
    if angles.stride(-1) != 1:
        # The kernels walk a row of the table with unit stride (only the row stride is passed): a transposed,
        # column-sliced or column-expanded table is copied once rather than read wrongly.
        angles = angles.contiguous()
    return _qk_norm_rope_op(q, k, q_weight, k_weight, angles, float(eps))
