"""Box coders: how a family's box predictions become boxes, as MMDetection's coders do it.

A criterion owns one (as torchvision's detection models own a `box_coder`), and test-time
post-processing asks the family for the same one, so training and inference decode alike.
Coders are frozen dataclasses: two heads decode alike exactly when their coders are equal,
which is what the pair check compares.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from crosskd_cli.detection.box_ops import decode_deltas, distance_to_bbox, encode_deltas, integral


def prior_centers(priors: Tensor) -> Tensor:
    """(..., 4) xyxy priors -> (..., 2) centres (FCOS points are zero-size boxes)."""
    return (priors[..., :2] + priors[..., 2:]) / 2


@dataclass(frozen=True)
class DeltaCoder:
    """MMDetection's DeltaXYWHBBoxCoder with means 0: (dx, dy, dw, dh) / stds from the anchor.

    RetinaNet uses stds 1, ATSS 0.1, 0.1, 0.2, 0.2; decoding clamps log(w / w_anchor).
    """

    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    box_channels = 4  # predictions per prior

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        return encode_deltas(anchors, boxes, self.stds)

    def decode(
        self, priors: Tensor, strides: Tensor, preds: Tensor, max_shape: Tensor | None = None
    ) -> Tensor:
        """priors (..., 4), strides (...), deltas (..., 4) -> xyxy boxes; clamped with max_shape."""
        return decode_deltas(priors, preds, self.stds, max_shape)


@dataclass(frozen=True)
class DistributionCoder:
    """GFL: per side a distribution over 0..reg_max bins; its mean times the stride is the
    distance from the anchor centre."""

    reg_max: int = 16

    @property
    def box_channels(self) -> int:
        return 4 * (self.reg_max + 1)

    def decode(
        self, priors: Tensor, strides: Tensor, preds: Tensor, max_shape: Tensor | None = None
    ) -> Tensor:
        distances = integral(preds, self.reg_max) * strides[..., None]
        return distance_to_bbox(prior_centers(priors), distances, max_shape)


@dataclass(frozen=True)
class DistanceCoder:
    """FCOS: the head predicts (left, top, right, bottom) distances in pixels from the point."""

    box_channels = 4

    def decode(
        self, priors: Tensor, strides: Tensor, preds: Tensor, max_shape: Tensor | None = None
    ) -> Tensor:
        return distance_to_bbox(prior_centers(priors), preds, max_shape)


BoxCoder = DeltaCoder | DistributionCoder | DistanceCoder
