"""Typed, frozen specs shared by every module: what a detector is made of (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale, as torchvision/MMDetection use
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint's metadata.

    Field names equal the constructor arguments they feed (see `crosskd_cli.models.build`).
    """

    family: str = (
        "gfl"  # head family, a key of crosskd_cli.families.FAMILIES: gfl, retinanet, atss, fcos
    )
    backbone: str = "resnet50"  # resnet18/34/50/101, resnet50_caffe/101_caffe, mobilenet_v2, swin_t
    num_classes: int = 80  # contiguous labels 0..num_classes-1
    fpn_channels: int = 256  # FPN output width (the paper's 256; CPU presets use 64-96)
    head_channels: int = 256  # width of every tower block
    stacked_convs: int = 4  # blocks per tower; the cross index runs over 0..stacked_convs
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)  # P3-P7
    norm_groups: int | None = 32  # GroupNorm groups in the head towers; None = no norm (RetinaNet)
    reg_max: int = 16  # GFL: box side distribution over 0..reg_max (17 bins)
    octave_base_scale: int = 8  # anchor side = octave_base_scale * stride (FCOS: unused)
    scales_per_octave: int = 1  # anchor sizes per location: base * 2**(k / scales_per_octave)
    anchor_ratios: tuple[float, ...] = (1.0,)  # anchor height / width; RetinaNet (0.5, 1.0, 2.0)
    extra_convs_source: str = "p5_output"  # where P6 is computed from: p5_output or c5
    relu_before_extra_convs: bool = False  # FCOS: ReLU between the FPN's extra convs
    frozen_stages: int = 1  # stem+layer1 frozen, applied only with pretrained backbone weights
    norm_eval: bool = True  # BN statistics frozen, applied only with pretrained backbone weights
    # False: BN weight and bias frozen too (MMDetection's caffe configs, BN requires_grad=False);
    # applied only with pretrained backbone weights
    norm_affine_trainable: bool = True
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # in the channel order below
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    to_bgr: bool = False  # caffe-style backbones read BGR

    @property
    def num_levels(self) -> int:
        return len(self.strides)
