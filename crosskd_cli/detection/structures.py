"""Small containers passed between data, models, losses and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32, any other dtype as it is: losses and decoding run in fp32 under mixed
    precision, and a model built in float64 (the equivalence tests, which take rounding out of
    the question) stays in float64 end to end."""
    return t.float() if t.dtype in LOW_PRECISION else t


@dataclass
class Target:
    """Ground truth of one image, in the coordinates of the resized (unpadded) image.

    boxes: (N, 4) float32 xyxy; labels: (N,) int64 contiguous 0..C-1; image_id: COCO image id;
    orig_size: (h, w) before resizing; scale: (sx, sy) = resized / original, for mapping
    detections back to original coordinates.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int
    orig_size: tuple[int, int]
    scale: tuple[float, float]

    def to(self, device: torch.device | str) -> Target:
        return Target(
            self.boxes.to(device), self.labels.to(device), self.image_id, self.orig_size, self.scale
        )


@dataclass
class Batch:
    """A collated batch.

    images: (B, 3, H, W) uint8 RGB, zero-padded to a multiple of 32 (normalisation belongs to
    the model spec, so teacher and student each normalise the same pixels their own way);
    image_sizes: each image's unpadded (h, w) after resizing.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[Target]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=True),
            self.image_sizes,
            [t.to(device) for t in self.targets],
        )


@dataclass
class HeadOutput:
    """Raw per-level head outputs, each (B, C, H_l, W_l), levels ordered P3..P7.

    With K priors per location (9 for RetinaNet, else 1): cls_logits C = K * num_classes;
    box_preds C = K * 4 (RetinaNet/ATSS deltas; FCOS distances in pixels, exp applied), or for
    GFL 4 * (reg_max + 1) box-side distribution logits; the per-level Scale already applied.
    centerness: C = K logits (ATSS, FCOS), empty for the other families. taps: {tower name:
    per-level taps at the requested index} (pre-activation output of that block; index 0 = the
    FPN feature), empty when no tap was asked for.
    """

    cls_logits: list[Tensor]
    box_preds: list[Tensor]
    centerness: list[Tensor] = field(default_factory=list)
    taps: dict[str, list[Tensor]] = field(default_factory=dict)

    def image(self, b: int) -> HeadOutput:
        """Image `b`'s predictions as a batch of one (views, no copy; taps left out)."""
        return HeadOutput(
            [x[b : b + 1] for x in self.cls_logits],
            [x[b : b + 1] for x in self.box_preds],
            [x[b : b + 1] for x in self.centerness],
        )


@dataclass
class DetectorOutput:
    """What `Detector.forward` returns: FPN features (for PKD) and the head outputs."""

    features: list[Tensor]
    head: HeadOutput


@dataclass
class Detections:
    """Post-processed detections of one image, in resized-image coordinates.

    boxes: (K, 4) xyxy float; scores: (K,); labels: (K,) int64 contiguous.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
