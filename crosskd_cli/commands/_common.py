"""Small pieces shared by the commands: where the data is, and never overwriting a file.

Imported by `--help`: anything that pulls in torch is imported inside the function using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from crosskd_cli.errors import DataError, RunError

if TYPE_CHECKING:
    from crosskd_cli.config.presets import Preset
    from crosskd_cli.data import DataSource


def data_source(
    data: str | None,
    preset: Preset,
    train_ann: Path | None,
    train_images: Path | None,
    val_ann: Path | None,
    val_images: Path | None,
) -> DataSource:
    """--data, else the custom paths, else the preset's own default data."""
    from crosskd_cli.data import resolve_data

    custom = any(p is not None for p in (train_ann, train_images, val_ann, val_images))
    spec = data if data is not None or custom else preset.data.source
    if spec is None and not custom:
        raise DataError(
            f"Preset '{preset.name}' names no data set and no --data was given.",
            hint="Add --data /path/to/coco (COCO layout), --data builtin:shapes, or "
            "--train-ann/--train-images/--val-ann/--val-images.",
        )
    return resolve_data(
        spec,
        train_ann=train_ann,
        train_images=train_images,
        val_ann=val_ann,
        val_images=val_images,
    )


def refuse_to_clobber(paths: list[Path]) -> None:
    taken = [p for p in paths if p.exists()]
    if taken:
        raise RunError(
            f"{taken[0]} already exists.",
            hint="Add --overwrite to replace it, or pick another --out.",
        )
