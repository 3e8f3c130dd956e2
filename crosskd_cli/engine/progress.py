"""The one progress bar style: description, bar, done/total, elapsed, ETA, and extra fields."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console, *, disable: bool = False, losses: bool = False) -> Progress:
    """A rich Progress; with `losses`, tasks carry a `losses` field shown after the ETA."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if losses:
        columns.append(TextColumn("{task.fields[losses]}"))
    return Progress(*columns, console=console, disable=disable)
