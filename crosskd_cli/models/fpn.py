"""Feature pyramid over C3-C5 producing P3-P7, laid out like MMDetection's FPN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd_cli.errors import ModelError


class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling + add, 3x3 output convs, extra levels.

    `lateral_convs[k]` and `fpn_convs[k]` are plain Conv2d (bias, xavier-uniform init), so
    MMDetection keys `neck.lateral_convs.K.conv.*` / `neck.fpn_convs.K.conv.*` map 1:1 after
    dropping `.conv`. `fpn_convs` holds the output convs of the input levels, then the
    stride-2 3x3 extra convs. The first extra conv reads the last output level
    (`extra_convs_source="p5_output"`: GFL, ATSS, FCOS) or the last backbone input ("c5":
    MMDetection's RetinaNet). Each further extra conv reads the previous extra level, through
    a ReLU only when `relu_before_extra_convs` (FCOS); the first extra conv never gets one,
    which is what MMDetection does.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int = 5,
        extra_convs_source: Literal["p5_output", "c5"] = "p5_output",
        relu_before_extra_convs: bool = False,
    ) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ModelError(
                f"The FPN was asked for {num_outs} levels but has {len(in_channels)} inputs.",
                hint="List at least as many strides as backbone levels (8, 16, 32).",
            )
        self.num_inputs = len(in_channels)
        self.out_channels = out_channels
        self.extra_convs_source = extra_convs_source
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        output_convs = [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels]
        first_extra_in = out_channels if extra_convs_source == "p5_output" else in_channels[-1]
        extra_convs = [
            nn.Conv2d(first_extra_in if k == 0 else out_channels, out_channels, 3, 2, padding=1)
            for k in range(num_outs - len(in_channels))
        ]
        self.fpn_convs = nn.ModuleList(output_convs + extra_convs)
        for conv in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """[C3, C4, C5] -> [P3, ..., P7], each (B, out_channels, H_l, W_l)."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for k in range(len(laterals) - 1, 0, -1):
            # size= (not scale_factor=2) so odd sizes round the way the coarser level was made
            upsampled = F.interpolate(laterals[k], size=laterals[k - 1].shape[-2:], mode="nearest")
            laterals[k - 1] = laterals[k - 1] + upsampled
        output_convs = self.fpn_convs[: self.num_inputs]
        outs = [conv(x) for conv, x in zip(output_convs, laterals, strict=True)]
        for k, conv in enumerate(self.fpn_convs[self.num_inputs :]):
            if k == 0:
                source = outs[-1] if self.extra_convs_source == "p5_output" else inputs[-1]
            else:
                source = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
            outs.append(extra_conv(conv, source))
        return outs


def extra_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """An extra level's stride-2 3x3 conv; in fp32 where CPU bf16 would corrupt training.

    torch's CPU backward of a bf16 strided 3x3 convolution over an input one pixel wide
    returns garbage at random (torch 2.14: weight gradients of 1e14 to inf; inputs 2 or more
    pixels wide, and 1xW ones, are fine). P6 is one pixel wide whenever the padded image is
    at most 64 px wide (C5/P5 at 32 px), so the extra convs meet such inputs in small-image
    runs; with gradients to compute, such an input runs this conv in fp32 (a few pixels: no
    cost). A frozen teacher (no gradients) and fp16 or fp32 runs are unchanged.
    """
    if (
        x.shape[-1] == 1
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and torch.is_grad_enabled()
        and conv.weight.dtype == torch.float32
    ):
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)
