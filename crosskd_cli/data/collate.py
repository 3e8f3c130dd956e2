"""Batching: pad images to a multiple of 32 and keep each image's unpadded size.

Training batches pad every image to the batch's largest size. Evaluation never lets
batch-mates change an image: each is padded only to its own multiple of 32 (the zero padding
the backbone, FPN and head see, and the locations post-processing ranks, are those of the
image alone), and a batch holds only images of one padded size, so detections do not depend
on the batch size or on which images share a batch (`build_eval_loader`).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from crosskd_cli.data.failures import FailedSample
from crosskd_cli.detection.structures import Batch, Target

SIZE_DIVISOR = 32  # the backbone's C5 stride: C3-C5 then tile the padded image exactly


def padded_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of SIZE_DIVISOR: the size an image is padded to."""
    return -(-height // SIZE_DIVISOR) * SIZE_DIVISOR, -(-width // SIZE_DIVISOR) * SIZE_DIVISOR


def _stack(samples: Sequence[tuple[Tensor, Target]]) -> Batch:
    images = [image for image, _ in samples]
    sizes = [tuple(image.shape[-2:]) for image in images]
    height, width = padded_size(max(h for h, _ in sizes), max(w for _, w in sizes))
    batch = images[0].new_zeros((len(images), 3, height, width))
    for k, image in enumerate(images):
        batch[k, :, : image.shape[-2], : image.shape[-1]] = image
    return Batch(batch, sizes, [target for _, target in samples])


def collate(samples: list[tuple[Tensor, Target] | FailedSample]) -> Batch | FailedSample:
    """Stack (image (3, h, w) uint8, Target) samples into one Batch (training).

    Images are zero-padded on the right and bottom to the batch's largest h and w, each rounded
    up to a multiple of 32: images (B, 3, H, W); image_sizes keeps every unpadded (h, w).
    A sample a worker failed to read stands in for the whole batch (`failures.py`).
    """
    failure = next((s for s in samples if isinstance(s, FailedSample)), None)
    if failure is not None:
        return failure
    return _stack(samples)


def collate_by_shape(
    samples: list[tuple[Tensor, Target] | FailedSample],
) -> list[Batch] | FailedSample:
    """Evaluation's collate: one Batch per padded size, each image padded to its own multiple
    of 32, in the order the sizes first appear.

    `SameShapeBatches` makes one Batch the rule; an image whose decoded size differs from its
    json's width and height (wrong json, EXIF rotation) gets a Batch of its own size instead
    of borrowing its batch-mates' padding. A failed sample stands in for the whole list.
    """
    failure = next((s for s in samples if isinstance(s, FailedSample)), None)
    if failure is not None:
        return failure
    groups: dict[tuple[int, int], list[tuple[Tensor, Target]]] = {}
    for image, target in samples:
        groups.setdefault(padded_size(*image.shape[-2:]), []).append((image, target))
    return [_stack(group) for group in groups.values()]


class SameShapeBatches(Sampler[list[int]]):
    """Batches of dataset indices whose images share one padded size, in a stable order.

    sizes: every image's expected (h, w) after resizing (the json's sizes). Indices are grouped
    by padded size, groups in the order their first image appears, indices ascending inside a
    group, cut into batches of `batch_size`: the last batch of a group may be short.

    It has no `batch_size` attribute on purpose: Accelerate's `BatchSamplerShard` then treats
    the batches as variable-sized and deals whole batches out round-robin, repeating the first
    ones on the processes left short at the end (every process runs as many batches), instead
    of holding back every batch shorter than `batch_size`. The repeats are dropped by image
    id after gathering (`evaluate.predict`).
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(sizes):
            groups.setdefault(padded_size(height, width), []).append(index)
        self.batches = [
            indices[start : start + batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(batch)

    def __len__(self) -> int:
        return len(self.batches)


class AspectRatioBatches(BatchSampler):
    """Training batches of one orientation: MMDetection's `AspectRatioBatchSampler`.

    Indices from `sampler` go to one of two buckets (portrait: width < height; landscape
    otherwise) and a bucket yields a batch when it holds `batch_size`; at the end the two
    remainders are joined and cut into batches (only those may mix orientations). A batch of
    one orientation pads far less than a mixed one (a 1333x800 beside an 800x1333 pads both to
    1344x1344). With one orientation only, the batches are exactly `BatchSampler`'s, and with
    `drop_last` there are len(sampler) // batch_size of them either way.

    A `BatchSampler` whose `sampler` Accelerate may swap for its seedable one, and whose
    batches its `BatchSamplerShard` deals out to the processes.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        portrait: Sequence[bool],
        batch_size: int,
        drop_last: bool,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.portrait = list(portrait)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: tuple[list[int], list[int]] = ([], [])
        for index in self.sampler:
            bucket = buckets[self.portrait[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        rest = buckets[0] + buckets[1]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch


def leave_stop_signals_to_the_main_process(worker_id: int, main_pid: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT but its main process's SIGTERM.

    `timeout`, Slurm and Kubernetes signal every process of the job, and a Ctrl-C reaches the
    terminal's whole process group: a worker that died of it (torch's worker handler re-raises
    a SIGTERM that does not come from its parent) would crash the main process before it could
    save. The main process decides (`engine.StopRequest`). Its own SIGTERM (how
    multiprocessing ends a worker that outlives its loader, at exit) still ends the worker:
    SIGTERM is blocked and a thread waits for it, reading who sent it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_the_main_process() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
                os._exit(0)

    threading.Thread(target=wait_for_the_main_process, daemon=True).start()


def worker_init() -> functools.partial:
    """The workers' init function, naming this (the main) process."""
    return functools.partial(leave_stop_signals_to_the_main_process, main_pid=os.getpid())


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    portrait: Sequence[bool] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of `Batch`es whose order (and worker seeds) depend only on `seed`: the
    shuffle draws from its own generator, never from torch's global RNG.

    portrait: every image's orientation (`CocoDetection.portrait`): batches then hold one
    orientation (`AspectRatioBatches`). pin_memory: page-locked batches, for a GPU."""
    generator = torch.Generator().manual_seed(seed)
    common = dict(
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=worker_init(),
    )
    if portrait is None:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common
        )
    # What DataLoader(shuffle=...) builds, with the grouping batch sampler in place of its own
    sampler: Sampler[int] = (
        RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    )
    return DataLoader(
        dataset,
        batch_sampler=AspectRatioBatches(sampler, portrait, batch_size, drop_last),
        **common,
    )


def build_eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Evaluation's DataLoader: lists of same-size `Batch`es (`collate_by_shape`) over
    `SameShapeBatches` of `dataset.resized_sizes()`, every image once, in a fixed order.

    `batch_size` is a speed and memory knob only: an image's detections are those it gets in
    a batch of one (up to the last bits of batched convolution kernels, see
    docs/method.md §1.7).
    """
    sampler = SameShapeBatches(dataset.resized_sizes(), batch_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_by_shape,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init(),
    )
