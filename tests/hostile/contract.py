"""The contract every hostile input must meet, as a few helpers the hostile tests share.

One clear line naming the bad value (and a hint), exit code 2, no traceback, nothing written
or changed, and the refusal before long work starts (no data generated, no training).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from crosskd_cli.cli import app

runner = CliRunner()
# Tiny built-in data under a seed no other test uses, so its absence from the cache proves
# that nothing was generated.
UNSEEN_DATA = "builtin:shapes:seed=4242,images=8,val=4,size=96"
QUICK = ["--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.max_iters=2"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *fragments: str) -> str:
    """Assert the contract's output: exit code 2, one 'Error:' line holding every fragment
    (rich may wrap it, so whitespace is joined), no traceback. Returns the joined output."""
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}{result.exception!r}"
    assert "Traceback" not in output and "Caught " not in output, output
    assert output.count("Error:") == 1, output
    flat = " ".join(output.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"
    return flat


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), to prove nothing changed."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def generated(cache: Path, marker: str = "seed4242") -> list[str]:
    """Built-in data folders in `cache` (finished or not) whose name holds `marker`."""
    builtin = cache / "builtin"
    return [p.name for p in builtin.iterdir() if marker in p.name] if builtin.is_dir() else []
