"""Batching: pad images to a multiple of 32 and keep each image's unpadded size."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from crosskd_cli.data.failures import FailedSample
from crosskd_cli.structures import Batch, Target

SIZE_DIVISOR = 32  # the backbone's C5 stride: C3-C5 then tile the padded image exactly


def collate(samples: list[tuple[Tensor, Target] | FailedSample]) -> Batch | FailedSample:
    """Stack (image (3, h, w) uint8, Target) samples into one Batch.

    Images are zero-padded on the right and bottom to the batch's largest h and w, each rounded
    up to a multiple of 32: images (B, 3, H, W); image_sizes keeps every unpadded (h, w).
    A sample a worker failed to read stands in for the whole batch (`failures.py`).
    """
    failure = next((s for s in samples if isinstance(s, FailedSample)), None)
    if failure is not None:
        return failure
    images = [image for image, _ in samples]
    sizes = [tuple(image.shape[-2:]) for image in images]
    height = -(-max(h for h, _ in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
    width = -(-max(w for _, w in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
    batch = images[0].new_zeros((len(images), 3, height, width))
    for k, image in enumerate(images):
        batch[k, :, : image.shape[-2], : image.shape[-1]] = image
    return Batch(batch, sizes, [target for _, target in samples])


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
