"""Batching: pad images to a multiple of 32 and keep each image's unpadded size.

Training batches pad every image to the batch's largest size. Evaluation never lets
batch-mates change an image: each is padded only to its own multiple of 32 (the zero padding
the backbone, FPN and head see, and the locations post-processing ranks, are those of the
image alone), and a batch holds only images of one padded size, so detections do not depend
on the batch size or on which images share a batch (`build_eval_loader`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from crosskd_cli.data.failures import FailedSample
from crosskd_cli.structures import Batch, Target

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


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of `Batch`es whose order (and worker seeds) depend only on `seed`: the
    shuffle draws from its own generator, never from torch's global RNG."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
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
    )
