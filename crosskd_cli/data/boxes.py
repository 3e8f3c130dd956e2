"""Which annotation boxes become training targets, and a count of every one that does not."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crosskd_cli.data.transforms import MIN_BOX_SIZE, keep_ratio_size

Boxes = tuple[np.ndarray, np.ndarray]  # (boxes (N, 4) float32 xyxy, labels (N,) int64)


@dataclass
class BoxIndex:
    """The boxes of one split, grouped by image, and what was left out.

    targets: image id -> boxes xyxy in original pixels, NOT clipped: the decoded image clips
    them when it is read, as the json's width and height may be wrong. has_boxes: the images
    with at least one box that survives clipping and resizing by the json's sizes (what
    training keeps). counts: see `index_boxes`.
    """

    targets: dict[int, Boxes]
    has_boxes: set[int]
    counts: dict[str, int] = field(default_factory=dict)


def index_boxes(coco, category_ids: list[int], scale: tuple[int, int]) -> BoxIndex:
    """Every annotation of `coco` sorted into targets or a count, vectorised over all at once.

    counts: crowd_boxes (iscrowd, never targets); invalid_boxes (a non-finite coordinate, or
    a negative width or height: dropped); degenerate_boxes (zero width or height, or empty or
    under 1 px once clipped to the image and resized to `scale`: dropped); clipped_boxes
    (reaching past the image's edges: clipped, and kept when still 1 px); images_without_boxes
    (no box left: training skips them, evaluation keeps them). Image sizes are the json's;
    when the decoded pixels differ, the boxes are clipped to those pixels when read, so the
    last three counts are then estimates (`ReadLog` counts such images).
    """
    anns = coco.dataset["annotations"]
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    label_of = {cid: k for k, cid in enumerate(category_ids)}
    image_ids = np.array([a["image_id"] for a in anns], dtype=np.int64)
    labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    valid = np.isfinite(xywh).all(axis=1) & (xywh[:, 2:] >= 0).all(axis=1)
    positive = valid & (xywh[:, 2:] > 0).all(axis=1) & ~crowd
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes[~valid] = 0  # keeps inf - inf out of the arithmetic below
    imgs = coco.imgs
    size = np.array([(imgs[i]["width"], imgs[i]["height"]) for i in image_ids.tolist()])
    limits = np.tile(size.reshape(-1, 2), 2)
    clipped = (boxes.clip(0, limits) != boxes).any(axis=1) & positive
    # What the transforms will drop, by the json's sizes: the resize factor of each box's image
    factor = {i: _resize_factor(info, scale) for i, info in imgs.items()}
    box_factor = np.array([factor[i] for i in image_ids.tolist()]).reshape(-1, 2)
    inside = boxes.clip(0, limits)
    survives = positive & ((inside[:, 2:] - inside[:, :2]) * box_factor >= MIN_BOX_SIZE).all(1)
    has_boxes = set(image_ids[survives].tolist())
    counts = {
        "images": len(imgs),
        "annotations": len(anns),
        "crowd_boxes": int(crowd.sum()),
        "invalid_boxes": int((~valid & ~crowd).sum()),
        "degenerate_boxes": int((valid & ~crowd & ~survives).sum()),
        "clipped_boxes": int(clipped.sum()),
        "images_without_boxes": len(imgs) - len(has_boxes & set(imgs)),
    }
    return BoxIndex(
        _group(image_ids[positive], boxes[positive], labels[positive]), has_boxes, counts
    )


def _group(image_ids: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> dict[int, Boxes]:
    order = np.argsort(image_ids, kind="stable")
    ids, starts = np.unique(image_ids[order], return_index=True)
    box_groups = np.split(boxes[order].astype(np.float32), starts[1:])
    label_groups = np.split(labels[order], starts[1:])
    # zip stops at len(ids): with no boxes at all np.split still returns one empty group
    return {int(i): (b, lab) for i, b, lab in zip(ids, box_groups, label_groups, strict=False)}


def _resize_factor(info: dict, scale: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy) that `KeepRatioResize` applies to an image of the json's width and height."""
    new_h, new_w = keep_ratio_size(info["height"], info["width"], scale)
    return new_w / info["width"], new_h / info["height"]
