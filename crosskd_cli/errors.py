"""The one error family the CLI turns into a red line, a hint and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


class CrossKDError(Exception):
    """A user-facing error: what was wrong (naming the bad value) and what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def __reduce__(self):
        """Pickled whole (hint and a subclass's own fields too): the main process hands its
        errors to the others of a multi-process run (`engine.from_main_process`)."""
        return _rebuild, (type(self), self.message, self.hint), self.__dict__


def _rebuild(cls: type[CrossKDError], message: str, hint: str | None) -> CrossKDError:
    error = cls.__new__(cls)
    CrossKDError.__init__(error, message, hint)
    return error


class DataError(CrossKDError):
    """Bad data: a missing folder or file, a json that is not COCO, an unreadable image."""


class PresetError(CrossKDError):
    """A preset or override that does not exist or does not type-check."""


class ModelError(CrossKDError):
    """A model spec that cannot be built, or a teacher/student pair that does not fit."""


class CheckpointError(CrossKDError):
    """A checkpoint that is missing, corrupt, or does not match the model it should load into."""


class RunError(CrossKDError):
    """A run folder that already exists, cannot be resumed, or cannot be written."""


class OptionError(CrossKDError):
    """A command-line option whose value the command cannot use (checked before any work)."""


class Interrupted(CrossKDError):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving its state: not an error, so it
    is shown as such and exits with the signal's conventional code (143, 130)."""

    label = "Interrupted"

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 130) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def lookup(table: dict[str, T], name: str, what: str) -> T:
    """table[name] of a name table (backbones, head families), or a ModelError listing the
    valid names with the closest one."""
    if name in table:
        return table[name]
    close = closest(name, table)
    raise ModelError(
        f"Unknown {what} '{name}'." + (f" Did you mean '{close}'?" if close else ""),
        hint=f"Valid {what} names: {', '.join(table)}.",
    )


def closest(value: str, options: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The option most like `value` (a likely typo), or None: every "Did you mean" of crosskd
    asks this (difflib's ratio, `cutoff` the least similarity worth suggesting)."""
    matches = difflib.get_close_matches(value, list(options), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def first_line(err: BaseException, limit: int = 160) -> str:
    """An underlying error in one line, to quote in a message: its first line, cut to `limit`
    characters, or its type's name when it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
