"""Train and test transforms on torchvision.transforms.v2, with tv_tensors boxes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

MIN_BOX_SIZE = 1.0  # px after resizing; narrower or shorter boxes are degenerate and dropped


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) resized to fit `scale` = (long side max, short side max), keeping the ratio.

    MMDetection's rule, so imported teachers see the pixels they were trained on:
    factor = min(long_max / max(h, w), short_max / min(h, w)), sizes rounded half up.
    The order of `scale` does not matter: (1333, 800) and (800, 1333) are the same limit.
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class KeepRatioResize(v2.Transform):
    """Resize the image and its boxes together to `keep_ratio_size`.

    Bilinear without antialiasing, like the OpenCV resize MMDetection uses. The only transform
    at test time, so train-time evaluation and `crosskd eval` resize identically.
    """

    def __init__(self, scale: tuple[int, int]) -> None:
        super().__init__()
        self.scale = scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"size": list(keep_ratio_size(height, width, self.scale))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=False)


def build_transforms(train: bool, scale: tuple[int, int], flip_prob: float = 0.5) -> v2.Compose:
    """Resize (and, when training, flip with probability `flip_prob` drawn from torch's RNG),
    then clamp boxes to the image and drop those that became degenerate.

    `scale` is one (long, short) limit; multi-scale training would pick one per image here.
    """
    steps: list[v2.Transform] = [KeepRatioResize(scale)]
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIZE, labels_getter="default"),
    ]
    return v2.Compose(steps)


def transform_sample(
    transforms: v2.Compose, image: Tensor, boxes: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """image (3, H, W) uint8, boxes (N, 4) xyxy float, labels (N,) -> the transformed triple,
    as plain tensors (boxes may lose rows, labels the same rows)."""
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
        "labels": labels,
    }
    out = transforms(sample)
    return (
        out["image"].as_subclass(torch.Tensor),
        out["boxes"].as_subclass(torch.Tensor),
        out["labels"],
    )
