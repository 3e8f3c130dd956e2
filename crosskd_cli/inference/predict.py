"""`crosskd predict`'s job: checkpoints on a folder of images -> detections JSON and pictures.

Per checkpoint: OUT/<name>.json (COCO results with file names and class names) and
OUT/<name>/<image>.png (the image with its detections); with several checkpoints also
OUT/side_by_side/<image>.png (one panel per checkpoint, in the order given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosskd_cli.checkpoints.format import CheckpointMeta
from crosskd_cli.data import read_image
from crosskd_cli.errors import DataError
from crosskd_cli.inference.predictor import Predictor
from crosskd_cli.storage.files import write_json
from crosskd_cli.viz.drawing import draw_detections, side_by_side, write_png, xywh_to_xyxy

# What `predict` looks for in a folder (torchvision decodes the first four, Pillow the rest).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SIDE_BY_SIDE = "side_by_side"


def list_images(source: Path) -> list[Path]:
    """`source` itself when it is a file, else its image files (by suffix, not recursive), in
    name order; a missing path or a folder without images is a DataError."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(
            f"--source {source} does not exist.",
            hint="Pass an image file or a folder of images.",
        )
    files = sorted(
        p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(
            f"--source {source} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).",
            hint="Pass a folder that contains images, or one image file.",
        )
    return files


def title(meta: CheckpointMeta) -> str:
    """What a checkpoint is, as the quickstart's table names it: 'teacher', 'student (no KD)',
    'student (crosskd, i=3)'."""
    method = meta.training.get("method")
    if meta.kind == "teacher" or method is None:
        return meta.kind
    if method == "none":
        return "student (no KD)"
    index = meta.training.get("cross_index")
    return f"student ({method}, i={index})" if "crosskd" in method else f"student ({method})"


def unique_names(checkpoints: Sequence[Path]) -> list[str]:
    """One file-name-safe name per checkpoint: its stem, else '<folder>-<stem>' where stems
    repeat (runs/a/best and runs/b/best), else numbered."""
    names = [p.stem for p in checkpoints]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}-{p.stem}" for p in checkpoints]
    if len(set(names)) < len(names) or SIDE_BY_SIDE in names:
        names = [f"{k + 1}-{p.stem}" for k, p in enumerate(checkpoints)]
    return names


def picture_names(files: Sequence[Path]) -> list[str]:
    """Each image's PNG name: '<stem>.png', or '<name>.png' for stems that repeat (a.jpg and
    a.png)."""
    stems = [f.stem for f in files]
    return [f"{f.stem if stems.count(f.stem) == 1 else f.name}.png" for f in files]


@dataclass
class Model:
    """One checkpoint as `predict` uses it."""

    checkpoint: Path
    predictor: Predictor
    name: str  # its JSON file and picture folder
    title: str  # above its panel
    results: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PredictReport:
    models: list[Model]
    images: int  # read and predicted
    skipped: list[tuple[Path, str]]  # unreadable files and why
    written: list[Path]  # the JSON files


def load_models(checkpoints: Sequence[Path], device: str | torch.device) -> list[Model]:
    """Every checkpoint loaded (all before any image is read, so a bad one stops at once)."""
    predictors = [Predictor.load(path, device) for path in checkpoints]
    titles = [title(p.meta) for p in predictors]
    names = unique_names(checkpoints)
    titles = [
        t if titles.count(t) == 1 else f"{t} {name}" for t, name in zip(titles, names, strict=True)
    ]
    return [
        Model(path, predictor, name, t)
        for path, predictor, name, t in zip(checkpoints, predictors, names, titles, strict=True)
    ]


def outputs(models: Sequence[Model], files: Sequence[Path], out: Path) -> list[Path]:
    """Every file `predict_images` may write, for refusing to overwrite before any work."""
    pictures = picture_names(files)
    folders = [m.name for m in models] + ([SIDE_BY_SIDE] if len(models) > 1 else [])
    return [out / f"{m.name}.json" for m in models] + [
        out / folder / picture for folder in folders for picture in pictures
    ]


def predict_images(
    models: Sequence[Model],
    files: Sequence[Path],
    out: Path,
    *,
    score_thr: float,
    batch_size: int = 8,
    on_image: Callable[[int], None] | None = None,
) -> PredictReport:
    """Run every model on every readable file, batch by batch, drawing as it goes; unreadable
    files are skipped and named. Image ids count the readable files from 1, in file order."""
    pictures = dict(zip(files, picture_names(files), strict=True))
    skipped: list[tuple[Path, str]] = []
    image_id = 0
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(read_image(path))
                chunk.append(path)
            except DataError as err:
                skipped.append((path, err.message))
        found = [m.predictor.predict_tensors(images, score_thr) for m in models]
        for k, (path, image) in enumerate(zip(chunk, images, strict=True)):
            image_id += 1
            panels = []
            for model, per_image in zip(models, found, strict=True):
                results = [
                    {"image_id": image_id, "file_name": path.name, **result}
                    for result in per_image[k].to_coco(image_id)
                ]
                model.results += results
                panels.append(draw_results(image, results, model.predictor))
                write_png(out / model.name / pictures[path], panels[-1])
            if len(models) > 1:
                both = side_by_side(panels, [m.title for m in models])
                write_png(out / SIDE_BY_SIDE / pictures[path], both)
        if on_image is not None:
            on_image(len(files[start : start + batch_size]))
    if image_id == 0:
        raise DataError(
            f"None of the {len(files)} files could be read ({skipped[0][0]}: {skipped[0][1]}).",
            hint="Pass images torchvision or Pillow can decode (JPEG, PNG, WebP, GIF, BMP, TIFF).",
        )
    written = [out / f"{m.name}.json" for m in models]
    for model, path in zip(models, written, strict=True):
        write_json(path, model.results)
    return PredictReport(list(models), image_id, skipped, written)


def draw_results(image: Tensor, results: Sequence[dict[str, Any]], predictor: Predictor) -> Tensor:
    """`image` with the detections of its COCO results drawn: the very numbers of the JSON."""
    boxes = xywh_to_xyxy([r["bbox"] for r in results])
    labels = [predictor.category_ids.index(r["category_id"]) for r in results]
    scores = [r["score"] for r in results]
    return draw_detections(image, boxes, labels, predictor.class_names, scores)
