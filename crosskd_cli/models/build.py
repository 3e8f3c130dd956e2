"""The one factory: a ModelSpec in, a Detector out, through literal name -> function dicts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

# the submodules by their own names: `from crosskd_cli.models import` would be the package,
# whose __init__ imports this module
import crosskd_cli.models.backbones as backbones
import crosskd_cli.models.mobilenet as mobilenet
import crosskd_cli.models.swin as swin
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.schema import Policy, refuse_unknown_name
from crosskd_cli.errors import ModelError, lookup
from crosskd_cli.families import FAMILIES, get_family
from crosskd_cli.models.backbones import Backbone
from crosskd_cli.models.dense_head import DenseHead
from crosskd_cli.models.detector import Detector
from crosskd_cli.models.fpn import FPN

MAX_ANCHOR_RATIOS = 16  # RetinaNet uses 3

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


def build_head(spec: ModelSpec) -> DenseHead:
    """The spec's dense head: the shared towers with its family's predictor options, box
    channels from the family's box coder and one predictor set per prior of a location."""
    family = get_family(spec.family)
    return DenseHead(
        num_classes=spec.num_classes,
        in_channels=spec.fpn_channels,
        feat_channels=spec.head_channels,
        stacked_convs=spec.stacked_convs,
        num_levels=spec.num_levels,
        norm_groups=spec.norm_groups,
        box_channels=family.box_coder(spec).box_channels,
        num_anchors=family.priors(spec).per_location,
        **family.head_options,
    )


def check_model_names(spec: ModelSpec, *, where: str, policy: Policy, path: str = "model") -> None:
    """The spec's names that index the zoo's tables (family, backbone, backbone_init) are
    among their keys, each refused as the parser refuses a choice (`policy`'s wording, the
    closest name as a hint). Run wherever a spec is read for work: a preset's check
    (`preset_checks`) and a checkpoint's metadata (`checkpoint.CheckpointMeta.from_json`)."""
    # pretrained imports models.backbones: importing it at the top would be a cycle
    from crosskd_cli.models.pretrained import BACKBONE_INITS

    for field, table in (
        ("family", FAMILIES),
        ("backbone", BACKBONES),
        ("backbone_init", BACKBONE_INITS),
    ):
        names = list(table)
        refuse_unknown_name(
            getattr(spec, field), names, where=where, path=f"{path}.{field}", policy=policy
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
    get_family(spec.family).criterion.check_spec(spec)
    # pretrained imports models.backbones: importing it at the top would be a cycle
    from crosskd_cli.models.pretrained import check_init

    check_init(spec)
    # A spec built in code skips the schema's ranges (crosskd_cli.config.model_spec); the list
    # length has no schema range: a checkpoint's metadata listing 10^6 ratios must not
    # allocate the head.
    for name, value, low, high in (
        ("num_classes", spec.num_classes, 1, None),
        ("reg_max", spec.reg_max, 1, None),
        ("stacked_convs", spec.stacked_convs, 0, None),
        ("scales_per_octave", spec.scales_per_octave, 1, None),
        ("anchor_ratios (count)", len(spec.anchor_ratios), 1, MAX_ANCHOR_RATIOS),
    ):
        if value < low:
            raise ModelError(f"{name}={value} is too small.", hint=f"Use a value >= {low}.")
        if high is not None and value > high:
            raise ModelError(f"{name}={value} is too large.", hint=f"Use a value <= {high}.")


def build_detector(
    spec: ModelSpec, backbone_weights: str | Path | None = None, *, pretrained: bool | None = None
) -> Detector:
    """Build the detector `spec` describes, with randomly initialised weights.

    backbone_weights: a local ImageNet state dict of the spec's backbone (ResNet,
    MobileNetV2, Swin-T), read in the layout of `spec.backbone_init` (torchvision's when that
    is `scratch`); `crosskd_cli.models.pretrained.resolve` finds it. Never looked up here:
    without it the backbone is random, as a model rebuilt from a checkpoint must be. Only with
    it are
    `spec.frozen_stages`, `spec.norm_eval` and `spec.norm_affine_trainable` applied: a backbone
    trained from scratch must train every stage and its BN. Works under
    `with torch.device("meta"):` for shape inspection. `pretrained=True` without a file builds
    the pretrained structure (frozen stages, BN in eval mode) for weights that come from
    elsewhere: a resumed run's saved state.
    """
    check_spec(spec)
    make_backbone = lookup(BACKBONES, spec.backbone, "backbone")
    if pretrained is None:
        pretrained = backbone_weights is not None
    backbone = make_backbone(
        frozen_stages=spec.frozen_stages if pretrained else -1,
        norm_eval=spec.norm_eval and pretrained,
    )
    if backbone_weights is not None:
        from crosskd_cli.models.pretrained import load_backbone_weights

        load_backbone_weights(backbone, Path(backbone_weights), spec.backbone_init)
    if pretrained:
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
    return Detector(backbone, neck, build_head(spec), spec)


def count_parameters(detector: Detector) -> dict[str, int]:
    """Parameter counts: {"backbone", "neck", "head", "total"} -> number of scalars."""
    counts = {name: _numel(getattr(detector, name)) for name in ("backbone", "neck", "head")}
    counts["total"] = _numel(detector)
    return counts


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
