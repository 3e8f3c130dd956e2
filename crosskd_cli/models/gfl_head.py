"""The GFL head (Generalized Focal Loss): class logits and box-side distributions."""

from __future__ import annotations

from torch import Tensor, nn

from crosskd_cli.models.dense_head import DenseHead, Scale, init_predictor


class GFLHead(DenseHead):
    """GFL predictors on top of the shared `DenseHead` towers.

    `gfl_cls`: 3x3 conv -> num_classes logits (joint class-quality scores), bias set so every
    score starts at `prior_prob`. `gfl_reg`: 3x3 conv -> 4 * (reg_max + 1) logits, one
    distribution over 0..reg_max per box side (left, top, right, bottom), times the level's
    learnable `scales[level]`. Tower and predictor weights ~ N(0, 0.01), as MMDetection.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        norm_groups: int = 32,
        reg_max: int = 16,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(in_channels, feat_channels, stacked_convs, num_levels, norm_groups)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.gfl_cls = nn.Conv2d(self.predictor_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(self.predictor_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        init_predictor(self.gfl_cls, prior_prob)
        init_predictor(self.gfl_reg)

    def predict(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int
    ) -> tuple[Tensor, Tensor, None]:
        """Tower outputs (B, C, H, W) -> cls (B, num_classes, H, W), box (B, 4*(reg_max+1), H, W).

        The box logits are multiplied by the level's Scale (MMDetection applies it before the
        distribution's softmax, so imported weights reproduce the original predictions).
        """
        return self.gfl_cls(cls_feat), self.scales[level](self.gfl_reg(reg_feat)), None
