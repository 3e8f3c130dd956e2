"""What `teacher` and `distill` do around a training run besides its set-up (`runs.setup`): which
options were typed, the summary after.

Imported by `--help`: anything that pulls in torch is imported inside the function using it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from crosskd_cli.engine.state import TrainerState
    from crosskd_cli.storage.run_folder import RunDir


def typed(ctx: typer.Context, option: str) -> bool:
    """Was `option` given on the command line (not left to its default)?"""
    source = ctx.get_parameter_source(option)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def print_run_summary(console: Console, run: RunDir, state: TrainerState) -> None:
    from crosskd_cli.inference.metrics import metrics_table

    console.print(metrics_table(state.metrics, f"Run {run.root}"))
    pictures = [p.name for p in (run.root / "results.png", run.root / "prediction_gap.png")]
    pictures = [name for name in pictures if (run.root / name).is_file()]
    files = [run.best, run.last, run.results, run.metrics, run.log, run.preset, run.config]
    names = [p.name for p in files if p.is_file()] + pictures + [f"{run.state.name}/"]
    console.print(
        f"{state.iteration} iterations in {state.wall_time / 60:.1f} min; best AP "
        f"{state.best_ap:.1f} (epoch {state.best_epoch}). Files in {run.root}: "
        f"{', '.join(names)} (the resumable state)."
    )
