"""Where a distillation's teacher comes from: --teacher, the preset, or the teacher cache."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from rich.console import Console

from crosskd_cli.config.presets import Preset
from crosskd_cli.config.schema import to_plain
from crosskd_cli.data import DataSource, cache_root
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.errors import CheckpointError
from crosskd_cli.runs.record import RESULT_NEUTRAL


def teacher_cache_dir(teacher: Preset, data_spec: str) -> Path:
    """The run folder of the cached teacher of `teacher` (a detector preset, overrides
    applied) on `data_spec`: trained once, then reused.

    Keyed on every setting that changes the teacher (its model, data and train sections, the
    data spec), so a teacher trained with another schedule or model is never reused in the
    place of this one; settings that change nothing it computes (`RESULT_NEUTRAL`) and the
    preset's name and description are left out of the key.
    """
    plain = to_plain(teacher)
    key = {
        section: {
            field: value
            for field, value in plain[section].items()
            if f"{section}.{field}" not in RESULT_NEUTRAL and f"{section}.{field}" != "data.source"
        }
        for section in ("model", "data", "train")
    }
    text = json.dumps({"preset": key, "data": data_spec}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{teacher.name}-{data_spec}")[:60]
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
    # the cache of the teacher preset as shipped: `quickstart --set ...` teachers are not it
    teacher_preset = load_preset(preset.teacher.preset)
    cached = teacher_cache_dir(teacher_preset, data.spec) / "best.safetensors"
    if cached.is_file():
        console.print(f"[dim]Using the cached teacher {cached}.[/]")
        return cached
    how = preset.teacher.how_to_get or (
        f"crosskd teacher --preset {preset.teacher.preset} --data {data.spec}"
    )
    raise CheckpointError(
        f"No teacher weights for preset '{preset.name}' (teacher preset "
        f"'{preset.teacher.preset}').",
        hint=how_to_get_hint(how, preset.teacher.preset),
    )


def how_to_get_hint(how: str, teacher_preset: str) -> str:
    """A preset's `teacher.how_to_get` as a hint whose commands paste into a shell: each
    command in backticks, a remark such as "(MMDetection model zoo)" outside them."""
    command, _, remark = how.partition(" (")
    remark = remark.removesuffix(")")
    if remark.startswith("or crosskd "):  # another command: quoted as the first
        remark = f"or `{remark.removeprefix('or ')}`"
    get = f"`{command}`" + (f" ({remark})" if remark else "")
    if command.startswith("crosskd teacher import"):
        return f"Get one with {get}, then pass the file it writes with --teacher."
    return (
        f"Train one with {get}, or convert one with `crosskd teacher import FILE --preset "
        f"{teacher_preset}`; then pass --teacher RUN/best.safetensors."
    )
