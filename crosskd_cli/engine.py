"""The one training loop, on Accelerate, shared by `crosskd teacher` and `crosskd distill`.

The loop knows nothing about detection: a `step_fn(model, batch) -> {name: loss}` computes the
losses, an `evaluate_fn(model) -> metrics` measures, and a `save_fn(model, name, metrics)`
writes a checkpoint. The only module that imports accelerate.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from crosskd_cli.config import TrainConfig
from crosskd_cli.errors import PresetError, RunError
from crosskd_cli.progress import progress_bar
from crosskd_cli.runs import TRAINER_STATE, RunDir, append_results, write_json

StepFn = Callable[[nn.Module, Any], dict[str, Tensor]]
EvalFn = Callable[[nn.Module], dict[str, Any]]
SaveFn = Callable[[nn.Module, str, dict[str, Any]], None]
ZERO_WATCH_ITERS = 20  # a KD term still exactly zero after this many iterations is reported


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


def process_state() -> PartialState:
    """The process group. Without a GPU, several processes (torchrun, accelerate launch) must be
    told they are CPU workers, or Accelerate runs each one alone, unaware of the others."""
    return PartialState(cpu=not torch.cuda.is_available())


def quiet_unless_main(console: Console) -> None:
    """Only the main process talks; the others would print every line once more."""
    console.quiet = not process_state().is_main_process


def main_process_first():
    """Context: the main process goes first (generating data, creating folders), then the rest."""
    return process_state().main_process_first()


def from_main_process(make: Callable[[], Any]) -> Any:
    """Call `make` on the main process only and hand its result to every process.

    Run-folder choices must agree across processes: each deciding for itself would number
    the same run twice.
    """
    state = process_state()
    value = make() if state.is_main_process else None
    if state.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


PRECISIONS = ("no", "fp16", "bf16", "auto")


def native_bf16(device_type: str) -> bool:
    """Does this device compute in bf16 natively, so that autocasting to it saves time?

    CPUs without AVX512-BF16 or AMX emulate bf16 and get slower, not faster.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device_type: str) -> str:
    """`train.mixed_precision` -> no, fp16 or bf16; auto is bf16 where it is native, else no."""
    if requested not in PRECISIONS:
        raise RunError(
            f"train.mixed_precision '{requested}' is not known.",
            hint=f"Use one of: {', '.join(PRECISIONS)} (--set train.mixed_precision=auto).",
        )
    if requested == "auto":
        return "bf16" if native_bf16(device_type) else "no"
    return requested


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """One Accelerator per run: device, processes, fp16 mixed precision, seedable data order.

    bf16 is not handed to Accelerate: it would also autocast the model's forward for good, so
    evaluation during training would run in bf16 and `crosskd eval` (fp32) could not reproduce
    the recorded AP. The Trainer autocasts the training step alone instead. fp16 stays with
    Accelerate, which owns the gradient scaler it needs.
    """
    process_state()  # fixes CPU-or-GPU before the Accelerator reads it
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.mixed_precision, device_type)
    accelerator = Accelerator(
        cpu=device_type == "cpu",
        mixed_precision="fp16" if precision == "fp16" else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # the schedule is per iteration, stepped by hand
    )
    set_seed(cfg.seed, device_specific=False)
    return accelerator


def scaled_lr(cfg: TrainConfig, num_processes: int) -> float:
    """Linear scaling rule: lr is given for `base_batch_size` images per step."""
    return cfg.lr * cfg.batch_size * num_processes / cfg.base_batch_size


def lr_factor(cfg: TrainConfig, iters_per_epoch: int) -> Callable[[int], float]:
    """Warm-up (linear from `warmup_ratio`, or constant at it), then x gamma at each milestone
    (epochs or iterations)."""
    if cfg.warmup not in ("linear", "constant"):
        raise PresetError(
            f"train.warmup '{cfg.warmup}' is not known.",
            hint="Use --set train.warmup=linear or --set train.warmup=constant.",
        )
    unit = 1 if cfg.max_iters else iters_per_epoch
    milestones = [m * unit for m in cfg.milestones]

    def factor(it: int) -> float:
        decay = cfg.gamma ** sum(it >= m for m in milestones)
        if it < cfg.warmup_iters:
            if cfg.warmup == "constant":
                return decay * cfg.warmup_ratio
            k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
            return decay * (1 - k)
        return decay

    return factor


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters; biases of convs and linears (not norms) get
    `bias_lr_factor` x lr and `bias_decay_factor` x weight decay, as MMDetection's
    `paramwise_cfg` (bias_lr_mult / bias_decay_mult) does for FCOS."""
    biases = {
        id(module.bias)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in biases]}]
    special = [p for p in trainable if id(p) in biases]
    if special and (cfg.bias_lr_factor != 1.0 or cfg.bias_decay_factor != 1.0):
        groups.append(
            {
                "params": special,
                "lr": lr * cfg.bias_lr_factor,
                "weight_decay": cfg.weight_decay * cfg.bias_decay_factor,
            }
        )
    else:
        groups[0]["params"] += special
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "sgd":
        raise PresetError(
            f"train.optimizer '{cfg.optimizer}' is not known.",
            hint=f"Use one of: {', '.join(OPTIMIZERS)} (e.g. --set train.optimizer=sgd).",
        )
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Average a tensor over processes (loss normalisers such as the positive count)."""
        return self.accelerator.reduce(value, reduction="mean")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        """The training step's precision context; it covers the unwrapped teacher too."""
        if self.precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Place a frozen model (the teacher): on the device, eval mode, never DDP-wrapped."""
        model.requires_grad_(False)
        return self.accelerator.prepare_model(model.eval(), evaluation_mode=True)

    def fit(
        self,
        model: nn.Module,
        step_fn: StepFn,
        train_loader: torch.utils.data.DataLoader,
        evaluate_fn: EvalFn,
        save_fn: SaveFn,
        *,
        resume: bool = False,
        watch_zero: tuple[str, ...] = (),
    ) -> TrainerState:
        """Train `model` to the end of the schedule, evaluating and checkpointing on the way."""
        acc = self.accelerator
        iters_per_epoch = len(train_loader)
        if iters_per_epoch == 0:
            raise RunError(
                "The training data gives no batch: fewer training images than the batch size.",
                hint="Lower --set train.batch_size or use more training images.",
            )
        total = self.cfg.max_iters or self.cfg.epochs * iters_per_epoch
        lr = scaled_lr(self.cfg, acc.num_processes)
        optimizer = build_optimizer(model, self.cfg, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(self.cfg, iters_per_epoch)
        )
        model, optimizer, train_loader, scheduler = acc.prepare(
            model, optimizer, train_loader, scheduler
        )
        if resume:
            self._load_state()
        watcher = ZeroWatch(watch_zero)
        if self.precision != "no" and self.is_main:
            self.console.print(f"[dim]Training steps in {self.precision} mixed precision.[/]")
        with self._progress() as progress:
            task = progress.add_task(
                "train", total=total, completed=self.state.iteration, losses=""
            )
            while self.state.iteration < total:
                self._train_epoch(
                    model,
                    step_fn,
                    train_loader,
                    optimizer,
                    scheduler,
                    total,
                    progress,
                    task,
                    watcher,
                )
                if self.state.epoch_step >= iters_per_epoch or self.state.iteration >= total:
                    self._end_epoch(model, evaluate_fn, save_fn, total)
        return self.state

    # --------------------------------------------------------------------- one epoch

    def _train_epoch(
        self, model, step_fn, loader, optimizer, scheduler, total, progress, task, watcher
    ) -> None:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        loader.set_epoch(state.epoch)
        batches = acc.skip_first_batches(loader, state.epoch_step) if state.epoch_step else loader
        sums: dict[str, Tensor] = {}
        count = 0
        started = time.perf_counter()
        model.train()
        try:
            for batch in batches:
                with self.autocast():
                    losses = step_fn(model, batch)
                loss = sum(losses.values())
                acc.backward(loss)
                if cfg.grad_clip:
                    acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0) + value.detach()
                count += 1
                state.iteration += 1
                state.epoch_step += 1
                if state.iteration % cfg.log_interval == 0 or state.iteration == total:
                    means = {k: (v / count).item() for k, v in sums.items()}  # the one sync
                    watcher.check(means, state.iteration, self.console if self.is_main else None)
                    progress.update(task, completed=state.iteration, losses=_loss_text(means))
                if state.iteration >= total:
                    break
        except KeyboardInterrupt:
            state.wall_time += time.perf_counter() - started
            self._save_state()
            raise RunError(
                f"Interrupted at epoch {state.epoch + 1}, iteration {state.iteration}; "
                f"state saved in {self.run.state}.",
                hint=f"Resume with: {self.resume_hint}",
            ) from None
        state.wall_time += time.perf_counter() - started
        if count:
            row = {
                "epoch": state.epoch + 1,
                "iteration": state.iteration,
                "lr": scheduler.get_last_lr()[0],
            }
            row.update({k: (v / count).item() for k, v in sums.items()})
            row["seconds"] = round(state.wall_time, 1)
            self._pending_row = row

    def _end_epoch(self, model, evaluate_fn, save_fn, total) -> None:
        state, cfg = self.state, self.cfg
        finished = state.iteration >= total
        row = self._pending_row or {"epoch": state.epoch + 1}
        evaluate_now = finished or (
            cfg.eval_interval and (state.epoch + 1) % cfg.eval_interval == 0
        )
        if evaluate_now:
            metrics = evaluate_fn(self.accelerator.unwrap_model(model))
            state.metrics = metrics
            row.update({k: v for k, v in metrics.items() if isinstance(v, float)})
            ap = float(metrics.get("AP", -1.0))
            if ap > state.best_ap:
                state.best_ap, state.best_epoch = ap, state.epoch + 1
                if self.is_main:
                    save_fn(self.accelerator.unwrap_model(model), "best", metrics)
        if self.is_main:
            append_results(self.run, row)
            if not self.console.is_terminal:  # logs and pipes get no live bar: a line per epoch
                line = epoch_line(row, state.iteration, total)
                self.console.print(line, highlight=False, soft_wrap=True)  # one line, unwrapped
        state.epoch += 1
        state.epoch_step = 0
        self._pending_row = {}
        if finished and self.is_main:
            save_fn(self.accelerator.unwrap_model(model), "last", state.metrics)
        self._save_state()

    # ----------------------------------------------------------------- state on disk

    def _save_state(self) -> None:
        """Save Accelerate's full state (model, optimizer, RNG...) plus ours, swapped in whole."""
        acc = self.accelerator
        tmp = self.run.state.with_name(self.run.state.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-save
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its part (its RNG state) first
        if self.is_main:
            write_json(tmp / TRAINER_STATE, asdict(self.state))
            old = self.run.state.with_name(self.run.state.name + ".old")
            if self.run.state.exists():
                self.run.state.rename(old)
            tmp.rename(self.run.state)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load_state(self) -> None:
        self.accelerator.load_state(str(self.run.state))
        data = json.loads((self.run.state / TRAINER_STATE).read_text())
        self.state = TrainerState(**data)

    def _progress(self) -> Progress:
        """The live bar, on the main process of a terminal; logs get `epoch_line`s instead
        (a bar rendered once into a file is one truncated line)."""
        live = self.is_main and self.console.is_terminal
        return progress_bar(self.console, disable=not live, losses=True)


class ZeroWatch:
    """Reports, once, a watched loss term that is still exactly zero after a few iterations."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.reported: set[str] = set()

    def check(self, means: dict[str, float], iteration: int, console: Console | None) -> None:
        if iteration < ZERO_WATCH_ITERS:
            return
        for name in self.names:
            if name in means and means[name] == 0.0 and name not in self.reported:
                self.reported.add(name)
                if console is not None:
                    console.print(
                        f"[bold yellow]Warning:[/] {name} has stayed exactly 0 for the first "
                        f"{iteration} iterations: this distillation term teaches nothing."
                    )


def epoch_line(row: dict[str, Any], iteration: int, total: int) -> str:
    """One plain progress line for a finished epoch: where the run is, its ETA, its losses."""
    seconds = row.get("seconds", 0.0)
    eta = seconds / max(iteration, 1) * (total - iteration)
    losses = {
        k: v for k, v in row.items() if k.startswith(("loss_", "kd_")) and isinstance(v, float)
    }
    return (
        f"epoch {row['epoch']}  iter {iteration}/{total}  {seconds / 60:.1f} min  "
        f"eta {eta / 60:.1f} min  {_loss_text(losses)}"
    )


def _loss_text(means: dict[str, float]) -> str:
    total = sum(v for v in means.values() if math.isfinite(v))
    parts = [f"loss {total:.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items()]
    return " ".join(parts)
