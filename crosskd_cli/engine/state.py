"""The resumable state of a run: where the loop is (`TrainerState`) beside Accelerate's state,
saved through the crash-safe folder protocol (`storage.state_dir`) and checked before loading.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load
from rich.console import Console
from safetensors import safe_open

from crosskd_cli.engine.log_lines import keep_log_until
from crosskd_cli.errors import RunError, first_line
from crosskd_cli.storage import state_dir
from crosskd_cli.storage.run_folder import DAMAGED_HINT, RunDir, keep_results_until
from crosskd_cli.storage.state_dir import abandon, commit, fresh_tmp, read_marker, recover, tmp_of


@dataclass
class TrainerState:
    """Where the loop is; saved beside Accelerate's state so a run resumes mid-epoch."""

    epoch: int = 0  # current epoch, 0-based
    epoch_step: int = 0  # iterations finished inside the current epoch
    iteration: int = 0  # iterations finished in total
    best_ap: float = -1.0
    best_epoch: int = -1
    wall_time: float = 0.0  # seconds of training so far, over all sessions
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest evaluation
    total_batch: int = 0  # images per optimizer step (0: a state from before it was recorded)
    # the schedule's decay iterations (none: a state from before they were recorded): those
    # passed stay put when a resume extends the run
    decays: list[int] = field(default_factory=list)
    skipped: int = 0  # non-finite steps skipped, over the whole run
    # The current epoch's running loss sums over every process and the count of steps in
    # them, so a resumed epoch's results row is the uninterrupted one's. epoch_kept < 0: a
    # state written before they were (crosskd 0.2), whose row covers the steps after resume
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_kept: float = 0.0


STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")  # Accelerate's names


def state_problem(folder: Path, process_index: int, scaler: bool) -> str | None:
    """What is wrong with the files of a saved state that this process loads, if anything.

    Cheap checks before loading: every file there, the safetensors header whole, the torch
    files' zip directories readable (a truncated one has none). The RNG file is loaded here:
    Accelerate would skip an unreadable one silently, and the run would no longer resume
    bit-identically.
    """
    rng = f"random_states_{process_index}.pkl"
    names = [*STATE_FILES, rng] + (["scaler.pt"] if scaler else [])
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), "pt"):
                    pass
            except Exception as err:  # safetensors raises its own error type: any is damage
                return f"{name} is truncated or not a safetensors file ({first_line(err)})"
        elif not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a file torch wrote"
    try:
        load(folder / rng)  # Accelerate's loader: weights only, plus its RNG state types
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, UnpicklingError) as err:
        return f"{rng} cannot be loaded ({first_line(err)})"
    return None


def trainer_state_problem(marker: dict[str, Any]) -> str | None:
    """trainer_state.json parsed, but is it a TrainerState (names and types of its fields)?"""
    fields = {f.name: f for f in dataclasses.fields(TrainerState)}
    unknown = [k for k in marker if k not in fields]
    if unknown:
        return f"{state_dir.MARKER} holds an unknown field '{unknown[0]}'"
    for name, value in marker.items():
        expected = type(getattr(TrainerState(), name))
        ok = isinstance(value, (int, float)) if expected is float else isinstance(value, expected)
        if not ok or isinstance(value, bool):
            return f"{state_dir.MARKER}: '{name}' is {value!r}, not of type {expected.__name__}"
        if expected is list and not all(type(v) is int and v >= 0 for v in value):
            return f"{state_dir.MARKER}: '{name}' is {value!r}, not a list of iterations"
    return None


def damaged(folder: Path, problem: str) -> RunError:
    return RunError(
        f"The saved state in {folder} is damaged: {problem}.",
        hint=DAMAGED_HINT.format(run=folder.parent),
    )


def write_state(acc: Accelerator, folder: Path) -> None:
    """Accelerate's full state (model, optimizer, scheduler, RNG...) written beside the current
    state, `folder` (`storage.state_dir`): a failed write, on any process, keeps the previous
    one and raises. `commit_state` then swaps it in."""
    main = acc.is_main_process
    if main:
        recover(folder)
        fresh_tmp(folder)
    acc.wait_for_everyone()
    written = 1.0
    try:
        state_dir.on_step("write")
        acc.save_state(str(tmp_of(folder)))
    except OSError as err:
        written, failure = 0.0, err
    flag = torch.tensor(written, device=acc.device)
    if acc.num_processes > 1:  # every process must have written its part (its RNG)
        flag = acc.reduce(flag, reduction="sum") / acc.num_processes
    if flag.item() < 1.0:
        if main:
            abandon(folder)
        last = read_marker(folder)
        kept = f"iteration {last['iteration']}" if last else "none saved yet"
        reason = failure if written == 0.0 else "another process could not write its part"
        raise RunError(
            f"Could not save the resumable state in {tmp_of(folder)}: {reason}. The "
            f"previous state in {folder} is kept ({kept}).",
            hint="Free disk space (or fix the folder's permissions), then resume.",
        )


def commit_state(acc: Accelerator, run: RunDir, state: TrainerState) -> None:
    """Mark the written state complete with `state` and swap it in by renames: a kill at any
    instant leaves a complete state. Rows of epochs past it are redone on resume."""
    if acc.is_main_process:
        commit(run.state, asdict(state))
        keep_results_until(run, state.epoch)
    acc.wait_for_everyone()


def load_state(acc: Accelerator, run: RunDir, console: Console) -> TrainerState:
    """Restore Accelerate's state and the loop's from `run.state`, after checking every file
    this process reads (a damaged state is refused by all processes alike)."""
    folder = run.state
    marker = recover(folder) if acc.is_main_process else None
    acc.wait_for_everyone()
    marker = marker or read_marker(folder)
    if marker is None:
        raise RunError(
            f"--resume: {folder} holds no complete state.",
            hint="Start a new run without --resume.",
        )
    problem = state_problem(folder, acc.process_index, acc.scaler is not None)
    problem = problem or trainer_state_problem(marker)
    flag = torch.tensor(float(problem is None), device=acc.device)
    if acc.num_processes > 1:  # a process that stops alone would leave the others waiting
        flag = acc.reduce(flag, reduction="sum") / acc.num_processes
    if flag.item() < 1.0:
        raise damaged(folder, problem or "another process found its part damaged")
    try:
        acc.load_state(str(folder))
    except UnpicklingError:
        raise damaged(
            folder, "a file holds pickled objects other than tensors (refused, not loaded)"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as err:
        fits = "size mismatch" not in str(err) and "Missing key" not in str(err)
        what = "cannot be loaded" if fits else "does not fit the run's model"
        raise damaged(folder, f"it {what} ({first_line(err)})") from None
    state = TrainerState(**marker)
    if "epoch_kept" not in marker and state.epoch_step:
        state.epoch_kept = -1.0  # crosskd 0.2: the epoch's sums were not saved
        if acc.is_main_process:
            console.print(
                f"[yellow]Note: the state in {folder} (crosskd 0.2) holds no running loss "
                f"sums: the results row of epoch {state.epoch + 1} averages the steps "
                "after this resume only.[/]"
            )
    if acc.is_main_process:  # rows and records the restored state has not reached are redone
        keep_results_until(run, state.epoch)
        keep_log_until(run.log, state.iteration)
    return state
