"""`crosskd quickstart`: teacher, plain student and CrossKD student on the built-in data."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crosskd_cli.commands._options import DataOpt, DownloadWeightsOpt, SetOpt
from crosskd_cli.errors import RunError
from crosskd_cli.runs.setup import data_source

console = Console()


def quickstart(
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="A pair preset.")
    ] = "shapes-gfl-r34-to-r18",
    data: DataOpt = None,
    overrides: SetOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder of the two student runs and summary.json.")
    ] = Path("runs/quickstart"),
    download_weights: DownloadWeightsOpt = False,
) -> None:
    """Run the whole CrossKD story on the built-in data in about ten minutes on a laptop CPU.

    Trains the teacher (or reuses it from the cache, keyed by its settings and the data), then
    the same student twice, without KD and with CrossKD, and prints one table of their COCO
    metrics. Interrupted? Run the same command again: it resumes.

    Example: crosskd quickstart
    """
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.inference.metrics import comparison_table
    from crosskd_cli.models.pretrained import resolve
    from crosskd_cli.runs.quickstart import pictures, run_quickstart
    from crosskd_cli.storage.run_folder import check_folder

    pair = load_preset(preset, list(overrides or []))
    if not pair.is_pair:
        raise RunError(
            f"Preset '{preset}' is not a teacher/student pair.",
            hint="Use a pair preset such as shapes-gfl-r34-to-r18.",
        )
    check_folder(out)
    # a paper pair's ImageNet backbone files, found (or fetched) before any data is read
    for model in (load_preset(pair.teacher.preset, list(overrides or [])).model, pair.model):
        resolve(model, None, download_weights, file_option=False)
    source = data_source(data, pair, None, None, None, None)
    hint = quickstart_command(preset, data, list(overrides or []), out)
    rows = run_quickstart(pair, source, out, list(overrides or []), console, hint)
    console.print(
        comparison_table(
            {r.name: r.metrics for r in rows}, f"crosskd quickstart: {pair.name} on {source.spec}"
        )
    )
    minutes = sum(r.minutes for r in rows)
    console.print(
        f"Training time {minutes:.1f} min in total. Checkpoints: "
        + ", ".join(str(r.checkpoint) for r in rows)
        + f". Summary: {out / 'summary.json'}"
    )
    console.print(
        "Pictures (losses, lr and AP; the paper's Fig. 5, the students' distances to the "
        "teacher and to the ground truth): " + ", ".join(str(p) for p in pictures(out, rows))
    )


def quickstart_command(preset: str, data: str | None, overrides: list[str], out: Path) -> str:
    """The quickstart command with every flag given, which resumes (or reuses) its runs."""
    words = ["crosskd", "quickstart", "--preset", preset]
    words += ["--data", data] if data is not None else []
    for item in overrides:
        words += ["--set", item]
    return shlex.join([*words, "--out", str(out)])
