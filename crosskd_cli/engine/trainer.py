"""The one training loop, on Accelerate, shared by `crosskd teacher` and `crosskd distill`.

The loop knows nothing about detection: its `Hooks` compute a step's losses, evaluate, save a
checkpoint and add columns to an epoch's results row. Around it: devices and processes
(`devices`), the Accelerator (`accelerator`), the optimizer (`optim`) and lr schedule
(`schedule`), the guards that keep a run honest (`guards`), the resumable state (`state`) and
what a run says while it trains (`log_lines`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.engine.accelerator import resolve_precision, tracker_config
from crosskd_cli.engine.guards import (
    MagnitudeWatch,
    NonFiniteGuard,
    StopRequest,
    ZeroWatch,
    check_diverged,
    check_learned,
    peers_watched,
)
from crosskd_cli.engine.log_lines import IntervalLog, epoch_line, loss_text
from crosskd_cli.engine.optim import build_optimizer
from crosskd_cli.engine.progress import progress_bar
from crosskd_cli.engine.schedule import build_schedule
from crosskd_cli.engine.state import TrainerState, commit_state, load_state, write_state
from crosskd_cli.engine.total_batch import check_resumed_batch, lr_line, scaled_lr, total_batch
from crosskd_cli.errors import Interrupted, RunError
from crosskd_cli.storage.run_folder import RunDir, append_results
from crosskd_cli.viz.plots import plot_run_or_warn

StepFn = Callable[[nn.Module, Any], dict[str, Tensor]]
EvalFn = Callable[[nn.Module], dict[str, Any]]
SaveFn = Callable[[nn.Module, str, dict[str, Any]], None]


@dataclass(frozen=True)
class Hooks:
    """What `fit` calls; every model it passes is unwrapped (no DDP) but for `step`'s."""

    step: StepFn  # (model, batch) -> {name: loss}, under the step's precision
    evaluate: EvalFn  # model -> metrics ("AP" picks the best checkpoint)
    save: SaveFn  # (model, "best" | "last", metrics): main process only
    # model -> more columns of the epoch's results.csv row (the Fig. 5 distances)
    epoch_columns: Callable[[nn.Module], dict[str, float]] | None = None
    # once the state is loaded (on resume) and before the first step; a resume refused for a
    # damaged state has changed nothing by then
    on_start: Callable[[], None] | None = None
    watch_zero: tuple[str, ...] = ()  # loss names reported if they stay exactly zero


@dataclass
class _Loop:
    """What every epoch of one `fit` runs with."""

    model: nn.Module
    step_fn: StepFn
    loader: Any
    optimizer: Any
    scheduler: Any
    total: int
    guard: NonFiniteGuard


class Trainer:
    """Runs `fit` for one run folder; every process builds one, only the main one writes."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: TrainConfig,
        run: RunDir,
        console: Console,
        resume_hint: str = "--resume",
    ) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.precision = resolve_precision(cfg.mixed_precision, accelerator.device.type)
        self.run = run
        self.console = console
        self.state = TrainerState()
        self._pending_row: dict[str, Any] = {}  # the epoch's losses, written after evaluation
        self.resume_hint = resume_hint  # the command that resumes this run, shown on interruption
        self.stop = StopRequest()
        self._magnitudes = MagnitudeWatch()

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Average a tensor over processes (loss normalisers such as the positive count)."""
        return self.accelerator.reduce(value, reduction="mean")

    def _reduce_sum(self, value: Tensor) -> Tensor:
        return self.accelerator.reduce(value, reduction="sum")

    def _summed(self, sums: dict[str, Tensor], kept: Tensor) -> Tensor:
        """The running loss sums, then the kept-step count, summed over every process."""
        values = torch.stack([torch.as_tensor(sums[k], device=kept.device).float() for k in sums])
        values = torch.cat([values, kept.reshape(1).float()])
        return self._reduce_sum(values) if self.accelerator.num_processes > 1 else values

    def _loss_means(self, sums: dict[str, Tensor], kept: Tensor) -> dict[str, float]:
        """Each loss's mean over the kept steps of every process: the loss of the total
        batch where its normaliser is averaged over processes (docs/method.md §1.3)."""
        values = self._summed(sums, kept)
        means = (values[:-1] / values[-1]).tolist()  # the one sync
        return dict(zip(sums, means, strict=True))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        """The training step's precision context; it covers the unwrapped teacher too."""
        if self.precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Place a frozen model (the teacher): on the device, eval mode, no grad, never
        DDP-wrapped and never registered with Accelerate, so it is not part of the resumable
        state: it is an input of the run, re-read from its file on resume."""
        model.requires_grad_(False)
        return model.eval().to(self.accelerator.device)

    def fit(
        self,
        model: nn.Module,
        train_loader: torch.utils.data.DataLoader,
        hooks: Hooks,
        *,
        resume: bool = False,
    ) -> TrainerState:
        """Train `model` to the end of the schedule, evaluating and checkpointing on the way."""
        acc, cfg = self.accelerator, self.cfg
        train_loader = acc.prepare(train_loader)  # this process's share: it sets the epoch
        iters_per_epoch = len(train_loader) // cfg.grad_accum  # optimizer steps
        if iters_per_epoch == 0:
            raise RunError(
                "The training data gives no optimizer step: fewer training images than the "
                f"total batch, {total_batch(cfg, acc.num_processes).describe()}.",
                hint="Lower --set train.batch_size (or train.grad_accum) or use more images.",
            )
        self.schedule = build_schedule(cfg, iters_per_epoch)
        total = self.schedule.total
        lr = scaled_lr(cfg, acc.num_processes)
        optimizer = build_optimizer(model, cfg, lr)
        # a lambda (not the schedule's method): a resume replaces the schedule it reads, and
        # LambdaLR keeps plain functions out of its state (runs of 0.2 hold such a state)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda iteration: self.schedule.factor(iteration)
        )
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if resume:
            self.state = load_state(acc, self.run, self.console)
            check_resumed_batch(self.state.total_batch, cfg, acc.num_processes, self.resume_hint)
            self.schedule = build_schedule(
                cfg, iters_per_epoch, self.state.decays, self.state.iteration
            )
        self.state.total_batch = total_batch(cfg, acc.num_processes).images
        self.state.decays = list(self.schedule.decays)
        if hooks.on_start is not None:
            hooks.on_start()
        images_per_step = total_batch(cfg, acc.num_processes).images
        self._log = IntervalLog(self, images_per_step, total)
        reduce_sum = self._reduce_sum if acc.num_processes > 1 else None
        guard = NonFiniteGuard(optimizer, acc.device, self.precision == "fp16", reduce_sum)
        guard.total += self.state.skipped
        self._guard = guard
        self._sums, self._kept = {}, torch.zeros((), device=acc.device)
        self._announce(lr)
        if cfg.log_with:
            acc.init_trackers("crosskd", config=tracker_config(asdict(cfg)))
        with self.stop, self._progress() as progress, self._peers_watched():
            task = progress.add_task(
                self._epoch_text(iters_per_epoch, total),
                total=total,
                completed=self.state.iteration,
                losses="",
            )
            loop = _Loop(model, hooks.step, train_loader, optimizer, scheduler, total, guard)
            watcher = ZeroWatch(hooks.watch_zero)
            while self.state.iteration < total:
                progress.update(task, description=self._epoch_text(iters_per_epoch, total))
                self._train_epoch(loop, progress, task, watcher)
                if self.state.epoch_step >= iters_per_epoch or self.state.iteration >= total:
                    self._end_epoch(model, hooks, total)
                if self.stop.agreed(self.accelerator, self._at_log_interval()):
                    self._stop_now()
        if cfg.log_with:
            acc.end_training()
        return self.state

    def _announce(self, lr: float) -> None:
        """The banner lines of the loop: lr, schedule (and its notes), precision."""
        if not self.is_main:
            return
        self.console.print(f"[dim]{lr_line(self.cfg, self.accelerator.num_processes)}[/]")
        self.console.print(f"[dim]{self.schedule.line(lr)}[/]", highlight=False)
        for note in self.schedule.notes():
            self.console.print(f"[yellow]Note: {note}.[/]", highlight=False)
        if self.precision != "no":
            self.console.print(f"[dim]Training steps in {self.precision} mixed precision.[/]")

    def _peers_watched(self):
        return peers_watched(
            self.accelerator, self.run, lambda: self.state.iteration, self.cfg.collective_timeout,
            self.resume_hint,
        )  # fmt: skip

    def _epoch_text(self, iters_per_epoch: int, total: int) -> str:
        epochs = -(-total // iters_per_epoch)
        return f"epoch {min(self.state.epoch + 1, epochs)}/{epochs}"

    # --------------------------------------------------------------------- one epoch

    def _train_epoch(self, loop: _Loop, progress, task, watcher: ZeroWatch) -> None:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        loader = loop.loader
        loader.set_epoch(state.epoch)
        if hasattr(loader.dataset, "set_epoch"):  # per-sample augmentation keyed by epoch
            loader.dataset.set_epoch(state.epoch, cfg.seed)
        done = state.epoch_step * cfg.grad_accum  # forwards of this epoch already trained
        batches = acc.skip_first_batches(loader, done) if done else loader
        sums, kept = self._epoch_sums_from_state()
        started = time.perf_counter()
        self._log.restart()
        loop.model.train()
        iters_per_epoch = len(loader) // cfg.grad_accum
        for losses in self._optimizer_steps(loop, batches):
            norm = None
            if cfg.grad_clip:
                norm = acc.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip)
            found = loop.guard.check(losses, norm)
            loop.optimizer.step()
            loop.scheduler.step()
            step = state.iteration + 1  # the step just taken
            logs = step % cfg.log_interval == 0 or step == loop.total
            if logs and self.is_main:  # before the gradients go
                self._magnitudes.check(acc.unwrap_model(loop.model), step, self.console)
            loop.optimizer.zero_grad(set_to_none=True)
            for name, value in losses.items():  # a skipped step's terms stay out of the means
                value = torch.where(found > 0, 0.0, value.detach().float())
                sums[name] = sums.get(name, 0) + value
            kept += 1 - found
            self._sums, self._kept = sums, kept  # what a state saved mid-epoch records
            state.iteration += 1
            state.epoch_step += 1
            progress.update(task, completed=state.iteration)  # the bar moves every step
            if logs:
                means = self._loss_means(sums, kept)
                check_diverged(
                    loop.guard, losses, cfg.max_nonfinite_steps, state.iteration, self.run
                )
                watcher.check(means, state.iteration, self.console if self.is_main else None)
                progress.update(task, losses=loss_text(means))
                wall = state.wall_time + time.perf_counter() - started
                lr, skipped = loop.scheduler.get_last_lr()[0], int(loop.guard.total.item())
                self._log.write(lr, means, skipped, wall)
            if state.iteration >= loop.total or state.epoch_step >= iters_per_epoch:
                break
            if self.stop.agreed(self.accelerator, self._at_log_interval()):
                state.wall_time += time.perf_counter() - started
                self._stop_now()
            if cfg.state_interval and state.iteration % cfg.state_interval == 0:
                state.wall_time += time.perf_counter() - started
                started = time.perf_counter()
                self._save_state()
        state.wall_time += time.perf_counter() - started
        if sums:
            row = {
                "epoch": state.epoch + 1,
                "iteration": state.iteration,
                "lr": loop.scheduler.get_last_lr()[0],
            }
            row.update(self._loss_means(sums, kept))
            row["skipped_steps"] = int(loop.guard.total.item())
            row["seconds"] = round(state.wall_time, 1)
            self._pending_row = row

    def _optimizer_steps(self, loop: _Loop, batches):
        """Yield each optimizer step's losses (the mean over its forwards) once the gradients
        of its `train.grad_accum` forwards are summed (Accelerate divides each forward's loss
        by their number; DDP syncs on the last forward only). Leftover forwards at the end of
        the epoch, too few for a step, are dropped, as an incomplete batch is."""
        acc, forwards = self.accelerator, self.cfg.grad_accum
        step: dict[str, Tensor] = {}
        for batch in batches:
            with acc.accumulate(loop.model):
                with self.autocast():
                    losses = loop.step_fn(loop.model, batch)
                acc.backward(sum(losses.values()))
            if forwards == 1:
                yield losses
                continue
            for name, value in losses.items():
                step[name] = step.get(name, 0) + value.detach() / forwards
            if acc.sync_gradients:
                yield step
                step = {}

    def _epoch_sums_from_state(self) -> tuple[dict[str, Tensor], Tensor]:
        """The running loss sums and kept-step count the epoch starts from: on resume mid-epoch
        the saved totals of every process, held by the main process alone (they are summed
        over processes when read), else nothing."""
        device, state = self.accelerator.device, self.state
        kept = torch.zeros((), device=device)
        if not (state.epoch_step and state.epoch_kept >= 0 and self.is_main):
            return {}, kept
        sums = {k: torch.tensor(v, device=device) for k, v in state.epoch_sums.items()}
        return sums, kept + state.epoch_kept

    def _record_progress(self) -> None:
        """Before a state save: the run's skipped steps and the epoch's running sums (over
        every process: a collective, which every process reaches in `_save_state`)."""
        state = self.state
        state.skipped = int(self._guard.total.item())
        if not state.epoch_step:  # a new epoch: nothing summed yet, and all of it known
            state.epoch_sums, state.epoch_kept = {}, 0.0
            return
        if not self._sums:
            return
        *totals, kept = self._summed(self._sums, self._kept).tolist()
        state.epoch_sums = dict(zip(self._sums, totals, strict=True))
        if state.epoch_kept >= 0:  # unknown stays unknown until the epoch ends
            state.epoch_kept = kept

    # ----------------------------------------------------------- stopping, epoch ends

    def _at_log_interval(self) -> bool:
        return self.state.iteration % self.cfg.log_interval == 0

    def _stop_now(self) -> None:
        self._save_state()
        state = self.state
        raise Interrupted(
            f"Stopped by {self.stop.name} at epoch {state.epoch + 1}, iteration "
            f"{state.iteration}; the state is saved in {self.run.state}.",
            hint=f"Resume with: {self.resume_hint}",
            exit_code=self.stop.exit_code,
        )

    def _end_epoch(self, model: nn.Module, hooks: Hooks, total: int) -> None:
        state, cfg = self.state, self.cfg
        finished = state.iteration >= total
        check_learned(self._guard, state.iteration, finished, list(self._sums))
        row = self._pending_row or {"epoch": state.epoch + 1}
        evaluate_now = finished or (
            cfg.eval_interval and (state.epoch + 1) % cfg.eval_interval == 0
        )
        plain = self.accelerator.unwrap_model(model)
        if evaluate_now:
            metrics = hooks.evaluate(plain)
            state.metrics = metrics
            row.update({k: v for k, v in metrics.items() if isinstance(v, float)})
            ap = float(metrics.get("AP", -1.0))
            if ap > state.best_ap:
                state.best_ap, state.best_epoch = ap, state.epoch + 1
                if self.is_main:
                    hooks.save(plain, "best", metrics)
        if self.is_main:
            if hooks.epoch_columns is not None:
                row.update(hooks.epoch_columns(plain))
            append_results(self.run, row)
            plot_run_or_warn(self.run, self.console)  # results.png beside results.csv
            if not self.console.is_terminal:  # logs and pipes get no live bar: a line per epoch
                line = epoch_line(row, state.iteration, total)
                self.console.print(line, highlight=False, soft_wrap=True)  # one line, unwrapped
        state.epoch += 1
        state.epoch_step = 0
        self._pending_row = {}
        self._sums, self._kept = {}, torch.zeros_like(self._kept)
        if finished and self.is_main:
            hooks.save(plain, "last", state.metrics)
        self._save_state()

    def _save_state(self) -> None:
        """The resumable state: written beside the current one, the progress recorded (a
        collective), then swapped in (`engine.state`)."""
        write_state(self.accelerator, self.run.state)
        self._record_progress()
        commit_state(self.accelerator, self.run, self.state)

    def _progress(self) -> Progress:
        """The live bar, on the main process of a terminal; logs get `epoch_line`s instead
        (a bar rendered once into a file is one truncated line)."""
        live = self.is_main and self.console.is_terminal
        return progress_bar(self.console, disable=not live, losses=True)
