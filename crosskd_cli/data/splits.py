"""The two datasets of a training run: the training split and the validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crosskd_cli.data.coco import CocoDetection
from crosskd_cli.data.source import DataSource
from crosskd_cli.errors import DataError

if TYPE_CHECKING:
    from crosskd_cli.config import DataConfig


@dataclass
class DataSplits:
    """The two datasets of a run and the class list they share."""

    train: CocoDetection
    val: CocoDetection

    @property
    def class_names(self) -> list[str]:
        return self.val.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.val.category_ids


def load_splits(cfg: DataConfig, data: DataSource) -> DataSplits:
    """The training split (augmented) and the validation split of `data`, as `cfg` reads them."""
    if data.train_ann is None or data.train_images is None:
        raise DataError(
            f"Data '{data.spec}' has no training split.",
            hint="Give a COCO folder, builtin:shapes, or --train-ann and --train-images.",
        )
    train = CocoDetection(
        data.train_ann,
        data.train_images,
        train=True,
        scale=cfg.scale,
        flip_prob=cfg.flip_prob,
        skip_bad_images=cfg.skip_bad_images,
        short_sides=cfg.train_short_sides,
    )
    val = CocoDetection(
        data.val_ann,
        data.val_images,
        train=False,
        scale=cfg.scale,
        skip_bad_images=cfg.skip_bad_images,
    )
    return DataSplits(train, val)
