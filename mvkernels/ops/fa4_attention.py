"""FlashAttention-4 (package ``flash-attn-4``, import ``flash_attn.cute``) as an optional attention backend.

FA4 is the fastest attention a user can ``pip install`` on Hopper (its SM90 path, built on the CuTe DSL; kernels
are JIT-compiled on first use, nothing compiles at install). It is wrapped here as the custom op
``mvkernels::fa4_attention`` (forward) + ``mvkernels::fa4_attention_bwd`` so that torch.compile, activation
checkpointing and FSDP2 see one opaque op with a fake implementation, instead of tracing into FA4's Python.

Layouts match ``mv_attention``: q ``[B, Sq, H, D]``, k / v ``[B, Sk, H, D]`` (unit last stride; other strides
are read in place), out ``[B, Sq, H, D]``. Connectivity "all" is one dense attention; "self" (each view's queries
see only that view's keys, e.g. the per-view text cross-attention) runs the views as a batch; other view patterns
("ringK", a bool [V, V] matrix) use FA4's block sparsity with a mask rule inside the blocks that straddle views
(``fa4_sparsity``).

Install: ``pip install "mvworld[flash]"`` (or ``pip install flash-attn-4``); without a package index, install the
wheels of flash-attn-4, nvidia-cutlass-dsl (+ its -libs-base and -libs-cu13), quack-kernels, apache-tvm-ffi and
torch-c-dlpack-ext with ``pip install --no-index --find-links DIR``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .mv_attention import connectivity_matrix

__all__ = ["available", "install_hint", "fa4_attention", "fa4_attention_reference", "serves"]

INSTALL_HINT = ('FlashAttention-4 is not installed: pip install "mvworld[flash]" (the flash-attn-4 package; '
                "without a package index, install its wheels with pip install --no-index --find-links DIR)")


@functools.cache
def _interface() -> Any:
    """FA4's interface module, or the ImportError that stopped it (looked up once)."""
    try:
        from flash_attn.cute import interface  # noqa: PLC0415 - optional dependency
    except Exception as e:  # noqa: BLE001 - a broken install must not break the other backends
        return e
    if not (hasattr(interface, "_flash_attn_fwd") and hasattr(interface, "_flash_attn_bwd")):
        return ImportError("flash_attn.cute.interface has no _flash_attn_fwd/_flash_attn_bwd: this wrapper "
                           "needs flash-attn-4 >= 4.0.0b36, < 4.1")
    return interface


def available() -> bool:
    """flash-attn-4 imports here (the GPU is checked per call by :func:`serves`)."""
    return not isinstance(_interface(), BaseException)


def install_hint() -> str:
    err = _interface()
    return INSTALL_HINT + (f" ({type(err).__name__}: {err})" if isinstance(err, BaseException) else "")


def serves(q: Tensor) -> bool:
    """FA4 runs q's kind of input: installed, CUDA sm90/sm100-class GPU, bf16/fp16, head dim <= 256 multiple of 8.
    Reads metadata only (safe while torch.compile traces a module)."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _serves_device(index)


@torch.compiler.assume_constant_result
def _serves_device(index: int) -> bool:
    # a constant per trace: it imports FA4 and asks the driver, which dynamo should not trace
    return available() and torch.cuda.get_device_capability(index)[0] in (9, 10, 11)


def fa4_attention_reference(q: Tensor, k: Tensor, v: Tensor, n_views: int = 1, connectivity: Any = "all",
                            softmax_scale: float | None = None) -> Tensor:
    """Plain PyTorch (SDPA math) with the same contract as :func:`fa4_attention`."""
    if not (isinstance(connectivity, str) and connectivity in ("all", "self")):
        from .mv_attention import mv_attention_reference  # noqa: PLC0415

        return mv_attention_reference(q, k, v, n_views=n_views, connectivity=connectivity, softmax_scale=softmax_scale)
    B, Sq, H, _ = q.shape
    qb, kb, vb = _as_batches(q, k, v, n_views, connectivity)
    out = torch.nn.functional.scaled_dot_product_attention(
        qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), scale=softmax_scale).transpose(1, 2)
    return out.reshape(B, Sq, H, v.shape[-1])


def _as_batches(q: Tensor, k: Tensor, v: Tensor, n_views: int, connectivity: str) -> tuple[Tensor, Tensor, Tensor]:
    """"all": unchanged; "self": view segments become batch entries (a view of the same memory)."""
    if connectivity == "all" or n_views == 1:
        return q, k, v
    if connectivity != "self":
        raise ValueError(f"fa4_attention: connectivity for batching must be 'all' or 'self', got {connectivity!r}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if Sq % n_views or Sk % n_views:
        raise ValueError(f"fa4_attention: Sq={Sq} and Sk={Sk} must be multiples of n_views={n_views}")
    return (q.reshape(B * n_views, Sq // n_views, H, D), k.reshape(B * n_views, Sk // n_views, H, D),
            v.reshape(B * n_views, Sk // n_views, H, D))


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"fa4_attention: {name} must be a [B, S, H, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in (torch.bfloat16, torch.float16) or t.dtype != q.dtype:
            raise ValueError(f"fa4_attention: q, k, v must share a dtype among bf16/fp16, got {name} {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"fa4_attention: {name} must have a unit last stride, got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"fa4_attention: q, k, v must be on one device, got {name} on {t.device}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"fa4_attention: k and v must be [B, Sk, H, D] matching q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")


def _pattern_key(n_views: int, conn: tuple[tuple[bool, ...], ...]) -> str:
    """A view pattern as a string op argument (custom ops take no callables): "5:11001110..." ("" = dense)."""
    return f"{n_views}:" + "".join("1" if b else "0" for row in conn for b in row)


def _sparse_kwargs(pattern: str, q: Tensor, k: Tensor, backward: bool) -> dict:
    if not pattern:
        return {}
    from .fa4_sparsity import sparse_plan  # noqa: PLC0415

    n_views, bits = pattern.split(":")
    fwd, bwd, mask_mod, aux = sparse_plan(int(n_views), tuple(b == "1" for b in bits), q.shape[1], k.shape[1],
                                          str(q.device))
    return dict(mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=bwd if backward else fwd)


@torch.library.custom_op("mvkernels::fa4_attention", mutates_args=())
def _fa4_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float, pattern: str) -> tuple[Tensor, Tensor]:
    out, lse, *_ = _interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True,
                                                **_sparse_kwargs(pattern, q, k, backward=False))
    return out, lse


@_fa4_fwd_op.register_fake
def _(q, k, v, scale, pattern):
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, v.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("mvkernels::fa4_attention_bwd", mutates_args=())
def _fa4_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                scale: float, pattern: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, do.contiguous(), lse, scale,
                                              deterministic=torch.are_deterministic_algorithms_enabled(),
                                              **_sparse_kwargs(pattern, q, k, backward=True))
    return dq, dk, dv


@_fa4_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, pattern):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, pattern = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.pattern = scale, pattern


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_fa4_bwd_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.pattern), None, None)


_fa4_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor, n_views: int = 1, connectivity: Any = "all",
                  softmax_scale: float | None = None) -> Tensor:
    """Attention through FlashAttention-4: q ``[B, Sq, H, D]``, k / v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]``.

    ``connectivity`` as in ``mv_attention``: "all" (dense), "self" (view i's queries see view i's keys; ``n_views``
    equal segments), "ringK" or a bool ``[n_views, n_views]`` matrix (block-sparse).
    Raises RuntimeError with the install command when FA4 is missing or cannot run on this GPU.
    """
    _validate(q, k, v)
    if not available():
        raise RuntimeError(install_hint())
    if not serves(q):
        raise RuntimeError(f"fa4_attention: FlashAttention-4 runs bf16/fp16 CUDA tensors on sm90/sm100-class GPUs "
                           f"with head dim <= 256 (multiple of 8); got {q.dtype} {tuple(q.shape)} on {q.device}")
    B, Sq, H, D = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    pattern = ""
    if not (isinstance(connectivity, str) and connectivity in ("all", "self")) and n_views > 1:
        conn = connectivity_matrix(connectivity, n_views)
        if all(all(row) for row in conn):
            connectivity = "all"
        else:
            if Sq % n_views or k.shape[1] % n_views:
                raise ValueError(f"fa4_attention: Sq={Sq} and Sk={k.shape[1]} must be multiples of n_views={n_views}")
            pattern, connectivity = _pattern_key(n_views, conn), "all"
    qb, kb, vb = _as_batches(q, k, v, n_views, connectivity)
    out, _ = _fa4_fwd_op(qb, kb, vb, scale, pattern)
    return out.reshape(B, Sq, H, out.shape[-1])
