"""The resumable state folder `RUN/last/`, saved so that a kill at any instant leaves one to resume.

A save never touches the current state until a complete new one exists beside it:

    write    RUN/last.tmp/...                   Accelerate's files, each fsynced
    mark     RUN/last.tmp/trainer_state.json    written last: its presence means complete
    retire   RUN/last      -> RUN/last.old
    promote  RUN/last.tmp  -> RUN/last
    drop     RUN/last.old  -> trash, deleted

A kill between any two steps leaves at least one complete folder among `last`, `last.tmp` and
`last.old`; `recover` picks the newest complete one, makes it `last/` and throws the others
away. A folder is only ever deleted after being renamed into a trash name, so a half-deleted
folder can never pass for a state. No torch here: the run folder (`run_folder`) asks
`has_state` without it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosskd_cli.storage.files import atomic_write_text, fsync_dir, fsync_file

MARKER = "trainer_state.json"  # written last; holds the loop's position (TrainerState)
STEPS = ("write", "mark", "retire", "promote", "drop")


def _no_hook(step: str) -> None:
    return None


# Called with each step's name just before it runs; the crash tests kill the process here.
on_step: Callable[[str], None] = _no_hook


def tmp_of(state: Path) -> Path:
    return state.with_name(state.name + ".tmp")


def old_of(state: Path) -> Path:
    return state.with_name(state.name + ".old")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's TrainerState dict when the folder is a complete state, else None."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("iteration"), int) else None


def marker_problem(folder: Path) -> str:
    """Why `folder` is not a complete state (for a folder `read_marker` turned down)."""
    path = folder / MARKER
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return f"{MARKER} is missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"{MARKER} cannot be read ({getattr(err, 'strerror', None) or err})"
    except ValueError:
        return f"{MARKER} is not valid JSON"
    return f"{MARKER} does not hold the training loop's position"


def newest(state: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete state among `state`, its .tmp and its .old, with its marker: the
    one `recover` keeps (read only; ties prefer `state`)."""
    candidates = []
    for rank, folder in enumerate((old_of(state), tmp_of(state), state)):
        marker = read_marker(folder)
        if marker is not None:
            candidates.append((marker["iteration"], rank, folder, marker))
    if not candidates:
        return None
    *_, folder, marker = max(candidates, key=lambda c: (c[0], c[1]))
    return folder, marker


def recover(state: Path) -> dict[str, Any] | None:
    """Make `state` the newest complete state among it, its .tmp and its .old; delete the rest.

    Returns that state's marker (TrainerState dict), or None when no complete state exists.
    Safe to call again after a kill at any point inside it.
    """
    found = newest(state)
    _empty_trash(state)
    if found is None:
        for folder in (old_of(state), tmp_of(state)):
            _discard(folder, state)
        return None
    best, marker = found
    if best != state:
        _discard(state, state)
        os.replace(best, state)
        fsync_dir(state.parent)
    for folder in (old_of(state), tmp_of(state)):
        _discard(folder, state)
    return marker


def fresh_tmp(state: Path) -> Path:
    """After `recover`: an empty `last.tmp/` for the next save to write into."""
    tmp = tmp_of(state)
    _discard(tmp, state)
    tmp.mkdir(parents=True)
    return tmp


def commit(state: Path, marker: dict[str, Any]) -> None:
    """Steps mark..drop: `last.tmp/` holds every file but the marker (already fsynced)."""
    tmp, old = tmp_of(state), old_of(state)
    fsync_tree(tmp)
    on_step("mark")
    _write_marker(tmp, marker)
    on_step("retire")
    if state.exists():
        os.replace(state, old)
    on_step("promote")
    os.replace(tmp, state)
    fsync_dir(state.parent)
    on_step("drop")
    _discard(old, state)


def abandon(state: Path) -> None:
    """A save that failed (disk full, a process that could not write): keep the old state."""
    _discard(tmp_of(state), state)


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk, so a power cut cannot leave a marked but empty
    state; then the folder itself."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")


def _trash_name(state: Path) -> str:
    return f".{state.name}.trash-"


def _discard(folder: Path, state: Path) -> None:
    """Rename `folder` into the trash (atomic), then delete it: never half a state in place."""
    if not folder.exists() and not folder.is_symlink():
        return
    trash = folder.with_name(f"{_trash_name(state)}{os.getpid()}-{folder.name}")
    _delete(trash)
    os.replace(folder, trash)
    _delete(trash)


def _empty_trash(state: Path) -> None:
    if state.parent.is_dir():
        for leftover in state.parent.glob(f"{_trash_name(state)}*"):
            _delete(leftover)


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
