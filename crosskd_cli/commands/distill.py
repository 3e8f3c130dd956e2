"""`crosskd distill`: train a student with Cross-Head Knowledge Distillation from a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

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
from crosskd_cli.config.presets import DEFAULT_PAIR
from crosskd_cli.runs.setup import DataPaths, RunRequest, started_run

if TYPE_CHECKING:
    from crosskd_cli.config.presets import Preset

console = Console()


def distill(
    ctx: typer.Context,
    preset: PresetOpt = DEFAULT_PAIR,
    data: DataOpt = None,
    cross_index: Annotated[
        int | None,
        typer.Option(
            "--cross-index",
            "-i",
            help="Student tap fed to the teacher head (0..stacked_convs; 0 = FPN feature). "
            "Default: the preset's (the paper's 3; 2 for FCOS).",
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            "-t",
            help="The teacher's crosskd .safetensors. Default: the "
            "preset's teacher weights, or the cached teacher of `crosskd quickstart`.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="crosskd, mimic, pkd, crosskd+pkd, crosskd+mimic or none "
            "(the plain student). Default: the preset's (crosskd)."
        ),
    ] = None,
    eval_teacher: Annotated[
        bool,
        typer.Option(
            "--eval-teacher", help="Measure the teacher on the validation data before training."
        ),
    ] = False,
    other_teacher: Annotated[
        bool,
        typer.Option(
            "--other-teacher",
            help="Use a --teacher whose backbone or head differs from the pair preset's teacher, "
            "or one trained as a student (refused otherwise).",
        ),
    ] = False,
    student_weights: Annotated[
        Path | None,
        typer.Option("--student-weights", help="Start the student from a crosskd checkpoint."),
    ] = None,
    backbone_weights: BackboneWeightsOpt = None,
    download_weights: DownloadWeightsOpt = False,
    train_ann: TrainAnnOpt = None,
    train_images: TrainImagesOpt = None,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    overrides: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    skip_bad_images: SkipBadImagesOpt = False,
    log_with: LogWithOpt = None,
) -> None:
    """Distill a student from a frozen teacher with CrossKD at a chosen cross index.

    The student's tap at --cross-index runs through the rest of the teacher's head; those
    cross-head predictions learn to match the teacher's, while the student's own head learns
    from the ground truth only. Writes the same run folder as `teacher`, with a student-only
    best.safetensors.

    Example: crosskd distill --preset gfl-r101-to-r50 --cross-index 3 --data /coco --teacher
    gfl_r101.safetensors

    Stopped (Ctrl-C, SIGTERM)? `crosskd distill --resume --out RUN` goes on: the run folder
    knows its preset, data and teacher.
    """
    from crosskd_cli.runs.jobs import distill_student

    settings = list(overrides or [])
    settings += [f"distill.cross_index={cross_index}"] if cross_index is not None else []
    settings += [f"distill.method={method}"] if method is not None else []
    settings += ["data.skip_bad_images=true"] if skip_bad_images else []
    settings += log_with_setting(log_with)
    request = RunRequest(
        "distill",
        preset,
        preset_given=typed(ctx, "preset"),
        settings=settings,
        paths=DataPaths(data, train_ann, train_images, val_ann, val_images),
        out=out,
        resume=resume,
        overwrite=overwrite,
        teacher=teacher,
        backbone_weights=backbone_weights,
        download_weights=download_weights,
        student_weights=student_weights,
    )
    with started_run(console, request) as inputs:
        spec, run = inputs.preset, inputs.run
        _print_banner(spec, inputs.source.spec, inputs.teacher, run.root, inputs.backbone_weights)
        state = distill_student(
            spec,
            inputs.source,
            run,
            inputs.teacher,
            resume=resume,
            student_weights=inputs.student_weights,
            backbone_weights=inputs.backbone_weights,
            eval_teacher=eval_teacher,
            console=console,
            resume_hint=inputs.resume_hint,
            other_teacher=other_teacher,
        )
    print_run_summary(console, run, state)


def _print_banner(spec: Preset, data: str, teacher: Path, root: Path, weights: Path | None) -> None:
    from crosskd_cli.distill.inspection import cross_branch_reuse
    from crosskd_cli.distill.kd_terms import method_terms
    from crosskd_cli.models.pretrained import describe

    cfg = spec.distill
    console.print(
        f"[bold]crosskd distill[/] [cyan]{spec.name}[/]: teacher {teacher} -> student "
        f"{spec.model.backbone} ({describe(weights)}); method [bold]{cfg.method}[/], cross index "
        f"[bold]{cfg.cross_index}[/] on [cyan]{data}[/] -> {root}"
    )
    if any(term.needs_taps for term in method_terms(cfg.method)):
        reused = cross_branch_reuse(cfg.cross_index, spec.model.stacked_convs)
        console.print(
            f"[dim]Cross branch reuses {reused}; alignment {'on' if cfg.align else 'off'}.[/]"
        )
