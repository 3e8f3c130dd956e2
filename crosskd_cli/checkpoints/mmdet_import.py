"""`crosskd teacher import`: an MMDetection checkpoint -> a self-describing crosskd teacher.

MMDetection's key names (docs/method.md §5) map onto crosskd's one rule at a time; nothing is
guessed. Every key that does not map, is missing or has another shape is reported by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from crosskd_cli.checkpoints.format import CheckpointMeta, make_meta, save_checkpoint
from crosskd_cli.checkpoints.safe_pickle import load_checkpoint_object, refused_inside
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import Preset
from crosskd_cli.config.schema import shown
from crosskd_cli.data import CocoDetection, DataSource
from crosskd_cli.data.coco_layout import COCO_CATEGORY_IDS, COCO_CLASSES
from crosskd_cli.errors import CheckpointError, first_line
from crosskd_cli.families import get_family
from crosskd_cli.models import build_detector
from crosskd_cli.models.backbone_import import UNUSED_KEYS, convert_mmdet_backbone
from crosskd_cli.storage.files import file_digest

# (MMDetection key pattern, crosskd key template) for the neck and the head; backbone keys go
# through `convert_mmdet_backbone`, predictors through the family's names (`key_rules`).
# MMDetection's ConvModule adds `.conv` / `.gn` levels that crosskd's blocks name conv / norm.
KEY_RULES = [
    (r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", r"neck.\1.\2.\3"),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)", r"head.towers.\1.\2.conv.\3"),
    (r"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)", r"head.towers.\1.\2.norm.\3"),
    (r"bbox_head\.scales\.(\d+)\.scale", r"head.scales.\1.scale"),
]
BACKBONE_PREFIX = "backbone."
# Buffers MMDetection saves that crosskd computes instead; each is checked, then dropped.
DERIVED = {"bbox_head.integral.project"}  # GFL's 0..reg_max projection vector


@dataclass
class ImportReport:
    """How the file's keys met the model's: what loaded and every problem, by name."""

    loaded: list[str] = field(default_factory=list)  # crosskd keys filled from the file
    unmapped: list[str] = field(default_factory=list)  # file keys no rule maps
    unexpected: list[str] = field(default_factory=list)  # mapped, but the model has no such key
    missing: list[str] = field(default_factory=list)  # model keys the file does not fill
    misshapen: list[str] = field(default_factory=list)  # "key: file (..) vs model (..)"
    refused_metadata: list[str] = field(default_factory=list)  # classes skipped outside weights
    unused: list[str] = field(default_factory=list)  # file keys the detector never runs

    @property
    def problems(self) -> list[tuple[str, list[str]]]:
        kinds = [
            ("not an MMDetection key crosskd knows", self.unmapped),
            ("no such crosskd key", self.unexpected),
            ("missing from the file", self.missing),
            ("shape differs", self.misshapen),
        ]
        return [(kind, keys) for kind, keys in kinds if keys]


def key_rules(family: str) -> list[tuple[str, str]]:
    """KEY_RULES plus the family's predictors: `bbox_head.gfl_cls.*` -> `head.cls_predictor.*`."""
    predictors = get_family(family).mmdet_predictors
    return KEY_RULES + [
        (rf"bbox_head\.{re.escape(theirs)}\.(weight|bias)", rf"head.{ours}.\1")
        for ours, theirs in predictors.items()
    ]


def map_key(key: str, rules: list[tuple[str, str]]) -> str | None:
    """The crosskd name of an MMDetection key, or None when no rule covers it."""
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    return None


def read_mmdet_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """(state dict, meta dict, refused metadata classes) of an MMDetection `.pth` file."""
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist.",
            hint="Pass the path of a local MMDetection .pth file (model zoo downloads are such).",
        )
    try:
        loaded, refused = load_checkpoint_object(path)
    except Exception as err:  # a truncated zip, not a pickle at all, ...
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: {first_line(err)}",
            hint="Pass an MMDetection .pth file saved by torch.save.",
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict.",
            hint="Pass an MMDetection checkpoint: a dict with a 'state_dict' of tensors.",
        )
    inside = sorted(refused_inside(state))
    if inside:
        raise CheckpointError(
            f"{path} stores objects of {', '.join(inside)} among its weights; they were not "
            "unpickled.",
            hint="Only tensors are imported. Re-save the file with plain tensors "
            "(torch.save({'state_dict': model.state_dict()}, path)).",
        )
    not_named = [k for k in state if not isinstance(k, str)]
    if not_named:
        raise CheckpointError(
            f"{path}: {len(not_named)} state dict keys are not parameter names but "
            f"{type(not_named[0]).__name__}s, e.g. {shown(not_named[0])}.",
            hint="Pass an MMDetection checkpoint: a 'state_dict' mapping parameter names "
            "(strings such as 'bbox_head.gfl_cls.weight') to tensors.",
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: state dict entries that are not tensors: {', '.join(not_tensors[:5])}.",
            hint="Pass an MMDetection checkpoint whose 'state_dict' holds tensors only.",
        )
    meta = loaded.get("meta", {}) if isinstance(loaded, dict) else {}
    meta = meta if isinstance(meta, dict) else {}
    return dict(state), meta, sorted(refused - set(inside))


def class_names_in(meta: dict[str, Any]) -> list[str] | None:
    """The class names MMDetection recorded (2.x: meta.CLASSES; 3.x: dataset_meta.classes)."""
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def rename_keys(
    state: dict[str, Tensor], spec: ModelSpec
) -> tuple[list[tuple[str, str | None, Tensor]], list[str], list[str]]:
    """[(file key, crosskd key or None, tensor)] for every tensor, backbone included; the
    backbone keys no rule maps (MMDetection names them; crosskd has no such layer); and the
    backbone keys MMDetection's detector never runs (backbone_import.UNUSED_KEYS), dropped."""
    renamed: list[tuple[str, str | None, Tensor]] = []
    backbone_state = {}
    rules = key_rules(spec.family)
    for key, value in state.items():
        if key in DERIVED:
            _check_projection(key, value, spec.reg_max)
        elif key.startswith(BACKBONE_PREFIX):
            backbone_state[key[len(BACKBONE_PREFIX) :]] = value
        else:
            renamed.append((key, map_key(key, rules), value))
    backbone = spec.backbone
    converted, unmapped = convert_mmdet_backbone(backbone, backbone_state)
    renamed += [(BACKBONE_PREFIX + k, BACKBONE_PREFIX + k, v) for k, v in converted.items()]
    unused_rule = UNUSED_KEYS.get(backbone)
    unused = [k for k in unmapped if unused_rule is not None and unused_rule.fullmatch(k)]
    unmapped = [k for k in unmapped if k not in unused]
    return renamed, [BACKBONE_PREFIX + k for k in unmapped], [BACKBONE_PREFIX + k for k in unused]


def convert_state(
    state: dict[str, Tensor], model: nn.Module, spec: ModelSpec
) -> tuple[dict[str, Tensor], ImportReport]:
    """Rename the file's tensors to crosskd's keys and compare them with `model`'s."""
    report = ImportReport()
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    covered: set[str] = set()  # model keys the file names, whatever their shape
    renamed, report.unmapped, report.unused = rename_keys(state, spec)
    for key, name, value in renamed:
        if name is None:
            report.unmapped.append(key)
        elif name not in expected:
            report.unexpected.append(f"{key} -> {name}")
        elif value.shape != expected[name].shape:
            covered.add(name)
            report.misshapen.append(
                f"{key}: file {tuple(value.shape)} vs model {tuple(expected[name].shape)}"
            )
        else:
            covered.add(name)
            converted[name] = value
            report.loaded.append(name)
    # A BN counter only matters for momentum=None; torch fills a missing one with 0
    report.missing = [
        k for k in expected if k not in covered and not k.endswith("num_batches_tracked")
    ]
    return converted, report


def _check_projection(key: str, value: Tensor, reg_max: int) -> None:
    expected = torch.linspace(0, reg_max, reg_max + 1)
    if value.shape != expected.shape or not torch.allclose(value.float(), expected):
        raise CheckpointError(
            f"{key} is {value.tolist()}, not 0..{reg_max}: the file's GFL head uses another "
            "reg_max or projection.",
            hint=f"Use a preset whose model.reg_max matches the file ({value.numel() - 1}).",
        )


class ImportMismatch(CheckpointError):
    """The file's weights do not fill the preset's model; `report` lists every key."""

    def __init__(self, message: str, hint: str, report: ImportReport) -> None:
        super().__init__(message, hint=hint)
        self.report = report


def resolve_classes(
    meta: dict[str, Any], data: DataSource | None, num_classes: int
) -> tuple[list[str], list[int], str]:
    """(class names, category ids, where they came from): the data's (its training split's,
    as a run on it would have, else its validation split's), else the file's COCO."""
    if data is not None:
        if data.train_ann is not None and data.train_images is not None:
            split = CocoDetection(data.train_ann, data.train_images, train=False)
        else:
            split = CocoDetection(data.val_ann, data.val_images, train=False)
        return list(split.class_names), list(split.category_ids), f"the data {data.spec}"
    names = class_names_in(meta)
    if names is None and num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES), list(COCO_CATEGORY_IDS), "COCO (the preset has 80 classes)"
    if names is not None and tuple(names) == COCO_CLASSES:
        return names, list(COCO_CATEGORY_IDS), "the file (COCO's 80 classes)"
    found = f"{len(names)} classes that are not COCO's" if names else "no class names"
    raise CheckpointError(
        f"The checkpoint records {found}, so their category ids are unknown.",
        hint="Pass --data DATA (the data set the teacher was trained on) to take the class "
        "list from its validation annotations.",
    )


def import_teacher(
    path: Path, preset: Preset, data: DataSource | None, out: Path, *, allow_partial: bool
) -> tuple[CheckpointMeta, ImportReport]:
    """Convert `path` into a crosskd teacher at `out` built from `preset`'s model spec."""
    state, file_meta, refused = read_mmdet_checkpoint(path)
    names, ids, classes_from = resolve_classes(file_meta, data, preset.model.num_classes)
    spec = dataclasses.replace(preset.model, num_classes=len(names))
    model = build_detector(spec)
    converted, report = convert_state(state, model, spec)
    report.refused_metadata = refused
    if report.problems and not allow_partial:
        counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in report.problems)
        raise ImportMismatch(
            f"{path.name} does not fit preset '{preset.name}' ({spec.family} {spec.backbone}): "
            f"{counts}.",
            hint="Pick the preset of the file's architecture (crosskd inspect --list-presets), "
            "or load what fits with --allow-partial.",
            report=report,
        )
    model.load_state_dict(converted, strict=False)
    training = {
        "command": "teacher import",
        "imported_from": path.name,
        "format": "mmdetection",
        "sha256": file_digest(path),
        "classes_from": classes_from,
        "partial": bool(report.problems),
    }
    val_data = data.spec if data is not None else ""
    meta = make_meta(
        preset,
        spec,
        "teacher",
        class_names=names,
        category_ids=ids,
        val_data=val_data,
        training=training,
    )
    save_checkpoint(out, model.state_dict(), meta)
    return meta, report
