"""Loads the compiled extension ``mvkernels._C`` once and says what it was built with."""
from __future__ import annotations

import warnings

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # an uninstalled source tree, or a broken build
    _C = None
    _import_error = exc
else:
    _import_error = None

_warned = False


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(_C.build_info()["cuda_archs"])


def lib():
    """The extension module; raises with the reason it is missing."""
    if _C is None:
        raise RuntimeError(f"mvkernels._C is not built ({_import_error}); reinstall with `pip install .`")
    return _C


def build_info() -> dict:
    """What the extension was compiled with: ``cuda_archs`` (list of str), ``cuda_version``, ``cpu``."""
    if _C is None:
        return {"cuda_archs": [], "cuda_version": None, "cpu": False, "error": str(_import_error)}
    info = dict(_C.build_info())
    info["cuda_archs"] = list(info["cuda_archs"])
    return info


def check_import() -> None:
    if _C is None:
        _warn_once(f"mvkernels: compiled extension missing ({_import_error}); csrc kernels unavailable")
    elif not has_cuda() and _gpu_visible():
        # Only where it costs speed: a CPU-only build (no nvcc, or MVWORLD_SKIP_CUDA=1) on a machine without a GPU
        # is the intended install, and a warning there would be noise in every command's output.
        _warn_once("mvkernels: extension built without CUDA kernels (CPU path only) on a machine with a CUDA GPU; "
                   "reinstall with nvcc on PATH to build them")


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()
