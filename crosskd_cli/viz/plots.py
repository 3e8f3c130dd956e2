"""A run's pictures: results.png (losses, lr, AP) and prediction_gap.png (the paper's Fig. 5).

Drawn from the files the run already writes (RUN/log.jsonl, RUN/results.csv), so a picture
shows exactly the numbers a user can read there. matplotlib is imported inside the drawing
functions, on its file-only Agg backend: `crosskd --help` never loads it, and no window opens.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from crosskd_cli.storage.files import atomic_path
from crosskd_cli.storage.run_folder import RunDir

RESULTS_PNG = "results.png"
GAP_PNG = "prediction_gap.png"
# The Fig. 5 columns of results.csv (crosskd_cli.distill.prediction_gap writes them), in panel order
GAP_COLUMNS = {
    "l1_to_teacher_cls": "(a) L1(student, teacher): class scores",
    "l1_to_teacher_box": "(a) L1(student, teacher): box sides / stride",
    "l1_to_gt_cls": "(b) L1(student, GT) at positives: class scores",
    "l1_to_gt_box": "(b) L1(student, GT) at positives: box sides / stride",
}
AP_PANEL = "(c) validation AP"
DPI = 80  # with the figure sizes below: results.png 864x280 px, prediction_gap.png 1440x280 px
Series = dict[str, tuple[list[float], list[float]]]  # label -> (x, y)
Panels = dict[str, Series]  # panel title -> its lines


def read_log(path: Path) -> list[dict[str, Any]]:
    """RUN/log.jsonl's records (a line a kill cut short is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_results(path: Path) -> list[dict[str, float]]:
    """RUN/results.csv's rows, numbers as floats (empty cells left out)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def _is_loss(name: str) -> bool:
    return name.startswith(("loss_", "kd_"))


def results_panels(run: RunDir) -> Panels:
    """What results.png draws: every loss term (and their sum) and the lr against iterations,
    from log.jsonl; AP, AP50 and AP75 per evaluation against epochs, from results.csv."""
    records = read_log(run.log)
    names = [k for k in (records[0] if records else {}) if _is_loss(k)]
    iterations = [float(r["iteration"]) for r in records]
    losses: Series = {name: (iterations, [float(r[name]) for r in records]) for name in names}
    if len(names) > 1:
        losses["total"] = (iterations, [sum(float(r[n]) for n in names) for r in records])
    lr: Series = {"lr": (iterations, [float(r["lr"]) for r in records])} if records else {}
    return {
        "losses (per log interval)": losses,
        "learning rate": lr,
        "validation AP": _ap_series(read_results(run.results)),
    }


def _ap_series(rows: list[dict[str, float]]) -> Series:
    evaluated = [r for r in rows if "AP" in r]
    return {
        key: ([r["epoch"] for r in evaluated], [r[key] for r in evaluated])
        for key in ("AP", "AP50", "AP75")
        if evaluated and all(key in r for r in evaluated)
    }


def gap_panels(runs: Mapping[str, Path]) -> Panels:
    """What prediction_gap.png draws, one line per run (label -> its results.csv): each Fig. 5
    column of results.csv against epochs, and AP at the epochs that were evaluated."""
    panels: Panels = {title: {} for title in [*GAP_COLUMNS.values(), AP_PANEL]}
    for label, path in runs.items():
        rows = read_results(path)
        for column, title in [*GAP_COLUMNS.items(), ("AP", AP_PANEL)]:
            measured = [r for r in rows if column in r]
            if measured:
                panels[title][label] = (
                    [r["epoch"] for r in measured],
                    [r[column] for r in measured],
                )
    return panels


def has_gap(path: Path) -> bool:
    """Does results.csv hold Fig. 5 measurements?"""
    return any(column in row for row in read_results(path) for column in GAP_COLUMNS)


def draw(panels: Panels, path: Path, title: str, xlabels: list[str]) -> Panels:
    """One row of line plots, written to `path` (PNG, atomically); returns the lines as
    matplotlib holds them, read back from the figure (what the picture shows)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.5), squeeze=False)
    drawn: Panels = {}
    for ax, (name, series), xlabel in zip(axes[0], panels.items(), xlabels, strict=True):
        for label, (xs, ys) in series.items():
            marker = "o" if len(xs) < 30 else None
            style = "--" if label == "total" else "-"
            ax.plot(xs, ys, style, marker=marker, markersize=3, label=label)
        if not series:
            ax.text(0.5, 0.5, "nothing yet", ha="center", va="center", transform=ax.transAxes)
        elif _positive(series) and _spread(series) > 20:
            ax.set_yscale("log")  # losses and lr span decades: a linear axis flattens them
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and iterations
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if series:
            ax.legend(fontsize=7)
        drawn[name] = {
            line.get_label(): ([float(x) for x in line.get_xdata()],
                               [float(y) for y in line.get_ydata()])
            for line in ax.get_lines()
        }  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return drawn


def save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a 256-colour PNG (a few tens of KB, a third of the
    full-colour file's size), atomically: never half a picture. Closes the figure."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        small = image.convert("RGB").quantize(256)
    with atomic_path(path, durable=False) as tmp:
        small.save(tmp, format="PNG", optimize=True)


def _values(series: Series) -> list[float]:
    return [y for _, ys in series.values() for y in ys if math.isfinite(y)]


def _positive(series: Series) -> bool:
    values = _values(series)
    return bool(values) and min(values) > 0


def _spread(series: Series) -> float:
    values = _values(series)
    return max(values) / min(values)


def plot_results(run: RunDir) -> Panels:
    """RUN/results.png; the lines drawn."""
    return draw(
        results_panels(run),
        run.root / RESULTS_PNG,
        f"{run.root.name}: training",
        ["iteration", "iteration", "epoch"],
    )


def plot_gap(runs: Mapping[str, Path], path: Path, title: str) -> Panels:
    """prediction_gap.png of one run or a comparison of several (label -> results.csv)."""
    return draw(gap_panels(runs), path, title, ["epoch"] * (len(GAP_COLUMNS) + 1))


def plot_run(run: RunDir) -> list[Path]:
    """Every picture of a run folder, from its files: results.png, and prediction_gap.png when
    results.csv holds Fig. 5 measurements. Returns the files written."""
    plot_results(run)
    written = [run.root / RESULTS_PNG]
    if has_gap(run.results):
        plot_gap({run.root.name: run.results}, run.root / GAP_PNG, f"{run.root.name}: Fig. 5")
        written.append(run.root / GAP_PNG)
    return written


def plot_run_or_warn(run: RunDir, console: Console | None) -> None:
    """plot_run for the training loop: a picture that cannot be written (no matplotlib, a full
    disk) is a warning; the run and its results.csv go on."""
    try:
        plot_run(run)
    except (ImportError, OSError) as err:
        if console is not None:
            console.print(f"[bold yellow]Warning:[/] {run.root / RESULTS_PNG} not drawn: {err}")
