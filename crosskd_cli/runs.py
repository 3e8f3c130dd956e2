"""Run folders: naming, refusing to clobber, the resolved config and the results table."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crosskd_cli.errors import RunError
from crosskd_cli.state_dir import MARKER as TRAINER_STATE
from crosskd_cli.state_dir import old_of, read_marker, tmp_of

STATE_DIR = "last"  # full resumable state (Accelerate save_state + trainer_state.json)


@dataclass(frozen=True)
class RunDir:
    """The files of one `teacher` or `distill` run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def log(self) -> Path:
        """One JSON record per log interval (iteration, losses, lr, speed, ETA, memory)."""
        return self.root / "log.jsonl"

    def has_state(self) -> bool:
        """A complete resumable state, possibly still to be recovered after a kill mid-save."""
        state = self.state
        return any(read_marker(f) for f in (state, tmp_of(state), old_of(state)))


def choose_run_dir(
    out: Path | None, command: str, preset_name: str, *, resume: bool, overwrite: bool
) -> RunDir:
    """Pick the run folder without ever overwriting one that the user did not ask to replace.

    Without --out: runs/<command>/<preset>, numbered -2, -3... when taken; --resume picks the
    newest of those that holds resumable state.
    """
    if out is None:
        base = Path("runs") / command / Path(preset_name).stem
        taken = [base] + [base.with_name(f"{base.name}-{k}") for k in range(2, 1000)]
        existing = [p for p in taken if p.exists()]
        if resume:
            resumable = [p for p in existing if RunDir(p).has_state()]
            if not resumable:
                raise RunError(
                    f"--resume: no run of '{preset_name}' with saved state under {base.parent}.",
                    hint="Pass the run folder with --out, or start a new run without --resume.",
                )
            return RunDir(resumable[-1])
        free = next(p for p in taken if not p.exists())
        return RunDir(free)
    run = RunDir(out)
    if resume:
        if not run.has_state():
            raise RunError(
                f"--resume: {out} holds no resumable state ({STATE_DIR}/{TRAINER_STATE}).",
                hint="Start a new run without --resume, or point --out at an interrupted run.",
            )
        return run
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(
                f"Run folder {out} already exists and is not empty.",
                hint="Add --resume to continue it, --overwrite to replace it, or pick another "
                "--out.",
            )
        shutil.rmtree(out)
    return run


def write_config(run: RunDir, config: dict[str, Any]) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config, yaml.safe_dump(config, sort_keys=False))


def append_results(run: RunDir, row: dict[str, Any]) -> None:
    """Append one row to results.csv; a new column rewrites the file with the wider header."""
    rows: list[dict[str, Any]] = []
    if run.results.exists():
        with run.results.open(newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: _fmt(v) for k, v in row.items()})
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    tmp = run.results.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run.results)


def keep_results_until(run: RunDir, epoch: int) -> None:
    """Drop the rows of epochs after `epoch`: written before a kill, they are written again
    when the resumed run finishes those epochs (so every epoch has one row)."""
    if not run.results.exists():
        return
    with run.results.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if int(r.get("epoch") or 0) <= epoch]
    if len(kept) == len(rows):
        return
    tmp = run.results.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, run.results)


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
