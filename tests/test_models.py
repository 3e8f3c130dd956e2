"""Models: shapes, taps, the cross-head identity, frozen backbones, normalisation, errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.errors import ModelError
from crosskd_cli.models import (
    FPN,
    DenseHead,
    build_detector,
    count_parameters,
    load_torchvision_weights,
)
from crosskd_cli.models.backbones import resnet18


def gfl_head(**kwargs) -> DenseHead:
    """A GFL-shaped head: 4 x 17 box-distribution logits per location, per-level Scale."""
    return DenseHead(box_channels=4 * 17, **kwargs)


SMALL = ModelSpec(
    backbone="resnet18", num_classes=8, fpn_channels=64, head_channels=64, norm_groups=16
)


@pytest.fixture(scope="module")
def small_detector():
    torch.manual_seed(0)
    return build_detector(SMALL).eval()


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_small_detector_outputs_one_map_per_level_at_strides_8_to_128(small_detector):
    images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)
    with torch.no_grad():
        out = small_detector(images, [(128, 160), (100, 150)])
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert [tuple(f.shape) for f in out.features] == [(2, 64, h, w) for h, w in sizes]
    assert [tuple(c.shape) for c in out.head.cls_logits] == [(2, 8, h, w) for h, w in sizes]
    assert [tuple(b.shape) for b in out.head.box_preds] == [(2, 68, h, w) for h, w in sizes]
    assert out.head.taps == {}


def test_tap_zero_is_the_fpn_feature_and_later_taps_have_head_width():
    torch.manual_seed(0)
    spec = replace(SMALL, fpn_channels=32)
    detector = build_detector(spec).eval()
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        out0 = detector(images, tap_index=0)
        out2 = detector(images, tap_index=2)
    assert all(torch.equal(t, f) for t, f in zip(out0.head.taps["cls"], out0.features, strict=True))
    assert all(torch.equal(t, f) for t, f in zip(out0.head.taps["reg"], out0.features, strict=True))
    assert [tuple(t.shape) for t in out2.head.taps["cls"]] == [
        (1, 64, 8, 12),
        (1, 64, 4, 6),
        (1, 64, 2, 3),
        (1, 64, 1, 2),
        (1, 64, 1, 1),
    ]
    # A pre-ReLU tap has negative values; a post-ReLU one would not
    assert (out2.head.taps["reg"][0] < 0).any()


def test_tap_of_block_k_is_its_norm_output_before_the_relu():
    torch.manual_seed(0)
    head = gfl_head(num_classes=3, in_channels=16, feat_channels=16, num_levels=1, norm_groups=4)
    x = torch.randn(1, 16, 6, 6)
    _, tap = head.run_tower(head.towers["cls"], x, tap_index=2)
    block1, block2 = head.towers["cls"][0], head.towers["cls"][1]
    expected = block2.norm(block2.conv(F.relu(block1.norm(block1.conv(x)))))
    assert torch.equal(tap, expected)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_forward_from_the_taps_of_block_i_reproduces_the_full_forward(index):
    torch.manual_seed(0)
    head = gfl_head(num_classes=5, in_channels=32, feat_channels=32, num_levels=3, norm_groups=8)
    features = [torch.randn(2, 32, s, s) for s in (8, 4, 2)]
    with torch.no_grad():
        head.scales[1].scale.fill_(0.5)  # the continuation must apply each level's Scale
        full = head(features, tap_index=index)
        relu_if = F.relu if index > 0 else (lambda t: t)
        cls_inputs = [relu_if(t) for t in full.taps["cls"]]
        reg_inputs = [relu_if(t) for t in full.taps["reg"]]
        cross = head.forward_from(index, {"cls": cls_inputs, "reg": reg_inputs})
    assert all(torch.equal(a, b) for a, b in zip(cross.cls_logits, full.cls_logits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(cross.box_preds, full.box_preds, strict=True))


def test_forward_from_sends_gradients_through_frozen_weights_to_its_inputs():
    torch.manual_seed(0)
    teacher = gfl_head(num_classes=3, in_channels=16, feat_channels=16, num_levels=1, norm_groups=4)
    teacher.requires_grad_(False)
    tap = torch.randn(1, 16, 4, 4, requires_grad=True)
    cross = teacher.forward_from(2, {"cls": [F.relu(tap)], "reg": [F.relu(tap)]})
    (cross.cls_logits[0].sum() + cross.box_preds[0].sum()).backward()
    assert tap.grad is not None and tap.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_tap_index_outside_the_tower_is_refused_with_the_valid_range(small_detector):
    features = [torch.zeros(1, 64, 2, 2)] * 5
    with pytest.raises(ModelError, match=r"tap index 5 is out of range") as err:
        small_detector.head(features, tap_index=5)
    assert err.value.hint.startswith("Use an index in 0..4")
    with pytest.raises(ModelError, match=r"cross index -1 is out of range"):
        small_detector.head.forward_from(-1, {"cls": features, "reg": features})


def test_head_refuses_a_wrong_number_of_levels(small_detector):
    with pytest.raises(ModelError, match="given 3 feature levels but was built for 5"):
        small_detector.head([torch.zeros(1, 64, 2, 2)] * 3)


def test_gfl_head_initialises_cls_bias_to_the_prior_and_scales_to_one():
    head = gfl_head(num_classes=4, in_channels=32, feat_channels=32, norm_groups=8)
    assert torch.allclose(head.cls_predictor.bias, torch.full((4,), -math.log(99.0)))
    assert [s.scale.item() for s in head.scales] == [1.0] * 5
    assert head.towers["cls"][0].conv.bias is None
    assert isinstance(head.towers["reg"][3].norm, nn.GroupNorm)
    assert head.towers["reg"][3].norm.num_groups == 8


def test_fpn_first_extra_conv_reads_p5_output_or_c5():
    torch.manual_seed(0)
    inputs = [torch.randn(1, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    on_output = FPN((8, 16, 32), 12, extra_convs_source="p5_output")
    on_input = FPN((8, 16, 32), 12, extra_convs_source="c5")
    assert on_output.fpn_convs[3].in_channels == 12
    assert on_input.fpn_convs[3].in_channels == 32
    outs = on_output(inputs)
    assert torch.equal(outs[3], on_output.fpn_convs[3](outs[2]))
    # No ReLU between the two extra convs unless asked for (FCOS)
    assert torch.equal(outs[4], on_output.fpn_convs[4](outs[3]))
    on_input_outs = on_input(inputs)
    assert torch.equal(on_input_outs[3], on_input.fpn_convs[3](inputs[2]))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_fpn_relu_before_extra_convs_applies_only_before_the_second():
    torch.manual_seed(0)
    fpn = FPN((8, 16, 32), 12, relu_before_extra_convs=True)
    outs = fpn([torch.randn(1, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))])
    assert torch.equal(outs[3], fpn.fpn_convs[3](outs[2]))
    assert torch.equal(outs[4], fpn.fpn_convs[4](F.relu(outs[3])))


def test_padded_area_is_zero_after_normalising(small_detector):
    images = torch.full((2, 3, 64, 96), 200, dtype=torch.uint8)
    x = small_detector.normalize(images, [(64, 96), (40, 70)])
    assert (x[1, :, 40:, :] == 0).all() and (x[1, :, :, 70:] == 0).all()
    expected_red = (200 - 123.675) / 58.395
    assert torch.allclose(x[1, 0, :40, :70], torch.tensor(expected_red))
    assert torch.allclose(x[0, 0], torch.tensor(expected_red))


def test_to_bgr_swaps_channels_before_normalising():
    spec = replace(SMALL, to_bgr=True, pixel_mean=(0.0,) * 3, pixel_std=(1.0,) * 3)
    detector = build_detector(spec)
    images = torch.stack([torch.full((4, 4), v, dtype=torch.uint8) for v in (10, 20, 30)])[None]
    x = detector.normalize(images)
    assert x[0, :, 0, 0].tolist() == [30.0, 20.0, 10.0]


def test_pixel_mean_and_std_are_not_in_the_state_dict(small_detector):
    keys = small_detector.state_dict().keys()
    assert "pixel_mean" not in keys and "pixel_std" not in keys
    assert "backbone.layer4.1.bn2.running_var" in keys
    assert "neck.fpn_convs.4.weight" in keys and "neck.lateral_convs.2.bias" in keys
    assert "head.towers.cls.3.norm.weight" in keys and "head.scales.4.scale" in keys


def test_backbone_weights_load_and_freeze_stem_and_layer1(resnet18_weights):
    detector = build_detector(SMALL, backbone_weights=resnet18_weights)
    detector.train()
    saved = torch.load(resnet18_weights, weights_only=True)
    backbone = detector.backbone
    assert torch.equal(backbone.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    assert not backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    # norm_eval: every BN frozen in train mode, yet affine parameters of unfrozen stages learn
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(bn.training for bn in bns)
    assert backbone.layer4[1].bn2.weight.requires_grad
    assert backbone.layer4[1].conv1.training and detector.head.training


def test_caffe_configs_can_freeze_the_bn_affine_parameters_too(resnet18_weights):
    spec = replace(SMALL, norm_affine_trainable=False)
    backbone = build_detector(spec, backbone_weights=resnet18_weights).backbone
    assert not backbone.layer4[1].bn2.weight.requires_grad
    assert not backbone.layer4[1].bn2.bias.requires_grad
    assert backbone.layer4[1].conv1.weight.requires_grad
    # from scratch nothing is frozen, whatever the spec says
    assert all(p.requires_grad for p in build_detector(spec).backbone.parameters())


def test_without_backbone_weights_every_stage_trains_with_live_bn():
    detector = build_detector(SMALL).train()
    assert all(p.requires_grad for p in detector.parameters())
    bns = [m for m in detector.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(bn.training for bn in bns)


def test_frozen_stages_get_no_gradient(resnet18_weights):
    detector = build_detector(SMALL, backbone_weights=resnet18_weights).train()
    out = detector(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    sum(c.sum() for c in out.head.cls_logits).backward()
    assert detector.backbone.layer1[0].conv1.weight.grad is None
    assert detector.backbone.layer2[0].conv1.weight.grad is not None


def test_weights_file_with_wrong_keys_names_them(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer5.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.running_var"]
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelError) as err:
        load_torchvision_weights(resnet18(), path)
    assert str(err.value.message) == (
        f"Backbone weights '{path}' do not fit resnet18: "
        "1 missing (layer4.1.bn2.running_var); 1 unexpected (layer5.weight); "
        "1 misshapen (conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7))."
    )


def test_resnet50_weights_into_resnet18_counts_and_truncates_the_lists(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ModelError) as err:
        load_torchvision_weights(resnet18(), path)
    message = err.value.message
    assert "do not fit resnet18: 198 unexpected (layer1.0.conv3.weight, " in message
    assert (
        "layer1.0.bn3.bias, ...); 23 misshapen (layer1.0.conv1.weight (64, 64, 1, 1) vs" in message
    )
    assert "missing" not in message


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match=f"Backbone weights file '{path}' does not exist"):
        build_detector(SMALL, backbone_weights=path)


def test_unknown_backbone_lists_valid_names_and_suggests_one():
    spec = replace(SMALL, backbone="resnet5")
    with pytest.raises(ModelError, match="Unknown backbone 'resnet5'. Did you mean") as err:
        build_detector(spec)
    assert err.value.hint.startswith("Valid backbone names: resnet18, resnet34, resnet50, ")


def test_unknown_head_family_lists_valid_names():
    spec = replace(SMALL, family="yolo")
    with pytest.raises(ModelError, match="Unknown head family 'yolo'") as err:
        build_detector(spec)
    assert err.value.hint == "Valid head family names: gfl, retinanet, atss, fcos."


def test_head_width_not_divisible_by_norm_groups_is_refused():
    spec = replace(SMALL, head_channels=48, norm_groups=32)
    with pytest.raises(ModelError, match="head_channels=48 is not divisible by norm_groups=32"):
        build_detector(spec)


def test_count_parameters_splits_backbone_neck_head(small_detector):
    counts = count_parameters(small_detector)
    assert counts["backbone"] == 11_176_512  # torchvision resnet18 minus fc (512*1000+1000)
    assert counts["backbone"] + counts["neck"] + counts["head"] == counts["total"]
    assert counts["total"] == sum(p.numel() for p in small_detector.parameters())


def test_r101_at_800x1344_has_the_expected_shapes_on_meta():
    with torch.device("meta"):
        detector = build_detector(ModelSpec(backbone="resnet101"))
        out = detector(torch.empty(1, 3, 800, 1344, dtype=torch.uint8), tap_index=3)
    sizes = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    assert [tuple(c.shape) for c in out.head.cls_logits] == [(1, 80, h, w) for h, w in sizes]
    assert [tuple(b.shape) for b in out.head.box_preds] == [(1, 68, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in out.head.taps["cls"]] == [(1, 256, h, w) for h, w in sizes]
    assert out.head.box_preds[0].device.type == "meta"


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_every_backbone_runs_one_forward_without_nan(backbone):
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone=backbone, num_classes=3, fpn_channels=16, head_channels=16, norm_groups=8
    )
    detector = build_detector(spec).eval()
    with torch.no_grad():
        out = detector(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), [(64, 48)])
    c5_channels = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
    assert detector.neck.lateral_convs[2].in_channels == c5_channels[backbone]
    assert [tuple(c.shape) for c in out.head.cls_logits][-1] == (1, 3, 1, 1)
    assert all(torch.isfinite(t).all() for t in out.head.cls_logits + out.head.box_preds)
