"""MMDetection backbone tensors -> crosskd's backbone names (torchvision's), one layout each.

`convert_mmdet_backbone(name, state)` takes the `backbone.*` tensors of an MMDetection
checkpoint with that prefix stripped and returns them under the parameter and buffer names of
crosskd's backbone `name`, plus the input keys no rule maps. It checks no shapes and fills
nothing: comparing with the model is the importer's job.

Where the converted weights give exactly MMDetection's outputs (same operations, same order):

- ResNet, pytorch and caffe style: MMDetection's ResNet keys are torchvision's, so the rule is
  the identity on the stem, layer1-4 and downsample keys (ResNetV1d's deep stem, DCN offsets
  or plugins stay unmapped). Every BN's `num_batches_tracked` is mapped like the other BN
  buffers when the file has it (MMDetection checkpoints do; Detectron-era caffe weights may
  not). It only matters for BN with momentum=None, which no model here uses, so a missing one
  is harmless (BatchNorm's load_state_dict fills it with 0 from a plain dict without torch's
  version metadata).
- MobileNetV2 (widen_factor 1, MMDetection's default act_cfg ReLU6; configs that change
  act_cfg, as MMDetection's YOLOv3-MobileNetV2 does with LeakyReLU, describe another network):
  `conv1.{conv,bn}` -> `features.0.{0,1}`; block j of `layer{i}` -> `features.n` with
  n = 1 + (blocks of layer1..layer{i-1}) + j; inside it MMDetection's `expand_conv`,
  `depthwise_conv` and `linear_conv` ConvModules (mmcls/mmpretrain's layout `conv.0..2` is
  read too) -> torchvision's `conv.0.{0,1}`, `conv.1.{0,1}`, `conv.2` + `conv.3` (layer1 has no
  expansion: `conv.0.{0,1}`, `conv.1` + `conv.2`). `conv2` (1280 ch, classifier only) stays
  unmapped.
- Swin-T, up to float rounding: patch embedding, LayerNorms, qkv/proj, relative position bias
  tables, MLP and the per-output `norm1..3` (-> `out_norms.0..2`) map 1:1. MMDetection stores
  `relative_position_index` as a (49, 49) matrix built another way; its values equal
  torchvision's flat (2401,) index, so it is flattened. MMDetection's PatchMerging gathers
  each 2x2 neighbourhood with nn.Unfold, giving features in channel-major order
  (c * 4 + 2 * row + col), where torchvision concatenates [x0, x1, x2, x3] = offsets
  (0,0), (1,0), (0,1), (1,1), i.e. k * C + c; the `downsample.norm` weight/bias and the
  `downsample.reduction.weight` input columns are permuted accordingly (LayerNorm is
  equivariant under a permutation of its features and its affine parameters).
  The shifted-window attention of both pads the map right/bottom with zeros to a multiple of
  the 7x7 window before the cyclic shift, attends to padded tokens unmasked, builds the same
  region mask (-100) and crops the same way; the outputs are equal while every stage's padded
  map is larger than one window on both sides. Not equal: along a side whose padded size is a
  single window (a feature side <= 7), torchvision does not shift while MMDetection still
  shifts by 3 and masks, so the odd (shifted) blocks of that stage differ. For inputs whose
  sides are multiples of 32 that means sides <= 224 (stride 32), <= 112 (16) or <= 56 (8);
  COCO-sized inputs (800 x 1333) are exact. MMDetection's `absolute_pos_embed` (off in its
  Swin configs) and a `norm0` stay unmapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from crosskd_cli.errors import lookup
from crosskd_cli.models.mobilenet import LAYER_BLOCKS

Rule = Callable[[str, Tensor], tuple[str, Tensor] | None]

_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_KEY = re.compile(
    rf"conv1\.weight|bn1\.{_BN}"
    rf"|layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.{_BN}|downsample\.0\.weight"
    rf"|downsample\.1\.{_BN})"
)


def _resnet_rule(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    """MMDetection's ResNet names are torchvision's, for both styles."""
    return (key, value) if _RESNET_KEY.fullmatch(key) else None


_MBV2_PARTS = ("expand_conv", "depthwise_conv", "linear_conv")  # layer1 has no expand_conv
_MBV2_STEM = re.compile(rf"conv1\.(?:conv\.(weight)|bn\.({_BN}))")
_MBV2_BLOCK = re.compile(
    r"layer([1-7])\.(\d+)\.(expand_conv|depthwise_conv|linear_conv|conv\.(\d))\."
    rf"(?:conv\.(weight)|bn\.({_BN}))"
)


def _mobilenet_v2_rule(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    """MMDetection's (or mmcls's) MobileNetV2 names -> torchvision's `features.*`."""
    if match := _MBV2_STEM.fullmatch(key):
        conv_param, bn_param = match.groups()
        return (f"features.0.0.{conv_param}" if conv_param else f"features.0.1.{bn_param}"), value
    match = _MBV2_BLOCK.fullmatch(key)
    if not match:
        return None
    layer, block, part, mmcls_index, conv_param, bn_param = match.groups()
    layer, block = int(layer), int(block)
    if block >= LAYER_BLOCKS[layer - 1]:
        return None
    parts = _MBV2_PARTS[1:] if layer == 1 else _MBV2_PARTS
    if mmcls_index is not None:  # mmcls: conv.k is the k-th of the block's ConvModules
        if int(mmcls_index) >= len(parts):
            return None
        part = parts[int(mmcls_index)]
    if part not in parts:  # an expand_conv in layer1
        return None
    position = parts.index(part)
    feature = 1 + sum(LAYER_BLOCKS[: layer - 1]) + block
    if part == "linear_conv":  # torchvision: a bare Conv2d, then the BN as the next entry
        name = f"{position}.{conv_param}" if conv_param else f"{position + 1}.{bn_param}"
    else:  # torchvision: Conv2dNormActivation = (conv, bn, ReLU6)
        name = f"{position}.0.{conv_param}" if conv_param else f"{position}.1.{bn_param}"
    return f"features.{feature}.conv.{name}", value


def unfold_to_concat_order(channels: int) -> Tensor:
    """idx with torchvision PatchMerging feature t = MMDetection feature idx[t] (4C of them).

    torchvision: t = k * C + c for the offsets k = (row, col) = (0,0), (1,0), (0,1), (1,1);
    MMDetection's nn.Unfold: c * 4 + 2 * row + col. So torchvision weights are
    `norm[idx]` and `reduction[:, idx]`.
    """
    rows = torch.tensor([0, 1, 0, 1])
    cols = torch.tensor([0, 0, 1, 1])
    return (torch.arange(channels)[None, :] * 4 + (2 * rows + cols)[:, None]).flatten()


# inside a block: MMDetection module -> torchvision module (both with weight and bias)
_SWIN_BLOCK_MODULES = {
    "norm1": "norm1",
    "attn.w_msa.qkv": "attn.qkv",
    "attn.w_msa.proj": "attn.proj",
    "norm2": "norm2",
    "ffn.layers.0.0": "mlp.0",  # mmcv FFN: (Linear, GELU, Dropout), Linear, Dropout
    "ffn.layers.1": "mlp.3",  # torchvision MLP: Linear, GELU, Dropout, Linear, Dropout
}


def _swin_rule(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    """MMDetection's SwinTransformer names -> torchvision's `features.*` and `out_norms.*`."""
    if match := re.fullmatch(r"patch_embed\.(projection|norm)\.(weight|bias)", key):
        return f"features.0.{0 if match[1] == 'projection' else 2}.{match[2]}", value
    if match := re.fullmatch(r"stages\.([0-3])\.blocks\.(\d+)\.(.+)", key):
        block = f"features.{1 + 2 * int(match[1])}.{match[2]}"
        module, _, param = match[3].rpartition(".")
        if module in _SWIN_BLOCK_MODULES and param in ("weight", "bias"):
            return f"{block}.{_SWIN_BLOCK_MODULES[module]}.{param}", value
        if match[3] == "attn.w_msa.relative_position_bias_table":
            return f"{block}.attn.relative_position_bias_table", value
        if match[3] == "attn.w_msa.relative_position_index":  # (49, 49) -> (2401,), same values
            return f"{block}.attn.relative_position_index", value.flatten()
        return None
    if match := re.fullmatch(
        r"stages\.([0-2])\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", key
    ):
        merging = f"features.{2 + 2 * int(match[1])}"
        order = unfold_to_concat_order(value.shape[-1] // 4)  # reduction: (2C, 4C), norm: (4C,)
        return f"{merging}.{match[2]}", value[..., order]
    if match := re.fullmatch(r"norm([1-3])\.(weight|bias)", key):
        return f"out_norms.{int(match[1]) - 1}.{match[2]}", value
    return None


# crosskd backbone name -> the rule for its MMDetection layout (keep in step with BACKBONES)
RULES: dict[str, Rule] = {
    "resnet18": _resnet_rule,
    "resnet34": _resnet_rule,
    "resnet50": _resnet_rule,
    "resnet101": _resnet_rule,
    "resnet50_caffe": _resnet_rule,
    "resnet101_caffe": _resnet_rule,
    "mobilenet_v2": _mobilenet_v2_rule,
    "swin_t": _swin_rule,
}


# Keys MMDetection saves but its detector never runs, per backbone: MobileNetV2's 1280-channel
# `conv2` is built whatever out_indices says and used only when 7 is among them (a classifier
# feature); the detector reads layers 3, 5 and 7. The importer drops them and says so.
UNUSED_KEYS: dict[str, re.Pattern[str]] = {"mobilenet_v2": re.compile(r"conv2\..+")}


def convert_mmdet_backbone(
    backbone_name: str, state: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """(tensors under crosskd's backbone keys, input keys no rule maps), no prefixes.

    state: an MMDetection checkpoint's `backbone.*` tensors without the `backbone.` prefix.
    Raises ModelError for a backbone name without a rule, listing the known ones.
    """
    rule = lookup(RULES, backbone_name, "backbone")
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        mapped = rule(key, value)
        if mapped is None:
            unmapped.append(key)
        else:
            converted[mapped[0]] = mapped[1]
    return converted, unmapped
