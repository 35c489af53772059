"""Face pixelation: RetinaFace-R50 detections -> every face of at least 20 x 20 px turned into 5 x 5 blocks.

Upstream's ``RetinaFaceFilter`` decisions: frames are RGB->BGR with the mean (104, 117, 123) subtracted at full
resolution; detections with face probability > 0.7 are kept (at most 5000, best first), NMS at IoU 0.4 keeps at
most 750; each box (coordinates truncated to int) narrower or shorter than 20 px is skipped; the box, clipped to the
frame, is resized to 5 x 5 (bilinear, as cv2 INTER_LINEAR without antialiasing) and back (nearest, as cv2
INTER_NEAREST). Frames are run in batches (eval-mode BatchNorm: same detections as upstream's batch of 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .retinaface import MEAN_BGR, RetinaFace, decode, load_retinaface, nms, priors

CONFIDENCE = 0.7
NMS_IOU = 0.4
TOP_K = 5000
KEEP_TOP_K = 750
MIN_FACE = 20
BLOCKS = 5
BATCH = 8


def filter_boxes(boxes: np.ndarray, scores: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """Boxes [P, 4] and scores [P] -> the kept boxes [K, 4], best first."""
    idx = np.nonzero(scores > confidence)[0]
    boxes, scores = boxes[idx], scores[idx]
    order = scores.argsort()[::-1][:TOP_K]
    boxes, scores = boxes[order], scores[order]
    return boxes[nms(boxes, scores, NMS_IOU)][:KEEP_TOP_K]


def pixelate(roi: torch.Tensor, blocks: int = BLOCKS) -> torch.Tensor:
    """uint8 [h, w, 3] -> the same size in blocks x blocks cells."""
    h, w = roi.shape[:2]
    x = roi.permute(2, 0, 1)[None].float()
    small = F.interpolate(x, size=(blocks, blocks), mode="bilinear", align_corners=False).round()
    return F.interpolate(small, size=(h, w), mode="nearest")[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8)


def pixelate_boxes(frame: torch.Tensor, boxes: np.ndarray, min_size: int = MIN_FACE) -> int:
    """Pixelate every box of at least ``min_size`` in ``frame`` (uint8 [H, W, 3], in place); -> faces pixelated."""
    H, W = frame.shape[:2]
    n = 0
    for box in boxes:
        x1, y1, x2, y2 = (int(v) for v in box)
        if x2 - x1 < min_size or y2 - y1 < min_size:
            continue
        ya, yb, xa, xb = max(y1, 0), min(y2, H), max(x1, 0), min(x2, W)
        if yb <= ya or xb <= xa:
            continue
        frame[ya:yb, xa:xb] = pixelate(frame[ya:yb, xa:xb])
        n += 1
    return n


class RetinaFaceFilter:
    """``pixelate_faces(frames) -> (frames, faces)`` over uint8 [N, H, W, 3] RGB frames (a copy is returned)."""

    name = "face blur filter"

    def __init__(self, checkpoint: str | Path | RetinaFace, device: torch.device | str = "cpu"):
        net = checkpoint if isinstance(checkpoint, RetinaFace) else load_retinaface(checkpoint)
        self.device = torch.device(device)
        self.net = net.to(self.device, torch.float32).eval().requires_grad_(False)

    @torch.inference_mode()
    def detect(self, frames: torch.Tensor) -> list[np.ndarray]:
        """uint8 [N, H, W, 3] RGB -> per frame the kept boxes [K, 4] in pixels."""
        H, W = frames.shape[1:3]
        prior = priors(H, W).to(self.device)
        mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        out = []
        for start in range(0, frames.shape[0], BATCH):
            x = frames[start:start + BATCH].to(self.device).permute(0, 3, 1, 2).flip(1).float() - mean
            loc, score = self.net(x)
            boxes = decode(loc, prior, H, W)
            for b, s in zip(boxes, score):
                keep = s > CONFIDENCE  # only candidates leave the GPU
                out.append(filter_boxes(b[keep].cpu().numpy(), s[keep].cpu().numpy()))
        return out

    def pixelate_faces(self, frames: torch.Tensor) -> tuple[torch.Tensor, int]:
        frames = frames.clone()
        faces = sum(pixelate_boxes(f, boxes) for f, boxes in zip(frames, self.detect(frames)))
        return frames, faces
