"""torchvision's Swin-T as a C3-C5 backbone with MMDetection's per-output LayerNorms."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from crosskd_cli.errors import ModelError
from crosskd_cli.models.backbones import Backbone

# torchvision's swin_t().features: [0] patch embedding (stride 4), then stage s (0-based) at
# 1 + 2s and its patch merging at 2 + 2s. C3, C4, C5 are the outputs of stages 1, 2, 3
# (MMDetection's out_indices (1, 2, 3)), before the merging that follows them.
NUM_STAGES = 4
OUT_FEATURES = (3, 5, 7)


class SwinTBackbone(Backbone):
    """torchvision `swin_t(...).features` returning [C3, C4, C5] (192, 384, 768 ch), NCHW.

    Each output goes through its own LayerNorm, `out_norms.k` = MMDetection's `norm{k+1}`
    (its SwinTransformer normalises every returned stage; torchvision has one final `norm`
    for the classifier). All other parameter names are torchvision's (`features.5.3.attn.qkv
    .weight`, ...), so a torchvision state dict loads once its `norm.*` and `head.*` are
    ignored; the out_norms then keep their values, the identity (weight 1, bias 0) for a fresh
    backbone, as MMDetection's are when it loads an ImageNet Swin.

    Sizes: the stage maps are exactly H/4, ..., H/32 for inputs whose sides are multiples of
    32 (the data pipeline pads to that); other sizes still run (the stride-4 patch conv drops a
    remainder, patch merging zero-pads odd sides). Every attention layer zero-pads its map on
    the right/bottom to a multiple of the 7x7 window and crops back afterwards; padded tokens
    are attended to unmasked, as in MMDetection. Along a side whose padded size is only one
    window (a stride-32 side <= 7, i.e. an image side <= 224), torchvision does not shift the
    window while MMDetection still does: see `crosskd_cli.models.backbone_import`.

    frozen_stages (MMDetection's): -1 freezes nothing, 0 the patch embedding, k in 1..4 the
    patch embedding and stages 1..k with their patch merging and, from k = 2, the out_norms
    of the frozen stages; frozen modules get requires_grad=False and stay in eval mode (no
    stochastic depth). norm_eval has nothing to act on (no BatchNorm) and is accepted for the
    common factory signature. Stochastic depth is torchvision's swin_t default, 0.2 rising
    linearly over the blocks, as MMDetection's Swin-T detector configs set it.
    """

    torchvision_arch = "swin_t"
    torchvision_ignored = ("norm.", "head.")
    torchvision_absent = ("out_norms.",)

    def __init__(
        self,
        swin: torchvision.models.SwinTransformer,
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ModelError(
                f"frozen_stages={frozen_stages} is out of range for a Swin Transformer.",
                hint="Use -1 (nothing frozen), 0 (patch embedding) or 1..4 (patch embedding "
                "and stages 1..k).",
            )
        self.name = "swin_t"
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.features = swin.features
        self.out_channels = tuple(
            self.features[index][-1].norm1.normalized_shape[0] for index in OUT_FEATURES
        )
        # eps 1e-5: MMDetection's LN config and torchvision's swin norm_layer agree on it
        self.out_norms = nn.ModuleList(nn.LayerNorm(width, eps=1e-5) for width in self.out_channels)
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """Patch embedding, then per frozen stage its blocks, its merging and its out_norm."""
        if self.frozen_stages < 0:
            return []
        modules = [self.features[0]]
        for stage in range(self.frozen_stages):
            modules.extend(self.features[1 + 2 * stage : 3 + 2 * stage])  # no merging after 3
            if stage >= 1:  # stage 0 is not an output
                modules.append(self.out_norms[stage - 1])
        return modules

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C3, C4, C5] at strides 8, 16, 32, NCHW."""
        norms = dict(zip(OUT_FEATURES, self.out_norms, strict=True))
        outs = []
        x = images
        for index, feature in enumerate(self.features):
            x = feature(x)  # channels last from the patch embedding on: (B, H_s, W_s, C)
            if index in norms:
                outs.append(norms[index](x).permute(0, 3, 1, 2).contiguous())
        return outs


def swin_t(frozen_stages: int = -1, norm_eval: bool = False) -> SwinTBackbone:
    """torchvision swin_t as a C3-C5 backbone, randomly initialised."""
    # weights=None: never download; pretrained weights come from a local file
    return SwinTBackbone(torchvision.models.swin_t(weights=None), frozen_stages, norm_eval)
