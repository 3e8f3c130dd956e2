"""`--data`: a COCO-layout folder, explicit custom paths, or the built-in generated data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from crosskd_cli.data.builtin import ensure_shapes, parse_params
from crosskd_cli.errors import DataError

BUILTIN = {"shapes": (parse_params, ensure_shapes)}  # name -> (parse knobs, generate/cache)
CUSTOM_PREFIX = "custom:"  # how explicit paths are recorded, so `crosskd eval` finds them again


@dataclass(frozen=True)
class DataSource:
    """Where the splits of a data set live. `spec` is what the user typed (recorded in
    checkpoints, so `crosskd eval FILE` finds the same data again)."""

    spec: str
    train_ann: Path | None
    train_images: Path | None
    val_ann: Path
    val_images: Path


def resolve_data(
    spec: str | None,
    *,
    train_ann: Path | None = None,
    train_images: Path | None = None,
    val_ann: Path | None = None,
    val_images: Path | None = None,
    progress=None,
) -> DataSource:
    """Turn --data (or the explicit split paths) into the four paths of a COCO data set."""
    explicit = (train_ann, train_images, val_ann, val_images)
    if spec is not None and any(p is not None for p in explicit):
        raise DataError(
            f"--data '{spec}' and explicit --train-ann/--val-ann style paths were both given.",
            hint="Use either --data or the explicit paths, not both.",
        )
    if spec is None:
        return _custom(*explicit)
    if spec.startswith("builtin:"):
        return _builtin(spec, progress)
    if spec.startswith(CUSTOM_PREFIX):
        paths = json.loads(spec[len(CUSTOM_PREFIX) :])
        return _custom(*(Path(p) if p else None for p in paths))
    return _coco_folder(Path(spec).expanduser(), spec)


def _builtin(spec: str, progress) -> DataSource:
    _, _, rest = spec.partition(":")
    name, _, knobs = rest.partition(":")
    if name not in BUILTIN:
        raise DataError(
            f"Built-in data set '{name}' does not exist.",
            hint=f"Built-in data sets: {', '.join('builtin:' + n for n in BUILTIN)}",
        )
    parse, ensure = BUILTIN[name]
    root = ensure(parse(knobs), progress)
    return _layout(root, spec)


def _coco_folder(root: Path, spec: str) -> DataSource:
    if not root.is_dir():
        raise DataError(
            f"Data folder {root} does not exist.",
            hint="Give a COCO-layout folder, builtin:shapes, or --train-ann/--train-images/"
            "--val-ann/--val-images.",
        )
    source = _layout(root, spec)
    for path in (source.val_ann, source.val_images):
        if not path.exists():
            raise DataError(
                f"{root} is not a COCO-layout folder: {path} is missing.",
                hint="Expected annotations/instances_{train,val}2017.json, train2017/ and "
                "val2017/ (or pass --train-ann/--train-images/--val-ann/--val-images).",
            )
    if not (source.train_ann.exists() and source.train_images.exists()):
        return DataSource(spec, None, None, source.val_ann, source.val_images)
    return source


def _layout(root: Path, spec: str) -> DataSource:
    ann = root / "annotations"
    return DataSource(
        spec,
        ann / "instances_train2017.json",
        root / "train2017",
        ann / "instances_val2017.json",
        root / "val2017",
    )


def _custom(train_ann, train_images, val_ann, val_images) -> DataSource:
    if val_ann is None or val_images is None:
        raise DataError(
            "No data given: pass --data, or --val-ann and --val-images (plus --train-ann and "
            "--train-images to train).",
            hint="Try --data builtin:shapes to run on the built-in data set.",
        )
    if (train_ann is None) != (train_images is None):
        raise DataError(
            "--train-ann and --train-images go together; only one was given.",
            hint="Pass both, or neither for evaluation only.",
        )
    paths = [train_ann, train_images, val_ann, val_images]
    absolute = [str(Path(p).expanduser().resolve()) if p else None for p in paths]
    for given, path in zip(paths, absolute, strict=True):
        if given is not None and not Path(path).exists():
            raise DataError(f"{given} does not exist.", hint="Check the path.")
    spec = CUSTOM_PREFIX + json.dumps(absolute)
    resolved = [Path(p) if p else None for p in absolute]
    return DataSource(spec, *resolved)
