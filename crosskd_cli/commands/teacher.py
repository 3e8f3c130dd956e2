"""Train a teacher detector from a preset (`crosskd teacher --preset gfl-r50 --data /coco`),
or convert existing weights into a crosskd teacher (`crosskd teacher import FILE`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from crosskd_cli.commands._common import refuse_to_clobber
from crosskd_cli.commands._options import (
    BackboneWeightsOpt,
    DataOpt,
    DownloadWeightsOpt,
    LogWithOpt,
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
    log_with_setting,
)
from crosskd_cli.commands._run import print_run_summary, typed
from crosskd_cli.config.presets import DEFAULT_TEACHER
from crosskd_cli.runs.setup import DataPaths, RunRequest, data_source, started_run

console = Console()


def train(
    ctx: typer.Context,
    preset: PresetOpt = DEFAULT_TEACHER,
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
    download_weights: DownloadWeightsOpt = False,
    skip_bad_images: SkipBadImagesOpt = False,
    log_with: LogWithOpt = None,
) -> None:
    """Train a teacher detector from a preset; or `crosskd teacher import FILE` to convert one.

    Writes a run folder with preset.yaml, config.yaml, results.csv, best.safetensors and
    last.safetensors. Stopped (Ctrl-C, SIGTERM)? `crosskd teacher --resume --out RUN` goes on.

    Example: crosskd teacher --preset shapes-gfl-r34 --data builtin:shapes

    On COCO: crosskd teacher --preset gfl-r101 --data /coco
    """
    if ctx.invoked_subcommand is not None:
        return
    from crosskd_cli.models.pretrained import describe
    from crosskd_cli.runs.jobs import train_detector

    settings = list(overrides or []) + (["data.skip_bad_images=true"] if skip_bad_images else [])
    settings += log_with_setting(log_with)
    request = RunRequest(
        "teacher",
        preset,
        preset_given=typed(ctx, "preset"),
        settings=settings,
        paths=DataPaths(data, train_ann, train_images, val_ann, val_images),
        out=out,
        resume=resume,
        overwrite=overwrite,
        backbone_weights=backbone_weights,
        download_weights=download_weights,
    )
    with started_run(console, request) as inputs:
        spec, run = inputs.preset, inputs.run
        console.print(
            f"[bold]crosskd teacher[/] preset [cyan]{spec.name}[/] ({spec.model.backbone} "
            f"{spec.model.family}, {describe(inputs.backbone_weights)}) on "
            f"[cyan]{inputs.source.spec}[/] -> {run.root}"
        )
        state = train_detector(
            spec,
            inputs.source,
            run,
            resume=resume,
            backbone_weights=inputs.backbone_weights,
            console=console,
            resume_hint=inputs.resume_hint,
        )
    print_run_summary(console, run, state)


def import_weights(
    file: Annotated[Path, typer.Argument(help="An MMDetection-format .pth checkpoint.")],
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            "-p",
            help="The detector preset of the file's architecture (a shipped name or a YAML path).",
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Data whose validation classes the teacher predicts; recorded so that "
            "`crosskd eval` needs nothing else. Default: COCO's 80 classes."
        ),
    ] = None,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    overrides: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output .safetensors. Default: FILE's name beside it."),
    ] = None,
    overwrite: OverwriteOpt = False,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial", help="Load the keys that fit and keep the rest as initialised."
        ),
    ] = False,
) -> None:
    """Convert an MMDetection checkpoint (GFL, RetinaNet, ATSS, FCOS) into a crosskd teacher.

    The file is read without running pickled code: only tensors and plain containers are
    built. Every key that does not map, is missing or has another shape is listed by name.
    Pick the preset of the file's architecture (crosskd inspect --list-presets).

    Example: crosskd teacher import gfl_r101_fpn_ms2x.pth --preset gfl-r101 --data /coco
    """
    from crosskd_cli.checkpoints.mmdet_import import ImportMismatch, import_teacher
    from crosskd_cli.distill.preset_checks import load_preset

    spec = load_preset(preset, list(overrides or []))
    given = data is not None or val_ann is not None or val_images is not None
    source = data_source(data, spec, None, None, val_ann, val_images) if given else None
    out = out or file.with_suffix(".safetensors")
    if not overwrite:
        refuse_to_clobber([out])
    try:
        meta, report = import_teacher(file, spec, source, out, allow_partial=allow_partial)
    except ImportMismatch as mismatch:
        console.print(_problem_table(mismatch.report))
        raise
    if report.problems:
        console.print(_problem_table(report))
    if report.unused:
        shown = ", ".join(report.unused[:3]) + (", ..." if len(report.unused) > 3 else "")
        console.print(
            f"[dim]Not imported ({len(report.unused)} tensors MMDetection stores but its "
            f"detector never runs): {shown}.[/]"
        )
    if report.refused_metadata:
        console.print(
            "[dim]Not unpickled (training metadata, not weights): "
            + ", ".join(report.refused_metadata)
            + ".[/]"
        )
    console.print(
        f"Imported {len(report.loaded)} tensors from {file} into [bold]{out}[/] "
        f"({meta.model.family} {meta.model.backbone}, {len(meta.class_names)} classes from "
        f"{meta.training['classes_from']})."
    )
    console.print(
        f"Next: crosskd eval {out}"
        + ("" if meta.val_data else " --data DATA")
        + f", or crosskd distill --preset PAIR --teacher {out} --data DATA"
    )


PROBLEM_ROWS = 8  # keys shown per kind of problem: the first ones say what went wrong


def _problem_table(report) -> Table:
    """The keys that did not import, the first PROBLEM_ROWS of each kind (a file of another
    architecture mismatches hundreds: the error after the table names the counts)."""
    table = Table(title="Keys that did not import", title_justify="left")
    table.add_column("problem")
    table.add_column("key")
    for kind, keys in report.problems:
        for key in keys[:PROBLEM_ROWS]:
            table.add_row(kind, key)
        if len(keys) > PROBLEM_ROWS:
            table.add_row(kind, f"[dim]... and {len(keys) - PROBLEM_ROWS} more[/]")
    return table
