"""Small pieces shared by the commands: never overwriting a file.

Imported by `--help`: anything that pulls in torch is imported inside the function using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from crosskd_cli.errors import RunError

if TYPE_CHECKING:
    pass


def refuse_to_clobber(paths: list[Path]) -> None:
    taken = [p for p in paths if p.exists()]
    if taken:
        raise RunError(
            f"{taken[0]} already exists.",
            hint="Add --overwrite to replace it, or pick another --out.",
        )
