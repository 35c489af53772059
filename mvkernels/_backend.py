"""Backend choice for every op: ``MVKERNELS_BACKEND=auto|csrc|triton|reference``.

* ``csrc``      our C++/CUDA extension (CUDA kernels on GPU tensors, its CPU build on CPU tensors);
* ``triton``    Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
* ``reference`` the plain-PyTorch reference that lives beside each op;
* ``auto``      the fastest backend an op has for the tensors' device (each op lists its preference).

Forcing a backend an op does not have, or one that cannot run on the given tensors, raises a clear error
instead of silently falling back: a user who forces ``triton`` wants to know they are not getting it.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "csrc", "triton", "reference")
_log = logging.getLogger("mvkernels")
_logged: set[tuple[str, str, str]] = set()


def requested_backend() -> str:
    name = os.environ.get("MVKERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MVKERNELS_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def csrc_usable(device: torch.device) -> bool:
    from . import _ext

    return _ext.has_cpu() if device.type == "cpu" else (device.type == "cuda" and _ext.has_cuda())


def select(op: str, device: torch.device, available: dict[str, bool], auto_order: tuple[str, ...]) -> str:
    """Pick the backend for ``op`` on ``device``.

    ``available`` maps each backend the op implements to whether it can run these inputs; ``auto_order``
    is the op's preference when nothing is forced. Logs the choice once per (op, device type, backend).
    """
    want = requested_backend()
    if want == "auto":
        chosen = next((b for b in auto_order if available.get(b, False)), None)
        if chosen is None:
            raise RuntimeError(f"mvkernels.{op}: no backend can run on device {device} (tried {auto_order})")
    else:
        if want not in available:
            raise RuntimeError(
                f"mvkernels.{op} has no '{want}' backend (MVKERNELS_BACKEND={want}); it has: {', '.join(available)}"
            )
        if not available[want]:
            hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if want == "triton" else ""
            raise RuntimeError(f"mvkernels.{op}: backend '{want}' cannot run on device {device}{hint}")
        chosen = want
    key = (op, device.type, chosen)
    if key not in _logged:
        _logged.add(key)
        _log.info("mvkernels.%s on %s uses the %s backend", op, device.type, chosen)
    return chosen
