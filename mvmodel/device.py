"""The ``--device`` check every CLI makes before any work: a wrong device is one line, not a traceback later."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None, arg: str = "--device") -> torch.device:
    """``None`` or "auto": cuda when available, else cpu. "cpu", "cuda", "cuda:N": checked against what PyTorch
    sees. Raises ValueError naming ``arg`` and what is expected."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As the user wrote it: "--device cuda" for a flag, "trainer.device=cuda" for a config key.
    given = f"{arg} {name}" if arg.startswith("-") else f"{arg}={name}"
    use_cpu = f"{arg} cpu" if arg.startswith("-") else f"{arg}=cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{given}: not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{given}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{given}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
                             f"use {use_cpu} or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{given}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev
