"""The FCOS head: class logits, exp-scaled side distances and a centerness logit (cls tower)."""

from __future__ import annotations

from torch import Tensor, nn

from crosskd_cli.models.dense_head import DenseHead, Scale, init_predictor


class FCOSHead(DenseHead):
    """FCOS (https://arxiv.org/abs/1904.01355) predictors on the `DenseHead` towers.

    `conv_cls` -> num_classes logits; `conv_reg` -> 4 distances (left, top, right, bottom) in
    pixels as exp(Scale(x)); `conv_centerness` -> 1 logit read from the cls tower. This is
    MMDetection's FCOSHead with norm_on_bbox, centerness_on_reg and centre sampling off, the
    configuration of its `fcos_r50-caffe_fpn_gn-head` models.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        norm_groups: int | None = 32,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(in_channels, feat_channels, stacked_convs, num_levels, norm_groups)
        self.num_classes = num_classes
        channels = self.predictor_channels
        self.conv_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        init_predictor(self.conv_cls, prior_prob)
        init_predictor(self.conv_reg)
        init_predictor(self.conv_centerness)

    def predict(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> cls (B, num_classes, H, W), distances (B, 4, H, W) > 0, centerness (B, 1, H, W).

        exp runs in fp32 (MMDetection casts before it) so mixed precision cannot overflow it.
        """
        distances = self.scales[level](self.conv_reg(reg_feat)).float().exp()
        return self.conv_cls(cls_feat), distances, self.conv_centerness(cls_feat)
