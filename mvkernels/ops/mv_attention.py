"""Multi-view attention: joint self-attention, per-view cross-attention and view-sparse connectivity in one op.

``mv_attention(q, k, v, n_views=..., connectivity=...)`` with q ``[B, Sq, H, D]`` and k, v ``[B, Sk, H, D]``.
q is ``n_views`` equal contiguous segments (views) of Sq / n_views tokens, k and v of Sk / n_views tokens;
``connectivity`` says which query view sees which key view (cosmos-multiview.md §6):

* ``"all"``    every view sees every view: upstream's joint self-attention (plain dense attention);
* ``"self"``   view i sees only key view i: upstream's per-view text cross-attention (no key padding mask);
* ``"ringK"``  view i sees views within ring distance K (``"ring1"``: i-1, i, i+1 mod n_views);
* a ``[n_views, n_views]`` bool tensor (or nested sequence), row = query view, column = key view.

Optional fusion (self-attention only, Sk == Sq): ``q_norm_weight`` / ``k_norm_weight`` ``[D]`` apply per-head
RMSNorm to q / k, then ``rope_angles`` ``[Sq, D]`` fp32 (layout of ``mvkernels.rope3d_angles``) rotates q and k
with rotate-half pairs (i, i + D/2), all before attention and differentiable (weights included).

Backends (``MVKERNELS_BACKEND``): ``triton`` (``mv_attention_triton.py``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``reference`` (explicit fp32 math on the masked score matrix, for small inputs).
``mv_attention_reference`` below is the plain SDPA-on-an-expanded-mask version used as the test oracle.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

__all__ = ["mv_attention", "mv_attention_reference", "connectivity_matrix"]

_LOG2E = 1.4426950408889634
_RING = re.compile(r"ring(\d+)")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# connectivity
# ----------------------------------------------------------------------------------------------------------
def connectivity_matrix(connectivity, n_views: int) -> tuple[tuple[bool, ...], ...]:
    """Normalise ``connectivity`` to an ``n_views x n_views`` tuple of bools (row = query view)."""
    n = n_views
    if isinstance(connectivity, str):
        name = connectivity.strip().lower()
        if name == "all":
            return tuple(tuple(True for _ in range(n)) for _ in range(n))
        if name == "self":
            return tuple(tuple(i == j for j in range(n)) for i in range(n))
        m = _RING.fullmatch(name)
        if m:
            r = int(m.group(1))
            return tuple(tuple(min((i - j) % n, (j - i) % n) <= r for j in range(n)) for i in range(n))
        raise ValueError(f"mv_attention: connectivity must be 'all', 'self', 'ringK' (e.g. 'ring1') or a "
                         f"[n_views, n_views] bool tensor, got {connectivity!r}")
    if isinstance(connectivity, Tensor):
        if connectivity.dtype != torch.bool:
            raise ValueError(f"mv_attention: connectivity tensor must be bool, got {connectivity.dtype}")
        if tuple(connectivity.shape) != (n, n):
            raise ValueError(f"mv_attention: connectivity must have shape [n_views, n_views] = [{n}, {n}], "
                             f"got {tuple(connectivity.shape)}")
        rows = connectivity.tolist()
    elif isinstance(connectivity, Sequence):
        rows = [list(r) if isinstance(r, Sequence) else None for r in connectivity]
        if len(rows) != n or any(r is None or len(r) != n for r in rows):
            raise ValueError(f"mv_attention: connectivity must be [n_views, n_views] = [{n}, {n}] bools")
    else:
        raise ValueError(f"mv_attention: connectivity must be a string or a [{n}, {n}] bool tensor, "
                         f"got {type(connectivity).__name__}")
    mat = tuple(tuple(bool(x) for x in r) for r in rows)
    empty = [i for i, r in enumerate(mat) if not any(r)]
    if empty:
        raise ValueError(f"mv_attention: connectivity row(s) {empty} see no key view; every query view must see "
                         f"at least one (the softmax of an empty row is undefined)")
    return mat


def _expanded_mask(n_views: int, conn: Sequence[int], Sq: int, Sk: int, device) -> Tensor:
    """[Sq, Sk] bool token mask from the flattened view connectivity."""
    seg = torch.tensor(conn, dtype=torch.bool, device=device).view(n_views, n_views)
    return seg.repeat_interleave(Sq // n_views, 0).repeat_interleave(Sk // n_views, 1)


# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------
def _norm_rope(x: Tensor, weight: Tensor | None, angles: Tensor | None, eps: float) -> Tensor:
    """Per-head RMSNorm then rotate-half RoPE, fp32 math (fp64 for fp64), one rounding to x's dtype."""
    y = x.double() if x.dtype == torch.float64 else x.float()
    if weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.to(y.dtype)
    if angles is not None:
        a = angles.to(y.dtype)[:, None, :]
        y1, y2 = y.chunk(2, dim=-1)
        y = y * a.cos() + torch.cat([-y2, y1], dim=-1) * a.sin()
    return y.to(x.dtype)


def mv_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, connectivity="all",
                           softmax_scale: float | None = None, rope_angles: Tensor | None = None,
                           q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                           eps: float = 1e-6) -> Tensor:
    """Plain PyTorch: norm/RoPE as above, then SDPA on ``[B, H, S, D]`` with the expanded ``[Sq, Sk]`` bool mask."""
    _validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight,
              dtypes=_DTYPES + (torch.float64,))
    mat = connectivity_matrix(connectivity, n_views)
    if q_norm_weight is not None or rope_angles is not None:
        q = _norm_rope(q, q_norm_weight, rope_angles, eps)
    if k_norm_weight is not None or rope_angles is not None:
        k = _norm_rope(k, k_norm_weight, rope_angles, eps)
    flat = [int(x) for r in mat for x in r]
    mask = None if all(flat) else _expanded_mask(n_views, flat, q.shape[1], k.shape[1], q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


def _math_forward(q, k, v, n_views, conn, scale):
    """Explicit fp32 (fp64 for fp64) math of the op: (out [B,Sq,H,D], lse [B,H,Sq] base 2)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~_expanded_mask(n_views, conn, q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse[..., None]) @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous(), (lse * _LOG2E).float()


def _math_backward(grad_out, q, k, v, n_views, conn, scale):
    """Explicit gradients of ``_math_forward`` (autograd is not recorded inside a custom op's kernel)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, dof = (t.to(ct).transpose(1, 2) for t in (q, k, v, grad_out))
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~_expanded_mask(n_views, conn, q.shape[1], k.shape[1], q.device), float("-inf"))
    p = torch.softmax(s, -1)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ kf, ds.transpose(-1, -2) @ qf
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


# ----------------------------------------------------------------------------------------------------------
# custom ops: forward returns (out, lse); backward is its own op so torch.compile sees both as opaque nodes
# ----------------------------------------------------------------------------------------------------------
def _choose(q: Tensor) -> str:
    triton_ok = _backend.triton_usable(q.device) and (q.device.type == "cpu" or q.dtype != torch.float32)
    return _backend.select("mv_attention", q.device, {"triton": triton_ok, "reference": True},
                           auto_order=("triton", "reference"))


@torch.library.custom_op("mvkernels::mv_attention", mutates_args=())
def _mv_attention_op(q: Tensor, k: Tensor, v: Tensor, n_views: int, conn: list[int],
                     softmax_scale: float) -> tuple[Tensor, Tensor]:
    if _choose(q) == "triton":
        if q.device.type == "cuda":
            # Hopper: the sm_90a CUDA forward (csrc) unless MVKERNELS_ATTN_FWD=triton or the inputs do not fit;
            # it writes the same (out, lse) as the Triton forward, so the Triton backward is unchanged.
            from . import mv_attention_sm90 as sm90

            if sm90.usable(q, k, v):
                return sm90.forward(q, k, v, n_views, tuple(conn), softmax_scale)
        from . import mv_attention_triton as tri

        return tri.forward(q, k, v, n_views, tuple(conn), softmax_scale)
    return _math_forward(q, k, v, n_views, conn, softmax_scale)


@_mv_attention_op.register_fake
def _(q, k, v, n_views, conn, softmax_scale):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("mvkernels::mv_attention_backward", mutates_args=())
def _mv_attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         n_views: int, conn: list[int], softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if _choose(q) == "triton":
        if q.device.type == "cuda":
            # Hopper: the sm_90a CUDA backward (csrc) unless MVKERNELS_ATTN_BWD=triton or the inputs do not fit;
            # it consumes the (out, lse) of either forward (same base-2 lse convention).
            from . import mv_attention_sm90 as sm90

            if sm90.usable_bwd(q, k, v):
                return sm90.backward(grad_out, q, k, v, out, lse, n_views, tuple(conn), softmax_scale)
        from . import mv_attention_triton as tri

        return tri.backward(grad_out, q, k, v, out, lse, n_views, tuple(conn), softmax_scale)
    return _math_backward(grad_out, q, k, v, n_views, conn, softmax_scale)


@_mv_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, n_views, conn, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, n_views, conn, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (n_views, conn, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _mv_attention_bwd_op(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


_mv_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public entry
# ----------------------------------------------------------------------------------------------------------
def _validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight, dtypes=_DTYPES):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"mv_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"mv_attention: {name} must be [B, S, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"mv_attention: {name} must be one of {', '.join(map(str, dtypes))}, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"mv_attention: {name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"mv_attention: {name} is on {t.device}, expected q's device {q.device}")
    B, Sq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H:
        raise ValueError(f"mv_attention: k must be [B={B}, Sk, H={H}, D={D}], got {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"mv_attention: head dim mismatch: k has D={k.shape[3]}, expected q's D={D}")
    if v.shape != k.shape:
        raise ValueError(f"mv_attention: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"mv_attention: head dim D must be one of 16, 32, 64, 128, got {D}")
    if not isinstance(n_views, int) or isinstance(n_views, bool) or n_views < 1:
        raise ValueError(f"mv_attention: n_views must be a positive int, got {n_views!r}")
    Sk = k.shape[1]
    if Sq % n_views:
        raise ValueError(f"mv_attention: Sq={Sq} (q.shape[1]) is not divisible by n_views={n_views}")
    if Sk % n_views or Sk == 0:
        raise ValueError(f"mv_attention: Sk={Sk} (k.shape[1]) must be a positive multiple of n_views={n_views}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"mv_attention: softmax_scale must be a positive float or None, got {softmax_scale!r}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (not isinstance(w, Tensor) or tuple(w.shape) != (D,) or w.device != q.device):
            raise ValueError(f"mv_attention: {name} must be a [{D}] tensor on {q.device}, got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if rope_angles is not None:
        if not isinstance(rope_angles, Tensor) or tuple(rope_angles.shape) != (Sq, D):
            raise ValueError(f"mv_attention: rope_angles must be [Sq, D] = [{Sq}, {D}], got "
                             f"{tuple(rope_angles.shape) if isinstance(rope_angles, Tensor) else rope_angles!r}")
        if rope_angles.dtype != torch.float32 or rope_angles.device != q.device:
            raise ValueError(f"mv_attention: rope_angles must be float32 on {q.device}, got "
                             f"{rope_angles.dtype} on {rope_angles.device}")
        if Sk != Sq:
            raise ValueError(f"mv_attention: rope_angles is for self-attention only: needs Sk == Sq, got "
                             f"Sk={Sk}, Sq={Sq}")


def _prepass(q, k, rope_angles, q_norm_weight, k_norm_weight, eps):
    """RMSNorm + RoPE on q and k. With all three inputs and a backend that has it, the fused
    ``mvkernels.qk_norm_rope`` op (one pass, ~copy bandwidth); otherwise the fp32 PyTorch composite."""
    if rope_angles is not None and q_norm_weight is not None and k_norm_weight is not None \
            and _backend.requested_backend() != "triton":
        from .qk_norm_rope import qk_norm_rope

        return qk_norm_rope(q, k, q_norm_weight, k_norm_weight, rope_angles, eps)
    if q_norm_weight is not None or rope_angles is not None:
        q = _norm_rope(q, q_norm_weight, rope_angles, eps)
    if k_norm_weight is not None or rope_angles is not None:
        k = _norm_rope(k, k_norm_weight, rope_angles, eps)
    return q, k


def mv_attention(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, connectivity="all",
                 softmax_scale: float | None = None, rope_angles: Tensor | None = None,
                 q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                 eps: float = 1e-6) -> Tensor:
    """Multi-view attention; returns ``[B, Sq, H, D]`` contiguous in q's dtype.

    q ``[B, Sq, H, D]``, k and v ``[B, Sk, H, D]`` (any strides with a unit last stride are read in place,
    e.g. ``qkv[:, :, 0]`` of a ``[B, S, 3, H, D]`` projection). D in {16, 32, 64, 128}. ``softmax_scale``
    defaults to 1/sqrt(D). See the module docstring for ``connectivity`` and the fusion arguments.
    Differentiable in q, k, v (and the norm weights).
    """
    _validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight)
    mat = connectivity_matrix(connectivity, n_views)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if rope_angles is not None or q_norm_weight is not None or k_norm_weight is not None:
        q, k = _prepass(q, k, rope_angles, q_norm_weight, k_norm_weight, eps)
    if all(all(r) for r in mat):  # dense: one segment, no view logic at all
        n_eff, flat = 1, [1]
    else:
        n_eff, flat = n_views, [int(x) for r in mat for x in r]
    out, _ = _mv_attention_op(q, k, v, n_eff, flat, scale)
    return out
