"""Backbones beyond ResNet: caffe ResNet, MobileNetV2, Swin-T; torchvision and MMDetection weights.

The MMDetection references below are written from reading MMDetection's swin.py,
mobilenet_v2.py and layers (nothing of MMDetection is installed): tensors are made under its
documented key names, converted, and the converted backbone must reproduce the reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.errors import ModelError
from crosskd_cli.models import BACKBONES, build_detector, load_torchvision_weights
from crosskd_cli.models.backbone_import import RULES, convert_mmdet_backbone, unfold_to_concat_order
from crosskd_cli.models.backbones import ResNetBackbone, resnet50, resnet50_caffe
from crosskd_cli.models.mobilenet import LAYER_ENDS, mobilenet_v2
from crosskd_cli.models.swin import SwinTBackbone, swin_t

NEW_BACKBONES = {
    "resnet50_caffe": (512, 1024, 2048),
    "resnet101_caffe": (512, 1024, 2048),
    "mobilenet_v2": (32, 96, 320),
    "swin_t": (192, 384, 768),
}
# MobileNetV2 arch settings (expand ratio t, channels c, blocks n, stride s) per layer
MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
MBV2_SETTINGS += [(6, 160, 3, 2), (6, 320, 1, 1)]
BN_DRAWS = {  # (mean, std) of random BN tensors: an identity-like BN would hide mistakes
    "weight": (1.0, 0.1),
    "bias": (0.0, 0.1),
    "running_mean": (0.0, 0.1),
    "running_var": (1.0, 0.2),
}
WINDOW = 7


# --- shapes, strides, registration ------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_BACKBONES)
@pytest.mark.parametrize("size", [(160, 160), (128, 96), (800, 1216)])
def test_new_backbones_give_c3_c5_at_strides_8_16_32(name, size):
    with torch.device("meta"):
        backbone = BACKBONES[name]().eval()
        outs = backbone(torch.empty(2, 3, *size))
    assert backbone.name == name
    assert backbone.out_channels == NEW_BACKBONES[name]
    assert backbone.strides == (8, 16, 32)
    h, w = size
    expected = [
        (2, c, h // s, w // s) for c, s in zip(backbone.out_channels, (8, 16, 32), strict=True)
    ]
    assert [tuple(o.shape) for o in outs] == expected


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_build_detector_feeds_the_fpn_from_the_backbone_channels(name):
    spec = ModelSpec(backbone=name, num_classes=8, fpn_channels=64, head_channels=64)
    with torch.device("meta"):
        detector = build_detector(spec)
    lateral_in = tuple(conv.in_channels for conv in detector.neck.lateral_convs)
    assert lateral_in == NEW_BACKBONES[name]


def test_every_backbone_has_an_mmdetection_rule():
    assert set(RULES) == set(BACKBONES)


def test_caffe_resnet_strides_in_conv1_of_the_first_block_of_layer2_to_4():
    caffe, pytorch = resnet50_caffe(), resnet50()
    for layer_c, layer_p in zip(caffe.children(), pytorch.children(), strict=True):
        if not isinstance(layer_c, nn.Sequential):
            continue
        for index, (block_c, block_p) in enumerate(zip(layer_c, layer_p, strict=True)):
            down = index == 0 and layer_c is not caffe.layer1
            stride = (2, 2) if down else (1, 1)
            assert (block_c.conv1.stride, block_c.conv2.stride) == (stride, (1, 1))
            assert (block_p.conv1.stride, block_p.conv2.stride) == ((1, 1), stride)
    assert caffe.name == "resnet50_caffe" and caffe.torchvision_arch == "resnet50"
    shapes = {k: v.shape for k, v in pytorch.state_dict().items()}
    assert {k: v.shape for k, v in caffe.state_dict().items()} == shapes
    with torch.device("meta"):
        for size in [(97, 75), (64, 33)]:
            outs_c = resnet50_caffe()(torch.empty(1, 3, *size))
            outs_p = resnet50()(torch.empty(1, 3, *size))
            assert [o.shape for o in outs_c] == [o.shape for o in outs_p]


def test_caffe_style_needs_bottlenecks_and_a_known_style():
    with pytest.raises(ModelError, match="caffe-style resnet18 is not defined"):
        ResNetBackbone(torchvision.models.resnet18(weights=None), "resnet18", style="caffe")
    with pytest.raises(ModelError, match="style 'detectron' is not known"):
        ResNetBackbone(torchvision.models.resnet18(weights=None), "resnet18", style="detectron")


# --- frozen stages ----------------------------------------------------------------------------


def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


def _trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("frozen_stages", [0, 3, 7])
def test_mobilenet_frozen_stages_count_conv1_then_mmdetection_layers(frozen_stages):
    backbone = mobilenet_v2(frozen_stages=frozen_stages).train()
    # MMDetection: conv1 = features[0]; layer1 = [1], layer2 = [2, 3], layer3 = [4..6], ...
    last_frozen = {0: 0, 3: 6, 7: 17}[frozen_stages]
    for index, feature in enumerate(backbone.features):
        frozen = index <= last_frozen
        assert _frozen(feature) if frozen else _trainable(feature), index
        assert feature.training is not frozen, index
    assert LAYER_ENDS == (1, 3, 6, 10, 13, 16, 17)


def test_mobilenet_norm_eval_freezes_statistics_only():
    backbone = mobilenet_v2(norm_eval=True).train()
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert _trainable(backbone)


def test_swin_frozen_stages_freeze_patch_embedding_stages_and_their_merging():
    backbone = swin_t(frozen_stages=2).train()
    features = backbone.features  # embed, stage1, merge, stage2, merge, stage3, merge, stage4
    for index in range(5):
        assert _frozen(features[index]) and not features[index].training, index
    for index in range(5, 8):
        assert _trainable(features[index]) and features[index].training, index
    assert _frozen(backbone.out_norms[0]) and not backbone.out_norms[0].training
    assert _trainable(backbone.out_norms[1]) and _trainable(backbone.out_norms[2])


@pytest.mark.parametrize(
    ("factory", "value", "message"),
    [
        (mobilenet_v2, 8, "out of range for a MobileNetV2"),
        (mobilenet_v2, -2, "out of range for a MobileNetV2"),
        (swin_t, 5, "out of range for a Swin Transformer"),
    ],
)
def test_frozen_stages_out_of_range_is_a_model_error(factory, value, message):
    with pytest.raises(ModelError, match=message) as err:
        factory(frozen_stages=value)
    assert err.value.hint.startswith("Use -1 (nothing frozen)")


# --- torchvision weights ----------------------------------------------------------------------


def _save_torchvision(tmp_path, arch: str) -> tuple[dict[str, Tensor], str]:
    torch.manual_seed(3)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize(
    ("factory", "arch"),
    [(resnet50_caffe, "resnet50"), (mobilenet_v2, "mobilenet_v2"), (swin_t, "swin_t")],
)
def test_torchvision_state_dict_loads_minus_its_classifier(tmp_path, factory, arch):
    state, path = _save_torchvision(tmp_path, arch)
    backbone = factory()
    load_torchvision_weights(backbone, path)
    own = backbone.state_dict()
    loaded = [k for k in own if k in state]
    assert loaded and all(torch.equal(own[k], state[k]) for k in loaded)
    classifier = {
        "resnet50": ("fc.",),
        "mobilenet_v2": ("features.18.", "classifier."),
        "swin_t": ("norm.", "head."),
    }[arch]
    left_out = [k for k in state if k not in own]
    assert {prefix for k in left_out for prefix in classifier if k.startswith(prefix)} == set(
        classifier
    )
    assert all(k.startswith(classifier) for k in left_out)


def test_swin_out_norms_stay_identity_after_a_torchvision_load(tmp_path):
    _, path = _save_torchvision(tmp_path, "swin_t")
    backbone = swin_t()
    load_torchvision_weights(backbone, path)
    for norm in backbone.out_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


@pytest.mark.parametrize(
    ("factory", "arch", "report"),
    [
        (
            swin_t,
            "mobilenet_v2",
            "swin_t: 180 missing (features.0.0.bias, features.0.2.weight, features.0.2.bias, ...); "
            "313 unexpected (features.0.1.weight, features.0.1.bias, features.0.1.running_mean, "
            "...); 1 misshapen (features.0.0.weight (32, 3, 3, 3) vs (96, 3, 4, 4)).",
        ),
        (
            mobilenet_v2,
            "swin_t",
            "mobilenet_v2: 305 missing (features.0.1.weight, features.0.1.bias, "
            "features.0.1.running_mean, ...); 184 unexpected (features.0.0.bias, "
            "features.0.2.weight, features.0.2.bias, ...); 1 misshapen (features.0.0.weight "
            "(96, 3, 4, 4) vs (32, 3, 3, 3)).",
        ),
        (
            resnet50_caffe,
            "mobilenet_v2",
            "resnet50_caffe: 318 missing (conv1.weight, bn1.weight, bn1.bias, ...); "
            "314 unexpected (features.0.0.weight, features.0.1.weight, features.0.1.bias, ...).",
        ),
    ],
)
def test_wrong_torchvision_state_dict_names_the_problem_and_the_constructor(
    tmp_path, factory, arch, report
):
    _, path = _save_torchvision(tmp_path, arch)
    backbone = factory()
    with pytest.raises(ModelError) as err:
        load_torchvision_weights(backbone, path)
    # swin_t: its 6 out_norms keys are not counted missing; mobilenet_v2's features.18 is gone
    assert err.value.message == f"Backbone weights '{path}' do not fit {report}"
    assert f"torchvision.models.{backbone.torchvision_arch}(weights=...)" in err.value.hint
    assert "resnet50_caffe(" not in err.value.hint


# --- MMDetection: ResNet ----------------------------------------------------------------------


def test_mmdet_resnet_keys_are_torchvision_keys():
    state = resnet50().state_dict()  # MMDetection's ResNet names, num_batches_tracked included
    extra = {"stem.0.weight": torch.zeros(1), "layer2.0.conv2.conv_offset.weight": torch.zeros(1)}
    for name in ("resnet50", "resnet50_caffe"):
        converted, unmapped = convert_mmdet_backbone(name, {**state, **extra})
        assert converted.keys() == state.keys()
        assert all(converted[k] is state[k] for k in state)
        assert unmapped == list(extra)


def test_unknown_backbone_has_no_rule():
    with pytest.raises(ModelError, match="Unknown backbone 'swin_s'"):
        convert_mmdet_backbone("swin_s", {})


# --- MMDetection: MobileNetV2 -----------------------------------------------------------------


def mmdet_mobilenet_v2_state(seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under MMDetection's MobileNetV2 names (InvertedResidual ConvModules)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}

    def conv_module(prefix: str, cin: int, cout: int, kernel: int, groups: int = 1) -> None:
        fan_in = cin // groups * kernel * kernel
        weight = torch.randn(cout, cin // groups, kernel, kernel, generator=generator)
        state[f"{prefix}.conv.weight"] = weight.double() * (2 / fan_in) ** 0.5
        for param, (shift, scale) in BN_DRAWS.items():
            value = shift + scale * torch.randn(cout, generator=generator, dtype=torch.float64)
            state[f"{prefix}.bn.{param}"] = value.abs() if param == "running_var" else value
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(7)

    conv_module("conv1", 3, 32, 3)
    cin = 32
    for layer, (t, c, n, _) in enumerate(MBV2_SETTINGS, start=1):
        for block in range(n):
            prefix, mid = f"layer{layer}.{block}", cin * t
            if t != 1:
                conv_module(f"{prefix}.expand_conv", cin, mid, 1)
            conv_module(f"{prefix}.depthwise_conv", mid, mid, 3, groups=mid)
            conv_module(f"{prefix}.linear_conv", mid, c, 1)
            cin = c
    conv_module("conv2", 320, 1280, 1)
    return state


def mmdet_mobilenet_v2_forward(images: Tensor, state: dict[str, Tensor]) -> list[Tensor]:
    """MMDetection's MobileNetV2 with out_indices (2, 4, 6), in eval mode."""

    def conv_module(x: Tensor, prefix: str, stride: int = 1, act: bool = True) -> Tensor:
        weight = state[f"{prefix}.conv.weight"]
        groups = x.shape[1] // weight.shape[1]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups)
        bn = {p: state[f"{prefix}.bn.{p}"] for p in ("running_mean", "running_var", "weight")}
        x = F.batch_norm(x, **bn, bias=state[f"{prefix}.bn.bias"], training=False, eps=1e-5)
        return F.relu6(x) if act else x

    x, outs, cin = conv_module(images, "conv1", stride=2), [], 32
    for layer, (t, c, n, s) in enumerate(MBV2_SETTINGS, start=1):
        for block in range(n):
            prefix, stride = f"layer{layer}.{block}", s if block == 0 else 1
            y = conv_module(x, f"{prefix}.expand_conv") if t != 1 else x
            y = conv_module(y, f"{prefix}.depthwise_conv", stride)
            y = conv_module(y, f"{prefix}.linear_conv", act=False)
            x, cin = (x + y if stride == 1 and cin == c else y), c
        if layer - 1 in (2, 4, 6):  # MMDetection counts its layers from 0
            outs.append(x)
    return outs


def test_mmdet_mobilenet_v2_converts_to_every_torchvision_key_and_the_same_outputs():
    state = mmdet_mobilenet_v2_state()
    converted, unmapped = convert_mmdet_backbone("mobilenet_v2", state)
    backbone = mobilenet_v2().double().eval()
    expected = backbone.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert sorted(unmapped) == sorted(k for k in state if k.startswith("conv2."))
    backbone.load_state_dict(converted, strict=True)
    images = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ours, reference = backbone(images), mmdet_mobilenet_v2_forward(images, state)
    assert [o.shape[1] for o in reference] == [32, 96, 320]
    for out, ref in zip(ours, reference, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_mmcls_mobilenet_v2_layout_converts_like_mmdetections():
    state = mmdet_mobilenet_v2_state()
    mmcls = {}
    for key, value in state.items():
        layer = key.split(".")[0]
        parts = ["depthwise_conv", "linear_conv"]
        parts = parts if layer == "layer1" else ["expand_conv", *parts]
        for index, part in enumerate(parts):
            key = key.replace(f".{part}.", f".conv.{index}.")
        mmcls[key] = value
    assert "layer2.0.conv.2.bn.running_var" in mmcls and "layer1.0.conv.1.conv.weight" in mmcls
    from_mmcls = convert_mmdet_backbone("mobilenet_v2", mmcls)[0]
    from_mmdet = convert_mmdet_backbone("mobilenet_v2", state)[0]
    assert from_mmcls.keys() == from_mmdet.keys()
    assert all(from_mmcls[k] is from_mmdet[k] for k in from_mmdet)


# --- MMDetection: Swin ------------------------------------------------------------------------


def mmdet_relative_position_index(window: int) -> Tensor:
    """MMDetection's WindowMSA index: a double-step sequence added to its transpose, flipped."""
    seq = (torch.arange(window)[:, None] * (2 * window - 1) + torch.arange(window)).reshape(1, -1)
    return (seq + seq.T).flip(1)  # (window^2, window^2)


def mmdet_patch_merging(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """MMDetection's PatchMerging on (B, H, W, C): nn.Unfold 2x2 gather, LayerNorm, Linear."""
    b, h, w, c = x.shape
    x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # B, L, 4C
    x = F.layer_norm(x, (4 * c,), state[f"{prefix}.norm.weight"], state[f"{prefix}.norm.bias"])
    return F.linear(x, state[f"{prefix}.reduction.weight"]).view(b, h // 2, w // 2, 2 * c)


def _windows(x: Tensor) -> Tensor:  # (B, H, W, C) -> (B * nW, WINDOW^2, C)
    b, h, w, c = x.shape
    x = x.view(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, WINDOW * WINDOW, c)


def mmdet_shift_window_msa(
    x: Tensor, state: dict[str, Tensor], prefix: str, heads: int, shift: int
) -> Tensor:
    """MMDetection's ShiftWindowMSA on (B, H, W, C): it shifts whenever shift > 0."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % WINDOW, 0, (-h) % WINDOW))
    hp, wp, n = x.shape[1], x.shape[2], WINDOW * WINDOW
    if shift:
        x = x.roll((-shift, -shift), (1, 2))
        region = torch.zeros(1, hp, wp, 1, dtype=x.dtype)
        cuts = (slice(0, -WINDOW), slice(-WINDOW, -shift), slice(-shift, None))
        for label, (rows, cols) in enumerate(itertools.product(cuts, cuts)):
            region[:, rows, cols] = label
        region = _windows(region).squeeze(-1)  # nW, N
        mask = (region[:, None, :] != region[:, :, None]).to(x.dtype) * -100.0
    windows = _windows(x)
    qkv = F.linear(windows, state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"])
    q, k, v = qkv.reshape(len(windows), n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    index = state[f"{prefix}.relative_position_index"].view(-1)
    bias = state[f"{prefix}.relative_position_bias_table"][index].view(n, n, heads)
    attn = attn + bias.permute(2, 0, 1)[None]
    if shift:
        attn = (attn.view(b, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = F.linear(out, state[f"{prefix}.proj.weight"], state[f"{prefix}.proj.bias"])
    out = out.view(b, hp // WINDOW, wp // WINDOW, WINDOW, WINDOW, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, hp, wp, c)
    if shift:
        out = out.roll((shift, shift), (1, 2))
    return out[:, :h, :w]


def _affine(state: dict[str, Tensor], prefix: str) -> tuple[Tensor, Tensor]:
    return state[f"{prefix}.weight"], state[f"{prefix}.bias"]


def mmdet_swin_block(x: Tensor, state: dict[str, Tensor], prefix: str, heads: int, shift: int):
    """MMDetection's SwinBlock: pre-norm window attention and FFN, each with a residual."""
    c = x.shape[-1]
    y = F.layer_norm(x, (c,), *_affine(state, f"{prefix}.norm1"))
    x = x + mmdet_shift_window_msa(y, state, f"{prefix}.attn.w_msa", heads, shift)
    y = F.layer_norm(x, (c,), *_affine(state, f"{prefix}.norm2"))
    y = F.gelu(F.linear(y, *_affine(state, f"{prefix}.ffn.layers.0.0")))
    return x + F.linear(y, *_affine(state, f"{prefix}.ffn.layers.1"))


def mmdet_swin_forward(images, state, embed, depths, heads) -> list[Tensor]:
    """MMDetection's SwinTransformer, out_indices (1, 2, 3), eval mode."""
    x = F.conv2d(images, *_affine(state, "patch_embed.projection"), stride=4)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (embed,), *_affine(state, "patch_embed.norm"))
    outs = []
    for stage, depth in enumerate(depths):
        for block in range(depth):
            shift = 0 if block % 2 == 0 else WINDOW // 2
            x = mmdet_swin_block(x, state, f"stages.{stage}.blocks.{block}", heads[stage], shift)
        if stage >= 1:
            norm = _affine(state, f"norm{stage}")
            outs.append(F.layer_norm(x, x.shape[-1:], *norm).permute(0, 3, 1, 2))
        if stage < len(depths) - 1:
            x = mmdet_patch_merging(x, state, f"stages.{stage}.downsample")
    return outs


def mmdet_swin_state(embed: int, depths, heads, seed: int = 0) -> dict[str, Tensor]:
    """Random float64 tensors under MMDetection's SwinTransformer names; LayerNorms not identity."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, shift: float = 0.0) -> Tensor:
        return shift + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    def norm(prefix: str, width: int) -> None:
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = rand(width, shift=1.0), rand(width)

    state = {
        "patch_embed.projection.weight": rand(embed, 3, 4, 4),
        "patch_embed.projection.bias": rand(embed),
    }
    norm("patch_embed.norm", embed)
    for stage, (depth, head) in enumerate(zip(depths, heads, strict=True)):
        dim = embed * 2**stage
        for block in range(depth):
            p = f"stages.{stage}.blocks.{block}"
            norm(f"{p}.norm1", dim)
            norm(f"{p}.norm2", dim)
            attn = f"{p}.attn.w_msa"
            state[f"{attn}.qkv.weight"], state[f"{attn}.qkv.bias"] = (
                rand(3 * dim, dim),
                rand(3 * dim),
            )
            state[f"{attn}.proj.weight"], state[f"{attn}.proj.bias"] = rand(dim, dim), rand(dim)
            state[f"{attn}.relative_position_bias_table"] = rand((2 * WINDOW - 1) ** 2, head)
            state[f"{attn}.relative_position_index"] = mmdet_relative_position_index(WINDOW)
            state[f"{p}.ffn.layers.0.0.weight"] = rand(4 * dim, dim)
            state[f"{p}.ffn.layers.0.0.bias"] = rand(4 * dim)
            state[f"{p}.ffn.layers.1.weight"] = rand(dim, 4 * dim, scale=0.1)
            state[f"{p}.ffn.layers.1.bias"] = rand(dim)
        if stage < len(depths) - 1:
            norm(f"stages.{stage}.downsample.norm", 4 * dim)
            state[f"stages.{stage}.downsample.reduction.weight"] = rand(2 * dim, 4 * dim)
        if stage >= 1:
            norm(f"norm{stage}", dim)
    return state


def tiny_swin(embed: int, depths, heads) -> SwinTBackbone:
    """torchvision's Swin architecture, narrow, in the crosskd wrapper (float64, eval)."""
    swin = torchvision.models.SwinTransformer(
        [4, 4], embed, list(depths), list(heads), [WINDOW, WINDOW], stochastic_depth_prob=0.0
    )
    return SwinTBackbone(swin).double().eval()


def test_patch_merging_permutation_reproduces_mmdetections_unfold_order():
    torch.manual_seed(0)
    c = 6
    state = {
        "m.norm.weight": 1 + torch.randn(4 * c, dtype=torch.float64),
        "m.norm.bias": torch.randn(4 * c, dtype=torch.float64),
        "m.reduction.weight": torch.randn(2 * c, 4 * c, dtype=torch.float64),
    }
    merging = torchvision.models.swin_transformer.PatchMerging(c).double()
    order = unfold_to_concat_order(c)
    merging.norm.weight.data = state["m.norm.weight"][order]
    merging.norm.bias.data = state["m.norm.bias"][order]
    merging.reduction.weight.data = state["m.reduction.weight"][:, order]
    x = torch.randn(2, 8, 10, c, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            merging(x), mmdet_patch_merging(x, state, "m"), rtol=0, atol=1e-12
        )
        merging.reduction.weight.data = state["m.reduction.weight"]  # unpermuted: not the same
        assert not torch.allclose(merging(x), mmdet_patch_merging(x, state, "m"))
    assert sorted(order.tolist()) == list(range(4 * c))


def test_mmdet_relative_position_index_equals_torchvisions():
    attention = swin_t().features[1][0].attn
    assert torch.equal(
        mmdet_relative_position_index(WINDOW).flatten(), attention.relative_position_index
    )


def test_mmdet_swin_converts_to_every_key_and_reproduces_mmdetections_outputs():
    embed, depths, heads = 24, (2, 2, 2, 2), (1, 2, 4, 8)
    state = {**mmdet_swin_state(embed, depths, heads), "absolute_pos_embed": torch.zeros(1)}
    converted, unmapped = convert_mmdet_backbone("swin_t", state)
    assert unmapped == ["absolute_pos_embed"]
    backbone = tiny_swin(embed, depths, heads)
    expected = backbone.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    backbone.load_state_dict(converted, strict=True)
    torch.manual_seed(1)
    images = torch.randn(1, 3, 256, 288, dtype=torch.float64)  # stride-32 map 8 x 9 > window
    with torch.no_grad():
        ours, reference = backbone(images), mmdet_swin_forward(images, state, embed, depths, heads)
    for out, ref in zip(ours, reference, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_swin_small_maps_differ_from_mmdetection_where_the_window_covers_a_side():
    """A side padded to a single window: torchvision does not shift there, MMDetection does."""
    embed, depths, heads = 24, (2, 2, 2, 2), (1, 2, 4, 8)
    state = mmdet_swin_state(embed, depths, heads)
    backbone = tiny_swin(embed, depths, heads)
    backbone.load_state_dict(convert_mmdet_backbone("swin_t", state)[0], strict=True)
    torch.manual_seed(2)
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)  # stage maps 16, 8, 4, 2
    with torch.no_grad():
        c3, c4, c5 = backbone(images)
        r3, r4, r5 = mmdet_swin_forward(images, state, embed, depths, heads)
    torch.testing.assert_close(c3, r3, rtol=0, atol=1e-9)  # 8 x 8, padded to 14: both shift
    assert not torch.allclose(c4, r4, atol=1e-3)  # 4 x 4, padded to 7: only MMDetection shifts
    assert not torch.allclose(c5, r5, atol=1e-3)
