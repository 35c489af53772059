"""Guardrails of a generation (upstream's four guards, our code): a keyword blocklist and Llama-Guard-3-8B on every
prompt, a SigLIP-based content classifier on every generated frame, and RetinaFace face pixelation of what is
written. See ``core`` for the checkpoint layout and the fail-closed rules."""
from .core import (DISABLE_HINT, GUARDRAIL1, LLAMA_GUARD, GuardrailBlocked, GuardrailError, Guardrails,
                   missing_files, paths)

__all__ = ["DISABLE_HINT", "GUARDRAIL1", "LLAMA_GUARD", "GuardrailBlocked", "GuardrailError", "Guardrails",
           "missing_files", "paths"]
