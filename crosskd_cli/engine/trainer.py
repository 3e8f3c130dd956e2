"""The one training loop, on Accelerate, shared by `crosskd teacher` and `crosskd distill`.

The loop knows nothing about detection: a `step_fn(model, batch) -> {name: loss}` computes the
losses, an `evaluate_fn(model) -> metrics` measures, and a `save_fn(model, name, metrics)`
writes a checkpoint. The only module that imports accelerate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import resource
import signal
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    broadcast_object_list,
    gather_object,
    load,
    set_seed,
)
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from torch import Tensor, nn

from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.engine.progress import progress_bar
from crosskd_cli.engine.schedule import build_schedule
from crosskd_cli.engine.total_batch import check_resumed_batch, lr_line, scaled_lr, total_batch
from crosskd_cli.errors import CrossKDError, Interrupted, OptionError, PresetError, RunError
from crosskd_cli.storage import state_dir
from crosskd_cli.storage.run_folder import DAMAGED_HINT, RunDir, append_results, keep_results_until
from crosskd_cli.storage.state_dir import abandon, commit, fresh_tmp, read_marker, recover, tmp_of
from crosskd_cli.viz.plots import plot_run_or_warn

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


def process_state() -> PartialState:
    """The process group. Without a GPU, several processes (torchrun, accelerate launch) must be
    told they are CPU workers, or Accelerate runs each one alone, unaware of the others."""
    return PartialState(cpu=not torch.cuda.is_available())


def default_device() -> torch.device:
    """Where a model runs unless told otherwise: this process's accelerator (its own GPU under
    torchrun), else the CPU; where training runs, so evaluation runs there too."""
    return process_state().device


DEVICES = "auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """`--device`: auto, cpu, cuda or cuda:N -> a torch device that exists here; anything
    else, or a GPU this machine does not have, is an OptionError before any work."""
    if name == "auto":
        return default_device()
    match = re.fullmatch(r"cpu|cuda(?::(\d{1,4}))?", name)
    if match is None:
        raise OptionError(f"--device '{name}' is not known.", hint=f"Use {DEVICES}.")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "none found"
        raise OptionError(
            f"--device {name}: no CUDA GPU is available ({why}).",
            hint="Use --device cpu (or auto, which falls back to the CPU).",
        )
    count = torch.cuda.device_count()
    if int(match.group(1) or 0) >= count:
        raise OptionError(
            f"--device {name}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
            f"(cuda:0..cuda:{count - 1}).",
            hint="Use cuda (the first) or one of the listed indices.",
        )
    return torch.device(name)


def quiet_unless_main(console: Console) -> None:
    """Only the main process talks; the others would print every line once more."""
    console.quiet = not process_state().is_main_process


def main_process_first():
    """Context: the main process goes first (generating data, creating folders), then the rest."""
    return process_state().main_process_first()


def from_main_process(make: Callable[[], Any]) -> Any:
    """Call `make` on the main process only and hand its result to every process.

    Run-folder choices must agree across processes: each deciding for itself would number
    the same run twice. A CrossKDError raised by `make` is raised by every process (the others
    would otherwise wait for a value forever).
    """
    state = process_state()
    if state.num_processes == 1:
        return make()
    value, error = None, None
    if state.is_main_process:
        try:
            value = make()
        except CrossKDError as exc:
            error = exc
    value, error = broadcast_object_list([value, error])
    if error is not None:
        raise error
    return value


PRECISIONS = ("no", "fp16", "bf16", "auto")
# A run that skipped more than this share of its steps (non-finite losses) ends in an error
MAX_SKIPPED_SHARE = 0.5
# Finite but exploding: a parameter's largest |weight| or its gradient's norm past these is
# reported once (the bf16 fault this guards against drove weights to 1e26)
WEIGHT_LIMIT, GRAD_NORM_LIMIT = 1e4, 1e6


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


def make_accelerator(cfg: TrainConfig, run: RunDir | None = None) -> Accelerator:
    """One Accelerator per run: device, processes, fp16 mixed precision, seedable data order,
    and the experiment trackers of `train.log_with` (writing under RUN/trackers/).

    bf16 is not handed to Accelerate: it would also autocast the model's forward for good, so
    evaluation during training would run in bf16 and `crosskd eval` (fp32) could not reproduce
    the recorded AP. The Trainer autocasts the training step alone instead. fp16 stays with
    Accelerate, which owns the gradient scaler it needs.
    """
    process_state()  # fixes CPU-or-GPU before the Accelerator reads it
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.mixed_precision, device_type)
    trackers = list(cfg.log_with)
    check_trackers(trackers)
    accelerator = Accelerator(
        cpu=device_type == "cpu",
        mixed_precision="fp16" if precision == "fp16" else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # an optimizer step every grad_accum forwards, counted by the loop, never cut short
        # by the end of an epoch (the loop drops an epoch's leftover forwards instead)
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # the schedule is per iteration, stepped by hand
        log_with=trackers or None,
        project_dir=str(run.root / "trackers") if run is not None and trackers else None,
    )
    set_seed(cfg.seed, device_specific=False)
    set_collective_timeout(cfg.collective_timeout)
    return accelerator


def set_collective_timeout(seconds: int) -> None:
    """From here on, a collective that waits longer than `seconds` for another process fails
    (`CollectiveFailure`) instead of waiting for ever. Set once the run is set up: the main
    process alone may take long before (generating data, downloading weights)."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        timeout = datetime.timedelta(seconds=seconds)
        if hasattr(dist, "set_timeout"):
            dist.set_timeout(timeout)
        else:  # torch < 2.10
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timeout)


def eval_shards(loader: torch.utils.data.DataLoader) -> tuple[Any, Callable | None]:
    """(loader, gather) for evaluation outside training (`crosskd eval`, --eval-teacher):
    under several processes each reads its share of `loader`'s batches and `gather` collects
    per-image results from all (a batch repeated to even the shares is met twice and counted
    once, by image id, in `evaluate.predict`); in one process, (loader, None)."""
    state = process_state()
    if state.num_processes == 1:
        return loader, None
    shard = prepare_data_loader(
        loader,
        num_processes=state.num_processes,
        process_index=state.process_index,
        put_on_device=False,
    )
    return shard, gather_object


def check_trackers(names: list[str]) -> None:
    """Each tracker's package must be installed: say which extra brings it, before any work."""
    from accelerate.utils import imports

    for name in names:
        available = getattr(imports, f"is_{name}_available", lambda: False)
        if not available():
            raise RunError(
                f"train.log_with names '{name}', but its package is not installed.",
                hint=f"pip install 'crosskd-cli[{name}]' (or pip install {name}), or drop it "
                "from train.log_with.",
            )


def check_warmup(cfg: TrainConfig) -> None:
    if cfg.warmup not in ("linear", "constant"):
        raise PresetError(
            f"train.warmup '{cfg.warmup}' is not known.",
            hint="Use --set train.warmup=linear or --set train.warmup=constant.",
        )


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
    # fused: one kernel per step, and it honours `found_inf` (NonFiniteGuard) on the device
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer != "sgd":
        raise PresetError(
            f"train.optimizer '{cfg.optimizer}' is not known.",
            hint=f"Use one of: {', '.join(OPTIMIZERS)} (e.g. --set train.optimizer=sgd).",
        )
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
    )


class StopRequest:
    """SIGTERM (batch schedulers, `timeout`, Kubernetes) and a first Ctrl-C only set a flag:
    the loop finishes the step it is in, saves the state and exits 143 / 130. A second Ctrl-C
    stops at once, without saving (the last saved state stays)."""

    CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals need the main one
            for signum in self.CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = self.signum or signum

    @property
    def exit_code(self) -> int:
        return self.CODES.get(self.signum, 130)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite, on the device.

    The optimizer (fused SGD/AdamW) reads `found_inf` and leaves parameters and momentum
    untouched when it is 1, as under GradScaler, without a host-device sync per step; the
    counts are read at log intervals. fp16 runs keep Accelerate's GradScaler, which skips by
    itself; the guard then only counts.

    `reduce_sum` (several processes): a step is skipped by all when one process found its
    losses not finite; a process stepping alone would leave the replicas different.
    """

    def __init__(
        self,
        optimizer: Any,
        device: torch.device,
        scaler_skips: bool,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
        self.optimizer = None if scaler_skips else inner
        self.reduce_sum = reduce_sum
        zero = torch.zeros((), device=device)
        self.found, self.streak, self.total = zero.clone(), zero.clone(), zero.clone()
        self.bad_terms: Tensor | None = None  # per loss term, steps it was not finite

    def check(self, losses: dict[str, Tensor], grad_norm: Tensor | None) -> Tensor:
        """found (0-d float, 1.0 = skip this step) from the step's losses and gradient norm."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        bad = ~torch.isfinite(values)
        self.bad_terms = bad.float() + (0 if self.bad_terms is None else self.bad_terms)
        finite = ~bad.any()
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        self.found = (~finite).float()
        if self.reduce_sum is not None:
            self.found = (self.reduce_sum(self.found) > 0).float()
        self.streak = (self.streak + self.found) * self.found
        self.total += self.found
        if self.optimizer is not None:
            self.optimizer.found_inf = self.found
        return self.found


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
        # model -> more columns of the epoch's results.csv row (the Fig. 5 distances), or None
        self.epoch_end: Callable[[nn.Module], dict[str, float]] | None = None
        self._magnitude_reported = False

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Average a tensor over processes (loss normalisers such as the positive count)."""
        return self.accelerator.reduce(value, reduction="mean")

    def _reduce_sum(self, value: Tensor) -> Tensor:
        return self.accelerator.reduce(value, reduction="sum")

    def _loss_means(self, sums: dict[str, Tensor], kept: Tensor) -> dict[str, float]:
        """Each loss's mean over the kept steps of every process: the loss of the total
        batch where its normaliser is averaged over processes (docs/method.md §1.3)."""
        names = list(sums)
        values = torch.stack([torch.as_tensor(sums[k], device=kept.device) for k in names])
        values = torch.cat([values.float(), kept.reshape(1).float()])
        if self.accelerator.num_processes > 1:
            values = self._reduce_sum(values)
        means = (values[:-1] / values[-1]).tolist()  # the one sync
        return dict(zip(names, means, strict=True))

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
        step_fn: StepFn,
        train_loader: torch.utils.data.DataLoader,
        evaluate_fn: EvalFn,
        save_fn: SaveFn,
        *,
        resume: bool = False,
        watch_zero: tuple[str, ...] = (),
        on_start: Callable[[], None] | None = None,
    ) -> TrainerState:
        """Train `model` to the end of the schedule, evaluating and checkpointing on the way.

        on_start: called once the state is loaded (on resume) and before the first step; a
        resume refused for a damaged state has changed nothing by then."""
        acc = self.accelerator
        train_loader = acc.prepare(train_loader)  # this process's share: it sets the epoch
        iters_per_epoch = len(train_loader) // self.cfg.grad_accum  # optimizer steps
        if iters_per_epoch == 0:
            raise RunError(
                "The training data gives no optimizer step: fewer training images than the "
                f"total batch, {total_batch(self.cfg, acc.num_processes).describe()}.",
                hint="Lower --set train.batch_size (or train.grad_accum) or use more images.",
            )
        check_warmup(self.cfg)
        self.schedule = build_schedule(self.cfg, iters_per_epoch)
        total = self.schedule.total
        lr = scaled_lr(self.cfg, acc.num_processes)
        optimizer = build_optimizer(model, self.cfg, lr)
        # a lambda (not the schedule's method): a resume replaces the schedule it reads, and
        # LambdaLR keeps plain functions out of its state (runs of 0.2 hold such a state)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda iteration: self.schedule.factor(iteration)
        )
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if resume:
            self._load_state()
            saved = self.state.total_batch
            check_resumed_batch(saved, self.cfg, acc.num_processes, self.resume_hint)
            self.schedule = build_schedule(
                self.cfg, iters_per_epoch, self.state.decays, self.state.iteration
            )
        self.state.total_batch = total_batch(self.cfg, acc.num_processes).images
        self.state.decays = list(self.schedule.decays)
        if on_start is not None:
            on_start()
        self._session_start, self._session_wall = self.state.iteration, self.state.wall_time
        reduce_sum = self._reduce_sum if acc.num_processes > 1 else None
        guard = NonFiniteGuard(optimizer, acc.device, self.precision == "fp16", reduce_sum)
        guard.total += self.state.skipped
        self._guard = guard
        self._sums, self._kept = {}, torch.zeros((), device=acc.device)
        watcher = ZeroWatch(watch_zero)
        if self.is_main:
            self.console.print(f"[dim]{lr_line(self.cfg, acc.num_processes)}[/]")
            self.console.print(f"[dim]{self.schedule.line(lr)}[/]", highlight=False)
            for note in self.schedule.notes():
                self.console.print(f"[yellow]Note: {note}.[/]", highlight=False)
        if self.precision != "no" and self.is_main:
            self.console.print(f"[dim]Training steps in {self.precision} mixed precision.[/]")
        if self.cfg.log_with:
            acc.init_trackers("crosskd", config=_scalars(asdict(self.cfg)))
        with self.stop, self._progress() as progress, self._peers_watched():
            task = progress.add_task(
                self._epoch_text(iters_per_epoch, total),
                total=total,
                completed=self.state.iteration,
                losses="",
            )
            loop = _Loop(model, step_fn, train_loader, optimizer, scheduler, total, guard)
            while self.state.iteration < total:
                progress.update(task, description=self._epoch_text(iters_per_epoch, total))
                self._train_epoch(loop, progress, task, watcher)
                if self.state.epoch_step >= iters_per_epoch or self.state.iteration >= total:
                    self._end_epoch(model, evaluate_fn, save_fn, total)
                if self._stop_agreed():
                    self._stop_now()
        if self.cfg.log_with:
            acc.end_training()
        return self.state

    @contextlib.contextmanager
    def _peers_watched(self):
        """A collective that failed (another process died) or timed out (it hangs) ends this
        process with the run's state named, not with a traceback or an endless wait; the
        launcher (torchrun, accelerate launch) then stops the remaining processes."""
        try:
            yield
        except RuntimeError as err:
            if self.accelerator.num_processes == 1 or not collective_failure(err):
                raise
            last = read_marker(self.run.state)
            kept = (
                f"the last saved state, {self.run.state} (iteration {last['iteration']}), is kept"
                if last
                else "no state was saved yet"
            )
            raise RunError(
                f"Process {self.accelerator.process_index} lost the others at iteration "
                f"{self.state.iteration}: another process died or did not answer within "
                f"train.collective_timeout={self.cfg.collective_timeout} s ({_first_line(err)})."
                f" The run stops; {kept}.",
                hint=f"Look for the first error of another process above, then resume: "
                f"{self.resume_hint}",
            ) from None

    def _epoch_text(self, iters_per_epoch: int, total: int) -> str:
        epochs = -(-total // iters_per_epoch)
        return f"epoch {min(self.state.epoch + 1, epochs)}/{epochs}"

    # --------------------------------------------------------------------- one epoch

    def _train_epoch(self, loop: _Loop, progress, task, watcher) -> None:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        loader = loop.loader
        loader.set_epoch(state.epoch)
        if hasattr(loader.dataset, "set_epoch"):  # per-sample augmentation keyed by epoch
            loader.dataset.set_epoch(state.epoch, cfg.seed)
        done = state.epoch_step * cfg.grad_accum  # forwards of this epoch already trained
        batches = acc.skip_first_batches(loader, done) if done else loader
        sums, kept = self._epoch_sums_from_state()
        started = time.perf_counter()
        interval = _Interval(started, state.iteration)
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
            if logs:
                self._watch_magnitudes(loop.model)  # before the gradients go
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
                self._check_finite(loop.guard, losses)
                watcher.check(means, state.iteration, self.console if self.is_main else None)
                progress.update(task, losses=_loss_text(means))
                wall = state.wall_time + time.perf_counter() - started
                self._log_interval(loop, interval, means, wall)
            if state.iteration >= loop.total or state.epoch_step >= iters_per_epoch:
                break
            if self._stop_agreed():
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

    def _log_interval(
        self, loop: _Loop, interval: _Interval, means: dict[str, float], wall: float
    ) -> None:
        """One record per log interval: to RUN/log.jsonl, the trackers, and a plain line when
        the output is not a terminal (a log file would otherwise stay silent for an epoch)."""
        state, acc = self.state, self.accelerator
        now = time.perf_counter()
        steps = state.iteration - interval.iteration
        images = steps * total_batch(self.cfg, acc.num_processes).images
        session_steps = max(state.iteration - self._session_start, 1)
        record = {
            "iteration": state.iteration,
            "epoch": state.epoch + 1,
            "lr": loop.scheduler.get_last_lr()[0],
            **means,
            "skipped_steps": int(loop.guard.total.item()),
            "images_per_s": round(images / max(now - interval.started, 1e-9), 2),
            "eta_s": round(
                (wall - self._session_wall) / session_steps * (loop.total - state.iteration), 1
            ),  # fmt: skip
            "max_memory_mb": round(peak_memory_mb(acc.device), 1),
            "seconds": round(wall, 1),
        }
        interval.started, interval.iteration = now, state.iteration
        if self.cfg.log_with:
            acc.log(record, step=state.iteration)
        if not self.is_main:
            return
        with self.run.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.console.is_terminal:
            self.console.print(interval_line(record, loop.total), highlight=False, soft_wrap=True)

    def _check_finite(self, guard: NonFiniteGuard, losses: dict[str, Tensor]) -> None:
        """At a log interval: stop a run whose steps have all been skipped for too long."""
        streak = int(guard.streak.item())
        if streak < self.cfg.max_nonfinite_steps:
            return
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).item()]
        what = ", ".join(bad) if bad else "the gradient norm"
        last = read_marker(self.run.state)
        good = (
            f"the last good state is {self.run.state} (iteration {last['iteration']})"
            if last
            else "no state was saved yet"
        )
        if self.run.best.exists():
            good += f", the best checkpoint {self.run.best}"
        raise RunError(
            f"Training diverged: {what} was not finite in the last {streak} steps (up to "
            f"iteration {self.state.iteration}); those steps were skipped. {good[0].upper()}"
            f"{good[1:]}.",
            hint="Lower train.lr or raise train.warmup_iters, then resume or start again "
            "(train.max_nonfinite_steps sets the patience).",
        )

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
        names = list(self._sums)
        values = torch.stack([torch.as_tensor(self._sums[k], device=self._kept.device).float()
                              for k in names] + [self._kept.float()])  # fmt: skip
        if self.accelerator.num_processes > 1:
            values = self._reduce_sum(values)
        *sums, kept = values.tolist()
        state.epoch_sums = dict(zip(names, sums, strict=True))
        if state.epoch_kept >= 0:  # unknown stays unknown until the epoch ends
            state.epoch_kept = kept

    def _check_learned(self, finished: bool) -> None:
        """At an epoch end: refuse a run that has taken no finite step, or (at its end) one
        that skipped more than MAX_SKIPPED_SHARE of its steps. Nothing of it is saved as
        `best`: its weights learned nothing or were shaped by the few steps that passed."""
        done, skipped = self.state.iteration, int(self._guard.total.item())
        never = done > 0 and skipped >= done
        if not never and not (finished and skipped > MAX_SKIPPED_SHARE * done):
            return
        terms = self._bad_terms()
        what = f"{terms} not finite" if terms else "a non-finite gradient norm"
        if never:
            message = (
                f"No training step of the run's {done} was finite ({what}): every one was "
                "skipped and nothing was learned, so no checkpoint is written."
            )
        else:
            message = (
                f"{skipped} of the run's {done} training steps were skipped ({what}), more "
                f"than the {MAX_SKIPPED_SHARE:.0%} a run may skip: its weights are not "
                "trusted, so no checkpoint is written."
            )
        raise RunError(
            message,
            hint="Lower train.lr or raise train.warmup_iters (with bf16, try --set "
            "train.mixed_precision=no), then start again.",
        )

    def _bad_terms(self) -> str:
        """The loss terms that were not finite in this session, most often first."""
        counts = self._guard.bad_terms
        if counts is None or not self._sums:
            return ""
        pairs = sorted(zip(counts.tolist(), self._sums, strict=False), key=lambda p: -p[0])
        return ", ".join(name for count, name in pairs if count > 0)

    def _watch_magnitudes(self, model: nn.Module) -> None:
        """Once per run, on the main process: name the first parameter whose weights or
        gradient grew past WEIGHT_LIMIT / GRAD_NORM_LIMIT while staying finite (a run going
        wrong before its losses say so). Called at log intervals, before the gradients go."""
        if self._magnitude_reported or not self.is_main:
            return
        named = [(n, p) for n, p in self.accelerator.unwrap_model(model).named_parameters()
                 if p.requires_grad]  # fmt: skip
        if not named:
            return
        # one foreach kernel per kind: no |w| copy of every parameter
        weights = torch.stack(torch._foreach_norm([p.detach() for _, p in named], float("inf")))
        with_grad = [k for k, (_, p) in enumerate(named) if p.grad is not None]
        grads = torch.zeros_like(weights)
        if with_grad:
            norms = torch._foreach_norm([named[k][1].grad.detach() for k in with_grad])
            grads[with_grad] = torch.stack(norms).to(grads.dtype)
        for kind, values, limit in (("weights reach |w| =", weights, WEIGHT_LIMIT),
                                    ("gradient norm reaches", grads, GRAD_NORM_LIMIT)):  # fmt: skip
            over = (torch.isfinite(values) & (values > limit)).nonzero()
            if len(over):
                k = int(over[0, 0])
                self._magnitude_reported = True
                self.console.print(
                    f"[yellow]Warning: {named[k][0]}'s {kind} {values[k].item():.3g} at iteration "
                    f"{self.state.iteration + 1} (past {limit:.0e}): training is going unstable. "
                    "Lower train.lr or set train.grad_clip.[/]"
                )
                return

    def _stop_agreed(self) -> bool:
        """Has any process been asked to stop? All processes must stop at the same step, so
        with several they agree through one small all-reduce, at log intervals only."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop.signum is not None
        if self.state.iteration % self.cfg.log_interval:
            return False
        flag = torch.tensor(float(self.stop.signum or 0), device=acc.device)
        agreed = acc.reduce(flag, reduction="sum").item()
        if agreed and self.stop.signum is None:
            self.stop.signum = signal.SIGTERM  # another process was told: stop as it does
        return bool(agreed)

    def _stop_now(self) -> None:
        self._save_state()
        state = self.state
        raise Interrupted(
            f"Stopped by {self.stop.name} at epoch {state.epoch + 1}, iteration "
            f"{state.iteration}; the state is saved in {self.run.state}.",
            hint=f"Resume with: {self.resume_hint}",
            exit_code=self.stop.exit_code,
        )

    def _end_epoch(self, model, evaluate_fn, save_fn, total) -> None:
        state, cfg = self.state, self.cfg
        finished = state.iteration >= total
        self._check_learned(finished)
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
            if self.epoch_end is not None:
                row.update(self.epoch_end(self.accelerator.unwrap_model(model)))
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
            save_fn(self.accelerator.unwrap_model(model), "last", state.metrics)
        self._save_state()

    # ----------------------------------------------------------------- state on disk

    def _save_state(self) -> None:
        """Accelerate's full state (model, optimizer, scheduler, RNG...) plus ours, written
        beside the current state and swapped in by renames (`state_dir`): a kill at any
        instant leaves a complete state; a failed write keeps the previous one."""
        acc, state_path = self.accelerator, self.run.state
        if self.is_main:
            recover(state_path)
            fresh_tmp(state_path)
        acc.wait_for_everyone()
        written = 1.0
        try:
            state_dir.on_step("write")
            acc.save_state(str(tmp_of(state_path)))
        except OSError as err:
            written, failure = 0.0, err
        flag = torch.tensor(written, device=acc.device)
        if acc.num_processes > 1:  # every process must have written its part (its RNG)
            flag = acc.reduce(flag, reduction="sum") / acc.num_processes
        if flag.item() < 1.0:
            if self.is_main:
                abandon(state_path)
            last = read_marker(state_path)
            kept = f"iteration {last['iteration']}" if last else "none saved yet"
            reason = failure if written == 0.0 else "another process could not write its part"
            raise RunError(
                f"Could not save the resumable state in {tmp_of(state_path)}: {reason}. The "
                f"previous state in {state_path} is kept ({kept}).",
                hint="Free disk space (or fix the folder's permissions), then resume.",
            )
        self._record_progress()
        if self.is_main:
            commit(state_path, asdict(self.state))
            keep_results_until(self.run, self.state.epoch)
        acc.wait_for_everyone()

    def _load_state(self) -> None:
        acc, folder = self.accelerator, self.run.state
        marker = recover(folder) if self.is_main else None
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
            raise _damaged(folder, problem or "another process found its part damaged")
        try:
            acc.load_state(str(folder))
        except UnpicklingError:
            raise _damaged(
                folder, "a file holds pickled objects other than tensors (refused, not loaded)"
            ) from None
        except (OSError, RuntimeError, ValueError, EOFError, KeyError) as err:
            fits = "size mismatch" not in str(err) and "Missing key" not in str(err)
            what = "cannot be loaded" if fits else "does not fit the run's model"
            raise _damaged(folder, f"it {what} ({_first_line(err)})") from None
        self.state = TrainerState(**marker)
        if "epoch_kept" not in marker and self.state.epoch_step:
            self.state.epoch_kept = -1.0  # crosskd 0.2: the epoch's sums were not saved
            if self.is_main:
                self.console.print(
                    f"[yellow]Note: the state in {folder} (crosskd 0.2) holds no running loss "
                    f"sums: the results row of epoch {self.state.epoch + 1} averages the steps "
                    "after this resume only.[/]"
                )
        if self.is_main:  # rows and records the restored state has not reached are redone
            keep_results_until(self.run, self.state.epoch)
            keep_log_until(self.run.log, self.state.iteration)

    def _progress(self) -> Progress:
        """The live bar, on the main process of a terminal; logs get `epoch_line`s instead
        (a bar rendered once into a file is one truncated line)."""
        live = self.is_main and self.console.is_terminal
        return progress_bar(self.console, disable=not live, losses=True)


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
                return f"{name} is truncated or not a safetensors file ({_first_line(err)})"
        elif not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a file torch wrote"
    try:
        load(folder / rng)  # Accelerate's loader: weights only, plus its RNG state types
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, UnpicklingError) as err:
        return f"{rng} cannot be loaded ({_first_line(err)})"
    return None


COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


def collective_failure(err: BaseException) -> bool:
    """Did a collective fail because a peer is gone or silent? torch raises DistError
    subclasses for most, plain RuntimeErrors naming the backend for the rest."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return any(word in text for word in COLLECTIVE_WORDS)


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


def _damaged(folder: Path, problem: str) -> RunError:
    return RunError(
        f"The saved state in {folder} is damaged: {problem}.",
        hint=DAMAGED_HINT.format(run=folder.parent),
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


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
    total = sum(means.values())  # a NaN term makes the total NaN: never hidden
    parts = [f"loss {total:.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items()]
    return " ".join(parts)


@dataclass
class _Interval:
    """Where the current log interval started: wall clock and iteration."""

    started: float
    iteration: int


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocator on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def interval_line(record: dict[str, Any], total: int) -> str:
    """The plain line of one log interval: iteration, epoch, losses, lr, speed, ETA, memory."""
    losses = {k: v for k, v in record.items() if k.startswith(("loss_", "kd_"))}
    skipped = f"  skipped {record['skipped_steps']}" if record["skipped_steps"] else ""
    return (
        f"iter {record['iteration']}/{total}  epoch {record['epoch']}  {_loss_text(losses)}  "
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


def _scalars(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker configs take scalars only (TensorBoard's hparams): lists become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
