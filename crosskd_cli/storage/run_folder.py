"""Run folders: naming, locking, refusing to clobber, the results table."""

from __future__ import annotations

import csv
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosskd_cli.errors import RunError
from crosskd_cli.storage.files import atomic_path
from crosskd_cli.storage.state_dir import MARKER as TRAINER_STATE
from crosskd_cli.storage.state_dir import marker_problem, old_of, read_marker, tmp_of

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

STATE_DIR = "last"  # full resumable state (Accelerate save_state + trainer_state.json)


@dataclass(frozen=True)
class RunDir:
    """The files of one `teacher` or `distill` run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def preset(self) -> Path:
        return self.root / "preset.yaml"

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


def claim_run_dir(
    out: Path | None, command: str, preset_name: str, *, resume: bool, overwrite: bool
) -> RunLock:
    """Pick the run folder and lock it, without ever overwriting one the user did not ask to
    replace, nor one that another run is using.

    Without --out: runs/<command>/<preset>, numbered -2, -3... when taken, claimed with an
    atomic mkdir (two runs started together get two folders); --resume picks the newest of
    those that holds resumable state. Call it on the main process only.
    """
    holder = f"crosskd {command}"
    if out is None:
        base = Path("runs") / command / Path(preset_name).stem
        taken = [base] + [base.with_name(f"{base.name}-{k}") for k in range(2, 1000)]
        if resume:
            resumable = [p for p in taken if p.exists() and RunDir(p).has_state()]
            if not resumable:
                raise RunError(
                    f"--resume: no run of '{preset_name}' with saved state under {base.parent}.",
                    hint="Pass the run folder with --out, or start a new run without --resume.",
                )
            return _locked_for_resume(RunDir(resumable[-1]), holder)
        check_folder(base.parent)
        for candidate in taken:
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue
            except OSError as err:
                raise _cannot_write(candidate, err) from None
            return lock_run(RunDir(candidate), holder, created=True)
        raise RunError(
            f"Every run folder {base}, {base.name}-2 ... {base.name}-999 is taken.",
            hint="Pass a new folder with --out.",
        )
    check_folder(out)
    run = RunDir(out)
    if resume:
        if not out.is_dir():
            raise RunError(
                f"--resume: {out} does not exist.",
                hint="Point --out at the folder of an interrupted run, or start a new run "
                "without --resume.",
            )
        return _locked_for_resume(run, holder)
    lock = lock_run(run, holder)
    try:
        if any(p.name != LOCK for p in out.iterdir()):
            if not overwrite and never_saved(run):
                clear_run_dir(run)  # a start that failed before its first save: nothing lost
            elif not overwrite:
                raise RunError(
                    f"Run folder {out} already exists and is not empty.",
                    hint="Add --resume to continue it, --overwrite to replace it, or pick "
                    "another --out.",
                )
            clear_run_dir(run)
    except BaseException:
        lock.release()
        raise
    return lock


# What a run writes before its first state save (and the state folders of a save cut short)
STARTUP_FILES = frozenset({"config.yaml", "preset.yaml", "log.jsonl", "results.csv",
                           "results.png", "prediction_gap.png", ".lock"})  # fmt: skip


def never_saved(run: RunDir) -> bool:
    """Did a run start in this folder and stop before it saved anything worth keeping? Then
    the same command (with any flags) may start again there without --overwrite: only files a
    starting run writes, no checkpoint and no state, complete or damaged (a last/ folder).
    Any other file, as in a folder of the user's own, keeps the folder protected."""
    for path in run.root.iterdir():
        partial_save = path.name.startswith(f"{STATE_DIR}.") or path.name.startswith(
            f".{STATE_DIR}"
        )
        if path.name not in STARTUP_FILES and not partial_save:
            return False
    return not run.has_state()


def clear_run_dir(run: RunDir) -> None:
    """Delete everything in `run` but the lock, which the caller holds."""
    if not run.root.is_dir():
        return
    for path in run.root.iterdir():
        if path.name == LOCK:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            raise _cannot_write(run.root, err) from None


def _locked_for_resume(run: RunDir, holder: str) -> RunLock:
    lock = lock_run(run, holder)  # first: the state of a run still going is not read
    try:
        check_resumable(run)
    except BaseException:
        lock.release()
        raise
    return lock


DAMAGED_HINT = (
    "It cannot be resumed: start the run again in another --out (--preset {run}/preset.yaml "
    "repeats its settings), or in this folder with --overwrite."
)


def check_resumable(run: RunDir) -> None:
    """A clear error when `run` has no state to resume, or a damaged one."""
    if run.has_state():
        return
    if run.state.is_dir():
        raise RunError(
            f"The saved state in {run.state} is damaged: {marker_problem(run.state)}.",
            hint=DAMAGED_HINT.format(run=run.root),
        )
    raise RunError(
        f"--resume: {run.root} holds no resumable state ({STATE_DIR}/{TRAINER_STATE}).",
        hint="Start a new run without --resume, or point --out at an interrupted run.",
    )


def check_folder(path: Path, option: str = "--out") -> None:
    """Refuse a folder that cannot hold a run's (or an evaluation's) files, before any work:
    a file, a path under a file, a symbolic link leading nowhere, a read-only place."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a loop, before Python 3.13
            raise RunError(
                f"{option} {path} is a symbolic link that leads nowhere (a loop or a missing "
                "target).",
                hint="Pass a real folder, or fix the link.",
            ) from None
    if path.exists() and not path.is_dir():
        raise RunError(
            f"{option} {path} is a file, not a folder.",
            hint="Pass a folder (it is created when missing), or pick another --out.",
        )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise RunError(
            f"{option} {path} cannot be created: {existing} is a file, not a folder.",
            hint="Pick another --out.",
        )
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(
            f"{option} {path} cannot be written: {existing} is read-only.",
            hint="Pick a folder you can write to, or change its permissions.",
        )


def _cannot_write(path: Path, err: OSError) -> RunError:
    return RunError(
        f"Run folder {path} cannot be created or written: {err.strerror or err}.",
        hint="Pick another --out.",
    )


# ---------------------------------------------------------------------------- the lock

LOCK = ".lock"  # RUN/.lock: locked by the process running RUN, which writes its PID there


class RunLock:
    """The exclusive lock of one run folder, held by the main process for the whole run.

    A POSIX record lock (lockf), not a flock: DataLoader workers forked by the run do not
    inherit it, so the kernel drops it the moment the run's process dies, and the next run
    takes it over at once. Released (and the lock file removed) when the run ends; a folder
    created for the run and left empty is removed too. One process never opens the lock
    file of a folder it holds (closing any descriptor of it would drop a record lock).
    """

    def __init__(self, run: RunDir, fd: int | None, created: bool) -> None:
        self.run = run
        self._fd = fd
        self._created = created

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            (self.run.root / LOCK).unlink(missing_ok=True)  # still held: nobody else uses it
            if self._created and not any(self.run.root.iterdir()):
                self.run.root.rmdir()
        except OSError:
            pass  # a lock file left behind is harmless: the next run takes it over
        finally:
            if fcntl is not None:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run(run: RunDir, holder: str, *, created: bool = False) -> RunLock:
    """Lock `run` (creating its folder) for this process, or say which process holds it."""
    path = run.root / LOCK
    created = created or not run.root.exists()
    for _ in range(5):
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _cannot_write(run.root, err) from None
        if fcntl is None:  # not POSIX: runs are not protected from each other
            return RunLock(run, fd, created)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise _cannot_write(run.root, err) from None
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            pid, _, what = owner.partition(" ")
            who = f"process {pid} ({what})" if pid.isdigit() else "another process"
            raise RunError(
                f"Run folder {run.root} is in use by {who}.",
                hint="Wait for that run to end, or stop it (kill -TERM "
                f"{pid if pid.isdigit() else 'PID'} saves its state and frees the folder); "
                "or pick another --out.",
            ) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
            return RunLock(run, fd, created)
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    raise RunError(f"Could not lock the run folder {run.root}: its {LOCK} kept changing.")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


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
    _write_results(run, header, rows)


def keep_results_until(run: RunDir, epoch: int) -> None:
    """Drop the rows of epochs after `epoch`: written before a kill, they are written again
    when the resumed run finishes those epochs (so every epoch has one row)."""
    if not run.results.exists():
        return
    with run.results.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if int(r.get("epoch") or 0) <= epoch]
    if len(kept) != len(rows):
        _write_results(run, list(header), kept)


def _write_results(run: RunDir, header: list[str], rows: list[dict[str, Any]]) -> None:
    """results.csv replaced whole, through a temporary file: never half a table."""
    with atomic_path(run.results, durable=False) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
