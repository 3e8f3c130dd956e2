"""The two datasets of a training run: the training split and the validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from crosskd_cli.data.coco import CocoDetection
from crosskd_cli.data.source import DataSource
from crosskd_cli.errors import DataError

if TYPE_CHECKING:
    from crosskd_cli.config.presets import DataConfig

VAL_CLASSES_HINT = (
    "The model's classes are the training split's: list every validation category in the "
    "training json too, or drop that category and its boxes from the validation json."
)


@dataclass
class DataSplits:
    """The two datasets of a run and the class list they share: the training split's.

    The validation split is read with it, so label k means one class in both; a validation
    json lacking one of its classes is fine (`class_warning`), one with a class training never
    lists is refused when the splits are loaded.
    """

    train: CocoDetection
    val: CocoDetection

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.train.category_ids

    def class_warning(self) -> str | None:
        """A line to print when the validation split lacks some of the classes."""
        return self.val.missing_classes_warning()


def load_splits(cfg: DataConfig, data: DataSource) -> DataSplits:
    """The training split (augmented) and the validation split of `data`, as `cfg` reads them,
    both labelled with the training split's classes."""
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
        multiscale=cfg.multiscale,
    )
    val = CocoDetection(
        data.val_ann,
        data.val_images,
        train=False,
        scale=cfg.scale,
        skip_bad_images=cfg.skip_bad_images,
        classes=train.class_list(f"the training split {data.train_ann}", VAL_CLASSES_HINT),
    )
    return DataSplits(train, val)
