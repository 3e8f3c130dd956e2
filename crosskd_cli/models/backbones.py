"""The backbone contract, torchvision ResNets (pytorch and caffe style) and weight loading."""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from crosskd_cli.errors import ModelError

_SHOWN_KEYS = 3  # how many offending keys an error names before it only counts


class Backbone(nn.Module, ABC):
    """What every backbone shares: [C3, C4, C5] at strides 8/16/32, and frozen stages.

    A subclass sets `name` (its BACKBONES key), `out_channels` (C3-C5 widths),
    `torchvision_arch` (the torchvision constructor whose state dict `load_torchvision_weights`
    reads), `torchvision_ignored` (key prefixes of that state dict with nothing to load into
    here: the classifier), `torchvision_absent` (own key prefixes that state dict lacks; they
    keep their values), `frozen_stages` and `norm_eval`, lists what `frozen_stages` freezes in
    `frozen_modules()`, and calls `freeze()` at the end of its __init__.
    """

    strides = (8, 16, 32)
    torchvision_ignored: tuple[str, ...] = ()
    torchvision_absent: tuple[str, ...] = ()

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """The modules `frozen_stages` freezes, in forward order."""

    def freeze(self) -> None:
        """Stop gradients into the frozen modules and put them (and BN, if norm_eval) in eval."""
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> Backbone:
        """Switch mode, keeping frozen stages (and every BN when norm_eval) in eval mode.

        Eval mode keeps BN statistics of frozen stages still and turns off their dropout or
        stochastic depth, as MMDetection's `_freeze_stages` does with `m.eval()`.
        """
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self


class ResNetBackbone(Backbone):
    """A torchvision ResNet without its classifier, returning [C3, C4, C5].

    Parameter names are exactly torchvision's (`conv1.weight`, `layer3.5.bn2.running_mean`,
    ...), so a torchvision state dict minus `fc.*` loads with strict key matching.

    name: the torchvision constructor (`resnet50`); the backbone is called `resnet50_caffe`
    for style="caffe".
    style: "pytorch" (torchvision) puts a Bottleneck's stride 2 on its 3x3 conv2; "caffe"
    (MMDetection's `style='caffe'`, the original MSRA/Detectron ResNets) puts it on the 1x1
    conv1. Same parameters and output shapes, different function: caffe-style weights (e.g.
    MMDetection's FCOS R50/R101-caffe backbones) only work in a caffe-style network. Those
    networks also read BGR with caffe mean/std, which the model spec's pixel fields handle.
    frozen_stages: -1 freezes nothing; k >= 0 freezes the stem (conv1, bn1) and layer1..layerk:
    their parameters get requires_grad=False and they stay in eval mode, so no backward runs
    through them and their BN statistics never move (MMDetection's `frozen_stages`).
    norm_eval: every BatchNorm stays in eval mode during training (statistics frozen, affine
    parameters still trainable), as for fine-tuning an ImageNet backbone with small batches.
    MMDetection's caffe configs also set BN `requires_grad=False` (affine frozen too): the
    model spec's `norm_affine_trainable: false` does that in `build_detector`.
    """

    torchvision_ignored = ("fc.",)

    def __init__(
        self,
        resnet: torchvision.models.ResNet,
        name: str = "resnet",
        frozen_stages: int = -1,
        norm_eval: bool = False,
        style: str = "pytorch",
    ) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ModelError(
                f"frozen_stages={frozen_stages} is out of range for a ResNet.",
                hint="Use -1 (nothing frozen), 0 (stem) or 1..4 (stem and layer1..layerk).",
            )
        if style not in ("pytorch", "caffe"):
            raise ModelError(
                f"ResNet style '{style}' is not known.", hint="Use 'pytorch' or 'caffe'."
            )
        if style == "caffe":
            _move_strides_to_conv1(resnet, name)
        self.torchvision_arch = name
        self.name = name if style == "pytorch" else f"{name}_{style}"
        self.style = style
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        expansion = type(resnet.layer4[-1]).expansion  # 1 for BasicBlock, 4 for Bottleneck
        self.out_channels = tuple(width * expansion for width in (128, 256, 512))
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first `frozen_stages` layers, in forward order."""
        if self.frozen_stages < 0:
            return []
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        return [self.conv1, self.bn1, *layers[: self.frozen_stages]]

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C3, C4, C5] at strides 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _move_strides_to_conv1(resnet: torchvision.models.ResNet, name: str) -> None:
    """Caffe style: each downsampling Bottleneck strides in its 1x1 conv1, not its 3x3 conv2.

    Output sizes are unchanged: a 1x1 stride-2 conv without padding and a 3x3 stride-2 conv
    with padding 1 both give ceil(H / 2). The shortcut's stride-2 1x1 conv stays as it is.
    """
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            if not isinstance(block, torchvision.models.resnet.Bottleneck):
                raise ModelError(
                    f"A caffe-style {name} is not defined: it has no Bottleneck blocks.",
                    hint="Use style='caffe' with resnet50 or resnet101.",
                )
            block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


def _resnet_factory(name: str, style: str = "pytorch") -> Callable[..., ResNetBackbone]:
    build_resnet = getattr(torchvision.models, name)

    def build(frozen_stages: int = -1, norm_eval: bool = False) -> ResNetBackbone:
        # weights=None: never download; pretrained weights come from a local file
        return ResNetBackbone(build_resnet(weights=None), name, frozen_stages, norm_eval, style)

    build.__name__ = name if style == "pytorch" else f"{name}_{style}"
    build.__doc__ = f"torchvision {name} ({style} style) as a C3-C5 backbone, random init."
    return build


resnet18 = _resnet_factory("resnet18")
resnet34 = _resnet_factory("resnet34")
resnet50 = _resnet_factory("resnet50")
resnet101 = _resnet_factory("resnet101")
resnet50_caffe = _resnet_factory("resnet50", style="caffe")
resnet101_caffe = _resnet_factory("resnet101", style="caffe")


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """Read a raw state dict or {"state_dict": ...} without unpickling arbitrary objects."""
    if not path.is_file():
        raise ModelError(
            f"Backbone weights file '{path}' does not exist.",
            hint="Pass the path of a local torchvision state dict (.pth or .safetensors).",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path, device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise ModelError(
            f"Backbone weights file '{path}' cannot be read as a state dict: {err}",
            hint="Save it with torch.save(model.state_dict(), path) from the torchvision model.",
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ModelError(
            f"Backbone weights file '{path}' holds a {type(loaded).__name__}, not a state dict "
            "of tensors.",
            hint="Save it with torch.save(model.state_dict(), path) from the torchvision model.",
        )
    return loaded


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def mismatch_report(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """One phrase per kind of mismatch (missing, unexpected, misshapen), empty when all fit."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    report = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            report.append(f"{len(keys)} {what} ({_name_some(keys)})")
    return report


def load_torchvision_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a local state dict of `backbone.torchvision_arch` from torchvision into `backbone`.

    Keys under `backbone.torchvision_ignored` (the classifier: ResNet `fc.*`, MobileNetV2
    `features.18.*` and `classifier.*`, Swin `norm.*` and `head.*`) are dropped; keys under
    `backbone.torchvision_absent` (Swin-T's per-output `out_norms.*`) are not expected and keep
    their values. Accepts a raw state dict or {"state_dict": ...} (.pth via torch.load with
    weights_only=True, or .safetensors). Every other key must match name and shape exactly;
    otherwise ModelError names the first few missing / unexpected / misshapen keys and counts.
    Never downloads anything.
    """
    path = Path(path)
    ignored = backbone.torchvision_ignored
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(ignored)}
    expected = {
        k: v
        for k, v in backbone.state_dict().items()
        if not k.startswith(backbone.torchvision_absent)
    }
    report = mismatch_report(state, expected)
    if report:
        arch = backbone.torchvision_arch
        raise ModelError(
            f"Backbone weights '{path}' do not fit {backbone.name}: {'; '.join(report)}.",
            hint=f"Pass a torchvision {arch} state dict "
            f"(torch.save(torchvision.models.{arch}(weights=...).state_dict(), path)), "
            "or change the preset's backbone to match the file.",
        )
    backbone.load_state_dict({**backbone.state_dict(), **state}, strict=True)
