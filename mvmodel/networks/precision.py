"""Inference precision of the DiT: 8-bit attention and FP8 linears, with chosen blocks and first steps in bf16.

    plan = apply_precision(net, Precision("fp8", bf16_blocks=(0, -1), bf16_steps=3))   # once, after loading
    for i in range(num_steps):
        set_sampling_step(net, i)          # flips two kinds of Python bool attributes; no tensor work
        x = euler_step_cfg(net, x, ...)

Modes (``--precision``):
* ``bf16``        everything in the net dtype (default);
* ``fp8``         8-bit attention and FP8 linears;
* ``fp8-attn``    8-bit self-attention only: ``mvkernels.mv_attention_int8`` (SageAttention2-style: INT8 Q.K^T
                  with per-block scales and K smoothing, e4m3 P.V with per-channel V scales, fp32 softmax);
* ``fp8-linear``  FP8 linears only: torchao float8, dynamic per-row activation scales and per-row weight scales,
                  weights quantized once here (cuBLAS ``_scaled_mm``; fuses best under torch.compile).

``bf16_blocks`` (indices, negative from the end) keep every op of those transformer blocks in bf16, and the first
``bf16_steps`` sampling steps run fully in bf16 (the high-noise steps set the layout of the whole video).

Which linears go FP8: the ones applied to video tokens inside the transformer blocks (fused self-attention QKV,
attention outputs, cross-attention queries, MLP). Kept in bf16: AdaLN / AdaLN-LoRA (one row per sample), the
cross-attention keys/values (512 text tokens per view: too small to gain), the patch embedding, the timestep MLP,
the view embeddings and the final layer, and anything with a dimension not a multiple of 16 (``_scaled_mm``).

The per-step switch: each 8-bit attention reads ``Attention.attn_8bit`` and each FP8 linear ``Fp8Switch.fp8``, plain
Python bools. torch.compile (which compiles each transformer block) guards on such attributes, so a block is
compiled once per value it has seen - two graphs, both cached - and flipping them costs one guard check per call,
never a recompile after the first 8-bit step. The bf16 weights stay beside the FP8 copies (the first steps and the
bf16 blocks need them, and the state dict keeps upstream's keys): +1 byte per quantized parameter.

Off Hopper / Ada (FP8 GEMMs need compute capability >= 8.9), without torchao, or without the 8-bit attention
kernel, the part that cannot run says so in one log line and stays bf16.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("mvmodel.precision")

PRECISIONS = ("bf16", "fp8", "fp8-attn", "fp8-linear")
DEFAULT_BF16_BLOCKS = (0, -1)  # first and last transformer block
DEFAULT_BF16_STEPS = 0


def parse_blocks(text: str | None) -> tuple[int, ...]:
    """``--bf16_blocks "0,-1"`` -> (0, -1); "" or "none" -> (); None -> the default (first and last)."""
    if text is None:
        return DEFAULT_BF16_BLOCKS
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--bf16_blocks {text!r}: expected comma-separated block indices, e.g. '0,-1' "
                         f"(negative counts from the last block), or 'none'") from None


@dataclass(frozen=True)
class Precision:
    """What runs in 8 bits. ``validate(num_blocks)`` checks the block indices against a net."""

    mode: str = "bf16"
    bf16_blocks: tuple[int, ...] = DEFAULT_BF16_BLOCKS
    bf16_steps: int = DEFAULT_BF16_STEPS

    def __post_init__(self) -> None:
        if self.mode not in PRECISIONS:
            raise ValueError(f"precision={self.mode!r} is not one of {', '.join(map(repr, PRECISIONS))}")
        if isinstance(self.bf16_blocks, (str, bytes)) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in self.bf16_blocks):
            raise ValueError(f"bf16_blocks={self.bf16_blocks!r}: expected a tuple of block indices (ints)")
        object.__setattr__(self, "bf16_blocks", tuple(self.bf16_blocks))
        if not isinstance(self.bf16_steps, int) or isinstance(self.bf16_steps, bool) or self.bf16_steps < 0:
            raise ValueError(f"bf16_steps={self.bf16_steps!r}: expected an integer >= 0 (sampling steps run in bf16)")

    @property
    def attention_8bit(self) -> bool:
        return self.mode in ("fp8", "fp8-attn")

    @property
    def linear_fp8(self) -> bool:
        return self.mode in ("fp8", "fp8-linear")

    def block_set(self, num_blocks: int) -> frozenset[int]:
        """The bf16 blocks as indices 0..num_blocks-1; an index outside the net is an error."""
        out = set()
        for b in self.bf16_blocks:
            if not -num_blocks <= b < num_blocks:
                raise ValueError(f"bf16_blocks: block {b} is out of range for a {num_blocks}-block net (expected "
                                 f"0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)")
            out.add(b % num_blocks)
        return frozenset(out)

    def replace(self, **changes: Any) -> "Precision":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------- what can run here
def int8_attention_module():
    """``mvkernels.ops.mv_attention_int8`` or the reason it cannot be imported (a string)."""
    try:  # the module itself (never a same-named function a package __init__ may re-export)
        return importlib.import_module("mvkernels.ops.mv_attention_int8")
    except Exception as exc:  # noqa: BLE001 - a missing or broken op must leave the bf16 path working
        return f"mvkernels.ops.mv_attention_int8 is not installed ({type(exc).__name__}: {exc})"


def int8_attention_status(device: torch.device) -> tuple[bool, str]:
    """(can run, why not) for the 8-bit attention kernel on ``device``."""
    mod = int8_attention_module()
    if isinstance(mod, str):
        return False, mod
    if device.type != "cuda":
        return False, f"8-bit attention needs a Hopper GPU (sm_90), the net is on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        name = torch.cuda.get_device_name(device)
        return False, f"8-bit attention needs a Hopper GPU (sm_90), {name} is sm_{major}{minor}"
    res = mod.available(device)  # truthy, or falsy with the reason
    if not res:
        return False, f"mv_attention_int8 cannot run: {res.reason}"
    return True, ""


def fp8_linear_status(device: torch.device) -> tuple[bool, str]:
    """(can run, why not) for torchao FP8 linears on ``device``."""
    if device.type != "cuda":
        return False, f"FP8 linears need a CUDA GPU of compute capability >= 8.9 (Ada/Hopper), the net is on {device}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return False, f"FP8 linears need compute capability >= 8.9, {name} is {major}.{minor}"
    try:
        import torchao  # noqa: F401, PLC0415 - optional extra
    except ImportError:
        return False, "FP8 linears need torchao (pip install 'mvworld[fp8]')"
    return True, ""


# ---------------------------------------------------------------------------------------------- FP8 linears
def quantize_weight_fp8(weight: Tensor) -> Tensor:
    """``weight`` [out, in] -> torchao's float8 tensor (e4m3, per-row scales) that ``F.linear`` dispatches to
    ``_scaled_mm`` with a dynamic per-row (per-token) activation scale. Done once, at load."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: PLC0415

    holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    holder[0].weight = nn.Parameter(weight.detach(), requires_grad=False)
    # activation_value_lb: an all-zero activation row (the unconditional pass's zero text makes the cross-attention
    # output exactly 0) would get scale 0 and quantize to 0/0 = NaN; a tiny floor keeps it 0.
    quantize_(holder, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=1e-12))
    return holder[0].weight.detach()


class Fp8Switch(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state-dict keys) that also holds an FP8 copy of its weight as a
    non-persistent buffer and uses it while ``fp8`` is True."""

    fp8: bool = False

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_fp8 if self.fp8 else self.weight, self.bias)

    @classmethod
    def convert(cls, linear: nn.Linear, quantize: Callable[[Tensor], Tensor]) -> "Fp8Switch":
        linear.__class__ = cls  # in place: parameters, hooks and the module tree stay as they were
        linear.register_buffer("weight_fp8", quantize(linear.weight), persistent=False)
        return linear


def fp8_linear_targets(net: nn.Module, bf16_blocks: frozenset[int]) -> dict[str, nn.Linear]:
    """{qualified name: Linear} of the linears that go FP8 (see the module docstring). The self-attention's q/k/v
    are listed under their attention module's name + ".qkv" (they run as one fused GEMM)."""
    from .attention import Attention  # noqa: PLC0415
    from .blocks import GPT2FeedForward  # noqa: PLC0415

    out: dict[str, nn.Module] = {}
    for i, (bname, tb) in enumerate(net.blocks.items()):
        if i in bf16_blocks:
            continue
        for name, m in tb.named_modules(prefix=f"blocks.{bname}"):
            if isinstance(m, Attention):
                if m.is_selfattn:
                    out[f"{name}.qkv"] = m
                else:
                    out[f"{name}.to_q.0"] = m.to_q[0]
                out[f"{name}.to_out.0"] = m.to_out[0]
            elif isinstance(m, GPT2FeedForward):
                out[f"{name}.layer1"], out[f"{name}.layer2"] = m.layer1, m.layer2
    return {n: m for n, m in out.items()
            if isinstance(m, Attention) or (m.in_features % 16 == 0 and m.out_features % 16 == 0)}


# ---------------------------------------------------------------------------------------------- apply / switch
def resolve_precision(precision: Precision, device: torch.device, dtype: torch.dtype = torch.bfloat16, *,
                      check_linears: bool = True) -> Precision:
    """The precision that can run on ``device`` for a net in ``dtype``: each 8-bit part that cannot is logged in
    one line and left in the net's dtype."""
    attn8, lin8 = precision.attention_8bit, precision.linear_fp8
    if attn8:
        ok, why = int8_attention_status(device)
        if ok and dtype not in (torch.bfloat16, torch.float16):
            ok, why = False, f"8-bit attention takes a bf16/fp16 net, this one is {dtype} (--dtype)"
        if not ok:
            log.warning("precision %s: %s; attention runs in bf16", precision.mode, why)
            attn8 = False
    if lin8 and check_linears:
        ok, why = fp8_linear_status(device)
        if ok and dtype != torch.bfloat16:  # torchao's per-row float8 quantizes bf16 weights only
            ok, why = False, f"FP8 linears take a bf16 net, this one is {dtype} (--dtype)"
        if not ok:
            log.warning("precision %s: %s; linears run in bf16", precision.mode, why)
            lin8 = False
    mode = {(True, True): "fp8", (True, False): "fp8-attn", (False, True): "fp8-linear"}.get((attn8, lin8), "bf16")
    return precision.replace(mode=mode)


def apply_precision(net: nn.Module, precision: Precision, *,
                    quantize: Callable[[Tensor], Tensor] | None = None) -> Precision:
    """Set ``net`` up for ``precision`` (once, after its weights are loaded and it is on its device); returns the
    precision that will actually run (``resolve_precision``). Call ``set_sampling_step`` before each sampling
    step. ``quantize`` replaces torchao's weight quantizer (CPU tests: a plain-PyTorch e4m3 rounding)."""
    from .attention import Attention  # noqa: PLC0415

    bf16 = precision.block_set(len(net.blocks))
    p0 = next(net.parameters())
    effective = resolve_precision(precision, p0.device, p0.dtype, check_linears=quantize is None)
    attn8, lin8 = effective.attention_8bit, effective.linear_fp8
    quantize = quantize or quantize_weight_fp8
    for i, tb in enumerate(net.blocks.values()):
        for m in tb.modules():
            if isinstance(m, Attention):
                m.attn_8bit_enabled = attn8 and m.is_selfattn and i not in bf16
                m.attn_8bit = False
    if lin8:
        for name, m in fp8_linear_targets(net, bf16).items():
            fused = isinstance(m, Attention)  # one fused q/k/v weight, as the bf16 path's single GEMM
            w = torch.cat([m.to_q[0].weight, m.to_k[0].weight, m.to_v[0].weight]) if fused else m.weight
            if not bool(w.abs().amax(1).gt(0).all()):  # a zero row's scale would be 0: 0/0 = NaN
                log.info("precision: %s keeps bf16 (a weight row is all zeros)", name)
                continue
            if fused:
                m.register_buffer("qkv_fp8", quantize(w), persistent=False)
            else:
                Fp8Switch.convert(m, quantize)
    net.precision = net._converted_precision = effective
    set_sampling_step(net, 0 if effective.bf16_steps == 0 else -1)  # bf16 until the first step says otherwise
    if effective.mode != "bf16":
        log.info("precision %s: bf16 blocks %s, first %d step(s) in bf16", effective.mode, sorted(bf16),
                 effective.bf16_steps)
    return effective


def set_sampling_step(net: nn.Module, step: int) -> bool:
    """Switch the converted parts of ``net`` for sampling step ``step`` (0-based): bf16 before ``bf16_steps`` and
    in ``bf16_blocks``, 8-bit elsewhere. Returns whether 8-bit parts are on. Cheap: Python attribute writes, and
    only when the setting changes."""
    from .attention import Attention  # noqa: PLC0415

    precision: Precision | None = getattr(net, "precision", None)
    if precision is None:  # never converted: nothing to switch
        return False
    on = precision.mode != "bf16" and step >= precision.bf16_steps
    if getattr(net, "_precision_on", None) == (on, precision):
        return on
    bf16 = precision.block_set(len(net.blocks))
    for i, tb in enumerate(net.blocks.values()):
        attn8 = on and precision.attention_8bit and i not in bf16
        lin8 = on and precision.linear_fp8 and i not in bf16
        for m in tb.modules():
            if isinstance(m, Attention):
                m.attn_8bit = attn8 and m.attn_8bit_enabled
                m.qkv_fp8_on = lin8 and hasattr(m, "qkv_fp8")
            elif isinstance(m, Fp8Switch):
                m.fp8 = lin8
    net._precision_on = (on, precision)
    return on


def set_precision_mode(net: nn.Module, mode: str, *, bf16_blocks: tuple[int, ...] | None = None,
                       bf16_steps: int | None = None) -> Precision:
    """Run a net converted by ``apply_precision`` with some of its converted parts only: another mode (e.g. a
    bench timing "fp8-attn", "fp8-linear" and "fp8" on one net converted for "fp8"; "bf16" turns every part off),
    more bf16 blocks (any superset of the converted net's) or another ``bf16_steps``, without converting again."""
    have: Precision = getattr(net, "_converted_precision", None) or Precision("bf16", ())
    converted = hasattr(net, "_converted_precision")
    want = Precision(mode, have.bf16_blocks if bf16_blocks is None else bf16_blocks,
                     have.bf16_steps if bf16_steps is None else bf16_steps)
    if not converted or (want.attention_8bit and not have.attention_8bit) or (want.linear_fp8 and not have.linear_fp8):
        raise ValueError(f"precision mode {mode!r}: the net was converted for "
                         f"{have.mode if converted else 'nothing'!r} (apply_precision), which lacks a part it needs")
    n = len(net.blocks)
    if not have.block_set(n) <= want.block_set(n):
        raise ValueError(f"bf16_blocks={want.bf16_blocks}: blocks {sorted(have.block_set(n) - want.block_set(n))} "
                         f"were kept bf16 when the net was converted; convert again to put them in 8 bits")
    net.precision = want
    return want
