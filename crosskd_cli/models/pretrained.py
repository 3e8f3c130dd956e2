"""ImageNet backbone initialisation as the paper's configs load it: a URI -> a local file.

A model spec's `backbone_init` names where its backbone starts from: `scratch` (random, what
the CPU `shapes-*` presets use) or one of the URIs of `BACKBONE_INITS`, the names MMDetection's
configs give their `init_cfg` (`torchvision://resnet50`, `open-mmlab://detectron2/...`). Each
URI stands for one file, looked for in the torch hub cache (`torch.hub.get_dir()/checkpoints/`,
where torchvision and MMDetection put downloads too), so a machine that has it needs no
network. It is downloaded only on request (`--download-weights`); `--backbone-weights FILE`
overrides it. Only a run that trains a backbone resolves it: rebuilding a model from a
checkpoint (eval, teacher import, a distill teacher, inspect) takes its weights from the file.

Each file is read without unpickling arbitrary objects, by the reader of its layout:
torchvision state dicts by `models.backbones.load_torchvision_weights`, MMDetection-named ones
(the converted caffe ResNets, whose keys are torchvision's; mmcls's MobileNetV2) through
`backbone_import.convert_mmdet_backbone`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.errors import ModelError
from crosskd_cli.models.backbones import (
    Backbone,
    load_torchvision_weights,
    mismatch_report,
    read_state_dict,
)

SCRATCH = "scratch"
_TORCHVISION = "https://download.pytorch.org/models/"
_OPENMMLAB_THIRD_PARTY = "https://download.openmmlab.com/pretrain/third_party/"
_OPENMMLAB_V2 = "https://download.openmmlab.com/mmdetection/v2.0/third_party/"
_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torch hub's file naming: <name>-<sha256 prefix>.pth


@dataclass(frozen=True)
class PretrainedFile:
    """One ImageNet checkpoint: its file name (as torch hub caches it), where it is published,
    the key layout its reader expects and the backbones it fits."""

    file: str
    url: str
    layout: Literal["torchvision", "mmdet"]
    backbones: tuple[str, ...]


# backbone_init value -> its file (None: from scratch). The URIs are MMDetection's.
BACKBONE_INITS: dict[str, PretrainedFile | None] = {
    SCRATCH: None,
    **{
        f"torchvision://{name}": PretrainedFile(
            file, _TORCHVISION + file, "torchvision", (name,)
        )  # torchvision's IMAGENET1K_V1 weights, the files MMDetection's configs load
        for name, file in (
            ("resnet18", "resnet18-f37072fd.pth"),
            ("resnet34", "resnet34-b627a593.pth"),
            ("resnet50", "resnet50-0676ba61.pth"),
            ("resnet101", "resnet101-63fe2227.pth"),
            # MMDetection's Swin configs load the official swin_tiny_patch4_window7_224.pth;
            # torchvision's own Swin-T ImageNet weights are the stated alternative here
            ("swin_t", "swin_t-704ceda3.pth"),
        )
    },
    # MMDetection's conversion of the MSRA caffe ResNets (torchvision key names, BGR input)
    "open-mmlab://detectron2/resnet50_caffe": PretrainedFile(
        "resnet50_msra-5891d200.pth",
        _OPENMMLAB_THIRD_PARTY + "resnet50_msra-5891d200.pth",
        "mmdet",
        ("resnet50_caffe",),
    ),
    "open-mmlab://detectron2/resnet101_caffe": PretrainedFile(
        "resnet101_msra-6cc46731.pth",
        _OPENMMLAB_THIRD_PARTY + "resnet101_msra-6cc46731.pth",
        "mmdet",
        ("resnet101_caffe",),
    ),
    # mmcls's MobileNetV2 (MMDetection's names under `backbone.`)
    "open-mmlab://mmdet/mobilenet_v2": PretrainedFile(
        "mobilenet_v2_batch256_imagenet-ff34753d.pth",
        _OPENMMLAB_V2 + "mobilenet_v2_batch256_imagenet-ff34753d.pth",
        "mmdet",
        ("mobilenet_v2",),
    ),
}


def check_init(spec: ModelSpec) -> None:
    """Refuse a `backbone_init` whose file holds another backbone than the spec's."""
    source = BACKBONE_INITS.get(spec.backbone_init)
    if source is not None and spec.backbone not in source.backbones:
        fitting = [uri for uri, s in BACKBONE_INITS.items() if s and spec.backbone in s.backbones]
        raise ModelError(
            f"backbone_init '{spec.backbone_init}' holds a {source.backbones[0]} backbone, "
            f"not the model's {spec.backbone}.",
            hint=f"Use --set model.backbone_init={(fitting or [SCRATCH])[0]}, or scratch.",
        )


def cache_path(source: PretrainedFile) -> Path:
    """Where torch hub keeps (and `--download-weights` puts) the file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / source.file


def resolve(
    spec: ModelSpec, given: Path | None, download: bool, *, file_option: bool = True
) -> Path | None:
    """The file the backbone starts from, None for from scratch.

    given (--backbone-weights) wins; else the spec's `backbone_init` file in the torch hub
    cache; else, with `download`, it is fetched into that cache (checked against the hash in
    its name). Without any, ModelError names the file, the cache path and both options
    (--backbone-weights only where the command has it: `file_option`).
    """
    check_init(spec)
    if given is not None:
        if not given.is_file():
            raise ModelError(
                f"Backbone weights file '{given}' does not exist.",
                hint="Pass the path of a local ImageNet state dict (.pth or .safetensors).",
            )
        return given
    source = BACKBONE_INITS[spec.backbone_init]
    if source is None:
        return None
    path = cache_path(source)
    if path.is_file():
        return path
    if not download:
        raise ModelError(
            f"The {spec.backbone} backbone starts from ImageNet weights "
            f"({spec.backbone_init}): {source.file} is not in {path.parent}.",
            hint=f"Place {source.url} at {path}"
            + (", pass --backbone-weights FILE," if file_option else "")
            + " or add --download-weights to fetch it; --set model.backbone_init=scratch "
            "trains the backbone from scratch.",
        )
    return _download(source, path)


def _download(source: PretrainedFile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH.search(source.file)
    try:
        torch.hub.download_url_to_file(
            source.url, str(path), hash_prefix=match[1] if match else None, progress=True
        )
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise ModelError(
            f"Downloading {source.url} failed: {err}",
            hint=f"Download it elsewhere and place it at {path}, or pass --backbone-weights FILE.",
        ) from err
    return path


def load_backbone_weights(backbone: Backbone, path: Path, backbone_init: str) -> None:
    """Load the ImageNet file at `path` into `backbone`, read as `backbone_init`'s layout
    (torchvision's for `scratch`, i.e. a --backbone-weights file on a from-scratch preset)."""
    source = BACKBONE_INITS.get(backbone_init)
    if source is None or source.layout == "torchvision":
        load_torchvision_weights(backbone, path)
    else:
        load_mmdet_weights(backbone, path)


def load_mmdet_weights(backbone: Backbone, path: Path) -> None:
    """Load an MMDetection/mmcls-named backbone file (keys optionally under `backbone.`).

    Keys no rule maps (a classifier head, MobileNetV2's 1280-channel conv) are dropped, and a
    missing BN `num_batches_tracked` keeps its value; every other key of the backbone must be
    there with its shape. A file in torchvision's own layout (nothing converts) is read as one.
    """
    from crosskd_cli.models.backbone_import import convert_mmdet_backbone  # it imports models.build

    state = dict(read_state_dict(path))
    if any(key.startswith("backbone.") for key in state):
        state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
    converted, _ = convert_mmdet_backbone(backbone.name, state)
    if not converted:
        load_torchvision_weights(backbone, path)
        return
    expected = {
        k: v
        for k, v in backbone.state_dict().items()
        if not k.startswith(backbone.torchvision_absent)
        and not (k.endswith("num_batches_tracked") and k not in converted)
    }
    report = mismatch_report(converted, expected)
    if report:
        raise ModelError(
            f"Backbone weights '{path}' do not fit {backbone.name}: {'; '.join(report)}.",
            hint="Pass MMDetection's ImageNet file of this backbone, or change the preset's "
            "backbone_init.",
        )
    backbone.load_state_dict({**backbone.state_dict(), **converted}, strict=True)


def describe(path: Path | None) -> str:
    """The run banner's words for where the backbone starts."""
    return "backbone from scratch" if path is None else f"backbone from {path}"
