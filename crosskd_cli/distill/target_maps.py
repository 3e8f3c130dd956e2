"""The paper's Fig. 2 for one image: per FPN level, the teacher's class scores beside the
ground-truth targets the student is assigned, and where the two disagree.

Prediction mimicking asks the student's own head to match both at once; where they differ
(the teacher unsure on a positive, or confident on a negative), the two targets conflict.
CrossKD moves the teacher's side of that conflict onto the cross-head branch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosskd_cli.checkpoints.format import load_checkpoint, load_state_into
from crosskd_cli.config.presets import Preset
from crosskd_cli.data import ClassList, CocoDetection, DataSource
from crosskd_cli.data.collate import collate_by_shape
from crosskd_cli.distill.pairing import pair_problems
from crosskd_cli.errors import ModelError, OptionError, RunError
from crosskd_cli.families import build_criterion
from crosskd_cli.models import build_detector
from crosskd_cli.storage.files import atomic_write_text
from crosskd_cli.viz.plots import save_png

FIGSIZE = (12.8, 3.0)  # at plots.DPI (80): every PNG is 1024x240 px
PANELS = ("image and ground truth", "teacher: max class score", "student's assigned target",
          "|teacher - target|, max over classes")  # fmt: skip


@dataclass
class LevelMaps:
    """One FPN level, one value per location (H, W); NaN where no loss is computed there
    (outside the image, RetinaNet's ignore band). With several anchors per location, the
    largest value over them."""

    name: str  # P3, P4, ...
    stride: int
    teacher: np.ndarray  # max over classes of sigmoid(teacher's class logit)
    target: np.ndarray  # max over classes of the assigned target: 1 on positives, else 0
    disagreement: np.ndarray  # max over classes of |teacher score - target|

    def as_dict(self) -> dict[str, Any]:
        def plain(a: np.ndarray) -> list[list[float | None]]:
            return [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in a]

        return {
            "level": self.name,
            "stride": self.stride,
            "positives": int(np.nansum(self.target > 0)),
            "teacher": plain(self.teacher),
            "target": plain(self.target),
            "disagreement": plain(self.disagreement),
        }


@dataclass
class TargetMaps:
    """Everything the pictures show for one validation image."""

    image_id: int
    image: np.ndarray  # (h, w, 3) uint8, resized as in training, unpadded
    boxes: list[list[float]]  # xyxy in the resized image
    labels: list[str]  # class names of the boxes
    levels: list[LevelMaps]


def read_val_image(data: DataSource, scale, classes: ClassList, image_id: int | None):
    """(dataset, index) of `image_id` (default: the first) in the validation split."""
    dataset = CocoDetection(
        data.val_ann, data.val_images, train=False, scale=scale, classes=classes
    )
    if image_id is None:
        return dataset, 0
    if image_id not in dataset.image_ids:
        some = ", ".join(str(i) for i in dataset.image_ids[:5])
        raise OptionError(
            f"--image-id {image_id} is not an image of the validation split of {data.spec}.",
            hint=f"Use one of its {len(dataset.image_ids)} image ids, e.g. {some}.",
        )
    return dataset, dataset.image_ids.index(image_id)


@torch.no_grad()
def compute_target_maps(
    preset: Preset, data: DataSource, teacher_path: Path, image_id: int | None
) -> TargetMaps:
    """The teacher (eval mode) on one validation image, resized to the preset's scale, and the
    assignment of the preset's model (the student of a pair) on the same priors."""
    state_dict, meta = load_checkpoint(teacher_path)
    teacher = build_detector(meta.model)
    load_state_into(teacher, state_dict, source=str(teacher_path))
    teacher.eval()
    spec = dataclasses.replace(preset.model, num_classes=meta.model.num_classes)
    problems = pair_problems(meta.model, spec, 0, adapter=True)
    if problems:
        raise ModelError(
            f"Teacher {teacher_path.name} and preset '{preset.name}' do not share priors: "
            + "; ".join(problems)
            + ".",
            hint="Pass the pair preset this teacher was trained for (--preset).",
        )
    classes = ClassList(
        tuple(meta.category_ids),
        tuple(meta.class_names),
        f"teacher {teacher_path.name}",
        "Pass data labelled with the teacher's classes.",
    )
    dataset, index = read_val_image(data, preset.data.scale, classes, image_id)
    (batch,) = collate_by_shape([dataset[index]])
    criterion = build_criterion(spec)
    head = teacher(batch.images, batch.image_sizes).head
    flat = criterion.flatten(head, batch.image_sizes)
    targets = criterion.assign(flat, batch.targets)
    scores = flat.cls.float().sigmoid()[0]  # (A, C)
    onehot = torch.zeros_like(scores)
    pos = targets.pos_mask[0]
    onehot[pos, targets.labels[0][pos]] = 1.0
    trained = flat.valid[0] & (targets.label_weights[0] > 0)
    per_prior = {
        "teacher": scores.amax(-1),
        "target": onehot.amax(-1),
        "disagreement": (scores - onehot).abs().amax(-1),
    }
    sizes = [tuple(x.shape[-2:]) for x in head.cls_logits]
    levels = split_levels(per_prior, trained, sizes, spec.strides)
    target = batch.targets[0]
    h, w = batch.image_sizes[0]
    return TargetMaps(
        image_id=target.image_id,
        image=batch.images[0, :, :h, :w].permute(1, 2, 0).numpy(),
        boxes=target.boxes.tolist(),
        labels=[meta.class_names[k] for k in target.labels.tolist()],
        levels=levels,
    )


def split_levels(
    per_prior: dict[str, torch.Tensor],
    trained: torch.Tensor,
    sizes: list[tuple[int, int]],
    strides: tuple[int, ...],
) -> list[LevelMaps]:
    """(A,) values in the priors' order -> per level (H, W) maps (`sizes`), the largest over
    a location's anchors, NaN where none of them is trained."""
    anchors = trained.numel() // sum(h * w for h, w in sizes)  # priors per location
    levels, start = [], 0
    for k, ((h, w), stride) in enumerate(zip(sizes, strides, strict=True)):
        count = h * w * anchors  # anchors innermost in the flattened order
        mask = trained[start : start + count].reshape(h, w, anchors)
        maps = {}
        for name, values in per_prior.items():
            v = values[start : start + count].reshape(h, w, anchors)
            v = torch.where(mask, v, torch.tensor(float("-inf"))).amax(-1)
            maps[name] = torch.where(mask.any(-1), v, torch.tensor(float("nan"))).numpy()
        levels.append(LevelMaps(f"P{3 + k}", int(stride), **maps))
        start += count
    return levels


def draw_level(maps: TargetMaps, level: LevelMaps, path: Path) -> dict[str, np.ndarray]:
    """One PNG: the image with its boxes, then the level's three maps over the image's extent.
    Returns each heat-map as matplotlib holds it (what the picture shows)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=FIGSIZE, layout="constrained")
    h, w = maps.image.shape[:2]
    rows, cols = level.teacher.shape
    extent = (0, cols * level.stride, rows * level.stride, 0)  # the level's grid in pixels
    axes[0].imshow(maps.image)
    drawn = {}
    for ax, name in zip(axes[1:], ("teacher", "target", "disagreement"), strict=True):
        ax.set_facecolor("#d8d8d8")  # where no loss is computed (NaN)
        image = ax.imshow(
            getattr(level, name), cmap="magma", vmin=0, vmax=1, extent=extent,
            interpolation="nearest",
        )  # fmt: skip
        drawn[name] = np.ma.filled(image.get_array(), np.nan)
    for ax, title in zip(axes, PANELS, strict=True):
        for box, label in zip(maps.boxes, maps.labels, strict=True):
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="#35c0ff"))
            if ax is axes[0]:
                ax.text(x0, y0 - 1, label, color="#35c0ff", fontsize=6)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[1:]), fraction=0.02, pad=0.01)
    fig.suptitle(
        f"image {maps.image_id}, level {level.name} (stride {level.stride}): "
        f"{int(np.nansum(level.target > 0))} positive locations",
        fontsize=9,
    )
    save_png(fig, path)
    return drawn


def output_files(out: Path, maps: TargetMaps) -> list[Path]:
    return [out / f"targets_{level.name}.png" for level in maps.levels] + [out / "targets.json"]


def write_target_maps(maps: TargetMaps, out: Path, overwrite: bool) -> list[Path]:
    """targets_P3.png... and targets.json (the numbers drawn) in `out`; files there are
    replaced only with `overwrite`."""
    files = output_files(out, maps)
    taken = [p for p in files if p.exists()]
    if taken and not overwrite:
        raise RunError(
            f"{taken[0]} already exists.",
            hint="Add --overwrite to replace it, or pick another --out.",
        )
    out.mkdir(parents=True, exist_ok=True)
    for level, path in zip(maps.levels, files, strict=False):
        draw_level(maps, level, path)
    payload = {
        "image_id": maps.image_id,
        "image_size": list(maps.image.shape[:2]),
        "boxes": maps.boxes,
        "labels": maps.labels,
        "levels": [level.as_dict() for level in maps.levels],
    }
    atomic_write_text(files[-1], json.dumps(payload), durable=False)
    return files
