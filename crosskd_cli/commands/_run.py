"""What `teacher` and `distill` do around a training run: the set-up before it, the summary after.

Imported by `--help`: anything that pulls in torch is imported inside the function using it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rich.console import Console

from crosskd_cli.commands._common import data_source
from crosskd_cli.config import load_preset

if TYPE_CHECKING:
    from crosskd_cli.config import Preset
    from crosskd_cli.data import DataSource
    from crosskd_cli.engine import TrainerState
    from crosskd_cli.runs import RunDir


class DataPaths(NamedTuple):
    """--data, or the custom split paths, as the user gave them."""

    data: str | None
    train_ann: Path | None
    train_images: Path | None
    val_ann: Path | None
    val_images: Path | None


def load_run_inputs(
    console: Console,
    preset: str,
    settings: list[str],
    skip_bad_images: bool,
    paths: DataPaths,
    backbone: tuple[Path | None, bool] = (None, False),
) -> tuple[Preset, DataSource, Path | None]:
    """The preset with the --set `settings` applied, the data it trains on and the ImageNet
    file its backbone starts from (None: from scratch).

    backbone: (--backbone-weights, --download-weights). The file is found (or downloaded)
    before any data is read, so a missing one stops the run at once. From here on only the
    main process prints; it also downloads and generates built-in data first, so the other
    processes find them on disk instead of fetching them once each.
    """
    from crosskd_cli.engine import main_process_first, quiet_unless_main
    from crosskd_cli.pretrained import resolve

    settings = settings + (["data.skip_bad_images=true"] if skip_bad_images else [])
    spec = load_preset(preset, settings)
    quiet_unless_main(console)
    with main_process_first():
        weights = resolve(spec.model, *backbone)
    with main_process_first():
        source = data_source(
            paths.data, spec, paths.train_ann, paths.train_images, paths.val_ann, paths.val_images
        )
    return spec, source, weights


def open_run(
    command: str, preset: Preset, out: Path | None, *, resume: bool, overwrite: bool
) -> tuple[RunDir, str]:
    """The run folder, chosen by the main process for all, and the command that resumes it."""
    from crosskd_cli.engine import from_main_process
    from crosskd_cli.runs import choose_run_dir

    run = from_main_process(
        lambda: choose_run_dir(out, command, preset.name, resume=resume, overwrite=overwrite)
    )
    resume_hint = command_line() if resume else f"{command_line()} --resume --out {run.root}"
    return run, resume_hint


def command_line() -> str:
    """The command as the user typed it, for 'resume with ...' hints."""
    return shlex.join(["crosskd", *sys.argv[1:]])


def print_run_summary(console: Console, run: RunDir, state: TrainerState) -> None:
    from crosskd_cli.metrics import metrics_table

    console.print(metrics_table(state.metrics, f"Run {run.root}"))
    console.print(
        f"{state.iteration} iterations in {state.wall_time / 60:.1f} min; best AP "
        f"{state.best_ap:.1f} (epoch {state.best_epoch}). Files: {run.best.name}, {run.last.name}, "
        f"{run.results.name}, {run.config.name}."
    )
