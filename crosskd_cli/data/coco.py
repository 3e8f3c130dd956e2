"""COCO-format detection data over pycocotools, decoded with torchvision.io."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from crosskd_cli.config.safe_read import MAX_DEPTH, Unbounded, depth, load_json
from crosskd_cli.config.schema import shown
from crosskd_cli.data.boxes import index_boxes
from crosskd_cli.data.failures import FailedSample, ReadLog, failed, in_worker
from crosskd_cli.data.transforms import build_transforms, keep_ratio_size, transform_sample
from crosskd_cli.detection.structures import Target
from crosskd_cli.errors import CrossKDError, DataError, first_line


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


# key -> field -> (check, what the check expects); the fields crosskd reads from each entry.
REQUIRED: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "images": {
        "id": (_is_int, "an integer"),
        "file_name": (lambda v: isinstance(v, str) and v != "", "a file name"),
        "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    },
    "annotations": {
        "image_id": (_is_int, "an integer"),
        "category_id": (_is_int, "an integer"),
        "bbox": (_is_box, "[x, y, width, height]"),
    },
    "categories": {"id": (_is_int, "an integer"), "name": (lambda v: isinstance(v, str), "a name")},
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Annotation fields the COCO evaluators read but exports often leave out (a missing one was a
# KeyError after the whole prediction pass): field -> (default, check, what the check expects)
EVALUATED: dict[str, tuple[Callable[[dict], Any], Callable[[Any], bool], str]] = {
    "iscrowd": (lambda a: 0, lambda v: isinstance(v, int) and v in (0, 1), "0 or 1"),
    "area": (lambda a: a["bbox"][2] * a["bbox"][3], _is_number, "a number"),
}


def load_coco_json(path: Path) -> COCO:
    """Read and check a COCO instances json; a missing key or bad entry field is named."""
    if not path.is_file():
        raise DataError(
            f"Annotation file {path} does not exist.",
            hint="Expected a COCO instances json (e.g. annotations/instances_val2017.json).",
        )
    try:
        # Too large to walk in Python (COCO's train json is 450 MB): only what the decoder
        # itself cannot nest is refused here; _check_coco bounds what is deep-copied later.
        data = load_json(path.read_bytes(), max_depth=None)
    except Unbounded as exc:
        raise DataError(
            f"{path} is not COCO: its JSON is {exc}.", hint="Re-export the file."
        ) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are both
        raise DataError(f"{path} is not valid JSON ({exc}).", hint="Re-export the file.") from None
    _check_coco(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        coco.createIndex()
    return coco


def _check_coco(path: Path, data: Any) -> None:
    hint = "A COCO instances json has 'images', 'annotations' and 'categories' lists."
    if not isinstance(data, dict):
        raise DataError(f"{path} is not COCO: the top level must be an object.", hint=hint)
    for key, rules in REQUIRED.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise DataError(f"{path} is not COCO: missing key '{key}'.", hint=hint)
        for field, (check, expected) in rules.items():
            bad = next(
                (k for k, e in enumerate(entries) if not isinstance(e, dict) or field not in e),
                None,
            )
            if bad is not None:
                raise DataError(
                    f"{path} is not COCO: {key}[{bad}] has no '{field}'.",
                    hint=f"Each entry of '{key}' needs {', '.join(rules)}.",
                )
            bad = next((k for k, e in enumerate(entries) if not check(e[field])), None)
            if bad is not None:
                raise DataError(
                    f"{path} is not COCO: {key}[{bad}].{field} is {shown(entries[bad][field])}, "
                    f"expected {expected}.",
                    hint=f"Fix that entry of '{key}' (bbox is [x, y, width, height] in pixels).",
                )
    _check_references(path, data)
    _fill_evaluated(path, data["annotations"])
    # pycocotools deep-copies the categories for every evaluation (loadRes): recursion
    if depth(data["categories"], stop=MAX_DEPTH) > MAX_DEPTH:
        raise DataError(
            f"{path} is not COCO: its 'categories' are nested deeper than {MAX_DEPTH} levels.",
            hint="Each category is an object with an integer 'id' and a 'name'.",
        )


def _fill_evaluated(path: Path, annotations: list[dict]) -> None:
    """Give each annotation the EVALUATED fields (the box's area, not crowd) it lacks."""
    for k, ann in enumerate(annotations):
        for field, (default, check, expected) in EVALUATED.items():
            if field not in ann:
                ann[field] = default(ann)
            elif not check(ann[field]):
                raise DataError(
                    f"{path} is not COCO: annotations[{k}].{field} is {shown(ann[field])}, "
                    f"expected {expected}.",
                    hint=f"Fix that annotation, or leave '{field}' out to use the default.",
                )


def _check_references(path: Path, data: dict) -> None:
    """Every annotation must name a listed image and a listed category."""
    for field, key in (("image_id", "images"), ("category_id", "categories")):
        known = {entry["id"] for entry in data[key]}
        bad = next((k for k, a in enumerate(data["annotations"]) if a[field] not in known), None)
        if bad is not None:
            raise DataError(
                f"{path} is not COCO: annotations[{bad}].{field} is "
                f"{data['annotations'][bad][field]}, which is not in '{key}'.",
                hint=f"Every annotation's {field} must be the id of an entry of '{key}'.",
            )


@dataclass(frozen=True)
class ClassList:
    """The classes of a model, in label order: label k is category id `category_ids[k]`, named
    `class_names[k]`. `origin` says where the list comes from ("the training split
    /data/train.json", "checkpoint best.safetensors") and `hint` how to make data fit it, for
    the messages of a split read with it (`CocoDetection(classes=...)`)."""

    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    origin: str
    hint: str

    def describe(self, category_id: int) -> str:
        """'7 'dog'': a category id with its name in this list."""
        return f"{category_id} {self.class_names[self.category_ids.index(category_id)]!r}"


def _listed(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def match_classes(coco: COCO, classes: ClassList, ann_file: Path) -> list[int]:
    """The ids of `classes` that `coco` does not list (missing: not scored, not an error).

    A category of `coco` that `classes` lacks, or names otherwise, is a DataError naming it:
    its boxes would be read as another class, or as none.
    """
    known = dict(zip(classes.category_ids, classes.class_names, strict=True))
    cats = coco.cats
    unknown = [f"{c} {cats[c]['name']!r}" for c in sorted(cats) if c not in known]
    if unknown:
        some = "Categories" if len(unknown) > 1 else "Category"
        are = "are" if len(unknown) > 1 else "is"
        raise DataError(
            f"{some} {_listed(unknown)} of {ann_file} {are} not among the "
            f"{len(known)} classes of {classes.origin} "
            f"({_listed([classes.describe(c) for c in classes.category_ids])}).",
            hint=classes.hint,
        )
    renamed = [c for c in sorted(cats) if cats[c]["name"] != known[c]]
    if renamed:
        c = renamed[0]
        raise DataError(
            f"Category {c} is {cats[c]['name']!r} in {ann_file} but {known[c]!r} in "
            f"{classes.origin}" + (f" ({len(renamed) - 1} more renamed)." if renamed[1:] else "."),
            hint=classes.hint,
        )
    return [c for c in classes.category_ids if c not in cats]


def read_image(path: Path) -> Tensor:
    """(3, H, W) uint8 RGB: grayscale and RGBA converted, EXIF orientation applied.

    torchvision decodes JPEG, PNG, WebP and GIF; other formats (BMP, TIFF) go through Pillow.
    """
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as exc:
        # torchvision prefixes its messages with "function, source.cpp:line, ".
        reason = re.sub(r"^\w+, \S+:\d+, ", "", first_line(exc))
        if not reason.startswith("Unsupported image file"):
            raise _unreadable(path, reason) from None
    try:
        with Image.open(path) as picture:
            pixels = np.asarray(ImageOps.exif_transpose(picture).convert("RGB"))
    except (OSError, ValueError) as exc:
        raise _unreadable(path, str(exc)) from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError(
        f"Image {path} cannot be read ({reason.rstrip('.')}).",
        hint="Replace the file, or pass --skip-bad-images to skip unreadable images.",
    )


class CocoDetection(Dataset):
    """Images and boxes of one COCO split, resized (not normalised) for a detector.

    Labels are contiguous 0..C-1 in the order of sorted category ids; `category_ids[label]`
    maps them back and `class_names[label]` names them. With `classes` the labels are that
    list's instead (the training split's for every split of a run, a checkpoint's for
    `crosskd eval`): a category of this json outside it is an error (`match_classes`);
    `missing_classes` holds those of the list this json lacks (their detections go unscored).
    Crowd boxes never become targets; invalid ones (nan, inf, negative sizes) are dropped.
    Boxes are clipped to the decoded image's pixels when it is read (not to the json's width
    and height, which can be wrong); boxes empty after clipping or under 1 px once resized are
    dropped. Training (`train=True`) skips images without boxes, judged by the json's sizes so
    that no image is decoded up front, and refuses a split where none is left; evaluation keeps
    every image.
    Missing image files stop construction (a cheap stat of every file). `drop_report()`
    counts everything left out.

    Unreadable images are only found when read (decoding every image up front would cost as
    much as an epoch): by default reading one raises a DataError naming it; with
    `skip_bad_images` the next readable image (in index order, wrapping around) is returned in
    its place. Either is seen the same in the main process with DataLoader workers
    (`failures.py`).
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
        short_sides: tuple[int, int] | None = None,
        multiscale: str = "range",
        classes: ClassList | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(
                f"Image folder {self.image_dir} does not exist.",
                hint="Point --data (or --train-images/--val-images) at the folder of images.",
            )
        self.coco = load_coco_json(self.ann_file)
        self.classes = classes
        self.missing_classes: list[int] = []
        if classes is None:
            self.category_ids: list[int] = sorted(self.coco.cats)
            self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        else:
            self.missing_classes = match_classes(self.coco, classes, self.ann_file)
            self.category_ids = list(classes.category_ids)
            self.class_names = list(classes.class_names)
        self.train = train
        self.scale = scale
        self.skip_bad_images = skip_bad_images
        self.transforms = build_transforms(train, scale, flip_prob, short_sides, multiscale)
        # (seed, epoch) of the random augmentation, in shared memory so that persistent
        # DataLoader workers see each new epoch (see `set_epoch`)
        self._augment_key = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._check_files_exist()
        # Multi-scale: keep a box if it survives the largest scale; smaller draws drop it later
        largest = scale if short_sides is None or not train else (max(scale), short_sides[1])
        index = index_boxes(self.coco, self.category_ids, largest)
        self._targets, self._counts = index.targets, index.counts
        ids = sorted(self.coco.imgs)
        self.image_ids: list[int] = [i for i in ids if i in index.has_boxes] if train else ids
        if train and not self.image_ids:
            raise _no_training_images(self.ann_file, self._counts, largest)
        self._log = ReadLog(ids)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable images skipped so far, in any process (`skip_bad_images`)."""
        return self._log.count("unreadable")

    def class_list(self, origin: str, hint: str) -> ClassList:
        """This split's classes, as the list other splits are read with."""
        return ClassList(tuple(self.category_ids), tuple(self.class_names), origin, hint)

    def missing_classes_warning(self) -> str | None:
        """One line on the classes of `classes` this json lacks, None when it has them all."""
        if not self.missing_classes:
            return None
        assert self.classes is not None
        missing = [self.classes.describe(c) for c in self.missing_classes]
        some = "categories" if len(missing) > 1 else "category"
        them = "them" if len(missing) > 1 else "it"
        return (
            f"{self.ann_file} has no {some} {_listed(missing)} of the "
            f"{len(self.category_ids)} classes of {self.classes.origin}: detections of {them} "
            "are not scored."
        )

    def drop_report(self, merge: Callable[[Tensor], Tensor] | None = None) -> dict[str, int]:
        """What this split left out, as plain counts (see `boxes.index_boxes`).

        images, annotations: as listed in the json; crowd_boxes, invalid_boxes,
        degenerate_boxes, clipped_boxes, images_without_boxes: counted up front, once;
        images_used: len(self); unreadable_images_skipped and images_size_mismatch (decoded
        pixels differ from the json's width/height; boxes clipped to the pixels): distinct
        images met so far by any DataLoader worker of this process. Under several processes
        (DDP) each meets the images of its own shard: `merge` sums the per-image marks
        (flags x images, int32) over the processes, so that each image counts once.
        """
        marks = self._log.marks()
        if merge is not None:
            marks = merge(marks)
        met = (marks > 0).sum(dim=1).tolist()
        return {
            **self._counts,
            "images_used": len(self),
            "unreadable_images_skipped": met[ReadLog.FLAGS.index("unreadable")],
            "images_size_mismatch": met[ReadLog.FLAGS.index("size_mismatch")],
        }

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Key the random augmentation (flip, multi-scale) of every sample of this epoch.

        A sample's draws depend on (seed, epoch, index) alone, not on which worker or process
        loads it nor on what was loaded before: a run resumed mid-epoch (or run with another
        number of workers) augments every image exactly as an uninterrupted one.
        """
        self._augment_key.copy_(torch.tensor([seed, epoch]))

    def __len__(self) -> int:
        return len(self.image_ids)

    def resized_sizes(self) -> list[tuple[int, int]]:
        """Every image's (h, w) after the test-time resize to `scale`, by the json's width and
        height (nothing is decoded): what evaluation groups its batches by."""
        imgs = self.coco.imgs
        return [
            keep_ratio_size(imgs[i]["height"], imgs[i]["width"], self.scale) for i in self.image_ids
        ]

    def portrait(self) -> list[bool]:
        """Whether each image is taller than wide, by the json's sizes: what training batches
        are grouped by (`AspectRatioBatches`)."""
        imgs = self.coco.imgs
        return [imgs[i]["width"] < imgs[i]["height"] for i in self.image_ids]

    def _check_files_exist(self) -> None:
        folder = str(self.image_dir)
        missing = [
            info["file_name"]
            for info in self.coco.imgs.values()
            if not os.path.isfile(os.path.join(folder, info["file_name"]))
        ]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise DataError(
                f"Image {self.image_dir / missing[0]} named in {self.ann_file} does not "
                f"exist{more}.",
                hint="Check that the image folder belongs to this annotation file.",
            )

    def __getitem__(self, index: int) -> tuple[Tensor, Target] | FailedSample:
        """(image (3, h, w) uint8 RGB resized, Target in resized coordinates); inside a
        DataLoader worker, a FailedSample instead of raising a CrossKDError."""
        if not -len(self) <= index < len(self):  # plain iteration stops on IndexError
            raise IndexError(f"index {index} out of range for {len(self)} images")
        try:
            return self._readable_sample(index)
        except CrossKDError as err:
            if not in_worker():
                raise
            return failed(err)

    def _readable_sample(self, index: int) -> tuple[Tensor, Target]:
        for offset in range(len(self.image_ids)):
            image_id = self.image_ids[(index + offset) % len(self.image_ids)]
            try:
                with self._seeded(index):
                    return self._sample(image_id)
            except DataError:
                if not self.skip_bad_images:
                    raise
                self._log.mark("unreadable", image_id)
        raise DataError(
            f"No image in {self.image_dir} could be read.",
            hint="Check the image folder; every image failed to decode.",
        )

    @contextlib.contextmanager
    def _seeded(self, index: int):
        """torch's RNG, seeded from (seed, epoch, index) for this sample only (training)."""
        if not self.train:
            yield
            return
        seed, epoch = self._augment_key.tolist()
        entropy = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(entropy))
            yield

    def _sample(self, image_id: int) -> tuple[Tensor, Target]:
        info = self.coco.imgs[image_id]
        image = read_image(self.image_dir / info["file_name"])
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            self._log.mark("size_mismatch", image_id)
        boxes, labels = self._targets.get(image_id, _NO_TARGETS)
        boxes = torch.from_numpy(boxes.copy())
        # The json's width/height may disagree with the file; the decoded pixels win.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        image, boxes, labels = transform_sample(
            self.transforms, image, boxes, torch.from_numpy(labels.copy())
        )
        scale = (image.shape[-1] / width, image.shape[-2] / height)
        return image, Target(boxes.float(), labels.long(), image_id, (height, width), scale)


_NO_TARGETS = (np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64))


def _no_training_images(ann_file: Path, counts: dict[str, int], scale) -> DataError:
    """Training needs one box; name what removed them all, before any sampler or model."""
    reasons = [
        f"{counts[key]} {words}"
        for key, words in (
            ("crowd_boxes", "crowd"),
            ("degenerate_boxes", f"empty or under 1 px at scale {list(scale)}"),
            ("invalid_boxes", "invalid (nan, inf or negative size)"),
        )
        if counts[key]
    ]
    what = f"; of its {counts['annotations']} boxes: " + ", ".join(reasons) if reasons else ""
    return DataError(
        f"No training images with boxes in {ann_file}: none of its {counts['images']} images "
        f"has a usable box{what}.",
        hint="Training needs non-crowd boxes of at least 1 px after resizing: check the "
        "annotations' iscrowd and bbox [x, y, width, height], or a larger data.scale.",
    )
