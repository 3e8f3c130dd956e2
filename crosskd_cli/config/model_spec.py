"""Typed, frozen specs shared by every module: what a detector is made of (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from crosskd_cli.config.schema import Channels, Count, Index, Positive, Range

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale, as torchvision/MMDetection use
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint's metadata.

    Field names equal the constructor arguments they feed (see `crosskd_cli.models.build`).
    The names that index the zoo's tables (family, backbone, backbone_init) are plain strings
    here; `models.build.check_model_names` checks them wherever a spec is read for work.
    """

    # head family, a key of crosskd_cli.families.FAMILIES: gfl, retinanet, atss, fcos
    family: str = "gfl"
    # resnet18/34/50/101, resnet50_caffe/101_caffe, mobilenet_v2, swin_t: a key of
    # crosskd_cli.models.build.BACKBONES
    backbone: str = "resnet50"
    num_classes: Annotated[int, Range(1, 100_000)] = 80  # contiguous labels 0..num_classes-1
    fpn_channels: Channels = 256  # FPN output width (the paper's 256; CPU presets use 64-96)
    head_channels: Channels = 256  # width of every tower block
    # blocks per tower; the cross index runs over 0..stacked_convs
    stacked_convs: Annotated[int, Range(0, 16)] = 4
    strides: tuple[Count, ...] = (8, 16, 32, 64, 128)  # P3-P7
    # GroupNorm groups in the head towers; None = no norm (RetinaNet)
    norm_groups: Count | None = 32
    reg_max: Annotated[int, Range(1, 64)] = 16  # GFL: box side distribution over 0..reg_max bins
    octave_base_scale: Index = 8  # anchor side = octave_base_scale * stride (FCOS: unused)
    # anchor sizes per location: base * 2**(k / scales_per_octave)
    scales_per_octave: Annotated[int, Range(1, 16)] = 1
    # anchor height / width; RetinaNet (0.5, 1.0, 2.0)
    anchor_ratios: tuple[Positive, ...] = (1.0,)
    extra_convs_source: Literal["p5_output", "c5"] = "p5_output"  # where P6 is computed from
    relu_before_extra_convs: bool = False  # FCOS: ReLU between the FPN's extra convs
    # stem+layer1 frozen (-1: nothing), applied only with pretrained backbone weights
    frozen_stages: Annotated[int, Range(-1)] = 1
    norm_eval: bool = True  # BN statistics frozen, applied only with pretrained backbone weights
    # False: BN weight and bias frozen too (MMDetection's caffe configs, BN requires_grad=False);
    # applied only with pretrained backbone weights
    norm_affine_trainable: bool = True
    # where the backbone starts: "scratch", or an ImageNet file's URI as MMDetection's configs
    # name it (torchvision://resnet50, ...: crosskd_cli.models.pretrained.BACKBONE_INITS); looked up
    # only when a run trains the backbone, never when a checkpoint is rebuilt
    backbone_init: str = "scratch"
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # in the channel order below
    pixel_std: tuple[Positive, Positive, Positive] = IMAGENET_STD
    to_bgr: bool = False  # caffe-style backbones read BGR

    @property
    def num_levels(self) -> int:
        return len(self.strides)
