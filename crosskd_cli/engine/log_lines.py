"""What a run says while it trains: plain lines for logs and pipes, log.jsonl records."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch


def epoch_line(row: dict[str, Any], iteration: int, total: int) -> str:
    """One plain progress line for a finished epoch: where the run is, its ETA, its losses."""
    seconds = row.get("seconds", 0.0)
    eta = seconds / max(iteration, 1) * (total - iteration)
    losses = {
        k: v for k, v in row.items() if k.startswith(("loss_", "kd_")) and isinstance(v, float)
    }
    return (
        f"epoch {row['epoch']}  iter {iteration}/{total}  {seconds / 60:.1f} min  "
        f"eta {eta / 60:.1f} min  {loss_text(losses)}"
    )


def loss_text(means: dict[str, float]) -> str:
    total = sum(means.values())  # a NaN term makes the total NaN: never hidden
    parts = [f"loss {total:.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items()]
    return " ".join(parts)


class IntervalLog:
    """One record per log interval: to RUN/log.jsonl (main process), the trackers
    (`train.log_with`), and a plain line when the output is not a terminal (a log file would
    otherwise stay silent for an epoch). Speed counts from the interval's start; the ETA from
    this session's start (a resumed run's earlier sessions ran elsewhere)."""

    def __init__(self, trainer: Any, images_per_step: int, total: int) -> None:
        self.trainer, self.images_per_step, self.total = trainer, images_per_step, total
        state = trainer.state
        self.session_start, self.session_wall = state.iteration, state.wall_time
        self.restart()

    def restart(self) -> None:
        """A new interval from now and the current iteration (each epoch starts one)."""
        self.started, self.iteration = time.perf_counter(), self.trainer.state.iteration

    def write(self, lr: float, means: dict[str, float], skipped: int, wall: float) -> None:
        trainer, state = self.trainer, self.trainer.state
        now = time.perf_counter()
        images = (state.iteration - self.iteration) * self.images_per_step
        session_steps = max(state.iteration - self.session_start, 1)
        remaining = self.total - state.iteration
        record = {
            "iteration": state.iteration,
            "epoch": state.epoch + 1,
            "lr": lr,
            **means,
            "skipped_steps": skipped,
            "images_per_s": round(images / max(now - self.started, 1e-9), 2),
            "eta_s": round((wall - self.session_wall) / session_steps * remaining, 1),
            "max_memory_mb": round(peak_memory_mb(trainer.accelerator.device), 1),
            "seconds": round(wall, 1),
        }
        self.started, self.iteration = now, state.iteration
        if trainer.cfg.log_with:
            trainer.accelerator.log(record, step=state.iteration)
        if not trainer.is_main:
            return
        with trainer.run.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not trainer.console.is_terminal:
            line = interval_line(record, self.total)
            trainer.console.print(line, highlight=False, soft_wrap=True)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the GPU allocator's on CUDA, else this process's peak RSS. VmHWM,
    not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a process
    started by a larger one (a launcher, a benchmark) would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB or B


def interval_line(record: dict[str, Any], total: int) -> str:
    """The plain line of one log interval: iteration, epoch, losses, lr, speed, ETA, memory."""
    losses = {k: v for k, v in record.items() if k.startswith(("loss_", "kd_"))}
    skipped = f"  skipped {record['skipped_steps']}" if record["skipped_steps"] else ""
    return (
        f"iter {record['iteration']}/{total}  epoch {record['epoch']}  {loss_text(losses)}  "
        f"lr {record['lr']:.3g}  {record['images_per_s']:.1f} img/s  "
        f"eta {record['eta_s'] / 60:.1f} min  mem {record['max_memory_mb']:.0f} MB{skipped}"
    )


def keep_log_until(path: Path, iteration: int) -> None:
    """Drop log.jsonl records past `iteration`: the resumed run writes them again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _record_iteration(line) <= iteration]
    path.write_text("".join(line + "\n" for line in kept))


def _record_iteration(line: str) -> float:
    try:
        return float(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line a kill cut short
