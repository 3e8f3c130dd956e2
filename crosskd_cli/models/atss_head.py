"""The ATSS head: class logits, box deltas and a centerness logit read from the reg tower."""

from __future__ import annotations

from torch import Tensor, nn

from crosskd_cli.models.dense_head import DenseHead, Scale, init_predictor


class ATSSHead(DenseHead):
    """ATSS (https://arxiv.org/abs/1912.02424) predictors on the `DenseHead` towers.

    `atss_cls` -> num_classes logits, `atss_reg` -> 4 deltas (stds 0.1, 0.1, 0.2, 0.2) times
    the level's Scale, `atss_centerness` -> 1 logit, both box outputs read from the reg tower,
    as MMDetection's ATSSHead (one anchor per location, octave base scale 8).
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
        self.atss_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        init_predictor(self.atss_cls, prior_prob)
        init_predictor(self.atss_reg)
        init_predictor(self.atss_centerness)

    def predict(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> cls (B, num_classes, H, W), scaled deltas (B, 4, H, W), centerness (B, 1, H, W).

        The deltas are cast to fp32 after the Scale, as MMDetection does under mixed precision.
        """
        deltas = self.scales[level](self.atss_reg(reg_feat)).float()
        return self.atss_cls(cls_feat), deltas, self.atss_centerness(reg_feat)
