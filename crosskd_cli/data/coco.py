"""COCO-format detection data over pycocotools, decoded with torchvision.io."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from crosskd_cli.data.transforms import apply, build_transforms
from crosskd_cli.errors import DataError
from crosskd_cli.structures import Target

REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_coco_json(path: Path) -> COCO:
    """Read and check a COCO instances json; a missing key is named in the error."""
    if not path.is_file():
        raise DataError(
            f"Annotation file {path} does not exist.",
            hint="Expected a COCO instances json (e.g. annotations/instances_val2017.json).",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}.", hint="Re-export the file.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not COCO: the top level must be an object.")
    for key, fields in REQUIRED.items():
        if not isinstance(data.get(key), list):
            raise DataError(
                f"{path} is not COCO: missing key '{key}'.",
                hint="A COCO instances json has 'images', 'annotations' and 'categories' lists.",
            )
        for k, entry in enumerate(data[key]):
            missing = [f for f in fields if f not in entry]
            if missing:
                raise DataError(
                    f"{path} is not COCO: {key}[{k}] has no '{missing[0]}'.",
                    hint=f"Each entry of '{key}' needs {', '.join(fields)}.",
                )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and boxes of one COCO split, resized (not normalised) for a detector.

    Labels are contiguous 0..C-1 in the order of sorted category ids; `category_ids` maps them
    back. Crowd boxes never become targets. Training drops images left without boxes; evaluation
    keeps every image. An unreadable image stops with its name, or with `skip_bad_images` the
    next readable image is returned in its place and `num_skipped` counts it.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        train: bool,
        scale: tuple[int, int] = (1333, 800),
        flip_prob: float = 0.5,
        skip_bad_images: bool = False,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(
                f"Image folder {self.image_dir} does not exist.",
                hint="Point --data (or --train-images/--val-images) at the folder of images.",
            )
        self.coco = load_coco_json(self.ann_file)
        self.category_ids = sorted(self.coco.getCatIds())
        cats = self.coco.loadCats(self.category_ids)
        self.class_names = [c["name"] for c in cats]
        self._label_of = {cid: k for k, cid in enumerate(self.category_ids)}
        self.train = train
        self.skip_bad_images = skip_bad_images
        self.skipped: set[int] = set()
        self.transforms = build_transforms(train, scale, flip_prob)
        self._boxes = {i: self._load_boxes(i) for i in sorted(self.coco.imgs)}
        self._check_files_exist()
        ids = sorted(self.coco.imgs)
        self.image_ids = [i for i in ids if len(self._boxes[i][0])] if train else ids

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load_boxes(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes as xyxy clipped to the image, degenerate ones dropped."""
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        unknown = [a["category_id"] for a in anns if a["category_id"] not in self._label_of]
        if unknown:
            raise DataError(
                f"{self.ann_file}: an annotation of image {image_id} has category_id "
                f"{unknown[0]}, which is not in 'categories'.",
                hint="Every annotation's category_id must be listed in 'categories'.",
            )
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, info["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, info["height"])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = np.array([self._label_of[a["category_id"]] for a in anns], dtype=np.int64)
        return boxes[keep], labels.reshape(-1)[keep]

    def _check_files_exist(self) -> None:
        missing = [
            info["file_name"]
            for info in self.coco.imgs.values()
            if not (self.image_dir / info["file_name"]).is_file()
        ]
        if missing:
            raise DataError(
                f"Image {self.image_dir / missing[0]} named in {self.ann_file} does not exist"
                + (f" ({len(missing) - 1} more missing)." if len(missing) > 1 else "."),
                hint="Check that the image folder belongs to this annotation file.",
            )

    def read_image(self, image_id: int) -> Tensor:
        """(3, H, W) uint8 RGB; grayscale/RGBA converted, EXIF orientation applied."""
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            return decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (RuntimeError, ValueError) as exc:
            raise DataError(
                f"Image {path} cannot be read ({str(exc).splitlines()[0][:80]}).",
                hint="Replace the file, or pass --skip-bad-images to skip unreadable images.",
            ) from None

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        for offset in range(len(self.image_ids)):
            image_id = self.image_ids[(index + offset) % len(self.image_ids)]
            try:
                return self._sample(image_id)
            except DataError:
                if not self.skip_bad_images:
                    raise
                self.skipped.add(image_id)
        raise DataError(f"No image in {self.image_dir} could be read.")

    def _sample(self, image_id: int) -> tuple[Tensor, Target]:
        image = self.read_image(image_id)
        height, width = image.shape[-2:]
        boxes, labels = self._boxes[image_id]
        boxes = torch.from_numpy(boxes.copy())
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        image, boxes, labels = apply(self.transforms, image, boxes, torch.from_numpy(labels))
        new_h, new_w = image.shape[-2:]
        scale = (new_w / width, new_h / height)
        return image, Target(boxes.float(), labels.long(), image_id, (height, width), scale)

    def dataset_info(self) -> dict[str, Any]:
        return {"images": len(self), "classes": len(self.class_names), "skipped": self.num_skipped}
