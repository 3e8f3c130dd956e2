"""Processes and devices: which process talks, where a model runs, how processes agree.

Imported by inference (`eval`, `predict`, the Predictor) as well as by the training loop; no
training code here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from accelerate import PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import broadcast_object_list, gather_object
from rich.console import Console

from crosskd_cli.errors import CrossKDError, OptionError


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


COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


def collective_failure(err: BaseException) -> bool:
    """Did a collective fail because a peer is gone or silent? torch raises DistError
    subclasses for most, plain RuntimeErrors naming the backend for the rest."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return any(word in text for word in COLLECTIVE_WORDS)
