"""The whole story on one data set: teacher (cached), plain student, CrossKD student, one table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from crosskd_cli.checkpoint import read_meta
from crosskd_cli.config import Preset, load_preset
from crosskd_cli.data import DataSource
from crosskd_cli.jobs import distill_student, train_detector
from crosskd_cli.pretrained import resolve
from crosskd_cli.runs import RunDir, choose_run_dir, write_json
from crosskd_cli.teachers import teacher_cache_dir

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class Row:
    """One model of the comparison."""

    name: str
    checkpoint: Path
    metrics: dict[str, Any]
    minutes: float


def cached_teacher(pair: Preset, data: DataSource, overrides: list[str], console: Console) -> Row:
    """Train the pair's teacher once per (teacher preset, data); later runs reuse it."""
    run = RunDir(teacher_cache_dir(pair.teacher.preset, data.spec))
    if run.best.is_file() and run.last.is_file():
        meta = read_meta(run.best)
        console.print(f"[dim]Reusing the cached teacher {run.best}.[/]")
        return Row("teacher", run.best, meta.metrics, meta.training.get("seconds", 0) / 60)
    resume = run.has_state()
    if run.root.exists() and not resume:
        run = choose_run_dir(run.root, "teacher", "", resume=False, overwrite=True)
    preset = load_preset(pair.teacher.preset, overrides)
    console.rule(f"1/3 teacher {preset.name} ({preset.model.backbone}), cached for later runs")
    state = train_detector(
        preset,
        data,
        run,
        resume=resume,
        backbone_weights=resolve(preset.model, None, download=False),
        console=console,
        resume_hint="crosskd quickstart (resumes the teacher where it stopped)",
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
) -> Row:
    """Train (or, when finished before, read back) the pair's student with `method`."""
    preset = dataclasses.replace(pair, distill=dataclasses.replace(pair.distill, method=method))
    run = RunDir(root / method.replace("+", "-"))
    if run.best.is_file() and run.last.is_file():
        meta = read_meta(run.best)
        return Row(
            _label(method, preset), run.best, meta.metrics, meta.training.get("seconds", 0) / 60
        )
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
        resume_hint=f"crosskd quickstart --out {root} (resumes where it stopped)",
    )
    return Row(_label(method, preset), run.best, state.metrics, state.wall_time / 60)


def _label(method: str, preset: Preset) -> str:
    if method == "none":
        return "student (no KD)"
    return f"student ({method}, i={preset.distill.cross_index})"


def run_quickstart(
    pair: Preset, data: DataSource, root: Path, overrides: list[str], console: Console
) -> list[Row]:
    """Teacher, `none` student and CrossKD student on the same data, the same schedule."""
    teacher = cached_teacher(pair, data, overrides, console)
    rows = [teacher]
    rows.append(student(pair, data, "none", teacher.checkpoint, root, console, "2/3"))
    rows.append(student(pair, data, "crosskd", teacher.checkpoint, root, console, "3/3"))
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
