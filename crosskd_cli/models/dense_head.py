"""The dense head of every family: towers of named conv blocks, their taps, partial forwards.

GFL, RetinaNet, ATSS and FCOS differ only in their predictors' options (box channels, priors
per location, a per-level Scale, where a centerness logit is read, exp on the distances), so
one class serves all four; the family table (`crosskd_cli.families`) gives each its options.
The cross-head forward of the distiller is then generic over families and towers:

    student_out = student.head(student_features, tap_index=i)  # {tower: taps of block i}
    inputs = {tower: [relu(align(t)) ...] for tower, taps in student_out.taps.items()}
    cross = teacher.head.forward_from(i, inputs)  # teacher blocks i+1.. and predictors
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crosskd_cli.detection.structures import HeadOutput, upcast
from crosskd_cli.errors import ModelError

TOWERS = ("cls", "reg")  # the classification tower feeds cls_predictor, the box tower the rest


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


class DenseHead(nn.Module):
    """Towers `towers["cls"]` / `towers["reg"]` and predictors, shared over the FPN levels.

    Tap index k in 0..stacked_convs: 0 is the FPN feature itself, k > 0 the pre-ReLU output of
    block k (1-based), in every tower alike.

    Predictors (3x3 convs on the towers' final outputs, ~N(0, 0.01)): `cls_predictor` ->
    num_anchors * num_classes logits (bias at `prior_prob`) from the cls tower; `box_predictor`
    -> num_anchors * box_channels from the reg tower, times the level's `scales[level]` when
    `scaled`; `centerness_predictor` -> num_anchors logits from the `centerness_tower` (None: no
    centerness). `box_fp32` casts the box output to fp32 after the Scale and `box_exp` then
    applies exp, as MMDetection's ATSS and FCOS heads do under mixed precision.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        norm_groups: int | None = 32,
        *,
        box_channels: int = 4,
        num_anchors: int = 1,
        scaled: bool = True,
        centerness_tower: str | None = None,
        box_fp32: bool = False,
        box_exp: bool = False,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if centerness_tower not in (None, *TOWERS):
            raise ModelError(
                f"centerness_tower '{centerness_tower}' is not a tower of this head.",
                hint=f"Use one of {TOWERS} or None.",
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        self.num_levels = num_levels
        self.num_anchors = num_anchors
        self.centerness_tower = centerness_tower
        self.box_fp32 = box_fp32 or box_exp  # exp runs in fp32 so it cannot overflow
        self.box_exp = box_exp
        self.towers = nn.ModuleDict(
            {name: build_tower(in_channels, feat_channels, stacked_convs, norm_groups)
             for name in TOWERS}
        )  # fmt: skip
        for tower in self.towers.values():
            for block in tower:
                nn.init.normal_(block.conv.weight, std=0.01)
                if block.conv.bias is not None:
                    nn.init.zeros_(block.conv.bias)
        # Creation order (cls, box, centerness, scales, then the inits) fixes the random
        # initialisation: the same as MMDetection's heads, and as crosskd 0.1.0's.
        channels = self.predictor_channels
        self.cls_predictor = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_predictor = nn.Conv2d(channels, num_anchors * box_channels, 3, padding=1)
        self.centerness_predictor = (
            nn.Conv2d(channels, num_anchors, 3, padding=1) if centerness_tower else None
        )
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels)) if scaled else None
        init_predictor(self.cls_predictor, prior_prob)
        init_predictor(self.box_predictor)
        if self.centerness_predictor is not None:
            init_predictor(self.centerness_predictor)

    @property
    def predictor_channels(self) -> int:
        """Channels the predictors read: the last block's, or the FPN's with no tower."""
        return self.feat_channels if self.stacked_convs > 0 else self.in_channels

    def predict(self, feats: dict[str, Tensor], level: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Predictors on the towers' final outputs of one level, {tower: (B, C, H, W)}.

        -> (cls logits, box predictions, centerness logits or None). The Scale comes before any
        softmax or exp, as in MMDetection, so imported weights reproduce its predictions.
        """
        box = self.box_predictor(feats["reg"])
        if self.scales is not None:
            box = self.scales[level](box)
        if self.box_fp32:
            box = upcast(box)
        if self.box_exp:
            box = box.exp()
        centerness = None
        if self.centerness_predictor is not None:
            centerness = self.centerness_predictor(feats[self.centerness_tower])
        return self.cls_predictor(feats["cls"]), box, centerness

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

        With `tap_index`, `taps[tower]` holds each level's tap at that index.
        """
        if tap_index is not None:
            self.check_index(tap_index)
        self._check_levels(len(features))
        out = HeadOutput([], [])
        for level, x in enumerate(features):
            feats = {}
            for name, tower in self.towers.items():
                feats[name], tap = self.run_tower(tower, x, 0, tap_index)
                if tap_index is not None:
                    out.taps.setdefault(name, []).append(tap)
            self._append(out, level, feats)
        return out

    def forward_from(self, index: int, inputs: dict[str, list[Tensor]]) -> HeadOutput:
        """Continue from block `index` on every level: run blocks index+1..n, then predict.

        inputs: {tower: per level, what block index+1 receives} (the caller applies ReLU to
        taps when index > 0). index == stacked_convs runs the predictors only.
        """
        self.check_index(index, "cross index")
        if set(inputs) != set(self.towers):
            raise ModelError(
                f"forward_from got inputs for towers {sorted(inputs)}; the head has "
                f"{sorted(self.towers)}.",
                hint="Give one list of per-level inputs per tower.",
            )
        for per_level in inputs.values():
            self._check_levels(len(per_level))
        out = HeadOutput([], [])
        for level in range(self.num_levels):
            feats = {
                name: self.run_tower(tower, inputs[name][level], index)[0]
                for name, tower in self.towers.items()
            }
            self._append(out, level, feats)
        return out

    def _append(self, out: HeadOutput, level: int, feats: dict[str, Tensor]) -> None:
        cls_logits, box_preds, centerness = self.predict(feats, level)
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
