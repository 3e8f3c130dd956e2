"""ResNet backbones from torchvision returning C3-C5, with frozen stages and frozen BN."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from crosskd_cli.errors import ModelError

_SHOWN_KEYS = 3  # how many offending keys an error names before it only counts


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning [C3, C4, C5].

    Parameter names are exactly torchvision's (`conv1.weight`, `layer3.5.bn2.running_mean`,
    ...), so a torchvision state dict minus `fc.*` loads with strict key matching.

    frozen_stages: -1 freezes nothing; k >= 0 freezes the stem (conv1, bn1) and layer1..layerk:
    their parameters get requires_grad=False and they stay in eval mode, so no backward runs
    through them and their BN statistics never move (MMDetection's `frozen_stages`).
    norm_eval: every BatchNorm stays in eval mode during training (statistics frozen, affine
    parameters still trainable), as for fine-tuning an ImageNet backbone with small batches.
    """

    strides = (8, 16, 32)

    def __init__(
        self,
        resnet: torchvision.models.ResNet,
        name: str = "resnet",
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ModelError(
                f"frozen_stages={frozen_stages} is out of range for a ResNet.",
                hint="Use -1 (nothing frozen), 0 (stem) or 1..4 (stem and layer1..layerk).",
            )
        self.name = name
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
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train()

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first `frozen_stages` layers, in forward order."""
        if self.frozen_stages < 0:
            return []
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        return [self.conv1, self.bn1, *layers[: self.frozen_stages]]

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Switch mode, keeping frozen stages (and every BN when norm_eval) in eval mode."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C3, C4, C5] at strides 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _resnet_factory(name: str) -> Callable[..., ResNetBackbone]:
    build_resnet = getattr(torchvision.models, name)

    def build(frozen_stages: int = -1, norm_eval: bool = False) -> ResNetBackbone:
        # weights=None: never download; pretrained weights come from a local file
        return ResNetBackbone(build_resnet(weights=None), name, frozen_stages, norm_eval)

    build.__name__ = name
    build.__doc__ = f"torchvision {name} as a C3-C5 backbone, randomly initialised."
    return build


resnet18 = _resnet_factory("resnet18")
resnet34 = _resnet_factory("resnet34")
resnet50 = _resnet_factory("resnet50")
resnet101 = _resnet_factory("resnet101")


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """Read a raw state dict or {"state_dict": ...} without unpickling arbitrary objects."""
    if not path.is_file():
        raise ModelError(
            f"Backbone weights file '{path}' does not exist.",
            hint="Pass the path of a local torchvision ResNet state dict (.pth or .safetensors).",
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
            hint="Save it with torch.save(model.state_dict(), path) from a torchvision ResNet.",
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ModelError(
            f"Backbone weights file '{path}' holds a {type(loaded).__name__}, not a state dict "
            "of tensors.",
            hint="Save it with torch.save(model.state_dict(), path) from a torchvision ResNet.",
        )
    return loaded


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _mismatch_report(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
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


def load_torchvision_weights(backbone: ResNetBackbone, path: str | Path) -> None:
    """Load a local torchvision ResNet state dict into `backbone`; `fc.*` keys are ignored.

    Accepts a raw state dict or {"state_dict": ...} (.pth via torch.load with
    weights_only=True, or .safetensors). Every other key must match name and shape exactly;
    otherwise ModelError names the first few missing / unexpected / misshapen keys and counts.
    Never downloads anything.
    """
    path = Path(path)
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    report = _mismatch_report(state, backbone.state_dict())
    if report:
        raise ModelError(
            f"Backbone weights '{path}' do not fit {backbone.name}: {'; '.join(report)}.",
            hint=f"Pass a torchvision {backbone.name} state dict "
            f"(torch.save(torchvision.models.{backbone.name}(weights=...).state_dict(), path)), "
            "or change the preset's backbone to match the file.",
        )
    backbone.load_state_dict(state, strict=True)
