"""The total batch of an optimizer step (processes x images x accumulation) and the lr it gets.

No torch here: the rule is plain arithmetic, shared by the loop, its banner and resume checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.errors import RunError


@dataclass(frozen=True)
class TotalBatch:
    """How many images make one optimizer step, and how they are split."""

    processes: int
    per_process: int  # train.batch_size: images per process per forward
    accumulation: int  # train.grad_accum: forwards per optimizer step

    @property
    def images(self) -> int:
        return self.processes * self.per_process * self.accumulation

    def describe(self) -> str:
        """'8 images (2 processes x 2 images x 2 accumulated steps)'."""
        return (
            f"{self.images} images ({self.processes} process{'es' * (self.processes > 1)} x "
            f"{self.per_process} image{'s' * (self.per_process > 1)} x {self.accumulation} "
            f"accumulated step{'s' * (self.accumulation > 1)})"
        )


def total_batch(cfg: TrainConfig, num_processes: int) -> TotalBatch:
    return TotalBatch(num_processes, cfg.batch_size, cfg.grad_accum)


def scaled_lr(cfg: TrainConfig, num_processes: int) -> float:
    """Linear scaling rule: `train.lr` is given for `base_batch_size` images per optimizer
    step; the run's lr is lr x total batch / base_batch_size, the total batch counting
    processes, images per process and accumulated steps."""
    return cfg.lr * total_batch(cfg, num_processes).images / cfg.base_batch_size


def lr_line(cfg: TrainConfig, num_processes: int) -> str:
    """The banner line: the lr used and where it comes from."""
    batch = total_batch(cfg, num_processes)
    return (
        f"lr {scaled_lr(cfg, num_processes):.6g} = {cfg.lr:g} x total batch "
        f"{batch.describe()} / base batch {cfg.base_batch_size}."
    )


def check_resumed_batch(saved: int, cfg: TrainConfig, num_processes: int, hint: str) -> None:
    """A resumed run keeps its total batch: its lr, schedule and data position per step are
    counted in it. `saved` is 0 for states written before crosskd recorded it (not checked).
    The split may change: 2 processes x 2 images resume as 1 x 2 x 2 accumulated steps."""
    now = total_batch(cfg, num_processes)
    if saved in (0, now.images):
        return
    split = now.processes * now.per_process
    if saved % split == 0:
        fix = f"Keep it with `{hint} --set train.grad_accum={saved // split}`"
    else:
        fix = f"Use a process count and train.batch_size whose product divides {saved}"
    raise RunError(
        f"This run was trained with a total batch of {saved} images per step; resumed now it "
        f"would be {now.describe()}.",
        hint=f"{fix}, or start a new run.",
    )
