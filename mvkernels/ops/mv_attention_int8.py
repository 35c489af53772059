"""8-bit multi-view attention forward for Hopper (inference): SageAttention2-style INT8 Q.K^T and FP8 P.V.

``mv_attention_int8(q, k, v, *, n_views, connectivity, softmax_scale, rope_angles, q_norm_weight,
k_norm_weight, eps)`` has the arguments, layouts ([B, S, H, D], bf16/fp16, any strides with a unit last stride)
and connectivity API ("all", "self", "ringK", [n_views, n_views] bool matrix) of ``mv_attention``; forward only.

Math (per batch and head; x_i a row of q / k after the optional RMSNorm + RoPE, all in fp32):
  K smoothing   k_j <- k_j - mean_j(k)            (q.mean is the same for every key of a row: softmax cancels it)
  Q, K -> INT8  q_i = round(x_i / sq_i), sq_i = absmax(group of q_i) / 127; same for k with sk_j
                (groups of Q_GROUP / K_GROUP consecutive rows inside a view segment; 1 = one scale per token)
  scores        t_ij = (q_i . k_j)_int32 * sk_j * sq_i * softmax_scale * log2(e)   (log2 domain, fp32)
  softmax       online over key tiles in fp32: m_i running max, P_ij = 2^(t_ij - m_i) * 448 in [0, 448]
  V -> FP8      v_j = e4m3(v_j * 448 / a), a = absmax over tokens per channel (per head), sv = a / 448
  P.V           per key tile: e4m3(P) . e4m3(V) as a fresh fp32 dot, added to the fp32 accumulator (two-level
                accumulation: Hopper's FP8 wgmma accumulates at reduced precision), out = acc * sv / l
Implementation: ``mv_attention_int8_triton.py`` (pre-pass + kernel, Triton, sm_90). A CUDA/wgmma version is not
part of this module. ``mv_attention_int8_reference`` is the same quantization math in plain PyTorch (for tests),
``per_tensor_fp8_attention_reference`` the naive per-tensor e4m3 baseline (FA3-fp8 style).

Errors: dtype other than bf16/fp16, head dim other than 64/128, a non-CUDA or pre-sm_90 device -> ValueError
naming it. NaN/Inf in q/k/v -> RuntimeError: the quantization scales are NaN/Inf then; they live in one buffer
that is checked with one reduction and one device->host sync after the kernel (a few microseconds; skipped while
a CUDA graph is being captured, or with MVKERNELS_INT8_CHECK_FINITE=0).
``available()`` says whether this machine can run it (falsy with ``.reason`` otherwise): callers fall back.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .. import _backend
from .mv_attention import _expanded_mask, connectivity_matrix

__all__ = ["mv_attention_int8", "mv_attention_int8_reference", "per_tensor_fp8_attention_reference",
           "quantize_reference", "available", "Availability", "Q_GROUP", "K_GROUP", "QK_FORMAT", "V_PLANES"]

LOG2E = 1.4426950408889634
LOG2_448 = 8.807354922057604
_NAME = "mv_attention_int8"
_DTYPES = (torch.bfloat16, torch.float16)
_HEAD_DIMS = (64, 128)
# Defaults chosen on the fidelity suite (.notes/attention_int8.md): one scale per token for Q and K (the kernel reads
# scale vectors, so this costs nothing in the attention loop), INT8 for Q.K^T. Overridable for measurements with
# MVKERNELS_INT8_QGROUP / MVKERNELS_INT8_KGROUP (1, 16, 32, 64, 128) and MVKERNELS_INT8_QK=int8|e4m3.
Q_GROUP = 1
K_GROUP = 1
QK_FORMAT = "int8"
# V planes: 1 = V in e4m3 (SageAttention2's P.V); 2 = V + its e4m3 rounding residual as a second e4m3 plane, one
# more FP8 dot per key tile (~1.5x the tensor-core work), which takes V's quantization error out of the result
# (rel L1 ~0.026 instead of ~0.037 on random inputs: .notes/attention_int8.md). MVKERNELS_INT8_V_PLANES=1|2.
V_PLANES = 1
_GROUPS = (1, 16, 32, 64, 128)


def _knobs() -> tuple[int, int, str, int]:
    qg = int(os.environ.get("MVKERNELS_INT8_QGROUP", Q_GROUP))
    kg = int(os.environ.get("MVKERNELS_INT8_KGROUP", K_GROUP))
    fmt = os.environ.get("MVKERNELS_INT8_QK", QK_FORMAT).strip().lower()
    vp = int(os.environ.get("MVKERNELS_INT8_V_PLANES", V_PLANES))
    if qg not in _GROUPS or kg not in _GROUPS:
        raise ValueError(f"{_NAME}: MVKERNELS_INT8_QGROUP/KGROUP must be one of {_GROUPS}, got {qg}, {kg}")
    if fmt not in ("int8", "e4m3"):
        raise ValueError(f"{_NAME}: MVKERNELS_INT8_QK must be int8 or e4m3, got {fmt!r}")
    if vp not in (1, 2):
        raise ValueError(f"{_NAME}: MVKERNELS_INT8_V_PLANES must be 1 or 2, got {vp}")
    return qg, kg, fmt, vp


# ----------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------
class Availability:
    """Truthy when the 8-bit kernel can run; otherwise falsy with a one-line ``reason``."""

    def __init__(self, ok: bool, reason: str = ""):
        self.ok, self.reason = bool(ok), reason

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return "Availability(True)" if self.ok else f"Availability(False, {self.reason!r})"

    __str__ = __repr__


def available(device=None) -> Availability:
    """Whether ``mv_attention_int8`` runs here: Triton importable with FP8 support and a CUDA sm_90+ GPU
    (``device``, default the current CUDA device). Falsy with ``.reason`` otherwise."""
    if not torch.cuda.is_available():  # before importing Triton (see the interpreter note in mv_attention_triton)
        return Availability(False, "no CUDA GPU")
    try:
        import triton.language as tl  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - absent or broken
        return Availability(False, f"Triton is not importable ({type(e).__name__}: {e})")
    if not hasattr(tl, "float8e4nv"):
        return Availability(False, "this Triton has no float8e4nv type")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return Availability(False, f"device {dev} is not a CUDA device")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (9, 0):
        return Availability(False, f"{torch.cuda.get_device_name(dev)} is sm_{cap[0]}{cap[1]}; the 8-bit attention "
                                   f"needs sm_90 or newer (Hopper)")
    return Availability(True)


@torch.compiler.assume_constant_result
def _capability(index: int) -> int:
    return 10 * torch.cuda.get_device_capability(index)[0] + torch.cuda.get_device_capability(index)[1]


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight):
    from .mv_attention import _validate as mv_validate  # noqa: PLC0415

    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, Tensor) and t.dtype not in _DTYPES:
            raise ValueError(f"{_NAME}: {name} has dtype {t.dtype}; only torch.bfloat16 and torch.float16 are "
                             f"supported")
        if isinstance(t, Tensor) and t.dim() == 4 and t.shape[-1] not in _HEAD_DIMS:
            raise ValueError(f"{_NAME}: head dim {t.shape[-1]} of {name} is not supported (only 64 or 128)")
    try:
        mv_validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight, dtypes=_DTYPES)
    except ValueError as e:
        raise ValueError(str(e).replace("mv_attention:", f"{_NAME}:", 1)) from None


def _check_device(q: Tensor) -> None:
    if q.device.type != "cuda":
        raise ValueError(f"{_NAME}: device {q.device} is not supported: needs a CUDA GPU with compute capability "
                         f">= 9.0 (Hopper); use mv_attention elsewhere")
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < 90:
        raise ValueError(f"{_NAME}: device {q.device} ({torch.cuda.get_device_name(index)}, sm_{cap}) is not "
                         f"supported: needs compute capability >= 9.0 (Hopper)")


# ----------------------------------------------------------------------------------------------------------
# references (plain PyTorch)
# ----------------------------------------------------------------------------------------------------------
def _norm_rope_f(x: Tensor, weight: Tensor | None, angles: Tensor | None, eps: float, ct) -> Tensor:
    """RMSNorm then rotate-half RoPE in ``ct`` without the final rounding; [B, S, H, D] -> [B, H, S, D]."""
    y = x.to(ct)
    if weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    if angles is not None:
        a = angles.to(ct)[:, None, :]
        y1, y2 = y.chunk(2, dim=-1)
        y = y * a.cos() + torch.cat([-y2, y1], dim=-1) * a.sin()
    return y.transpose(1, 2)


def _group_absmax(x: Tensor, n_views: int, group: int) -> Tensor:
    """[B, H, S, D] -> [B, H, S]: absmax over groups of ``group`` rows that start at each view segment's start;
    NaN/Inf anywhere in a group gives NaN (as the kernel)."""
    B, H, S, D = x.shape
    L = S // n_views
    Lg = -(-L // group) * group
    xs = x.reshape(B, H, n_views, L, D)
    bad = (xs * 0).sum(-1)
    a = xs.abs().amax(-1) + bad
    a = torch.nn.functional.pad(a, (0, Lg - L))
    a = a.reshape(B, H, n_views, Lg // group, group).amax(-1, keepdim=True)
    a = torch.where(torch.isnan(a.sum(-1, keepdim=True)), torch.full_like(a, float("nan")), a)
    return a.expand(B, H, n_views, Lg // group, group).reshape(B, H, n_views, Lg)[..., :L].reshape(B, H, S)


def _quantize_rows(x: Tensor, amax: Tensor, fmt: str) -> Tensor:
    """Round x / (amax / 127) half-up to int8 (or x / (amax / 448) to e4m3); returns the codes as fp32."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))[..., None]
    if fmt == "int8":
        return torch.floor(x * (127.0 / safe) + 0.5).clamp(-127, 127)
    return (x * (448.0 / safe)).to(torch.float8_e4m3fn).float()


def quantize_reference(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, softmax_scale: float | None = None,
                       rope_angles: Tensor | None = None, q_norm_weight: Tensor | None = None,
                       k_norm_weight: Tensor | None = None, eps: float = 1e-6, qk_format: str = QK_FORMAT,
                       pv_format: str = "e4m3", smooth_k: bool = True, q_group: int = Q_GROUP,
                       k_group: int = K_GROUP) -> dict[str, Tensor]:
    """The pre-pass in PyTorch, unpadded [B, H, S, ...] layout. Codes are returned as float tensors holding the
    integer (int8) or e4m3 values: qi, ki [B, H, S, D]; v8 [B, H, Sk, D]. Scales: qs, ks [B, H, S] (absmax / 127
    or / 448; qs does NOT include softmax_scale * log2 e), vs [B, H, D] (absmax / 448); k_mean [B, H, D].
    ``qk_format`` / ``pv_format`` "none" skip that quantization (codes = values, scales = 1); ``pv_format``
    "e4m3x2" returns v8 = e4m3 plane + e4m3(residual * 16) / 16 (the two-plane V of MVKERNELS_INT8_V_PLANES=2)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = _norm_rope_f(q, q_norm_weight, rope_angles, eps, ct)
    kf = _norm_rope_f(k, k_norm_weight, rope_angles, eps, ct)
    k_mean = kf.mean(2)
    if smooth_k:
        kf = kf - k_mean[:, :, None, :]
    out = {"k_mean": k_mean}
    for name, x, g in (("q", qf, q_group), ("k", kf, k_group)):
        if qk_format == "none":
            out[name + "i"], out[name + "s"] = x, torch.ones(x.shape[:3], dtype=ct, device=x.device)
        else:
            a = _group_absmax(x, n_views, g)
            out[name + "i"] = _quantize_rows(x, a, qk_format).to(ct)
            out[name + "s"] = a / (127.0 if qk_format == "int8" else 448.0)
    vf = v.to(ct).transpose(1, 2)
    if pv_format == "none":
        out["v8"], out["vs"] = vf, torch.ones(vf.shape[:2] + vf.shape[3:], dtype=ct, device=v.device)
    else:
        vabs = vf.abs().amax(2) + (vf * 0).sum(2)
        safe = torch.where(vabs > 0, vabs, torch.ones_like(vabs))
        xv = vf.float() * (448.0 / safe.float())[:, :, None, :]
        v8 = xv.to(torch.float8_e4m3fn).float()
        if pv_format == "e4m3x2":
            v8 = v8 + ((xv - v8) * 16.0).to(torch.float8_e4m3fn).float() * 0.0625
        out["v8"] = v8.to(ct)
        out["vs"] = vabs / 448.0
    return out


def mv_attention_int8_reference(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, connectivity="all",
                                softmax_scale: float | None = None, rope_angles: Tensor | None = None,
                                q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                                eps: float = 1e-6, qk_format: str = QK_FORMAT, pv_format: str = "e4m3",
                                smooth_k: bool = True, q_group: int = Q_GROUP, k_group: int = K_GROUP,
                                block_n: int | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """The 8-bit attention's math in plain PyTorch (fp32; fp64 for fp64 inputs), [B, Sq, H, D] in ``out_dtype``
    (default q's dtype). ``block_n`` = the kernel's key tile: the online softmax then visits the keys in the
    kernel's order (connected segments ascending, tiles of block_n) so P is quantized against the same running
    max; None = one pass over all connected keys (the global row max). Knobs (``qk_format`` int8|e4m3|none,
    ``pv_format`` e4m3|e4m3x2|none, ``smooth_k``, ``q_group``, ``k_group``) exist for the fidelity measurements."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    conn = connectivity_matrix(connectivity, n_views)
    if all(all(r) for r in conn):  # dense: one segment, as the kernel (groups and tiles start at segment starts)
        n_views, conn = 1, ((True,),)
    ops = quantize_reference(q, k, v, n_views=n_views, rope_angles=rope_angles, q_norm_weight=q_norm_weight,
                             k_norm_weight=k_norm_weight, eps=eps, qk_format=qk_format, pv_format=pv_format,
                             smooth_k=smooth_k, q_group=q_group, k_group=k_group)
    ct = ops["qi"].dtype
    exact = torch.float64 if ct == torch.float64 or qk_format != "none" else ct
    # integer (or e4m3) dot products are exact in fp64 and stay exact in fp32 (|s| < 2^22 for int8)
    s = (ops["qi"].to(exact) @ ops["ki"].to(exact).transpose(-1, -2)).to(ct)
    x = s * ops["ks"][:, :, None, :]
    qs = ops["qs"] * torch.tensor(scale * LOG2E, dtype=ct)
    Lq, Lk = Sq // n_views, Sk // n_views
    out = torch.empty((B, H, Sq, D), dtype=ct, device=q.device)
    for i in range(n_views):
        rows = slice(i * Lq, (i + 1) * Lq)
        col_ids = [j for j in range(n_views) if conn[i][j]]
        if block_n is None:
            tiles = [torch.cat([torch.arange(j * Lk, (j + 1) * Lk) for j in col_ids])]
        else:
            tiles = [torch.arange(j * Lk + a, j * Lk + min(a + block_n, Lk))
                     for j in col_ids for a in range(0, Lk, block_n)]
        m = torch.full((B, H, Lq), float("-inf"), dtype=ct, device=q.device)
        l = torch.zeros((B, H, Lq), dtype=ct, device=q.device)
        acc = torch.zeros((B, H, Lq, D), dtype=ct, device=q.device)
        qs_i = qs[:, :, rows]
        for cols in tiles:
            cols = cols.to(q.device)
            xt = x[:, :, rows][:, :, :, cols]
            m_new = torch.maximum(m, xt.amax(-1) * qs_i)
            p = torch.exp2(xt * qs_i[..., None] - (m_new - LOG2_448)[..., None])
            alpha = torch.exp2(m - m_new)
            l = l * alpha + p.sum(-1)
            if pv_format in ("e4m3", "e4m3x2"):
                p = p.float().to(torch.float8_e4m3fn).to(ct)
            acc = acc * alpha[..., None] + p @ ops["v8"][:, :, cols]
            m = m_new
        out[:, :, rows] = acc * ops["vs"][:, :, None, :] / l[..., None]
    return out.transpose(1, 2).to(out_dtype or q.dtype)


def per_tensor_fp8_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, connectivity="all",
                                       softmax_scale: float | None = None, rope_angles: Tensor | None = None,
                                       q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                                       eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    """The naive baseline (FA3-fp8 style): Q, K, V each cast to e4m3 with ONE scale per tensor (absmax / 448), no
    smoothing, scores and softmax in fp32, P scaled by 448 and cast to e4m3 like ours, l from the fp32 P."""
    B, Sq, H, D = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    conn = connectivity_matrix(connectivity, n_views)

    def per_tensor(x):
        a = x.abs().amax()
        a = torch.where(a > 0, a, torch.ones_like(a))
        return (x * (448.0 / a)).to(torch.float8_e4m3fn).float() * (a / 448.0)

    qf = per_tensor(_norm_rope_f(q, q_norm_weight, rope_angles, eps, torch.float32))
    kf = per_tensor(_norm_rope_f(k, k_norm_weight, rope_angles, eps, torch.float32))
    vf = per_tensor(v.float().transpose(1, 2))
    s = (qf @ kf.transpose(-1, -2)) * scale
    flat = [int(x) for r in conn for x in r]
    if not all(flat):
        s = s.masked_fill(~_expanded_mask(n_views, flat, Sq, k.shape[1], q.device), float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (p * 448.0).to(torch.float8_e4m3fn).float() / 448.0
    out = (p8 @ vf) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).to(out_dtype or q.dtype)


# ----------------------------------------------------------------------------------------------------------
# the kernel path
# ----------------------------------------------------------------------------------------------------------
def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, n_views: int, conn, scale: float, rope_angles, q_norm_weight,
             k_norm_weight, eps: float, check_finite: bool = True) -> Tensor:
    """Pre-pass + attention kernel (no argument checks). Also runs on CPU tensors under TRITON_INTERPRET=1."""
    from . import mv_attention_int8_triton as tri  # noqa: PLC0415 - lazy: honours TRITON_INTERPRET

    qg, kg, fmt, vp = _knobs()
    if _backend.triton_interpreting() and q.dtype != torch.float32:
        # numpy has no bf16: the interpreter runs the same kernels on fp32 copies (exact upcast)
        out = _forward(q.float(), k.float(), v.float(), n_views, conn, scale, rope_angles, q_norm_weight,
                       k_norm_weight, eps, check_finite)
        return out.to(q.dtype)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if rope_angles is not None and rope_angles.stride(-1) != 1:
        rope_angles = rope_angles.contiguous()
    B, Sq, H, D = q.shape
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    ops = tri.quantize(q, k, v, n_views, scale, rope_angles, q_norm_weight, k_norm_weight, eps,
                       qk_fp8=fmt == "e4m3", q_group=qg, k_group=kg, v_planes=vp)
    tri.attention(ops, out, n_views, tuple(conn), qk_fp8=fmt == "e4m3")
    if check_finite:
        _check_finite(ops)
    return out


def _check_finite(ops: dict) -> None:
    """One reduction over the buffer holding every scale (all >= 0 unless NaN/Inf) and one device->host sync."""
    if os.environ.get("MVKERNELS_INT8_CHECK_FINITE", "1") == "0":
        return
    if ops["scales"].is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no sync inside CUDA graph capture
    if bool(torch.isfinite(ops["scales"].amax())):
        return
    bad = [n for n, key in (("q", "qs"), ("k", "ks"), ("v", "vs")) if not bool(torch.isfinite(ops[key]).all())]
    raise RuntimeError(f"{_NAME}: non-finite values (NaN or Inf) in {', '.join(bad) or 'q/k/v'}: its 8-bit "
                       f"quantization scale is not finite, so the attention output would be garbage")


@torch.library.custom_op("mvkernels::mv_attention_int8", mutates_args=())
def _int8_op(q: Tensor, k: Tensor, v: Tensor, n_views: int, conn: list[int], softmax_scale: float,
             rope_angles: Tensor | None, q_norm_weight: Tensor | None, k_norm_weight: Tensor | None,
             eps: float) -> Tensor:
    return _forward(q, k, v, n_views, conn, softmax_scale, rope_angles, q_norm_weight, k_norm_weight, eps)


@_int8_op.register_fake
def _(q, k, v, n_views, conn, softmax_scale, rope_angles, q_norm_weight, k_norm_weight, eps):
    return q.new_empty(q.shape)


def _no_backward(ctx, grad_out):
    raise RuntimeError(f"{_NAME} is forward-only (inference): use mv_attention for training")


def _setup_context(ctx, inputs, output):
    return None


_int8_op.register_autograd(_no_backward, setup_context=_setup_context)


def mv_attention_int8(q: Tensor, k: Tensor, v: Tensor, *, n_views: int = 1, connectivity="all",
                      softmax_scale: float | None = None, rope_angles: Tensor | None = None,
                      q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                      eps: float = 1e-6) -> Tensor:
    """8-bit multi-view attention forward; returns ``[B, Sq, H, D]`` contiguous in q's dtype.

    Same arguments as :func:`mvkernels.mv_attention`: q ``[B, Sq, H, D]``, k / v ``[B, Sk, H, D]``, bf16 or fp16,
    head dim 64 or 128, a CUDA sm_90+ device; ``connectivity`` "all" | "self" | "ringK" | bool ``[n_views,
    n_views]``; optional per-head RMSNorm (``q_norm_weight``, ``k_norm_weight``) and RoPE (``rope_angles``
    ``[Sq, D]`` fp32) applied to q and k in the quantizing pre-pass. Not differentiable (inference only).
    Raises ValueError for unsupported dtype / head dim / device, RuntimeError for NaN/Inf in q, k or v.
    """
    _validate(q, k, v, n_views, softmax_scale, rope_angles, q_norm_weight, k_norm_weight)
    mat = connectivity_matrix(connectivity, n_views)
    _check_device(q)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if all(all(r) for r in mat):  # dense: one segment
        n_eff, flat = 1, [1]
    else:
        n_eff, flat = n_views, [int(x) for r in mat for x in r]
    return _int8_op(q, k, v, n_eff, flat, scale, rope_angles, q_norm_weight, k_norm_weight, float(eps))
