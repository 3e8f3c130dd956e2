"""Train and test transforms on torchvision.transforms.v2, with tv_tensors boxes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from crosskd_cli.errors import DataError

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
    at test time, so train-time evaluation and `crosskd eval` resize identically. With
    `short_sides` = (lo, hi) the short-side limit is drawn per image (torch's RNG) while the
    long-side limit stays scale's: any integer in lo..hi with `multiscale="range"`
    (MMDetection's `RandomResize`), lo or hi with `multiscale="choice"` (`RandomChoiceResize`
    of two scales, MMDetection's FCOS ms-640-800 recipe).
    """

    def __init__(
        self,
        scale: tuple[int, int],
        short_sides: tuple[int, int] | None = None,
        multiscale: str = "range",
    ) -> None:
        super().__init__()
        self.scale = scale
        self.short_sides = short_sides
        self.multiscale = multiscale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.scale
        if self.short_sides is not None:
            low, high = self.short_sides
            if self.multiscale == "choice":
                short = (low, high)[int(torch.randint(0, 2, ()).item())]
            else:
                short = int(torch.randint(low, high + 1, ()).item())
            scale = (max(scale), short)
        return {"size": list(keep_ratio_size(height, width, scale))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=False)


def build_transforms(
    train: bool,
    scale: tuple[int, int],
    flip_prob: float = 0.5,
    short_sides: tuple[int, int] | None = None,
    multiscale: str = "range",
) -> v2.Compose:
    """Resize (multi-scale over `short_sides`, as `multiscale` says, when training and
    given), flip with probability
    `flip_prob` when training (both drawn from torch's RNG), then clamp boxes to the image and
    drop those that became degenerate."""
    if short_sides is not None and not 0 < short_sides[0] <= short_sides[1]:
        raise DataError(
            f"data.train_short_sides {list(short_sides)} is not a range of sides.",
            hint="Give [low, high] with 0 < low <= high, e.g. --set data.train_short_sides="
            "[640,800].",
        )
    steps: list[v2.Transform] = [KeepRatioResize(scale, short_sides if train else None, multiscale)]
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
