"""mvkernels: fused kernels of mvworld (C++/CUDA extension ``mvkernels._C`` and Triton).

Every op has a plain-PyTorch reference beside it and is registered as a ``torch.library`` custom op in the
``mvkernels`` namespace. Backend choice: ``MVKERNELS_BACKEND=auto|csrc|triton|reference``.
"""
from ._ext import build_info, check_import as _check_import
from .ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .ops.mv_attention import mv_attention, mv_attention_reference
from .ops.mv_attention_int8 import mv_attention_int8, mv_attention_int8_reference
from .ops.rope3d import rope3d_angles

_check_import()

__all__ = ["build_info", "qk_norm_rope", "qk_norm_rope_reference", "rope3d_angles", "mv_attention",
           "mv_attention_reference", "mv_attention_int8", "mv_attention_int8_reference"]
