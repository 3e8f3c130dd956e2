"""torchvision's MobileNetV2 as a C3-C5 backbone, cut at MMDetection's out_indices (2, 4, 6)."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from crosskd_cli.errors import ModelError
from crosskd_cli.models.backbones import Backbone

# Inverted residual blocks per layer (the `n` column of torchvision's and MMDetection's
# arch settings); features[0] is the stem, layer k is the next LAYER_BLOCKS[k - 1] features.
LAYER_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
LAYER_ENDS = tuple(sum(LAYER_BLOCKS[: k + 1]) for k in range(len(LAYER_BLOCKS)))  # 1, 3, ..., 17
# C3, C4, C5 are the outputs of layer3 (32 ch, stride 8), layer5 (96, 16) and layer7 (320, 32):
# MMDetection's out_indices (2, 4, 6) count its layers from 0.
OUT_LAYERS = (3, 5, 7)


class MobileNetV2Backbone(Backbone):
    """torchvision `mobilenet_v2(...).features[:18]`, returning [C3, C4, C5] (32, 96, 320 ch).

    Parameter names are torchvision's (`features.0.0.weight`, `features.14.conv.1.1.bias`, ...).
    features[18], the 1280-channel 1x1 conv that only feeds the classifier (MMDetection's
    `conv2`), is dropped, so a torchvision state dict loads once `features.18.*` and
    `classifier.*` are ignored.

    frozen_stages follows MMDetection's numbering: -1 freezes nothing, 0 the stem (conv1 =
    features[0]), k in 1..7 the stem and layer1..layerk. Frozen modules get
    requires_grad=False and stay in eval mode. (MMDetection leaves the stem in train mode, so
    its BN statistics still move while its weights are frozen; here they stay still, as for
    ResNet.) norm_eval keeps every BatchNorm in eval mode.
    """

    torchvision_arch = "mobilenet_v2"
    torchvision_ignored = ("features.18.", "classifier.")

    def __init__(
        self,
        mobilenet: torchvision.models.MobileNetV2,
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= len(LAYER_BLOCKS):
            raise ModelError(
                f"frozen_stages={frozen_stages} is out of range for a MobileNetV2.",
                hint="Use -1 (nothing frozen), 0 (stem) or 1..7 (stem and layer1..layerk, "
                "MMDetection's numbering).",
            )
        self.name = "mobilenet_v2"
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.features = mobilenet.features[: LAYER_ENDS[-1] + 1]  # keeps keys "0".."17"
        self.out_channels = tuple(self.features[LAYER_ENDS[k - 1]].out_channels for k in OUT_LAYERS)
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the features of layer1..layer`frozen_stages`, in forward order."""
        if self.frozen_stages < 0:
            return []
        end = LAYER_ENDS[self.frozen_stages - 1] if self.frozen_stages else 0
        return list(self.features[: end + 1])

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C3, C4, C5] at strides 8, 16, 32."""
        taps = {LAYER_ENDS[k - 1] for k in OUT_LAYERS}
        outs = []
        x = images
        for index, feature in enumerate(self.features):
            x = feature(x)
            if index in taps:
                outs.append(x)
        return outs


def mobilenet_v2(frozen_stages: int = -1, norm_eval: bool = False) -> MobileNetV2Backbone:
    """torchvision mobilenet_v2 (width 1.0) as a C3-C5 backbone, randomly initialised."""
    # weights=None: never download; pretrained weights come from a local file
    return MobileNetV2Backbone(
        torchvision.models.mobilenet_v2(weights=None), frozen_stages, norm_eval
    )
