"""The guardrails of a generation: prompts are checked before anything is generated, frames before anything is
written, and faces are pixelated in what is written.

Checkpoint layout under ``guardrail_dir`` (what ``python -m mvmodel.download`` fetches; upstream's layout)::

    meta-llama/Llama-Guard-3-8B/                    config.json, tokenizer, *.safetensors
    nvidia/Cosmos-Guardrail1/blocklist/             custom/, whitelist/, exact_match/, nltk_data/
    nvidia/Cosmos-Guardrail1/video_content_safety_filter/safety_filter.pt, models--google--siglip-so400m-patch14-384/
    nvidia/Cosmos-Guardrail1/face_blur_filter/Resnet50_Final.pth

Each model is loaded when its stage starts and deleted when it ends (on ``device``, or on the CPU with
``offload``), so it never shares the GPU with the DiT, T5 or the tokenizer. A guard that fails (missing or damaged
weights, out of memory, an unreadable answer) raises ``GuardrailError``: the generation stops (fail closed).
A guard that finds the content unsafe raises ``GuardrailBlocked``.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger("mvmodel.guardrail")

LLAMA_GUARD = "meta-llama/Llama-Guard-3-8B"
GUARDRAIL1 = "nvidia/Cosmos-Guardrail1"
DISABLE_HINT = ("download them with `python -m mvmodel.download --checkpoint_dir CHECKPOINT_DIR` (Llama-Guard-3-8B "
                "is gated: accept its licence on huggingface.co first), or pass --disable_guardrail to generate "
                "without guardrails")


class GuardrailError(ValueError):
    """A guard could not run (fail closed): the message names the guard."""


class GuardrailBlocked(ValueError):
    """A guard found a prompt or a video unsafe: the message names the guard and the reason."""


def paths(guardrail_dir: str | Path) -> dict[str, Path]:
    root = Path(guardrail_dir)
    g1 = root / GUARDRAIL1
    return {"llama_guard": root / LLAMA_GUARD, "blocklist": g1 / "blocklist",
            "video_filter": g1 / "video_content_safety_filter",
            "retinaface": g1 / "face_blur_filter" / "Resnet50_Final.pth"}


def missing_files(guardrail_dir: str | Path) -> list[str]:
    """What the guardrails need and ``guardrail_dir`` lacks (cheap: no model is read)."""
    from .video_filter import SIGLIP_CACHE

    p = paths(guardrail_dir)
    need = [p["llama_guard"] / "config.json", p["llama_guard"] / "tokenizer_config.json",
            p["blocklist"] / "custom", p["blocklist"] / "whitelist", p["blocklist"] / "exact_match",
            p["blocklist"] / "nltk_data",
            p["video_filter"] / "safety_filter.pt", p["retinaface"]]
    out = [str(f) for f in need if not f.exists()]
    if not any(p["llama_guard"].glob("*.safetensors")):
        out.append(f"{p['llama_guard']}/*.safetensors")
    if not any((p["video_filter"] / SIGLIP_CACHE / "snapshots").glob("*/config.json")):
        out.append(f"{p['video_filter'] / SIGLIP_CACHE}/snapshots/*/config.json")
    return out


def _first_line(exc: BaseException) -> str:
    """``Type: first line with words`` (some libraries frame their messages with rules of asterisks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if any(c.isalpha() for c in ln)]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Guardrails:
    """Prompt and video guards over the checkpoints of ``guardrail_dir``.

    ``device``: where the models run (the generation's device); ``offload``: keep them on the CPU instead.
    The ``make_*`` arguments replace how a guard is built (tests pass small models with the real code around them).
    """

    def __init__(self, guardrail_dir: str | Path, device: torch.device | str = "cpu", offload: bool = False, *,
                 make_blocklist: Callable | None = None, make_llama_guard: Callable | None = None,
                 make_video_filter: Callable | None = None, make_face_filter: Callable | None = None):
        self.dir = Path(guardrail_dir)
        self.device = torch.device("cpu") if offload else torch.device(device)
        self.p = paths(self.dir)
        self.make = {"blocklist": make_blocklist, "llama_guard": make_llama_guard,
                     "video_filter": make_video_filter, "face_filter": make_face_filter}
        self.timings: dict[str, float] = {}
        if not any(self.make.values()):
            missing = missing_files(self.dir)
            if missing:
                raise GuardrailError(f"guardrail checkpoints missing under {self.dir}: {', '.join(missing[:3])}"
                                     f"{' ...' if len(missing) > 3 else ''}; {DISABLE_HINT}")

    def _build(self, key: str, name: str):
        t0 = time.perf_counter()
        try:
            if self.make[key] is not None:
                guard = self.make[key](self.device)
            elif key == "blocklist":
                from .blocklist import Blocklist
                guard = Blocklist(self.p["blocklist"])
            elif key == "llama_guard":
                from .llama_guard import LlamaGuard3
                guard = LlamaGuard3(self.p["llama_guard"], self.device)
            elif key == "video_filter":
                from .video_filter import VideoContentSafetyFilter
                guard = VideoContentSafetyFilter(self.p["video_filter"], self.device)
            else:
                from .face_blur import RetinaFaceFilter
                guard = RetinaFaceFilter(self.p["retinaface"], self.device)
        except Exception as exc:  # noqa: BLE001 - any failure to load stops the generation (fail closed)
            _free(self.device)
            raise GuardrailError(f"guardrail {name} could not be loaded ({_first_line(exc)})") from exc
        self.timings[f"load {name}"] = self.timings.get(f"load {name}", 0.0) + time.perf_counter() - t0
        return guard

    def _run(self, name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - an error is not a pass (upstream passes Llama Guard errors)
            raise GuardrailError(f"guardrail {name} failed ({_first_line(exc)})") from exc
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def check_prompts(self, prompts: Sequence[tuple[str, str]]) -> None:
        """``prompts``: (what, text) pairs, e.g. ("video 0, left camera", "..."). Raises GuardrailBlocked naming
        the first unsafe one. The blocklist runs on all of them before Llama Guard is loaded."""
        distinct: dict[str, str] = {}
        for what, text in prompts:
            distinct.setdefault(text, what)
        for key, name in (("blocklist", "blocklist"), ("llama_guard", "Llama Guard 3")):
            guard = self._build(key, name)
            try:
                for text, what in distinct.items():
                    safe, reason = self._run(name, guard.is_safe, text)
                    if not safe:
                        raise GuardrailBlocked(f"{name} blocked the prompt of {what}: {reason}")
            finally:
                del guard
                _free(self.device)

    def check_video(self, views: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """uint8 [V, T, H, W, 3] with a name per view -> the same with faces pixelated. Raises GuardrailBlocked
        naming the view and frame when the content filter finds one unsafe."""
        V, T = views.shape[:2]
        flat = views.reshape(V * T, *views.shape[2:])
        guard = self._build("video_filter", "video content safety filter")
        try:
            hit = self._run("video content safety filter", guard.first_unsafe, flat)
        finally:
            del guard
            _free(self.device)
        if hit is not None:
            i, cls = hit
            raise GuardrailBlocked(f"video content safety filter blocked the video: {names[i // T]}, frame {i % T} "
                                   f"classified {cls}")
        guard = self._build("face_filter", "face blur filter")
        try:
            out, faces = self._run("face blur filter", guard.pixelate_faces, flat)
        finally:
            del guard
            _free(self.device)
        if faces:
            log.info("guardrail: pixelated %d face region(s) in %d frames", faces, V * T)
        return out.reshape(views.shape)
