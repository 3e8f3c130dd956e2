"""`--data`: a COCO-layout folder, explicit custom paths, or the built-in generated data."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crosskd_cli.config.safe_read import load_json
from crosskd_cli.data.builtin import ensure_shapes, parse_params
from crosskd_cli.errors import DataError

BUILTIN = {"shapes": (parse_params, ensure_shapes)}  # name -> (parse knobs, generate or reuse)
CUSTOM_PREFIX = "custom:"  # how explicit paths are recorded, so `crosskd eval` finds them again
LAYOUT_HINT = (
    "Expected a COCO-layout folder: annotations/instances_{train,val}2017.json, train2017/ and "
    "val2017/ (train parts optional for eval); or pass --train-ann/--train-images/--val-ann/"
    "--val-images; or use --data builtin:shapes."
)


@dataclass(frozen=True)
class DataSource:
    """Where the splits of a data set live.

    `spec` reproduces the source (it is recorded in checkpoints, so `crosskd eval FILE` finds
    the same data again): the builtin spec as typed, a folder as its absolute path, explicit
    paths as `custom:` + a JSON list of the four absolute paths. train_* are None when the
    source has no training split (evaluation only).
    """

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
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DataSource:
    """Turn --data (or the explicit split paths) into the four paths of a COCO data set.

    cache_dir: where built-in data sets are generated (default `builtin_cache_dir()`);
    progress(done, total): called per image while a built-in data set is being generated.
    """
    explicit = (train_ann, train_images, val_ann, val_images)
    if spec is not None and any(p is not None for p in explicit):
        raise DataError(
            f"--data '{spec}' and explicit --train-ann/--val-ann style paths were both given.",
            hint="Use either --data or the explicit paths, not both.",
        )
    if spec is None:
        return _custom(*explicit)
    if spec.startswith("builtin:"):
        return _builtin(spec, cache_dir, progress)
    if spec.startswith(CUSTOM_PREFIX):
        return _custom(*_recorded_paths(spec))
    return _coco_folder(Path(spec).expanduser())


def _builtin(spec: str, cache_dir: Path | None, progress) -> DataSource:
    name, _, knobs = spec.removeprefix("builtin:").partition(":")
    if name not in BUILTIN:
        raise DataError(
            f"Built-in data set '{name}' does not exist.",
            hint=f"Built-in data sets: {', '.join('builtin:' + n for n in BUILTIN)} "
            "(parameters as in builtin:shapes:seed=3,images=2000).",
        )
    parse, ensure = BUILTIN[name]
    root = ensure(parse(knobs), cache_dir=cache_dir, progress=progress)
    return DataSource(spec, *_layout(root))


def _coco_folder(root: Path) -> DataSource:
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist.", hint=LAYOUT_HINT)
    root = root.resolve()
    train_ann, train_images, val_ann, val_images = _layout(root)
    for path in (val_ann, val_images):
        if not path.exists():
            raise DataError(
                f"{root} is not a COCO-layout folder: {path} is missing.", hint=LAYOUT_HINT
            )
    if not (train_ann.is_file() and train_images.is_dir()):  # e.g. only val2017 downloaded
        train_ann = train_images = None
    return DataSource(str(root), train_ann, train_images, val_ann, val_images)


def _layout(root: Path) -> tuple[Path, Path, Path, Path]:
    ann = root / "annotations"
    return (
        ann / "instances_train2017.json",
        root / "train2017",
        ann / "instances_val2017.json",
        root / "val2017",
    )


def _recorded_paths(spec: str) -> list[Path | None]:
    try:
        paths = load_json(spec.removeprefix(CUSTOM_PREFIX))  # from a checkpoint: bounded
        if not (isinstance(paths, list) and len(paths) == 4):
            raise ValueError
        if not all(p is None or isinstance(p, str) for p in paths):
            raise ValueError
    except ValueError:
        shown = spec if len(spec) <= 120 else f"{spec[:100]}... ({len(spec)} characters)"
        raise DataError(
            f"Data spec '{shown}' is not a valid recorded custom data set.",
            hint="Pass --val-ann and --val-images (and --train-*) explicitly instead.",
        ) from None
    return [Path(p) if p else None for p in paths]


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
    given = [train_ann, train_images, val_ann, val_images]
    resolved = [Path(p).expanduser().resolve() if p is not None else None for p in given]
    for path, kind in zip(resolved, ("file", "folder", "file", "folder"), strict=True):
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            raise DataError(
                f"{path} does not exist or is not a {kind}.",
                hint="Annotation paths are COCO json files; image paths are folders of images.",
            )
    spec = CUSTOM_PREFIX + json.dumps([str(p) if p else None for p in resolved])
    return DataSource(spec, *resolved)
