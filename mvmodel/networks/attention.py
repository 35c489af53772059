"""Attention of the multi-view DiT: joint self-attention (FA) and per-view text cross-attention (CA).

Module and parameter names reproduce upstream's ``Attention`` (cosmos-multiview.md §4.3, §6): ``to_q`` / ``to_k``
are ``Sequential(Linear(no bias), per-head RMSNorm)``, ``to_v`` is ``Sequential(Linear, Identity)`` and ``to_out``
is ``Sequential(Linear, Dropout(0))``. Tokens are kept B-major, ``[B, S, D]``, instead of upstream's ``THWBD``:
only the activation layout differs, every weight and the state dict are identical.

Backends compute the same thing:
* ``"sdpa"``: plain-PyTorch RMSNorm and rotate-half RoPE, then ``torch.nn.functional.scaled_dot_product_attention``;
* ``"mvkernels"``: ``mvkernels.mv_attention`` with the per-head QK-norm and RoPE passed in (it applies them with
  the fused ``mvkernels.qk_norm_rope`` pass before its attention kernel);
* ``"hybrid"``: the fused ``mvkernels.qk_norm_rope`` pass, then torch SDPA (whichever SDPA backend is enabled);
* ``"fa4"``: the fused ``mvkernels.qk_norm_rope`` pass, then FlashAttention-4 (optional package ``flash-attn-4``;
  view-sparse patterns through its block sparsity);
* ``"int8"``: ``mvkernels.mv_attention_int8`` (8-bit, forward only, Hopper), norms and RoPE fused as "mvkernels".
  Never chosen by name: a self-attention runs it while ``attn_8bit`` is set (``mvmodel.networks.precision``).
``"auto"`` picks, per case (self/cross attention, dense/per-view/sparse connectivity, inference/training), the
fastest backend measured on this GPU model: ``attention_table.json`` beside this file, written by
``benches/bench_attention_choice.py``, lists the backends of each case fastest first and "auto" takes the first one
that can run the inputs. GPUs not in the table: "mvkernels" for self-attention on Hopper (our sm_90a kernels),
"hybrid" elsewhere on CUDA, "sdpa" on CPU. When the precision asks for 8-bit attention the case gets a "/8bit"
suffix (e.g. "self/dense/fwd/8bit"); unmeasured, it is "int8" when that can run, else the bf16 choice.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in fp32, returned in x's dtype.

    Matches Transformer Engine's RMSNorm (upstream's ``affline_norm`` and per-head q/k norms): fp32 statistics,
    one rounding on output.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate-half RoPE (pairs i, i + D/2), computed in fp32: ``x`` [B, S, H, D], ``angles`` [S, D] fp32.

    Same arithmetic as TE's fused RoPE used upstream (fp32 math on the input, one rounding on output).
    """
    xf = x.float()
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


_OPS: dict[str, Any] | None = None


def _mvkernels_ops() -> dict[str, Any]:
    """The mvkernels ops that are installed (empty when the package or an op is missing); looked up once, in a
    plain global so that torch.compile traces a dict read rather than the import."""
    global _OPS
    if _OPS is None:
        try:
            import mvkernels
        except Exception:  # noqa: BLE001 - a broken build must not break the SDPA path
            _OPS = {}
        else:
            _OPS = {n: getattr(mvkernels, n) for n in ("mv_attention", "qk_norm_rope") if hasattr(mvkernels, n)}
    return _OPS


_INT8: Any = None


def _int8_op():
    """``mvkernels.ops.mv_attention_int8`` (the module) or None; looked up once, outside compiled regions."""
    global _INT8
    if _INT8 is None:
        from .precision import int8_attention_module  # noqa: PLC0415

        mod = int8_attention_module()
        _INT8 = False if isinstance(mod, str) else mod
    return _INT8 or None


def _int8_serves(q: Tensor) -> bool:
    """The 8-bit kernel takes q's kind of input (forward only: never under autograd). Metadata only."""
    mod = _int8_op()
    if mod is None or q.device.type != "cuda" or torch.is_grad_enabled():
        return False
    if hasattr(mod, "serves"):
        return bool(mod.serves(q))
    return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)


def mvkernels_available() -> bool:
    ops = _mvkernels_ops()
    return "mv_attention" in ops and "qk_norm_rope" in ops


BACKENDS = ("auto", "sdpa", "mvkernels", "hybrid", "fa4")
AUTO_TABLE = Path(__file__).with_name("attention_table.json")


def _fa4():
    from mvkernels.ops import fa4_attention  # noqa: PLC0415 - pure Python, imports FA4 lazily itself

    return fa4_attention


def _hopper_sm90(q: Tensor) -> bool:
    """mv_attention's sm_90a kernels take this kind of input (the backward too when autograd is on): "auto" then
    prefers them. Metadata only, so it is safe while torch.compile traces the block."""
    if q.device.type != "cuda" or not mvkernels_available():
        return False
    from mvkernels.ops import mv_attention_sm90  # noqa: PLC0415 - only with the ops installed

    return mv_attention_sm90.serves(q, backward=torch.is_grad_enabled())


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "hybrid" if device.type == "cuda" and "qk_norm_rope" in _mvkernels_ops() else "sdpa"
    if backend == "mvkernels" and not mvkernels_available():
        raise RuntimeError("attention_backend='mvkernels' but mvkernels.mv_attention / qk_norm_rope are not "
                           "installed; use attention_backend='sdpa'")
    if backend == "hybrid" and "qk_norm_rope" not in _mvkernels_ops():
        raise RuntimeError("attention_backend='hybrid' needs mvkernels.qk_norm_rope; use attention_backend='sdpa'")
    if backend == "fa4" and not _fa4().available():
        raise RuntimeError(f"attention_backend='fa4': {_fa4().install_hint()}")
    if backend == "int8" and _int8_op() is None:  # set directly only by benches; models use the precision option
        raise RuntimeError("attention backend 'int8' needs mvkernels.ops.mv_attention_int8, which is not installed")
    return backend


def auto_case(self_attn: bool, connectivity: Any, training: bool) -> str:
    """The key of one case in ``attention_table.json``: e.g. "self/dense/train", "cross/views/fwd"."""
    if isinstance(connectivity, str) and connectivity in ("all", "self"):
        pattern = "dense" if connectivity == "all" else "views"
    else:
        pattern = "sparse"
    return f"{'self' if self_attn else 'cross'}/{pattern}/{'train' if training else 'fwd'}"


@torch.compiler.assume_constant_result
def _measured_order(device_index: int, case: str) -> str:
    """Comma-separated backends of ``case`` for this GPU model, fastest first ("" when not measured). A constant
    per trace: it reads a file and asks the driver for the GPU's name."""
    rows = _load_table(str(AUTO_TABLE)).get("gpus", {}).get(torch.cuda.get_device_name(device_index), {})
    return ",".join(rows.get(case, []))


@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _can_run(backend: str, q: Tensor, use_rope: bool, connectivity: Any) -> bool:
    """``backend`` takes these inputs (metadata only: safe while torch.compile traces the block)."""
    if backend == "sdpa":
        return True
    if backend == "hybrid":
        return q.device.type == "cuda" and "qk_norm_rope" in _mvkernels_ops()
    if backend == "mvkernels":
        return q.device.type == "cuda" and mvkernels_available()
    if backend == "fa4":
        return (not use_rope or "qk_norm_rope" in _mvkernels_ops()) and _fa4().serves(q)
    if backend == "int8":
        return _int8_serves(q)
    return False


def choose_auto(q: Tensor, self_attn: bool, use_rope: bool, connectivity: Any, eight_bit: bool = False) -> str:
    """The backend "auto" runs for these inputs: the measured table's first runnable entry, else the defaults.
    ``eight_bit``: the precision asks for 8-bit attention (the "/8bit" rows, "int8" when not measured)."""
    cuda = q.device.type == "cuda"
    index = (q.device.index if q.device.index is not None else torch.cuda.current_device()) if cuda else -1
    case = auto_case(self_attn, connectivity, torch.is_grad_enabled())
    if eight_bit:  # the kernel itself says which devices it serves (_can_run)
        for name in filter(None, ((_measured_order(index, case + "/8bit") if cuda else "") or "int8").split(",")):
            if _can_run(name, q, use_rope, connectivity):
                return name
    if cuda:
        order = _measured_order(index, case)
        for name in filter(None, order.split(",")):
            if _can_run(name, q, use_rope, connectivity):
                return name
        if use_rope and _hopper_sm90(q):
            return "mvkernels"
    return resolve_backend("auto", q.device)


def view_connectivity_matrix(connectivity: Any, n_views: int, device: torch.device) -> Tensor | None:
    """``[n_views, n_views]`` bool (query view i may see key view j), or None for "all" (dense)."""
    if isinstance(connectivity, Tensor):
        if connectivity.shape != (n_views, n_views) or connectivity.dtype != torch.bool:
            raise ValueError(f"connectivity tensor must be bool [{n_views}, {n_views}], got "
                             f"{connectivity.dtype} {tuple(connectivity.shape)}")
        return connectivity.to(device)
    if connectivity == "all":
        return None
    idx = torch.arange(n_views, device=device)
    if connectivity == "self":
        return idx[:, None] == idx[None, :]
    m = re.fullmatch(r"ring(\d+)", str(connectivity))
    if m:
        d = (idx[:, None] - idx[None, :]).abs()
        return torch.minimum(d, n_views - d) <= int(m.group(1))
    raise ValueError(f"connectivity must be 'all', 'self', 'ringK' or a bool [V, V] tensor, got {connectivity!r}")


def sdpa_multiview(q: Tensor, k: Tensor, v: Tensor, n_views: int, connectivity: Any) -> Tensor:
    """SDPA over view segments: q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D].

    "all" is one dense attention; "self" runs views as a batch (no mask, so zero-padded keys still take part in
    the softmax, as upstream); other patterns build a token-level boolean mask from the view matrix.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if connectivity == "self" and n_views > 1:
        q = q.reshape(B * n_views, Sq // n_views, H, D)
        k = k.reshape(B * n_views, Sk // n_views, H, D)
        v = v.reshape(B * n_views, Sk // n_views, H, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(B, Sq, H, D)
    conn = view_connectivity_matrix(connectivity, n_views, q.device)
    mask = None
    if conn is not None and not bool(conn.all()):
        qv = torch.arange(Sq, device=q.device) // (Sq // n_views)
        kv = torch.arange(Sk, device=q.device) // (Sk // n_views)
        mask = conn[qv][:, kv]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm; RoPE on self-attention only.

    forward(x [B, S, Dq], context [B, M, Dc] or None, rope_angles [S, head_dim] fp32 or None) -> [B, S, Dq].
    ``n_views``/``connectivity`` split q and k/v into view segments (CA uses "self": view v's queries see view
    v's text tokens only; FA uses the model's self-attention connectivity, "all" upstream).
    """

    attn_8bit: bool = False
    """This call runs 8-bit attention: set per sampling step by ``mvmodel.networks.precision.set_sampling_step`` (a
    plain bool: torch.compile keeps one graph per value, so flipping it never recompiles twice)."""
    attn_8bit_enabled: bool = False
    """The precision puts this attention in 8 bits (self-attention of a block not kept in bf16)."""
    qkv_fp8_on: bool = False
    """Use the FP8 fused q/k/v weight ``qkv_fp8`` (a non-persistent buffer made by ``apply_precision``)."""

    cp: Any = None
    """Context-parallel hook (``mvmodel.trainer.context_parallel.ContextParallel``); None: single-rank path."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.is_selfattn = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        inner = heads * dim_head
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        _mvkernels_ops()  # look the ops up now, outside any compiled region
        fk = dict(device=device, dtype=dtype)
        self.to_q = nn.Sequential(nn.Linear(query_dim, inner, bias=False, **fk), RMSNorm(dim_head, 1e-6, **fk))
        self.to_k = nn.Sequential(nn.Linear(context_dim, inner, bias=False, **fk), RMSNorm(dim_head, 1e-6, **fk))
        self.to_v = nn.Sequential(nn.Linear(context_dim, inner, bias=False, **fk), nn.Identity())
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, bias=False, **fk), nn.Dropout(0.0))
        # LoRA adapters (``mvmodel.networks.lora``), set by ``add_lora`` on the targeted linears; None: no adapter.
        self.to_q_lora = self.to_k_lora = self.to_v_lora = self.to_out_lora = None

    def forward(self, x: Tensor, context: Tensor | None = None, rope_angles: Tensor | None = None,
                n_views: int = 1, connectivity: Any = "all") -> Tensor:
        B, S, _ = x.shape
        ctx = x if context is None else context
        if context is None and self.qkv_fp8_on:  # FP8 linears: one quantized GEMM (per-row scales, so = 3 GEMMs)
            q, k, v = F.linear(x, self.qkv_fp8).unflatten(-1, (3, self.heads, self.dim_head)).unbind(2)
        elif context is None:
            # One GEMM for q, k, v (weights stay separate parameters, so the state dict is upstream's); q, k, v are
            # strided views of [B, S, 3, H, Dh], which both backends read in place.
            w = torch.cat([self.to_q[0].weight, self.to_k[0].weight, self.to_v[0].weight])
            qkv = F.linear(x, w).unflatten(-1, (3, self.heads, self.dim_head))
            if self.to_q_lora is not None or self.to_k_lora is not None or self.to_v_lora is not None:
                self._lora_qkv(x, qkv)
            q, k, v = qkv.unbind(2)
        else:
            q = self._linear(self.to_q[0], self.to_q_lora, x).unflatten(-1, (self.heads, self.dim_head))
            k = self._linear(self.to_k[0], self.to_k_lora, ctx).unflatten(-1, (self.heads, self.dim_head))
            v = self._linear(self.to_v[0], self.to_v_lora, ctx).unflatten(-1, (self.heads, self.dim_head))
        if self.cp is not None and context is None:
            # Context parallelism (set by mvmodel.trainer.context_parallel): x holds this rank's token slice; the
            # hook exchanges q/k/v across ranks and calls ``core`` on full sequences with a subset of heads.
            out = self.cp.attend(self, q, k, v, rope_angles, n_views, connectivity)
        else:
            out = self.core(q, k, v, rope_angles, n_views, connectivity)
        out = out.reshape(B, S, self.heads * self.dim_head)
        return self.to_out[1](self._linear(self.to_out[0], self.to_out_lora, out))

    @staticmethod
    def _linear(linear: nn.Linear, lora: nn.Module | None, x: Tensor) -> Tensor:
        return linear(x) if lora is None else linear(x) + lora(x)

    def _lora_qkv(self, x: Tensor, qkv: Tensor) -> None:
        """Add the adapters' outputs to their slices of the fused [B, S, 3, H, Dh] projection, in place: q, k, v
        stay strided views of one buffer (what the attention kernels read), the base GEMM stays one GEMM, and
        autograd needs nothing of that GEMM's output (its weight is frozen), so the in-place add is safe."""
        for i, lora in enumerate((self.to_q_lora, self.to_k_lora, self.to_v_lora)):
            if lora is not None:
                qkv[:, :, i].add_(lora(x).unflatten(-1, (self.heads, self.dim_head)))

    def core(self, q: Tensor, k: Tensor, v: Tensor, rope_angles: Tensor | None, n_views: int,
             connectivity: Any) -> Tensor:
        """q [B, Sq, h, Dh], k/v [B, Sk, h, Dh] before the per-head norms -> [B, Sq, h, Dh]; h may be a subset of
        the heads (context parallelism: the norm weights are shared by all heads)."""
        use_rope = self.is_selfattn and rope_angles is not None
        backend = choose_auto(q, self.is_selfattn, use_rope, connectivity, eight_bit=True) if self.attn_8bit else ""
        if backend != "int8":  # bf16: this step / block, or 8-bit measured slower on this GPU, or input not served
            if self.backend == "auto":
                backend = choose_auto(q, self.is_selfattn, use_rope, connectivity)
            else:
                backend = resolve_backend(self.backend, q.device)
        if backend == "int8":  # same contract as mv_attention: norms and RoPE applied inside
            out = _int8_op().mv_attention_int8(
                q, k, v, n_views=n_views, connectivity=connectivity, rope_angles=rope_angles if use_rope else None,
                q_norm_weight=self.to_q[1].weight, k_norm_weight=self.to_k[1].weight, eps=self.to_q[1].eps)
        elif backend == "mvkernels":
            # One op: per-head RMSNorm (+ RoPE for self-attention) fused in front of the attention kernel.
            out = _mvkernels_ops()["mv_attention"](
                q, k, v, n_views=n_views, connectivity=connectivity, rope_angles=rope_angles if use_rope else None,
                q_norm_weight=self.to_q[1].weight, k_norm_weight=self.to_k[1].weight, eps=self.to_q[1].eps)
        elif backend == "hybrid" and use_rope:  # fused norm+RoPE pass, then torch SDPA (e.g. cuDNN)
            q, k = _mvkernels_ops()["qk_norm_rope"](q, k, self.to_q[1].weight, self.to_k[1].weight, rope_angles,
                                                    self.to_q[1].eps)
            out = sdpa_multiview(q, k, v, n_views, connectivity)
        elif backend == "fa4":
            if use_rope:
                q, k = _mvkernels_ops()["qk_norm_rope"](q, k, self.to_q[1].weight, self.to_k[1].weight, rope_angles,
                                                        self.to_q[1].eps)
            else:
                q, k = self.to_q[1](q), self.to_k[1](k)
            out = _fa4().fa4_attention(q, k, v, n_views=n_views, connectivity=connectivity)
        else:
            q, k = self.to_q[1](q), self.to_k[1](k)
            if use_rope:
                q, k = apply_rope(q, rope_angles), apply_rope(k, rope_angles)
            out = sdpa_multiview(q, k, v, n_views, connectivity)
        return out
