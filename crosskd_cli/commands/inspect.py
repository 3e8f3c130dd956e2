"""`crosskd inspect`: head layer shapes, parameter counts, and what the cross branch reuses."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from crosskd_cli.commands._options import DataOpt, OverwriteOpt, SetOpt
from crosskd_cli.config.presets import DEFAULT_PAIR, list_presets, to_dict
from crosskd_cli.errors import CrossKDError

if TYPE_CHECKING:
    from crosskd_cli.config.presets import Preset
    from crosskd_cli.distill.inspection import LayerRow, ModelReport, PairReport

console = Console()


def inspect(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Inspect a crosskd .safetensors checkpoint instead.")
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            "-p",
            help="A pair preset (teacher + student) or a detector preset, by name or YAML path.",
        ),
    ] = DEFAULT_PAIR,
    cross_index: Annotated[
        int | None,
        typer.Option(
            "--cross-index",
            "-i",
            help="Student tap fed to the teacher head (0..stacked_convs). Default: the preset's.",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="Input HxW, e.g. 800x1333 (padded to /32). Default: the preset's resize scale.",
        ),
    ] = None,
    overrides: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    list_only: Annotated[
        bool, typer.Option("--list-presets", help="List shipped presets.")
    ] = False,
    env: Annotated[bool, typer.Option("--env", help="Show versions and devices.")] = False,
    targets: Annotated[
        bool,
        typer.Option(
            "--targets",
            help="Draw the paper's Fig. 2 for one validation image: per FPN level, the "
            "teacher's class scores beside the targets the student is assigned (PNGs + JSON).",
        ),
    ] = False,
    data: DataOpt = None,
    image_id: Annotated[
        int | None,
        typer.Option("--image-id", help="--targets: a validation image id. Default: the first."),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            "-t",
            help="--targets: the teacher's .safetensors. Default: the preset's teacher weights, "
            "or the cached teacher of `crosskd quickstart`.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="--targets: folder. Default: runs/targets/image-ID."),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Show a pair's head layers per tower with their shapes, parameter counts, which teacher
    layers the cross branch reuses at --cross-index, and whether the pair is compatible.

    Shapes are worked out on the meta device: instant even for R101 at 800x1333.

    Example: crosskd inspect --preset gfl-r101-to-r50 --cross-index 3

    Fig. 2: crosskd inspect --targets --preset shapes-gfl-r34-to-r18 --data builtin:shapes
    --image-id 3
    """
    from crosskd_cli.distill.preset_checks import load_preset

    if fmt not in ("table", "json"):
        raise CrossKDError(f"--format '{fmt}' is not known.", hint="Use --format table or json.")
    if targets:
        spec = load_preset(preset, list(overrides or []))
        _show_targets(spec, data, image_id, teacher, out, overwrite)
    elif env:
        _print_env()
    elif list_only:
        _print_presets()
    elif checkpoint is not None:
        _show_checkpoint(checkpoint, image_size, fmt)
    else:
        spec = load_preset(preset, list(overrides or []))
        size = _parse_size(image_size, spec.data.scale)
        if spec.is_pair:
            _show_pair(spec, cross_index, size, fmt)
        else:
            _show_detector(spec, size, fmt)


def _show_targets(
    spec: Preset,
    data: str | None,
    image_id: int | None,
    teacher: Path | None,
    out: Path | None,
    overwrite: bool,
) -> None:
    from crosskd_cli.distill.target_maps import compute_target_maps, write_target_maps
    from crosskd_cli.runs.setup import data_source
    from crosskd_cli.runs.teachers import resolve_teacher

    source = data_source(data, spec, None, None, None, None)
    teacher_path = resolve_teacher(spec, source, teacher, console)
    maps = compute_target_maps(spec, source, teacher_path, image_id)
    folder = out if out is not None else Path("runs/targets") / f"image-{maps.image_id}"
    files = write_target_maps(maps, folder, overwrite)
    console.print(
        f"Image {maps.image_id} of {source.spec}, teacher {teacher_path}: per FPN level, the "
        f"teacher's class scores beside the targets the {spec.model.backbone} student is "
        "assigned, and where they disagree."
    )
    for level, path in zip(maps.levels, files, strict=False):
        positives = int((level.target > 0).sum())
        console.print(f"  {level.name} (stride {level.stride}): {path}  {positives} positives")
    console.print(f"  the numbers drawn: {files[-1]}")


def _show_checkpoint(checkpoint: Path, image_size: str | None, fmt: str) -> None:
    from crosskd_cli.checkpoints.format import read_meta
    from crosskd_cli.distill.inspection import describe_model

    meta = read_meta(checkpoint)
    report = describe_model(meta.model, _parse_size(image_size, meta.image_scale))
    if fmt == "json":
        model = report.as_dict()
        typer.echo(
            json.dumps(
                {"checkpoint": str(checkpoint), "meta": to_dict(meta), "model": model}, indent=2
            )
        )
        return
    console.print(_head_table(report, f"{checkpoint.name} ({meta.kind})", None, None))
    console.print(_params_table({"model": report.params}))
    console.print(
        f"Classes: {len(meta.class_names)}; validation data: {meta.val_data}; "
        f"recorded AP: {meta.metrics.get('AP', 'n/a')}"
    )


def _show_detector(spec: Preset, size: tuple[int, int], fmt: str) -> None:
    from crosskd_cli.distill.inspection import describe_model

    report = describe_model(spec.model, size)
    if fmt == "json":
        typer.echo(json.dumps({"preset": spec.name, "model": report.as_dict()}, indent=2))
        return
    console.print(_head_table(report, f"{spec.name}: {spec.model.backbone}", None, None))
    console.print(_params_table({"model": report.params}))


def _show_pair(spec: Preset, cross_index: int | None, size: tuple[int, int], fmt: str) -> None:
    from crosskd_cli.distill.inspection import describe_pair

    report = describe_pair(spec, cross_index, size)
    if fmt == "json":
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    teacher, student, index = report.teacher, report.student, report.cross_index
    console.print(
        f"[bold]{report.preset}[/]: teacher {teacher.spec.backbone} -> student "
        f"{student.spec.backbone}, {student.spec.family} head, cross index [bold]{index}[/], "
        f"input {size[0]}x{size[1]}"
    )
    console.print(_head_table(teacher, f"Teacher head ({teacher.spec.backbone})", index, "teacher"))
    console.print(_head_table(student, f"Student head ({student.spec.backbone})", index, "student"))
    console.print(_params_table({"teacher": teacher.params, "student": student.params}))
    console.print(_cross_summary(report))
    if report.adapter:
        student_width, teacher_width = report.adapter
        console.print(
            f"Tap adapter: a 1x1 conv per tower maps the student's {student_width} channels to "
            f"the teacher's {teacher_width} before alignment; trained, never exported."
        )
    if report.problems:
        console.print("[bold red]Incompatible pair:[/] " + "; ".join(report.problems))
    else:
        console.print(
            "[bold green]Compatible:[/] same head family, classes, levels, strides, priors, "
            "box coding and tap width" + (" (through the adapter)." if report.adapter else ".")
        )
    console.print(f"[dim]Presets: {', '.join(list_presets())}[/]")


def _parse_size(text: str | None, scale: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return (min(scale), max(scale))
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise CrossKDError(
            f"--image-size '{text}' is not HEIGHTxWIDTH.", hint="Example: --image-size 800x1333"
        ) from None
    return (h, w)


def _head_table(report: ModelReport, title: str, index: int | None, side: str | None) -> Table:
    levels = [f"P{3 + k}" for k in range(len(report.level_shapes))]
    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    table.add_column("out ch", justify="right")
    for level in levels:
        table.add_column(f"{level} HxW", justify="right")
    table.add_column("params", justify="right")
    if side:
        table.add_column("cross branch")
    first = (
        "FPN input",
        str(report.level_shapes[0][0]),
        *(f"{s[1]}x{s[2]}" for s in report.level_shapes),
        "",
    )
    table.add_row(*first, *([_role(None, index, side, tap0=True)] if side else []))
    for row in report.layers:
        shapes = row.shapes
        # Match calls to levels by their size: a per-level Scale runs on its own level only
        sizes = {tuple(s[1:]) for s in shapes}
        per_level = [f"{h}x{w}" if (h, w) in sizes else "" for _, h, w in report.level_shapes]
        cells = [
            row.name,
            str(shapes[0][0]) if shapes[0] else "1",
            *per_level,
            f"{row.params:,}",
        ]
        table.add_row(*cells, *([_role(row, index, side)] if side else []))
    return table


def _role(row: LayerRow | None, index: int, side: str, tap0: bool = False) -> str:
    from crosskd_cli.distill.inspection import reused_by_cross_branch

    if tap0:
        return "[bold]tap (i=0)[/]" if index == 0 and side == "student" else ""
    after_tap = reused_by_cross_branch(row, index)
    if side == "teacher":
        return "[green]reused[/]" if after_tap else ""
    if row.block == index and row.name.endswith("norm"):
        return f"[bold]tap (i={index})[/]"
    return "[dim]GT only[/]" if after_tap else ""


def _params_table(params: dict[str, dict[str, int]]) -> Table:
    table = Table(title="Parameters", title_justify="left")
    table.add_column("part")
    for name in params:
        table.add_column(name, justify="right")
    for part in next(iter(params.values())):
        table.add_row(part, *(f"{p[part]:,}" for p in params.values()))
    return table


def _cross_summary(report: PairReport) -> str:
    index, reused = report.cross_index, report.reused_blocks
    predictors = "teacher predictors" + (" (Scale included)" if report.scaled else "")
    if not reused:
        return f"Cross branch: student tap {index} -> aligned -> ReLU -> {predictors} only."
    start = "the FPN feature" if index == 0 else f"student tap {index} -> aligned -> ReLU"
    return (
        f"Cross branch: {start} -> teacher blocks {reused.start}..{reused.stop - 1} -> "
        f"{predictors}. Student blocks after the tap and its predictors learn from the ground "
        "truth only."
    )


def _print_presets() -> None:
    from crosskd_cli.distill.preset_checks import load_preset

    table = Table(title="Presets", title_justify="left")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("description")
    for name in list_presets():
        spec = load_preset(name)
        table.add_row(name, "pair" if spec.is_pair else "detector", spec.description)
    console.print(table)


def _print_env() -> None:
    import accelerate
    import torch
    import torchvision

    from crosskd_cli import __version__

    table = Table(title="Environment", title_justify="left", show_header=False)
    for key, value in [
        ("crosskd", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("accelerate", accelerate.__version__),
        ("cuda available", str(torch.cuda.is_available())),
        (
            "devices",
            ", ".join(torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count()))
            or "cpu",
        ),
        ("cpu threads", str(torch.get_num_threads())),
    ]:
        table.add_row(key, value)
    console.print(table)
