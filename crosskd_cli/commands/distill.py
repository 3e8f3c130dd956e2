"""`crosskd distill`: train a student with Cross-Head Knowledge Distillation from a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crosskd_cli.commands._options import DataOpt, OutOpt, PresetOpt, SetOpt
from crosskd_cli.errors import CrossKDError


def distill(
    preset: PresetOpt = "gfl-r101-to-r50",
    data: DataOpt = None,
    cross_index: Annotated[
        int | None,
        typer.Option(
            "--cross-index",
            "-i",
            help="Student tap fed to the teacher head "
            "(0..stacked_convs; default: the preset's, 3 for GFL).",
        ),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option("--teacher", help="The teacher's crosskd .safetensors.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="crosskd, mimic, pkd, crosskd+pkd, crosskd+mimic or none."),
    ] = None,
    overrides: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Distill a student from a frozen teacher with CrossKD at a chosen cross index.

    Not available yet: distillation arrives in the next release. Today you can train and
    evaluate detectors (`crosskd teacher`, `crosskd eval`) and inspect pairs (`crosskd inspect`).

    Example: crosskd distill --preset gfl-r101-to-r50 --cross-index 3 --data /coco
    """
    raise CrossKDError(
        "`crosskd distill` is not implemented in this version.",
        hint="Inspect the pair meanwhile: crosskd inspect --preset " + preset,
    )
