"""The one factory: a ModelSpec in, a Detector out, through literal name -> function dicts."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from crosskd_cli.errors import ModelError
from crosskd_cli.models import backbones, mobilenet, swin
from crosskd_cli.models.atss_head import ATSSHead
from crosskd_cli.models.backbones import Backbone, load_torchvision_weights
from crosskd_cli.models.dense_head import DenseHead
from crosskd_cli.models.detector import Detector
from crosskd_cli.models.fcos_head import FCOSHead
from crosskd_cli.models.fpn import FPN
from crosskd_cli.models.gfl_head import GFLHead
from crosskd_cli.models.retina_head import RetinaHead
from crosskd_cli.specs import ModelSpec

T = TypeVar("T")

# name -> factory(frozen_stages, norm_eval)
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": backbones.resnet18,
    "resnet34": backbones.resnet34,
    "resnet50": backbones.resnet50,
    "resnet101": backbones.resnet101,
    "resnet50_caffe": backbones.resnet50_caffe,
    "resnet101_caffe": backbones.resnet101_caffe,
    "mobilenet_v2": mobilenet.mobilenet_v2,
    "swin_t": swin.swin_t,
}


def gfl_head(spec: ModelSpec) -> GFLHead:
    """The GFL head of `spec`, reading FPN features of `spec.fpn_channels`."""
    return GFLHead(**_common_head_args(spec), reg_max=spec.reg_max)


def retina_head(spec: ModelSpec) -> RetinaHead:
    """The RetinaNet head of `spec`: spec.anchors_per_location anchors, no norm unless asked."""
    return RetinaHead(
        num_classes=spec.num_classes,
        in_channels=spec.fpn_channels,
        feat_channels=spec.head_channels,
        stacked_convs=spec.stacked_convs,
        num_levels=spec.num_levels,
        num_anchors=spec.anchors_per_location,
        norm_groups=spec.norm_groups,
    )


def atss_head(spec: ModelSpec) -> ATSSHead:
    return ATSSHead(**_common_head_args(spec))


def fcos_head(spec: ModelSpec) -> FCOSHead:
    return FCOSHead(**_common_head_args(spec))


def _common_head_args(spec: ModelSpec) -> dict:
    return {
        "num_classes": spec.num_classes,
        "in_channels": spec.fpn_channels,
        "feat_channels": spec.head_channels,
        "stacked_convs": spec.stacked_convs,
        "num_levels": spec.num_levels,
        "norm_groups": spec.norm_groups,
    }


# family -> factory(spec)
HEADS: dict[str, Callable[[ModelSpec], DenseHead]] = {
    "gfl": gfl_head,
    "retinanet": retina_head,
    "atss": atss_head,
    "fcos": fcos_head,
}


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """table[name], or a ModelError listing the valid names with the closest one."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    raise ModelError(
        f"Unknown {what} '{name}'." + (f" Did you mean '{close[0]}'?" if close else ""),
        hint=f"Valid {what} names: {', '.join(table)}.",
    )


def check_spec(spec: ModelSpec) -> None:
    """Refuse a spec that would fail deep inside a constructor, saying which field to fix."""
    if spec.norm_groups is not None and spec.head_channels % spec.norm_groups:
        raise ModelError(
            f"head_channels={spec.head_channels} is not divisible by "
            f"norm_groups={spec.norm_groups} (GroupNorm in the head towers).",
            hint="Pick head_channels as a multiple of norm_groups (e.g. 64 with 32 or 16 groups).",
        )
    expected = tuple(8 * 2**k for k in range(len(spec.strides)))
    if tuple(spec.strides) != expected or len(spec.strides) < 3:
        raise ModelError(
            f"strides={tuple(spec.strides)} do not fit a C3-C5 backbone with stride-2 extra "
            "levels.",
            hint="Use (8, 16, 32, 64, 128) (P3-P7), or a prefix of at least (8, 16, 32).",
        )
    if spec.family == "fcos" and len(spec.strides) > 5:
        raise ModelError(
            f"FCOS has regress ranges for 5 levels, the spec lists {len(spec.strides)} strides.",
            hint="Use strides (8, 16, 32, 64, 128) or fewer for FCOS.",
        )
    for name, value, low in (
        ("num_classes", spec.num_classes, 1),
        ("reg_max", spec.reg_max, 1),
        ("stacked_convs", spec.stacked_convs, 0),
        ("scales_per_octave", spec.scales_per_octave, 1),
        ("anchor_ratios (count)", len(spec.anchor_ratios), 1),
    ):
        if value < low:
            raise ModelError(f"{name}={value} is too small.", hint=f"Use a value >= {low}.")


def build_detector(spec: ModelSpec, backbone_weights: str | Path | None = None) -> Detector:
    """Build the detector `spec` describes, with randomly initialised weights.

    backbone_weights: a local torchvision state dict of the spec's backbone (ResNet,
    MobileNetV2, Swin-T). Only then are `spec.frozen_stages`, `spec.norm_eval` and
    `spec.norm_affine_trainable` applied: a backbone trained from scratch must train every
    stage and its BN. Works under `with torch.device("meta"):` for shape inspection.
    """
    check_spec(spec)
    make_backbone = lookup(BACKBONES, spec.backbone, "backbone")
    make_head = lookup(HEADS, spec.family, "head family")
    pretrained = backbone_weights is not None
    backbone = make_backbone(
        frozen_stages=spec.frozen_stages if pretrained else -1,
        norm_eval=spec.norm_eval and pretrained,
    )
    if pretrained:
        load_torchvision_weights(backbone, backbone_weights)
        if not spec.norm_affine_trainable:  # MMDetection's BN requires_grad=False
            for module in backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
    neck = FPN(
        backbone.out_channels,
        spec.fpn_channels,
        num_outs=spec.num_levels,
        extra_convs_source=spec.extra_convs_source,
        relu_before_extra_convs=spec.relu_before_extra_convs,
    )
    return Detector(backbone, neck, make_head(spec), spec)


def count_parameters(detector: Detector) -> dict[str, int]:
    """Parameter counts: {"backbone", "neck", "head", "total"} -> number of scalars."""
    counts = {name: _numel(getattr(detector, name)) for name in ("backbone", "neck", "head")}
    counts["total"] = _numel(detector)
    return counts


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
