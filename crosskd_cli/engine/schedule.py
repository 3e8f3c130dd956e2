"""The lr schedule a run actually follows: warm-up, then x gamma at each decay point.

`train.milestones` are epochs unless `train.milestone_unit: iterations`. A run of epochs
decays at the end of those epochs. A run of `train.max_iters` iterations takes epoch
milestones in proportion to its length, as the fraction of `train.epochs` they mark (the 1x
schedule's 8 and 11 of 12 epochs decay at 8/12 and 11/12 of the run), so a preset's epoch
milestones keep their meaning under any length. A decay point that cannot act as written
(at or past the end of the run, or inside the warm-up) is kept and named by `notes()`: short
runs (`--set train.max_iters=2`) must still start.

An extended run (a resume with more epochs or iterations) recomputes the points ahead of it for
the new length; those it has already passed stay where they were (`passed`), so its lr never
rises again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crosskd_cli.config.presets import TrainConfig


@dataclass(frozen=True)
class Schedule:
    cfg: TrainConfig
    iters_per_epoch: int
    total: int  # iterations of the run
    decays: tuple[int, ...]  # iteration after which the lr is x gamma, one per milestone

    def factor(self, iteration: int) -> float:
        """The lr multiplier for the step after `iteration` finished steps (LambdaLR's)."""
        cfg = self.cfg
        decay = cfg.gamma ** sum(iteration >= at for at in self.decays)
        if iteration < cfg.warmup_iters:
            if cfg.warmup == "constant":
                return decay * cfg.warmup_ratio
            k = (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
            return decay * (1 - k)
        return decay

    def _epoch(self, iteration: int) -> str:
        return f"{iteration / self.iters_per_epoch:.3g}"

    def line(self, lr: float) -> str:
        """The banner line: warm-up, each decay point in iterations and epochs, final lr."""
        cfg = self.cfg
        parts = []
        if cfg.warmup_iters:
            start = f"from {cfg.warmup_ratio:g} x lr" if cfg.warmup == "linear" else "constant"
            parts.append(f"warm-up {_iterations(cfg.warmup_iters)} ({cfg.warmup} {start})")
        for milestone, at in zip(self.cfg.milestones, self.decays, strict=True):
            written = f"{milestone} {cfg.milestone_unit}"
            parts.append(f"x{cfg.gamma:g} at iteration {at} (epoch {self._epoch(at)}; {written})")
        final = lr * self.factor(self.total - 1) if self.total else lr
        parts.append(f"final lr {final:.3g}")
        return f"Schedule over {_iterations(self.total)}: " + ", ".join(parts) + "."

    def notes(self) -> list[str]:
        """Decay points that cannot act as written: at or past the end, inside the warm-up."""
        notes = []
        for milestone, at in zip(self.cfg.milestones, self.decays, strict=True):
            written = f"milestone {milestone} {self.cfg.milestone_unit} (iteration {at})"
            if at >= self.total:
                notes.append(f"{written} is not before the end of the run ({self.total}): "
                             "it never lowers the lr")  # fmt: skip
            elif at < self.cfg.warmup_iters:
                notes.append(f"{written} falls inside the warm-up "
                             f"({_iterations(self.cfg.warmup_iters)}): the warm-up ramps to the "
                             "decayed lr")  # fmt: skip
        return notes

    def record(self) -> dict[str, object]:
        """What a run records of its schedule (config.yaml)."""
        cfg = self.cfg
        return {
            "iterations": self.total,
            "iterations_per_epoch": self.iters_per_epoch,
            "warmup_iters": cfg.warmup_iters,
            "decay_iterations": list(self.decays),
            "gamma": cfg.gamma,
            "milestones": list(cfg.milestones),
            "milestone_unit": cfg.milestone_unit,
        }


def _iterations(count: int) -> str:
    return f"{count} iteration{'' if count == 1 else 's'}"


def decay_iterations(cfg: TrainConfig, iters_per_epoch: int) -> tuple[int, ...]:
    """Each milestone as the iteration after which it lowers the lr."""
    if cfg.milestone_unit == "iterations":
        return tuple(cfg.milestones)
    if cfg.max_iters:  # epochs in proportion to the run: m / epochs of max_iters
        return tuple(m * cfg.max_iters // cfg.epochs for m in cfg.milestones)
    return tuple(m * iters_per_epoch for m in cfg.milestones)


def build_schedule(
    cfg: TrainConfig, iters_per_epoch: int, passed: Sequence[int] = (), at: int = 0
) -> Schedule:
    """The schedule of `cfg`. `passed`: the decay points a resumed run recorded (its earlier
    schedule's); those at or before `at`, the iteration it resumes from, stay as they were."""
    total = cfg.max_iters or cfg.epochs * iters_per_epoch
    decays = list(decay_iterations(cfg, iters_per_epoch))
    if len(passed) == len(decays):
        decays = [old if old <= at else new for old, new in zip(passed, decays, strict=True)]
    return Schedule(cfg, iters_per_epoch, total, tuple(decays))
