"""COCO's classes, and a generated folder in COCO's layout, sizes and category ids, without COCO.

`write_coco_folder` writes `annotations/instances_{train,val}2017.json`, `train2017/` and
`val2017/` as COCO 2017 ships them: JPEG images of COCO's common sizes named by a 12-digit id,
and COCO's 80 categories with their names and non-contiguous ids (1..90). Each category is drawn
as one shape in one colour on the built-in data's textured backgrounds, so a model has something
to learn. It lets the whole COCO path (teacher import, distill at 1333x800, resume, eval) be
rehearsed on a machine without COCO: `tests/test_coco_rehearsal.py` and
`benchmarks/coco_rehearsal.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crosskd_cli.data.builtin import background, coco_records, draw_shape, jitter, sample_box
from crosskd_cli.errors import DataError

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
COCO_TRAIN_IMAGES = 117_266  # train2017 images with at least one box (118,287 in all)
COCO_VAL_IMAGES = 5_000

# (width, height) of common COCO images: most have a 640 px long side, a quarter or so are
# portrait. Image k takes size k modulo this list, so a few images already cover the mix.
COCO_SIZES = (
    (640, 480), (640, 427), (480, 640), (640, 426), (640, 428), (427, 640), (640, 424),
    (500, 375), (640, 360), (612, 612),
)  # fmt: skip
# Each class is one of 9 shapes in one of 9 colours: 81 looks for COCO's 80 classes.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "hexagon", "star", "ring", "bar")
PALETTE = (
    (220, 40, 40), (40, 180, 60), (40, 80, 230), (235, 215, 40), (160, 50, 200),
    (250, 140, 20), (30, 200, 210), (150, 150, 150), (240, 240, 240),
)  # fmt: skip
MAX_OBJECTS = 12  # per image, at least 2
MIN_SIDE = 16  # objects are 8 px to half the shorter side


def write_coco_folder(
    root: Path,
    *,
    train: int,
    val: int,
    sizes: Sequence[tuple[int, int]] = COCO_SIZES,
    seed: int = 0,
) -> Path:
    """Write a COCO-2017-layout folder of `train` and `val` generated images at `root`.

    `root` must be missing or empty (nothing is overwritten). Every image is drawn from
    `seed`, its split and its index alone, so the folder is the same on every machine. The
    json is written after the images: a folder with both jsons is complete.
    """
    if not sizes or any(min(size) < MIN_SIDE for size in sizes):
        raise DataError(
            f"Image sizes {list(sizes)} must be at least {MIN_SIDE} px on each side.",
            hint="Pass (width, height) pairs, e.g. COCO_SIZES.",
        )
    if root.exists() and any(root.iterdir()):
        raise DataError(
            f"{root} is not empty; a COCO folder is written only into a new or empty one.",
            hint="Pass another folder, or remove this one first.",
        )
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations = [], []
        for k in range(count):
            rng = np.random.default_rng([seed, split_index, k])
            width, height = sizes[k % len(sizes)]
            picture, objects = draw_coco_image(rng, width, height)
            info = {"id": k + 1, "file_name": f"{k + 1:012d}.jpg", "width": width, "height": height}
            picture.save(folder / info["file_name"], quality=90)
            images.append(info)
            annotations += coco_records(
                info["id"], objects, len(annotations) + 1, COCO_CATEGORY_IDS
            )
        payload = {"images": images, "annotations": annotations, "categories": categories()}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    return root


def categories() -> list[dict]:
    """COCO's category list: ids, names, and the shape that draws each here."""
    return [
        {"id": cid, "name": name, "supercategory": SHAPES[label // len(PALETTE)]}
        for label, (cid, name) in enumerate(zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True))
    ]


def draw_coco_image(rng: np.random.Generator, width: int, height: int):
    """One picture and its objects [(label 0..79, (x0, y0, x1, y1))], all drawn from `rng`.

    Larger objects are drawn first, so a smaller one is never hidden behind a larger one.
    """
    canvas = background(rng, width, height, level=1)
    draw = ImageDraw.Draw(canvas)
    boxes = [sample_box(rng, width, height) for _ in range(int(rng.integers(2, MAX_OBJECTS + 1)))]
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    objects = []
    for box in boxes:
        label = int(rng.integers(len(COCO_CLASSES)))
        shape, colour = SHAPES[label // len(PALETTE)], PALETTE[label % len(PALETTE)]
        draw_shape(draw, shape, box, jitter(rng, colour))
        objects.append((label, box))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 5, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), objects
