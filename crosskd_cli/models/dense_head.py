"""The dense-head contract: two towers of named conv blocks, their taps, and partial forwards.

Every head family (GFL, RetinaNet, ATSS, FCOS) subclasses `DenseHead` and only adds its
predictors in `predict`. The cross-head forward of the distiller is then generic:

    student_out = student.head(student_features, tap_index=i)  # taps of block i, per level
    cls_in = [relu(align(t)) if i > 0 else align(t) for t in student_out.cls_taps]  # reg alike
    cross = teacher.head.forward_from(i, cls_in, reg_in)  # teacher blocks i+1.. and predictors
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from crosskd_cli.errors import ModelError
from crosskd_cli.structures import HeadOutput


class ConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> ReLU; the block's tap is the output of `norm`, before `act`.

    With `norm_groups=None` (RetinaNet) the norm is an Identity and the conv keeps its bias; with
    a norm the conv has no bias, as MMDetection's ConvModule (the norm's shift replaces it).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int | None) -> None:
        super().__init__()
        has_norm = norm_groups is not None
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not has_norm)
        self.norm = nn.GroupNorm(norm_groups, out_channels) if has_norm else nn.Identity()
        # Not in place: the pre-activation tensor is the tap and must survive the ReLU
        self.act = nn.ReLU(inplace=False)

    def pre_activation(self, x: Tensor) -> Tensor:
        """The tap: conv then norm, (B, out_channels, H, W)."""
        return self.norm(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pre_activation(x))


def init_predictor(conv: nn.Conv2d, prior_prob: float | None = None) -> None:
    """N(0, 0.01) weights; bias 0, or set so every sigmoid starts at `prior_prob` (focal loss)."""
    nn.init.normal_(conv.weight, std=0.01)
    bias = 0.0 if prior_prob is None else -math.log((1 - prior_prob) / prior_prob)
    nn.init.constant_(conv.bias, bias)


class Scale(nn.Module):
    """A learnable scalar multiplying a level's box output (one per FPN level)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def build_tower(
    in_channels: int, feat_channels: int, stacked_convs: int, norm_groups: int | None
) -> nn.ModuleList:
    """`stacked_convs` ConvBlocks; the first reads `in_channels`, the rest `feat_channels`."""
    return nn.ModuleList(
        ConvBlock(in_channels if k == 0 else feat_channels, feat_channels, norm_groups)
        for k in range(stacked_convs)
    )


class DenseHead(nn.Module, ABC):
    """Shared towers `cls_tower` / `reg_tower` run on every FPN level with shared weights.

    Tap index k in 0..stacked_convs: 0 is the FPN feature itself, k > 0 the pre-ReLU output of
    block k (1-based). Subclasses build their predictors (`predictor_channels` inputs) and
    implement `predict`.
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int,
        stacked_convs: int,
        num_levels: int,
        norm_groups: int | None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        self.num_levels = num_levels
        self.cls_tower = build_tower(in_channels, feat_channels, stacked_convs, norm_groups)
        self.reg_tower = build_tower(in_channels, feat_channels, stacked_convs, norm_groups)
        for block in [*self.cls_tower, *self.reg_tower]:
            nn.init.normal_(block.conv.weight, std=0.01)
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)

    @property
    def predictor_channels(self) -> int:
        """Channels the predictors read: the last block's, or the FPN's with no tower."""
        return self.feat_channels if self.stacked_convs > 0 else self.in_channels

    @abstractmethod
    def predict(
        self, cls_feat: Tensor, reg_feat: Tensor, level: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Predictors on the towers' final outputs of one level.

        -> (cls_logits, box_preds, centerness logits or None for heads without one).
        """

    def check_index(self, index: int, name: str = "tap index") -> None:
        """Refuse an index outside 0..stacked_convs, naming the valid range."""
        if not 0 <= index <= self.stacked_convs:
            raise ModelError(
                f"The {name} {index} is out of range for a head with {self.stacked_convs} "
                "stacked convs.",
                hint=f"Use an index in 0..{self.stacked_convs} (0 = the FPN feature, "
                "k = block k's output before its ReLU).",
            )

    def run_tower(
        self, tower: nn.ModuleList, x: Tensor, start: int = 0, tap_index: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run blocks start+1..n of `tower` on x -> (final activated output, tap or None).

        x is what block start+1 receives (the FPN feature when start == 0, else block start's
        post-ReLU output). The tap is block `tap_index`'s pre-ReLU output, or x itself when
        tap_index == start == 0.
        """
        if tap_index is not None and not (
            start < tap_index <= len(tower) or tap_index == 0 == start
        ):
            raise ModelError(
                f"Cannot tap block {tap_index} of a tower run from block {start}.",
                hint=f"Ask for a tap index in {start + 1}..{len(tower)}, or 0 from the start.",
            )
        tap = x if tap_index == 0 else None
        for k in range(start, len(tower)):
            pre = tower[k].pre_activation(x)
            if k + 1 == tap_index:
                tap = pre
            x = tower[k].act(pre)
        return x, tap

    def forward(self, features: list[Tensor], tap_index: int | None = None) -> HeadOutput:
        """Full head on every level; features: [P3..P7], each (B, in_channels, H_l, W_l).

        With `tap_index`, cls_taps / reg_taps hold each level's tap at that index.
        """
        if tap_index is not None:
            self.check_index(tap_index)
        self._check_levels(len(features))
        out = HeadOutput([], [])
        for level, x in enumerate(features):
            cls_feat, cls_tap = self.run_tower(self.cls_tower, x, 0, tap_index)
            reg_feat, reg_tap = self.run_tower(self.reg_tower, x, 0, tap_index)
            self._append(out, level, cls_feat, reg_feat)
            if tap_index is not None:
                out.cls_taps.append(cls_tap)
                out.reg_taps.append(reg_tap)
        return out

    def forward_from(
        self, index: int, cls_inputs: list[Tensor], reg_inputs: list[Tensor]
    ) -> HeadOutput:
        """Continue from block `index` on every level: run blocks index+1..n, then predict.

        cls_inputs / reg_inputs: per level, what block index+1 receives (the caller applies ReLU
        to taps when index > 0). index == stacked_convs runs the predictors only.
        """
        self.check_index(index, "cross index")
        self._check_levels(len(cls_inputs))
        self._check_levels(len(reg_inputs))
        out = HeadOutput([], [])
        for level, (cls_x, reg_x) in enumerate(zip(cls_inputs, reg_inputs, strict=True)):
            cls_feat, _ = self.run_tower(self.cls_tower, cls_x, index)
            reg_feat, _ = self.run_tower(self.reg_tower, reg_x, index)
            self._append(out, level, cls_feat, reg_feat)
        return out

    def _append(self, out: HeadOutput, level: int, cls_feat: Tensor, reg_feat: Tensor) -> None:
        cls_logits, box_preds, centerness = self.predict(cls_feat, reg_feat, level)
        out.cls_logits.append(cls_logits)
        out.box_preds.append(box_preds)
        if centerness is not None:
            out.centerness.append(centerness)

    def _check_levels(self, given: int) -> None:
        if given != self.num_levels:
            raise ModelError(
                f"The head was given {given} feature levels but was built for {self.num_levels}.",
                hint="Give one feature map per FPN level (the model spec's strides).",
            )
