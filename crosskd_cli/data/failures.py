"""What happens while DataLoader workers read: errors carried back as data, and a shared log.

Two things a worker process cannot hand to the main process by itself:

- Its exceptions. torch re-raises them in the main process as the same type built from one
  string, the worker's whole traceback, so the CLI's one-line error became a page. A sample
  that fails with a CrossKDError inside a worker is returned as a `FailedSample` instead;
  `collate` passes it on in place of the batch, and the main process raises the original
  error, message and hint intact, when it moves the batch to its device: `FailedSample.to`
  raises, and every loop calls `.to` first (`Batch.to` in `evaluate.predict`, Accelerate's
  `send_to_device` in prepared loaders). A loop that never calls `.to` calls
  `raise_if_failed(batch)`.
- What it saw. Attributes it sets live in its own copy of the dataset. `ReadLog` keeps one
  flag per image in shared memory, so what any worker marks, the main process counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

from crosskd_cli.errors import CrossKDError


@dataclass(frozen=True)
class FailedSample:
    """A CrossKDError raised while reading a sample, as picklable data."""

    error_type: type[CrossKDError]
    message: str
    hint: str | None

    def error(self) -> CrossKDError:
        return self.error_type(self.message, hint=self.hint)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Where the batch would move to the device, the main process meets the error."""
        raise self.error()


def in_worker() -> bool:
    return get_worker_info() is not None


def failed(err: CrossKDError) -> FailedSample:
    return FailedSample(type(err), err.message, err.hint)


def raise_if_failed(batch: Any) -> Any:
    """`batch`, or the original error if a worker failed to read one of its samples."""
    if isinstance(batch, FailedSample):
        raise batch.error()
    return batch


class ReadLog:
    """Per-image flags set while reading, in shared memory when the system has it.

    Each flag is its own row written with plain stores (never read-modify-write), so workers
    marking at once cannot lose a mark. Without shared memory (rare sandboxes) marks made in
    worker processes stay there and are not counted.
    """

    FLAGS = ("unreadable", "size_mismatch")

    def __init__(self, image_ids: list[int]) -> None:
        self._position = {image_id: k for k, image_id in enumerate(image_ids)}
        flags = torch.zeros(len(self.FLAGS), max(len(image_ids), 1), dtype=torch.uint8)
        try:
            flags.share_memory_()
        except RuntimeError:
            pass
        self._flags = flags

    def mark(self, flag: str, image_id: int) -> None:
        self._flags[self.FLAGS.index(flag), self._position[image_id]] = 1

    def marks(self) -> torch.Tensor:
        """A copy of the marks: (len(FLAGS), images) int32, 1 where marked."""
        return self._flags.to(torch.int32)

    def count(self, flag: str) -> int:
        """Distinct images marked with `flag`, by any process reading this dataset."""
        return int(self._flags[self.FLAGS.index(flag)].sum())
