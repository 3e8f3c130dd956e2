"""`crosskd eval --save-vis N`: validation images, ground truth beside the predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crosskd_cli.data import read_image
from crosskd_cli.data.coco import load_coco_json
from crosskd_cli.data.source import DataSource
from crosskd_cli.viz.drawing import draw_detections, side_by_side, write_png, xywh_to_xyxy

VIS_SCORE_THR = 0.3  # predictions drawn: those scoring at least this (the JSON has them all)
FOLDER = "vis"


def eval_pictures(
    data: DataSource,
    results: Sequence[dict[str, Any]],
    category_ids: Sequence[int],
    class_names: Sequence[str],
    count: int,
    out: Path,
    score_thr: float = VIS_SCORE_THR,
) -> list[Path]:
    """The first `count` validation images (ascending image id), each as two panels: its
    non-crowd ground-truth boxes and its `results` (COCO results, as predictions.json) scoring
    at least `score_thr`, written to OUT/vis/<image>.png. Returns the files written."""
    coco = load_coco_json(data.val_ann)
    label = {category_id: k for k, category_id in enumerate(category_ids)}
    image_ids = sorted(coco.imgs)[:count]
    by_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in image_ids}
    for result in results:
        if result["image_id"] in by_image and result["score"] >= score_thr:
            by_image[result["image_id"]].append(result)
    written = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        image = read_image(data.val_images / info["file_name"])
        truth = [
            ann
            for ann in coco.imgToAnns[image_id]
            if not ann.get("iscrowd", 0) and ann["category_id"] in label
        ]
        shown = by_image[image_id]
        panels = [
            draw_detections(
                image,
                xywh_to_xyxy([ann["bbox"] for ann in truth]),
                [label[ann["category_id"]] for ann in truth],
                class_names,
            ),
            draw_detections(
                image,
                xywh_to_xyxy([r["bbox"] for r in shown]),
                [label[r["category_id"]] for r in shown],
                class_names,
                [r["score"] for r in shown],
            ),
        ]
        picture = side_by_side(panels, ["ground truth", f"predictions (score >= {score_thr})"])
        path = out / FOLDER / f"{Path(info['file_name']).stem}-{image_id}.png"
        write_png(path, picture)
        written.append(path)
    return written
