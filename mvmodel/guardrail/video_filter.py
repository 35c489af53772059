"""Video content safety filter: SigLIP-so400m-384 image features -> a 7-class classifier, per frame.

Files (``Cosmos-Guardrail1/video_content_safety_filter/``): ``safety_filter.pt`` = ``{"model": state_dict}`` of
``SafetyClassifier`` (keys ``network.layers.{0,1,3,4,6}.*``: Linear 1152-512, BatchNorm, ReLU, Linear 512-256,
BatchNorm, ReLU, Linear 256-7), and the SigLIP model in a Hugging Face cache layout
(``models--google--siglip-so400m-patch14-384/snapshots/<revision>/``), as upstream's ``cache_dir`` download leaves it.

Each frame is resized to 384 x 384 (bicubic, antialiased: the SigLIP processor's PIL resize done in torch on the
guard's device), scaled to [-1, 1] (mean = std = 0.5), encoded by the vision tower (the pooled output is SigLIP's
``get_image_features``), L2-normalised and classified; any frame whose arg-max class is not Safe makes the video
unsafe. Frames are independent (BatchNorm in eval mode), so they are run in batches and the first unsafe one is
reported, the decision upstream's frame-by-frame loop makes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("Safe", "Sexual_Content", "Violence", "Drugs", "Child_Abuse", "Hate_and_Harassment", "Self-Harm")
SIGLIP_CACHE = "models--google--siglip-so400m-patch14-384"
FEATURES = 1152
BATCH = 32


class _Layers(nn.Module):
    def __init__(self, input_size: int = FEATURES, num_classes: int = len(CLASSES)):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                    nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                    nn.Linear(256, num_classes))

    def forward(self, x):
        return self.layers(x)


class SafetyClassifier(nn.Module):
    """The classifier with upstream's key names (``network.layers.N.*``); logits [N, 7] from features [N, 1152]."""

    def __init__(self, input_size: int = FEATURES, num_classes: int = len(CLASSES)):
        super().__init__()
        self.network = _Layers(input_size, num_classes)

    def forward(self, x):
        return self.network(x)


def load_classifier(path: str | Path) -> SafetyClassifier:
    """``safety_filter.pt`` -> the classifier; wrong keys or shapes are a one-line error naming the file."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not isinstance(sd.get("model"), dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict")
    net = SafetyClassifier()
    try:
        net.load_state_dict(sd["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: not the safety classifier ({' '.join(str(exc).split())[:300]})") from None
    return net.eval().requires_grad_(False)


def siglip_snapshot(folder: str | Path) -> Path:
    """The SigLIP snapshot folder (one with config.json) in the HF cache layout under ``folder``."""
    snaps = sorted(p.parent for p in (Path(folder) / SIGLIP_CACHE / "snapshots").glob("*/config.json"))
    if not snaps:
        raise FileNotFoundError(f"{Path(folder) / SIGLIP_CACHE}/snapshots/*/config.json not found")
    return snaps[-1]


def preprocess(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> float [N, 3, size, size] in [-1, 1]."""
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 255) / 255.0 - 0.5) / 0.5


class VideoContentSafetyFilter:
    """``first_unsafe(frames) -> (index, class name) | None`` over uint8 [N, H, W, 3] frames."""

    name = "video content safety filter"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import SiglipVisionModel
        from transformers.utils import logging as hf_logging

        folder = Path(folder)
        self.device = torch.device(device)
        # The vision tower alone: get_image_features is its pooled output, and the text tower is not needed (its
        # weights in the file are skipped; transformers would list each of them as unexpected, hence the quiet).
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.encoder = SiglipVisionModel.from_pretrained(str(siglip_snapshot(folder)), local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
        self.encoder.to(self.device, torch.float32).eval().requires_grad_(False)
        self.size = int(self.encoder.config.image_size)
        self.classifier = load_classifier(folder / "safety_filter.pt").to(self.device)

    @classmethod
    def from_modules(cls, encoder, classifier: SafetyClassifier, device: torch.device | str = "cpu"):
        """The filter around already-built models (a ``SiglipVisionModel`` and the classifier): benchmarks."""
        self = cls.__new__(cls)
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device, torch.float32).eval().requires_grad_(False)
        self.size = int(encoder.config.image_size)
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)
        return self

    @torch.inference_mode()
    def classify(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> class index [N] (CPU)."""
        x = preprocess(frames.to(self.device), self.size)
        feats = self.encoder(pixel_values=x).pooler_output.float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return self.classifier(feats).argmax(-1).cpu()

    def first_unsafe(self, frames: torch.Tensor) -> tuple[int, str] | None:
        for start in range(0, frames.shape[0], BATCH):
            cls = self.classify(frames[start:start + BATCH])
            bad = (cls != 0).nonzero()
            if len(bad):
                i = int(bad[0])
                return start + i, CLASSES[int(cls[i])]
        return None
