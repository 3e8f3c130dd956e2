"""A training run from a request: the preset with its settings, the data, the claimed and
locked run folder, the teacher and initial weights; on `--resume`, all of it read back from the
folder and checked against what is given again (`runs.record`).

Imported by `--help` (the commands build a `RunRequest`): anything that pulls in torch is
imported inside the function using it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from crosskd_cli.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console

    from crosskd_cli.config.presets import Preset
    from crosskd_cli.data import DataSource
    from crosskd_cli.storage.run_folder import RunDir


class DataPaths(NamedTuple):
    """--data, or the custom split paths, as the user gave them."""

    data: str | None
    train_ann: Path | None
    train_images: Path | None
    val_ann: Path | None
    val_images: Path | None

    def given(self) -> bool:
        return any(v is not None for v in self)


class RunRequest(NamedTuple):
    """A `teacher` or `distill` command line, as typed."""

    command: str  # teacher or distill
    preset: str
    preset_given: bool  # --preset typed, not its default
    settings: list[str]  # --set, and the flags standing for one (--cross-index, --method...)
    paths: DataPaths
    out: Path | None
    resume: bool
    overwrite: bool
    teacher: Path | None = None
    backbone_weights: Path | None = None
    student_weights: Path | None = None
    download_weights: bool = False  # fetch the backbone's ImageNet file if it is not cached


class RunInputs(NamedTuple):
    """What a run goes with: its settings, data, locked folder, teacher and initial weights."""

    preset: Preset
    source: DataSource
    run: RunDir
    resume_hint: str  # the command that resumes it: `crosskd <command> --resume --out RUN`
    teacher: Path | None
    backbone_weights: Path | None
    student_weights: Path | None


@contextmanager
def started_run(console: Console, request: RunRequest) -> Iterator[RunInputs]:
    """Set a run up, holding its folder's lock (main process) while the block runs.

    A new run: the preset with the settings, the folder, the data, the teacher. A resumed one
    reads them all from its folder; what is given again must agree (`runs.record`). From here
    on only the main process prints.
    """
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.engine.devices import from_main_process, main_process_first, quiet_unless_main
    from crosskd_cli.errors import OptionError
    from crosskd_cli.storage.run_folder import check_folder

    if request.resume and request.overwrite:
        raise OptionError(
            "--resume continues a run and --overwrite replaces it: give one of them.",
            hint=f"Resume with `crosskd {request.command} --resume --out RUN`.",
        )
    if request.out is not None:
        check_folder(request.out)
    if request.resume:
        quiet_unless_main(console)
        with claimed_run(request, Path(request.preset).stem) as run:
            hint = resume_command(request.command, run)
            resumed = from_main_process(lambda: read_resumed(request, run, hint))
            for note in resumed.notes:
                console.print(note, highlight=False)
            with main_process_first():
                source = data_source(resumed.data, resumed.preset, None, None, None, None)
            yield RunInputs(resumed.preset, source, run, hint, *resumed.inputs)
        return
    spec = load_preset(request.preset, request.settings)
    quiet_unless_main(console)
    with claimed_run(request, spec.name) as run:
        from crosskd_cli.models.pretrained import resolve

        with main_process_first():  # the backbone's ImageNet file, found or fetched once
            weights = resolve(spec.model, request.backbone_weights, request.download_weights)
        with main_process_first():  # generates built-in data once, for every process
            data, *split_paths = request.paths
            source = data_source(data, spec, *split_paths)
        teacher = None
        if request.command == "distill":
            from crosskd_cli.runs.teachers import resolve_teacher

            teacher = resolve_teacher(spec, source, request.teacher, console)
        yield RunInputs(
            spec,
            source,
            run,
            resume_command(request.command, run),
            teacher,
            weights,
            request.student_weights,
        )


@contextmanager
def claimed_run(request: RunRequest, preset_name: str) -> Iterator[RunDir]:
    """The run folder, chosen and locked by the main process for all, released at the end."""
    from crosskd_cli.engine.devices import from_main_process
    from crosskd_cli.storage.run_folder import claim_run_dir

    held = []

    def claim() -> RunDir:
        lock = claim_run_dir(
            request.out,
            request.command,
            preset_name,
            resume=request.resume,
            overwrite=request.overwrite,
        )
        held.append(lock)
        return lock.run

    run = from_main_process(claim)
    try:
        yield run
    finally:
        for lock in held:
            lock.release()


class Resumed(NamedTuple):
    preset: Preset
    notes: tuple[str, ...]
    data: str
    inputs: tuple[Path | None, Path | None, Path | None]  # teacher, backbone, student weights


def read_resumed(request: RunRequest, run: RunDir, hint: str) -> Resumed:
    """The run's own inputs, from its folder; anything given again must be the same, but for
    a longer schedule and the settings that change no result."""
    from crosskd_cli.distill.preset_checks import check_preset, load_preset
    from crosskd_cli.errors import RunError
    from crosskd_cli.runs.record import (
        check_data,
        check_teacher,
        check_weights,
        plan_resume,
        read_record,
        read_run_preset,
    )

    record = read_record(run)
    if record.command != request.command:
        raise RunError(
            f"{run.root} is a run of `crosskd {record.command}`, not of `crosskd "
            f"{request.command}`.",
            hint=f"Resume it with `{resume_command(record.command, run)}`.",
        )
    keys = {item.partition("=")[0].strip() for item in request.settings}
    given_preset = request.preset if request.preset_given else None
    if given_preset is not None:
        requested = load_preset(given_preset, request.settings)
    else:
        requested = check_preset(read_run_preset(run, request.settings))
    plan = plan_resume(
        check_preset(read_run_preset(run)),
        requested,
        keys,
        preset_given=given_preset,
        resume_command=hint,
    )
    data = check_data(given_data_spec(request.paths), record.data, hint)
    teacher = None
    if request.command == "distill":
        teacher = check_teacher(record.teacher, request.teacher)
    check_weights("--backbone-weights", request.backbone_weights, record.backbone_weights, hint)
    check_weights("--student-weights", request.student_weights, record.student_weights, hint)
    notes = (resuming_line(run), *plan.notes)
    inputs = (teacher, _path(record.backbone_weights), _path(record.student_weights))
    return Resumed(plan.preset, notes, data, inputs)


def resuming_line(run: RunDir) -> str:
    """Which saved state the resume continues: the one recovery will keep (a save that was
    complete but not yet swapped in when the run was killed is newer than last/)."""
    from crosskd_cli.storage.state_dir import newest

    found = newest(run.state)
    if found is None:
        return f"Resuming {run.root}."
    folder, marker = found
    where = "" if folder == run.state else f", from {folder.name} (a save the kill left unswapped)"
    return f"Resuming {run.root} at iteration {marker['iteration']}{where}."


def given_data_spec(paths: DataPaths) -> str | None:
    """The data spec of --data (or the split paths) given again, without generating data."""
    from crosskd_cli.data import resolve_data

    if not paths.given():
        return None
    if paths.data is not None and paths.data.startswith("builtin:"):
        return paths.data
    return resolve_data(
        paths.data,
        train_ann=paths.train_ann,
        train_images=paths.train_images,
        val_ann=paths.val_ann,
        val_images=paths.val_images,
    ).spec


def resume_command(command: str, run: RunDir) -> str:
    """The whole command that resumes `run`: its folder knows everything else."""
    return shlex.join(["crosskd", command, "--resume", "--out", str(run.root)])


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def data_source(
    data: str | None,
    preset: Preset,
    train_ann: Path | None,
    train_images: Path | None,
    val_ann: Path | None,
    val_images: Path | None,
) -> DataSource:
    """--data, else the custom paths, else the preset's own default data."""
    from crosskd_cli.data import resolve_data

    custom = any(p is not None for p in (train_ann, train_images, val_ann, val_images))
    spec = data if data is not None or custom else preset.data.source
    if spec is None and not custom:
        raise DataError(
            f"Preset '{preset.name}' names no data set and no --data was given.",
            hint="Add --data /path/to/coco (COCO layout), --data builtin:shapes, or "
            "--train-ann/--train-images/--val-ann/--val-images.",
        )
    return resolve_data(
        spec,
        train_ann=train_ann,
        train_images=train_images,
        val_ann=val_ann,
        val_images=val_images,
    )
