"""RetinaFace with a ResNet-50 body (the network of ``Resnet50_Final.pth``), its priors, box decoding and NMS.

Written in plain torch (torchvision is not a dependency) with the module names of the released checkpoint:
``body.*`` (ResNet-50 stem and layer1-4, torchvision's Bottleneck naming), ``fpn.output{1,2,3}`` / ``fpn.merge{1,2}``,
``ssh{1,2,3}.conv3X3 / conv5X5_1 / conv5X5_2 / conv7X7_2 / conv7x7_3`` and ``{Class,Bbox,Landmark}Head.{0,1,2}
.conv1x1``. Settings of the R50 model: feature strides 8/16/32, anchors 16,32 / 64,128 / 256,512 px (2 per cell),
variances 0.1/0.2, 256 FPN channels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)


def _conv_bn(cin, cout, k, stride=1, act: float | None = 0.0):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(nn.LeakyReLU(act, inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or cin != out else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """ResNet-50 up to layer4, returning the layer2/3/4 maps (strides 8, 16, 32)."""

    def __init__(self, width: int = 64, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, (n, planes) in enumerate(zip(blocks, (width, width * 2, width * 4, width * 8))):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(cin, planes, 2 if (b == 0 and i > 0) else 1))
                cin = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return c2, c3, self.layer4(c3)


class FPN(nn.Module):
    def __init__(self, cins, cout):
        super().__init__()
        leaky = 0.1 if cout <= 64 else 0.0
        self.output1, self.output2, self.output3 = (_conv_bn(c, cout, 1, act=leaky) for c in cins)
        self.merge1 = _conv_bn(cout, cout, 3, act=leaky)
        self.merge2 = _conv_bn(cout, cout, 3, act=leaky)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return o1, o2, o3


class SSH(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        leaky = 0.1 if cout <= 64 else 0.0
        self.conv3X3 = _conv_bn(cin, cout // 2, 3, act=None)
        self.conv5X5_1 = _conv_bn(cin, cout // 4, 3, act=leaky)
        self.conv5X5_2 = _conv_bn(cout // 4, cout // 4, 3, act=None)
        self.conv7X7_2 = _conv_bn(cout // 4, cout // 4, 3, act=leaky)
        self.conv7x7_3 = _conv_bn(cout // 4, cout // 4, 3, act=None)

    def forward(self, x):
        a = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(a), self.conv7x7_3(self.conv7X7_2(a))], 1))


class _Head(nn.Module):
    def __init__(self, cin, anchors, per_anchor):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """BGR mean-subtracted float [N, 3, H, W] -> (box offsets [N, P, 4], face probability [N, P]) over the priors.

    ``width`` 64 / ``fpn`` 256 is the released R50; tests build smaller ones with the same structure."""

    def __init__(self, width: int = 64, fpn: int = 256, blocks=(3, 4, 6, 3), anchors: int = 2):
        super().__init__()
        self.body = ResNetBody(width, blocks)
        c = width * Bottleneck.expansion
        self.fpn = FPN((c * 2, c * 4, c * 8), fpn)
        self.ssh1, self.ssh2, self.ssh3 = SSH(fpn, fpn), SSH(fpn, fpn), SSH(fpn, fpn)
        self.ClassHead = nn.ModuleList(_Head(fpn, anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(fpn, anchors, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(fpn, anchors, 10) for _ in range(3))  # loaded, not used

    def forward(self, x):
        feats = self.fpn(self.body(x))
        feats = (self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2]))
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1)
        return loc, conf.softmax(-1)[..., 1]


def load_retinaface(path: str | Path) -> RetinaFace:
    """``Resnet50_Final.pth`` (keys possibly prefixed ``module.``, or under ``state_dict``) -> the net. Unlike
    upstream's non-strict load, every tensor of the net must be present with its shape."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    net = RetinaFace()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not the RetinaFace-R50 checkpoint ({' '.join(str(exc).split())[:300]})") from None
    return net.eval().requires_grad_(False)


def priors(height: int, width: int) -> torch.Tensor:
    """Anchor boxes [P, 4] (cx, cy, w, h as fractions of the image), in the heads' output order: per level, per
    cell row-major, per anchor size."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(fh, dtype=torch.float64) + 0.5) * step / height,
                                (torch.arange(fw, dtype=torch.float64) + 0.5) * step / width, indexing="ij")
        for_cell = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cx, s / height)], -1)
                    for s in sizes]
        out.append(torch.stack(for_cell, 2).reshape(-1, 4))
    return torch.cat(out).float()


def decode(loc: torch.Tensor, prior: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Offsets [..., P, 4] -> boxes [..., P, 4] (x1, y1, x2, y2 in pixels)."""
    centre = prior[:, :2] + loc[..., :2] * VARIANCES[0] * prior[:, 2:]
    size = prior[:, 2:] * torch.exp(loc[..., 2:] * VARIANCES[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    return boxes * boxes.new_tensor([width, height, width, height])


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression with the +1 pixel area convention of the RetinaFace code."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep
