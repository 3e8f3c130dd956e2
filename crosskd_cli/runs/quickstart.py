"""The whole story on one data set: teacher (cached), plain student, CrossKD student, one table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from crosskd_cli.checkpoints.format import read_meta
from crosskd_cli.config.presets import Preset
from crosskd_cli.data import DataSource
from crosskd_cli.distill.preset_checks import check_preset, load_preset
from crosskd_cli.errors import RunError
from crosskd_cli.models.pretrained import resolve
from crosskd_cli.runs.jobs import distill_student, train_detector
from crosskd_cli.runs.record import differences, read_run_preset
from crosskd_cli.runs.teachers import teacher_cache_dir
from crosskd_cli.storage.files import write_json
from crosskd_cli.storage.run_folder import RunDir, clear_run_dir, lock_run
from crosskd_cli.viz.plots import GAP_PNG, RESULTS_PNG, has_gap, plot_gap, plot_run

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
STUDENTS = (("none", "2/3"), ("crosskd", "3/3"))  # (method, step shown)


@dataclass
class Row:
    """One model of the comparison."""

    name: str
    checkpoint: Path
    metrics: dict[str, Any]
    minutes: float


def cached_teacher(
    pair: Preset, data: DataSource, overrides: list[str], console: Console, resume_hint: str
) -> Row:
    """Train the pair's teacher once per (teacher preset with the overrides, data); later runs
    with the same settings reuse it (`teacher_cache_dir`)."""
    preset = load_preset(pair.teacher.preset, overrides)
    run = RunDir(teacher_cache_dir(preset, data.spec))
    with lock_run(run, "crosskd quickstart"):
        if run.best.is_file() and run.last.is_file():
            meta = read_meta(run.best)
            console.print(f"[dim]Reusing the cached teacher {run.best}.[/]")
            return Row("teacher", run.best, meta.metrics, meta.training.get("seconds", 0) / 60)
        resume = run.has_state()
        if not resume:  # what a killed first save left: start afresh
            clear_run_dir(run)
        console.rule(f"1/3 teacher {preset.name} ({preset.model.backbone}), cached for later runs")
        state = train_detector(
            preset,
            data,
            run,
            resume=resume,
            backbone_weights=resolve(preset.model, None, download=False),
            console=console,
            resume_hint=resume_hint,
        )
    return Row("teacher", run.best, state.metrics, state.wall_time / 60)


def student(
    pair: Preset,
    data: DataSource,
    method: str,
    teacher: Path,
    root: Path,
    console: Console,
    step: str,
    resume_hint: str,
) -> Row:
    """Train (or, when finished before, read back) the pair's student with `method`."""
    preset, run = student_preset(pair, method), student_run(root, method)
    with lock_run(run, "crosskd quickstart"):
        if run.best.is_file() and run.last.is_file():
            meta = read_meta(run.best)
            minutes = meta.training.get("seconds", 0) / 60
            return Row(_label(method, preset), run.best, meta.metrics, minutes)
        console.rule(f"{step} student {preset.model.backbone}, method {method}")
        state = distill_student(
            preset,
            data,
            run,
            teacher,
            resume=run.has_state(),
            student_weights=None,
            backbone_weights=resolve(preset.model, None, download=False),
            eval_teacher=False,
            console=console,
            resume_hint=resume_hint,
        )
    return Row(_label(method, preset), run.best, state.metrics, state.wall_time / 60)


def student_preset(pair: Preset, method: str) -> Preset:
    return dataclasses.replace(pair, distill=dataclasses.replace(pair.distill, method=method))


def student_run(root: Path, method: str) -> RunDir:
    return RunDir(root / method.replace("+", "-"))


def check_students(pair: Preset, root: Path) -> None:
    """Before any training: students in `root` made with other settings are not reused."""
    for method, _ in STUDENTS:
        run = student_run(root, method)
        if not (run.has_state() or run.best.is_file()) or not run.preset.is_file():
            continue
        changed = differences(check_preset(read_run_preset(run)), student_preset(pair, method))
        if changed:
            raise RunError(
                f"{run.root} holds a student trained with other settings: {'; '.join(changed)}.",
                hint="Pass another --out to keep both, or the settings of that run.",
            )


def _label(method: str, preset: Preset) -> str:
    if method == "none":
        return "student (no KD)"
    return f"student ({method}, i={preset.distill.cross_index})"


def run_quickstart(
    pair: Preset,
    data: DataSource,
    root: Path,
    overrides: list[str],
    console: Console,
    resume_hint: str,
) -> list[Row]:
    """Teacher, `none` student and CrossKD student on the same data, the same schedule.

    resume_hint: the quickstart command with every flag, which resumes any of them."""
    check_students(pair, root)
    teacher = cached_teacher(pair, data, overrides, console, resume_hint)
    rows = [teacher]
    for method, step in STUDENTS:
        rows.append(
            student(pair, data, method, teacher.checkpoint, root, console, step, resume_hint)
        )
    write_json(
        root / "summary.json",
        [
            {
                "model": r.name,
                "checkpoint": str(r.checkpoint),
                "minutes": round(r.minutes, 2),
                **{k: r.metrics.get(k) for k in METRICS},
            }
            for r in rows
        ],
    )
    return rows


def pictures(root: Path, rows: list[Row]) -> list[Path]:
    """Every run's results.png (drawn for a student run made before crosskd drew them) and,
    in `root`, the paper's Fig. 5 for the two students side by side."""
    files = []
    for row in rows:
        run = RunDir(row.checkpoint.parent)
        if not (run.root / RESULTS_PNG).is_file() and run.root.parent == root:
            plot_run(run)
        files += [p for p in (run.root / RESULTS_PNG, run.root / GAP_PNG) if p.is_file()]
    students = {
        row.name: row.checkpoint.parent / "results.csv"
        for row in rows[1:]
        if has_gap(row.checkpoint.parent / "results.csv")
    }
    if students:
        plot_gap(students, root / GAP_PNG, "Fig. 5: " + " vs ".join(students))
        files.append(root / GAP_PNG)
    return files
