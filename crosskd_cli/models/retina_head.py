"""The RetinaNet head: per-anchor class logits and box deltas, towers without a norm."""

from __future__ import annotations

from torch import Tensor, nn

from crosskd_cli.models.dense_head import DenseHead, init_predictor


class RetinaHead(DenseHead):
    """RetinaNet (https://arxiv.org/abs/1708.02002) predictors on the `DenseHead` towers.

    Tower blocks are conv3x3 (with bias) -> ReLU, no norm. `retina_cls`: 3x3 conv ->
    num_anchors * num_classes logits; `retina_reg`: 3x3 conv -> num_anchors * 4 deltas
    (MMDetection's DeltaXYWHBBoxCoder, means 0, stds 1). No per-level Scale.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        num_anchors: int = 9,
        norm_groups: int | None = None,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(in_channels, feat_channels, stacked_convs, num_levels, norm_groups)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        channels = self.predictor_channels
        self.retina_cls = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        init_predictor(self.retina_cls, prior_prob)
        init_predictor(self.retina_reg)

    def predict(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int
    ) -> tuple[Tensor, Tensor, None]:
        """-> cls (B, A*num_classes, H, W), deltas (B, A*4, H, W), no centerness."""
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat), None
