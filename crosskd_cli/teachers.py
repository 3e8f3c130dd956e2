"""Where a distillation's teacher comes from: --teacher, the preset, or the teacher cache."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from rich.console import Console

from crosskd_cli.config import Preset
from crosskd_cli.data import DataSource, cache_root
from crosskd_cli.errors import CheckpointError


def teacher_cache_dir(teacher_preset: str, data_spec: str) -> Path:
    """The run folder of the cached teacher of (preset, data): trained once, then reused."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(teacher_preset).stem}-{data_spec}")[:60]
    digest = hashlib.sha1(f"{teacher_preset}|{data_spec}".encode()).hexdigest()[:8]
    return cache_root() / "teachers" / f"{slug}-{digest}"


def resolve_teacher(preset: Preset, data: DataSource, given: Path | None, console: Console) -> Path:
    """The teacher checkpoint to use, or an error saying exactly how to get one."""
    if given is not None:
        if not given.is_file():
            raise CheckpointError(
                f"Teacher checkpoint {given} does not exist.",
                hint="Pass the best.safetensors of a `crosskd teacher` run.",
            )
        return given
    if preset.teacher is None:
        raise CheckpointError(
            f"Preset '{preset.name}' is a single detector, not a teacher/student pair.",
            hint="Use a pair preset such as gfl-r101-to-r50 (crosskd inspect --list-presets).",
        )
    if preset.teacher.weights:
        weights = Path(preset.teacher.weights).expanduser()
        if weights.is_file():
            return weights
    cached = teacher_cache_dir(preset.teacher.preset, data.spec) / "best.safetensors"
    if cached.is_file():
        console.print(f"[dim]Using the cached teacher {cached}.[/]")
        return cached
    how = preset.teacher.how_to_get or (
        f"crosskd teacher --preset {preset.teacher.preset} --data {data.spec}"
    )
    raise CheckpointError(
        f"No teacher weights for preset '{preset.name}' (teacher preset "
        f"'{preset.teacher.preset}').",
        hint=f"Train one with `{how}` (or convert one with `crosskd teacher import FILE "
        f"--preset {preset.teacher.preset}`), then pass --teacher RUN/best.safetensors.",
    )
