"""Train a teacher detector from a preset (`crosskd teacher --preset gfl-r50 --data /coco`),
or convert existing weights into a crosskd teacher (`crosskd teacher import FILE`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crosskd_cli.commands._common import command_line, data_source, print_run_summary
from crosskd_cli.commands._options import (
    BackboneWeightsOpt,
    DataOpt,
    OutOpt,
    OverwriteOpt,
    PresetOpt,
    ResumeOpt,
    SetOpt,
    SkipBadImagesOpt,
    TrainAnnOpt,
    TrainImagesOpt,
    ValAnnOpt,
    ValImagesOpt,
)
from crosskd_cli.config import load_preset
from crosskd_cli.engine import from_main_process, main_process_first, quiet_unless_main
from crosskd_cli.errors import CrossKDError
from crosskd_cli.runs import choose_run_dir

console = Console()


def train(
    ctx: typer.Context,
    preset: PresetOpt = "shapes-gfl-r50",
    data: DataOpt = None,
    train_ann: TrainAnnOpt = None,
    train_images: TrainImagesOpt = None,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    overrides: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    backbone_weights: BackboneWeightsOpt = None,
    skip_bad_images: SkipBadImagesOpt = False,
) -> None:
    """Train a teacher detector from a preset; or `crosskd teacher import FILE` to convert one.

    Writes a run folder with config.yaml, results.csv, best.safetensors and last.safetensors.

    Example: crosskd teacher --preset shapes-gfl-r50 --data builtin:shapes
    """
    if ctx.invoked_subcommand is not None:
        return
    from crosskd_cli.training import train_detector

    settings = list(overrides or []) + (["data.skip_bad_images=true"] if skip_bad_images else [])
    spec = load_preset(preset, settings)
    quiet_unless_main(console)
    with main_process_first():  # generates built-in data once, not once per process
        source = data_source(data, spec, train_ann, train_images, val_ann, val_images)
    run = from_main_process(
        lambda: choose_run_dir(out, "teacher", spec.name, resume=resume, overwrite=overwrite)
    )
    console.print(
        f"[bold]crosskd teacher[/] preset [cyan]{spec.name}[/] ({spec.model.backbone} "
        f"{spec.model.family}) on [cyan]{source.spec}[/] -> {run.root}"
    )
    resume_hint = command_line() if resume else f"{command_line()} --resume --out {run.root}"
    state = train_detector(
        spec,
        source,
        run,
        resume=resume,
        backbone_weights=backbone_weights,
        console=console,
        resume_hint=resume_hint,
    )
    print_run_summary(console, run, state)


def import_weights(
    file: Annotated[Path, typer.Argument(help="An MMDetection-format .pth checkpoint.")],
    preset: PresetOpt = "gfl-r50",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .safetensors.")] = None,
) -> None:
    """Convert an MMDetection checkpoint into a crosskd teacher (.safetensors).

    Not available yet: MMDetection import arrives with the detector-zoo release. Until then,
    train a teacher with `crosskd teacher --preset NAME --data DATA`.

    Example: crosskd teacher import gfl_r101_ms2x.pth --preset gfl-r101
    """
    raise CrossKDError(
        f"`crosskd teacher import` cannot convert {file} yet: MMDetection import is not "
        "implemented in this version.",
        hint="Train a teacher instead: crosskd teacher --preset NAME --data DATA",
    )
