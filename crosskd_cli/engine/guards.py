"""What keeps a run honest while it trains: stop requests, skipped non-finite steps, a run that
learned nothing, weights that explode while finite, KD terms stuck at zero.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from crosskd_cli.engine.devices import collective_failure
from crosskd_cli.errors import RunError, first_line
from crosskd_cli.storage.run_folder import RunDir
from crosskd_cli.storage.state_dir import read_marker

ZERO_WATCH_ITERS = 20  # a KD term still exactly zero after this many iterations is reported


# A run that skipped more than this share of its steps (non-finite losses) ends in an error
MAX_SKIPPED_SHARE = 0.5


# Finite but exploding: a parameter's largest |weight| or its gradient's norm past these is
# reported once (the bf16 fault this guards against drove weights to 1e26)
WEIGHT_LIMIT, GRAD_NORM_LIMIT = 1e4, 1e6


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

    def agreed(self, acc: Any, at_log_interval: bool) -> bool:
        """Has any process been asked to stop? All processes must stop at the same step, so
        with several (`acc`, the Accelerator) they agree through one small all-reduce, at log
        intervals only."""
        if acc.num_processes == 1:
            return self.signum is not None
        if not at_log_interval:
            return False
        flag = torch.tensor(float(self.signum or 0), device=acc.device)
        agreed = acc.reduce(flag, reduction="sum").item()
        if agreed and self.signum is None:
            self.signum = signal.SIGTERM  # another process was told: stop as it does
        return bool(agreed)

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


def check_diverged(
    guard: NonFiniteGuard, losses: dict[str, Tensor], patience: int, iteration: int, run: RunDir
) -> None:
    """At a log interval: stop a run whose steps have all been skipped for `patience` steps
    (`train.max_nonfinite_steps`), naming the terms and the last good state."""
    streak = int(guard.streak.item())
    if streak < patience:
        return
    bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).item()]
    what = ", ".join(bad) if bad else "the gradient norm"
    last = read_marker(run.state)
    good = (
        f"the last good state is {run.state} (iteration {last['iteration']})"
        if last
        else "no state was saved yet"
    )
    if run.best.exists():
        good += f", the best checkpoint {run.best}"
    raise RunError(
        f"Training diverged: {what} was not finite in the last {streak} steps (up to "
        f"iteration {iteration}); those steps were skipped. {good[0].upper()}{good[1:]}.",
        hint="Lower train.lr or raise train.warmup_iters, then resume or start again "
        "(train.max_nonfinite_steps sets the patience).",
    )


def check_learned(guard: NonFiniteGuard, done: int, finished: bool, names: list[str]) -> None:
    """At an epoch end: refuse a run that has taken no finite step of its `done`, or (at its
    end) one that skipped more than MAX_SKIPPED_SHARE of them. Nothing of it is saved as
    `best`: its weights learned nothing or were shaped by the few steps that passed."""
    skipped = int(guard.total.item())
    never = done > 0 and skipped >= done
    if not never and not (finished and skipped > MAX_SKIPPED_SHARE * done):
        return
    terms = bad_terms(guard, names)
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


def bad_terms(guard: NonFiniteGuard, names: list[str]) -> str:
    """The loss terms (`names`, in the order the guard saw them) that were not finite in
    this session, most often first."""
    counts = guard.bad_terms
    if counts is None or not names:
        return ""
    pairs = sorted(zip(counts.tolist(), names, strict=False), key=lambda p: -p[0])
    return ", ".join(name for count, name in pairs if count > 0)


class MagnitudeWatch:
    """Once per run, on the main process: names the first parameter whose weights or gradient
    grew past WEIGHT_LIMIT / GRAD_NORM_LIMIT while staying finite (a run going wrong before
    its losses say so). Checked at log intervals, before the gradients go."""

    def __init__(self) -> None:
        self.reported = False

    def check(self, model: nn.Module, iteration: int, console: Console) -> None:
        """`model` unwrapped; `iteration`: the step just taken (1-based)."""
        if self.reported:
            return
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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
                self.reported = True
                console.print(
                    f"[yellow]Warning: {named[k][0]}'s {kind} {values[k].item():.3g} at iteration "
                    f"{iteration} (past {limit:.0e}): training is going unstable. "
                    "Lower train.lr or set train.grad_clip.[/]"
                )
                return


@contextlib.contextmanager
def peers_watched(
    acc: Any, run: RunDir, iteration: Callable[[], int], timeout: int, resume_hint: str
):
    """A collective that failed (another process died) or timed out (it hangs, past
    `train.collective_timeout`) ends this process with the run's state named, not with a
    traceback or an endless wait; the launcher (torchrun, accelerate launch) then stops the
    remaining processes."""
    try:
        yield
    except RuntimeError as err:
        if acc.num_processes == 1 or not collective_failure(err):
            raise
        last = read_marker(run.state)
        kept = (
            f"the last saved state, {run.state} (iteration {last['iteration']}), is kept"
            if last
            else "no state was saved yet"
        )
        raise RunError(
            f"Process {acc.process_index} lost the others at iteration {iteration()}: another "
            f"process died or did not answer within train.collective_timeout={timeout} s "
            f"({first_line(err)}). The run stops; {kept}.",
            hint=f"Look for the first error of another process above, then resume: {resume_hint}",
        ) from None
