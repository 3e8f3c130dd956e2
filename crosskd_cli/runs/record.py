"""What a run folder records about its start (preset.yaml, config.yaml), so that the folder
alone resumes it, and what a resume may change.

preset.yaml is a plain preset: the settings the run resolved (`--preset RUN/preset.yaml`
starts the same run again). config.yaml holds the run's other inputs: the command, the data,
the teacher file and its sha256, the initial weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from crosskd_cli.config.presets import Preset, build_preset, read_preset
from crosskd_cli.config.safe_read import Unbounded, load_yaml
from crosskd_cli.config.schema import Policy, parse, to_plain, yaml_words
from crosskd_cli.errors import CheckpointError, DataError, PresetError, RunError, first_line
from crosskd_cli.storage.files import atomic_write_text, file_digest
from crosskd_cli.storage.run_folder import RunDir

MAX_RECORD_BYTES = 1 << 20  # config.yaml is a few hundred bytes

# Settings a resumed run may change: none changes what the run computes, only how it gets there
RESULT_NEUTRAL = {
    "data.num_workers": "every sample's augmentation is keyed by (seed, epoch, index) alone",
    "data.skip_bad_images": "a bad image stops the run without it, and is replaced with it",
    "train.log_interval": "when losses are synced for the log",
    "train.log_with": "which trackers also receive the log",
    "train.state_interval": "when the resumable state is saved",
    "train.max_nonfinite_steps": "the patience of a diverging run",
    "train.collective_timeout": "how long processes wait for each other",
    # the split of a total batch: the total itself is checked against the saved state
    "train.grad_accum": "how the total batch is split into forwards",
    "distill.gap_images": "the Fig. 5 distances measure the student, they never train it",
}
SCHEDULE = ("train.epochs", "train.max_iters")  # may grow on resume, never shrink
# Not compared: descriptive fields; the teacher reference (the teacher file is checked by its
# sha256 instead); num_classes, which the data decides (`jobs.spec_for_data`)
NOT_COMPARED = ("name", "description", "reference", "teacher", "model.num_classes")

RECORD = Policy(
    raises=RunError,
    refuse_unknown=False,  # keys a newer crosskd adds do not stop this one resuming
    nested_defaults=True,
    describe=yaml_words,
    root="config.yaml",
    wrong_type="{where}: '{path}' must be {expected}, got {value}.",
    wrong_type_hint="The file was edited or damaged: restore it, or start the run again.",
    missing="{where}: missing key '{path}'.",
    missing_hint="The file was edited or damaged: restore it, or start the run again.",
)


@dataclass(frozen=True)
class TeacherFile:
    """A distillation's teacher: an input of the run, re-read (and checked) on resume."""

    path: str  # absolute
    sha256: str | None = None  # None: recorded before crosskd hashed teachers (not checked)


@dataclass(frozen=True)
class RunRecord:
    """config.yaml: the inputs of a run besides its settings (preset.yaml)."""

    command: Literal["teacher", "distill"]
    data: str  # the data as `--data` reproduces it (DataSource.spec)
    teacher: TeacherFile | None = None  # distill only
    backbone_weights: str | None = None  # initial weights, read once; a resume reads last/
    student_weights: str | None = None


# ---------------------------------------------------------------------------- the files


def write_record(
    run: RunDir, record: RunRecord, preset: Preset, schedule: dict[str, Any] | None = None
) -> None:
    """preset.yaml and config.yaml; a file whose text is unchanged is not rewritten.

    `schedule`: the lr schedule as the run resolved it (`Schedule.record`), for the reader
    only: a resume computes it again from the settings (`read_record` skips it)."""
    header = (
        "# The inputs of this run; its settings are in preset.yaml.\n"
        f"# `crosskd {record.command} --resume --out RUN` reads both.\n"
    )
    plain = to_plain(record)
    if plain["teacher"] is None:  # a teacher run
        del plain["teacher"]
    if schedule is not None:
        plain["schedule"] = schedule
    settings = to_plain(preset)
    if not preset.is_pair:  # a detector's run: no teacher, nothing distilled
        del settings["teacher"], settings["distill"]
    _write_if_changed(run.preset, yaml.safe_dump(settings, sort_keys=False))
    _write_if_changed(run.config, header + yaml.safe_dump(plain, sort_keys=False))


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def read_record(run: RunDir) -> RunRecord:
    raw = dict(_read_config(run))
    if isinstance(raw.get("teacher"), str):  # written before the teacher was hashed
        raw["teacher"] = {"path": raw["teacher"]}
    for key in ("backbone_weights", "student_weights"):
        raw[key] = raw.get(key) or None  # older runs wrote "" for none
    return parse(RunRecord, raw, where=str(run.config), policy=RECORD)


# Settings added since 0.2.0 whose default differs from what a run recorded before computed:
# such a run resumes as it started
# (a value, or a function of the recorded preset giving one)
BEFORE_RECORDED = {
    ("data", "group_by_aspect_ratio"): "false",
    # 0.2 counted milestones in iterations whenever train.max_iters was set
    ("train", "milestone_unit"): lambda recorded: (
        "iterations" if recorded.get("train", {}).get("max_iters") else "epochs"
    ),
}


def read_run_preset(run: RunDir, overrides: list[str] | None = None) -> Preset:
    """The run's settings (preset.yaml), with `overrides` applied: parsed, not yet checked
    against the zoo (the caller's `preset_checks.check_preset`)."""
    if run.preset.is_file():
        return read_preset(str(run.preset), _recorded_before(run.preset) + list(overrides or []))
    raw = _read_config(run).get("preset")  # written before preset.yaml existed
    if not isinstance(raw, dict):
        raise RunError(
            f"{run.root} has no preset.yaml: the run's settings are missing.",
            hint="Restore it, or start the run again in another --out.",
        )
    return build_preset(raw, overrides, where=f"{run.config} (preset)", name=str(raw.get("name")))


def _recorded_before(path: Path) -> list[str]:
    """Overrides that give a run recorded before a setting existed that setting's old
    behaviour (BEFORE_RECORDED); none for a file read_preset will refuse anyway."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return []
        recorded = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, Unbounded):
        return []
    if not isinstance(recorded, dict):
        return []
    return [
        f"{section}.{key}={value(recorded) if callable(value) else value}"
        for (section, key), value in BEFORE_RECORDED.items()
        if isinstance(recorded.get(section, {}), dict) and key not in recorded.get(section, {})
    ]


def _read_config(run: RunDir) -> dict[str, Any]:
    hint = "Resuming needs it: restore it, or start the run again in another --out."
    try:
        if run.config.stat().st_size > MAX_RECORD_BYTES:
            raise RunError(f"{run.config} is {run.config.stat().st_size} bytes: damaged.", hint)
        text = run.config.read_text()
    except FileNotFoundError:
        raise RunError(
            f"{run.root} has no config.yaml: it is not a crosskd run folder.", hint
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{run.config} cannot be read: {err}.", hint) from None
    try:
        raw = load_yaml(text)
    except (Unbounded, yaml.YAMLError) as err:
        raise RunError(
            f"{run.config} is damaged: not plain YAML ({first_line(err)}).", hint
        ) from None
    if not isinstance(raw, dict):
        raise RunError(f"{run.config} is damaged: it holds {type(raw).__name__}, not a mapping.")
    return raw


# ---------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class ResumePlan:
    """The settings a resumed run goes on with, and the changes made to them, in words."""

    preset: Preset
    notes: tuple[str, ...]


def plan_resume(
    run: Preset,
    requested: Preset,
    given: set[str],
    *,
    preset_given: str | None,
    resume_command: str,
) -> ResumePlan:
    """The run's own settings, with what `requested` changes that a resume may change: a
    longer schedule and the RESULT_NEUTRAL settings; any other difference is refused, named.

    requested: the run's preset with the --set given again, or the --preset given again with
    them. given: the dotted keys the command line set (--set, and the flags standing for one).
    """
    if preset_given is not None and requested.name != run.name:
        raise PresetError(
            f"--preset {preset_given} is not the run's preset '{run.name}'; a resumed run keeps "
            "its preset.",
            hint=f"Resume with `{resume_command}` alone (the run folder knows its preset), or "
            "start a new run in another --out.",
        )
    refused, changes, notes = _compare(run, requested, given, preset_given)
    if refused:
        raise PresetError(
            "; ".join(refused) + "; a resumed run keeps its settings.",
            hint=f"Resume with `{resume_command}` alone (the run folder knows its settings). "
            "A resume may only extend train.epochs or train.max_iters, and change "
            + ", ".join(RESULT_NEUTRAL)
            + ".",
        )
    return ResumePlan(_with_changes(run, requested, changes), tuple(notes))


def differences(run: Preset, requested: Preset) -> list[str]:
    """Every way `requested` would run otherwise than `run` did (a longer schedule too):
    what keeps `quickstart` from reusing a run made with other settings."""
    if requested.name != run.name:
        return [f"--preset {requested.name} differs from the run's {run.name}"]
    refused, changes, _ = _compare(run, requested, set(), None)
    longer = [k.split(".")[1] for k in changes if k in SCHEDULE]
    return refused + [
        _differs(f"train.{f}", getattr(requested.train, f), getattr(run.train, f), set(), None)
        for f in longer
    ]


def _compare(
    run: Preset, requested: Preset, given: set[str], preset_given: str | None
) -> tuple[list[str], dict[str, Any], list[str]]:
    """(refusals, allowed changes {dotted key: value}, notes on those changes)."""
    before, after = _flat(to_plain(run)), _flat(to_plain(requested))
    refused, neutral, changes = [], [], {}
    for key, value in after.items():
        old = before.get(key)
        if value == old or key in SCHEDULE or _under(key, NOT_COMPARED):
            continue
        if value is None and key.startswith("distill.") and key.endswith("_weight"):
            continue  # None: the family's default, which the run resolved and recorded
        if key in RESULT_NEUTRAL:
            changes[key] = value
            neutral.append(f"{key}={_show(value)} (was {_show(old)})")
            continue
        refused.append(_differs(key, value, old, given, preset_given))
    notes = []
    schedule = _schedule(run, requested, given, preset_given)
    if isinstance(schedule, str):
        refused.append(schedule)
    elif schedule is not None:
        key, old, new, unit = schedule
        changes[key] = new
        notes.append(f"Extending the schedule from {old} to {new} {unit}.")
    if neutral:
        notes.append(f"Resuming with {', '.join(neutral)}: the results stay the same.")
    return refused, changes, notes


def _schedule(
    run: Preset, requested: Preset, given: set[str], preset_given: str | None
) -> tuple[str, int, int, str] | str | None:
    """(key, old, new, unit) of an extended schedule; a refusal; or None when unchanged."""
    old, new = run.train, requested.train
    if (old.max_iters is None) != (new.max_iters is None):
        return (
            _differs("train.max_iters", new.max_iters, old.max_iters, given, preset_given)
            + " (switching between epochs and iterations would move the lr milestones)"
        )
    key, unit = ("train.max_iters", "iterations") if old.max_iters else ("train.epochs", "epochs")
    field = key.split(".")[1]
    before, after = getattr(old, field), getattr(new, field)
    if after == before:
        return None
    if after < before:
        return (
            _differs(key, after, before, given, preset_given)
            + " (a resume may extend the schedule, not shorten it)"
        )
    return key, before, after, unit


def _with_changes(run: Preset, requested: Preset, changes: dict[str, Any]) -> Preset:
    sections: dict[str, dict[str, Any]] = {}
    for key in changes:
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = getattr(getattr(requested, section), field)
    replaced = {s: dataclasses.replace(getattr(run, s), **f) for s, f in sections.items()}
    return dataclasses.replace(run, **replaced)


def _differs(key: str, value: Any, old: Any, given: set[str], preset_given: str | None) -> str:
    if _under(key, given) or preset_given is None:
        return f"--set {key}={_show(value)} differs from the run's {_show(old)}"
    return f"{key}={_show(value)} of --preset {preset_given} differs from the run's {_show(old)}"


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat(plain: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    """A value as it is typed after --set."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


# ---------------------------------------------------------------------------- the inputs


def check_teacher(recorded: TeacherFile | None, given: Path | None) -> Path:
    """The teacher a resumed distillation reads: the recorded file, or the one given again
    with --teacher, which must be the same file (sha256) wherever it now lives."""
    if recorded is None:
        raise RunError(
            "The run's config.yaml records no teacher: it was edited or damaged.",
            hint="Restore it, or start the run again in another --out.",
        )
    path = given if given is not None else Path(recorded.path)
    sha = recorded.sha256
    if not path.is_file():
        hint = "Pass the run's teacher again with --teacher FILE"
        hint += f" (sha256 {sha[:16]}...)." if sha else "."
        raise CheckpointError(
            f"Teacher checkpoint {path} does not exist"
            + (" (any more)." if given is None else "."),
            hint=hint,
        )
    if sha is None:
        return path
    digest = file_digest(path)
    if digest == sha:
        return path
    if path.resolve() == Path(recorded.path).resolve():
        message = (
            f"Teacher {path} changed since the run started: sha256 {digest[:16]}... now, "
            f"{sha[:16]}... then; a resumed run keeps its teacher."
        )
    else:
        message = (
            f"Teacher {path} (sha256 {digest[:16]}...) is not the run's teacher "
            f"{recorded.path} (sha256 {sha[:16]}...); a resumed run keeps its teacher."
        )
    raise CheckpointError(
        message,
        hint="Pass the run's teacher with --teacher, or start a new run in another --out.",
    )


def check_data(given: str | None, recorded: str, resume_command: str) -> str:
    """The data a resumed run reads: the recorded data; data given again must be the same."""
    if given is None or given == recorded:
        return recorded
    raise DataError(
        f"--data {given} differs from the run's {recorded}; a resumed run keeps its data.",
        hint=f"Resume with `{resume_command}` alone (the run folder knows its data), or start "
        "a new run in another --out.",
    )


def check_weights(
    option: str, given: Path | None, recorded: str | None, resume_command: str
) -> None:
    """Initial weights given again must be the run's (a resume reads them from last/)."""
    if given is None:
        return
    if recorded is not None and given.expanduser().resolve() == Path(recorded).resolve():
        return
    raise RunError(
        f"{option} {given} differs from the run's {recorded or 'none'}; a resumed run keeps "
        "its settings.",
        hint=f"Resume with `{resume_command}` alone: the saved state holds the weights.",
    )
