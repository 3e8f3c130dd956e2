"""Small pieces shared by the training commands: data resolution and the closing summary.

Imported by `--help`: anything that pulls in torch is imported inside the function using it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from crosskd_cli.errors import DataError, RunError

if TYPE_CHECKING:
    from crosskd_cli.config import Preset
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


def command_line() -> str:
    """The command as the user typed it, for 'resume with ...' hints."""
    return shlex.join(["crosskd", *sys.argv[1:]])


def print_run_summary(console: Console, run, state) -> None:
    from crosskd_cli.metrics import metrics_table

    console.print(metrics_table(state.metrics, f"Run {run.root}"))
    console.print(
        f"{state.iteration} iterations in {state.wall_time / 60:.1f} min; best AP "
        f"{state.best_ap:.1f} (epoch {state.best_epoch}). Files: {run.best.name}, {run.last.name}, "
        f"{run.results.name}, {run.config.name}."
    )


def refuse_to_clobber(paths: list[Path]) -> None:
    taken = [p for p in paths if p.exists()]
    if taken:
        raise RunError(
            f"{taken[0]} already exists.",
            hint="Add --overwrite to replace it, or pick another --out.",
        )
