"""COCO bbox metrics (AP, AP50, ..., in percent) from either COCO evaluator, and rich tables."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rich.table import Table

from crosskd_cli.errors import DataError, OptionError, closest

BACKENDS = ("faster", "pycocotools")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in this order
# COCO's own value for a size range (or class) without any ground truth: not a score, so it is
# kept as is rather than scaled to percent, and tables show it as a dash.
NO_GROUND_TRUTH = -1.0

# (stats (12,), precision (T, R, K, A, M), category ids in the K order) of one evaluation
Evaluation = tuple[np.ndarray, np.ndarray, list[int]]


def coco_metrics(
    coco_gt: Any,
    results: Sequence[dict[str, Any]],
    *,
    backend: str = "faster",
    per_class: bool = False,
) -> dict[str, Any]:
    """COCO bbox metrics of `results` against `coco_gt`, over every ground-truth image.

    coco_gt: a loaded `pycocotools.coco.COCO` (a `faster_coco_eval.COCO` works too).
    results: COCO results format, one dict per box: image_id, category_id (the ORIGINAL COCO
        id, not the contiguous label), bbox [x, y, w, h] in original image pixels, score.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} as floats in percent (0-100), full
    precision; NO_GROUND_TRUTH (-1.0) for a size range without ground truth. With per_class,
    also "per_class": one `per_class_rows` row per category, in category-id order. Images
    without any prediction count (as misses), so empty `results` give 0.0 wherever there is
    ground truth.
    """
    check_backend(backend)
    clean = _clean_results(coco_gt, results)
    # Both evaluators print progress lines on stdout; the caller prints its own summary.
    with contextlib.redirect_stdout(io.StringIO()):
        stats, precision, cat_ids = EVALUATORS[backend](coco_gt, clean)
    metrics: dict[str, Any] = {key: _percent(stats[i]) for i, key in enumerate(METRIC_KEYS)}
    if per_class:
        metrics["per_class"] = per_class_rows(coco_gt, precision, cat_ids)
    return metrics


PER_CLASS_KEYS = ("category_id", "name", "instances", "AP", "AP50", "AP75")
# IoU-threshold rows of COCOeval's precision table (0.50:0.05:0.95) behind AP50 and AP75
_IOU_ROW = {"AP50": 0, "AP75": 5}


def per_class_rows(coco_gt: Any, precision: np.ndarray, cat_ids: list[int]) -> list[dict]:
    """One row per category, in id order: category_id, name, instances (non-crowd ground-truth
    boxes), AP, AP50, AP75 in percent (area 'all', 100 detections; NO_GROUND_TRUTH without
    instances), as COCOeval.summarize computes its overall numbers."""
    names = {cat["id"]: cat["name"] for cat in coco_gt.loadCats(cat_ids)}
    instances = dict.fromkeys(cat_ids, 0)
    for ann in coco_gt.dataset["annotations"]:
        if not ann.get("iscrowd", 0) and ann["category_id"] in instances:
            instances[ann["category_id"]] += 1
    return [
        {
            "category_id": cat_id,
            "name": names[cat_id],
            "instances": instances[cat_id],
            "AP": _class_ap(precision[:, :, k, 0, -1]),
            **{key: _class_ap(precision[row, :, k, 0, -1]) for key, row in _IOU_ROW.items()},
        }
        for k, cat_id in enumerate(cat_ids)
    ]


def check_backend(backend: str) -> None:
    """Refuse an unknown evaluator by name, so a command can check before it predicts."""
    if backend not in EVALUATORS:
        close = closest(backend, BACKENDS)
        raise OptionError(
            f"COCO evaluation backend '{backend}' is not known.",
            hint=(f"Did you mean '{close}'? " if close else "")
            + f"Use one of: {', '.join(BACKENDS)}.",
        )


def _clean_results(coco_gt: Any, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh plain-Python copies (the evaluators add keys to the dicts they load), checked
    against the ground truth so a label/id mix-up fails loudly instead of scoring zero."""
    image_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    clean = []
    for i, r in enumerate(results):
        try:
            item = {
                "image_id": int(r["image_id"]),
                "category_id": int(r["category_id"]),
                "bbox": [float(v) for v in r["bbox"]],
                "score": float(r["score"]),
            }
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"Detection result {i} is not a COCO bbox result: {r!r} ({err!r}).",
                hint="Each result needs image_id, category_id, bbox [x, y, w, h] and score.",
            ) from err
        if item["image_id"] not in image_ids:
            raise DataError(
                f"Detection result {i} has image_id {item['image_id']}, "
                "which is not in the ground truth.",
                hint="Evaluate predictions against the annotation file they were made for.",
            )
        if item["category_id"] not in cat_ids:
            raise DataError(
                f"Detection result {i} has category_id {item['category_id']}, not one of the "
                f"ground truth's ids {sorted(cat_ids)[:10]}.",
                hint="Map contiguous labels to original COCO ids (category_ids[label]).",
            )
        clean.append(item)
    return clean


def _evaluate_pycocotools(coco_gt: Any, results: list[dict[str, Any]]) -> Evaluation:
    """The official evaluator (reference numbers, slower)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if results:
        coco_dt = coco_gt.loadRes(results)
    else:  # pycocotools' loadRes cannot take an empty list; an empty result set can
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": list(coco_gt.dataset["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    return _run(evaluator, coco_gt)


def _evaluate_faster(coco_gt: Any, results: list[dict[str, Any]]) -> Evaluation:
    """faster-coco-eval: the same matching and accumulation in C++, several times faster."""
    from faster_coco_eval import COCO, COCOeval_faster

    silent = lambda *args, **kwargs: None  # noqa: E731
    # A shallow copy of the ground-truth dict: no re-reading of the json, no deep copy.
    faster_gt = COCO(coco_gt.dataset, print_function=silent)
    coco_dt = faster_gt.loadRes(results)
    evaluator = COCOeval_faster(faster_gt, coco_dt, "bbox", print_function=silent)
    return _run(evaluator, coco_gt)


def _run(evaluator: Any, coco_gt: Any) -> Evaluation:
    """evaluate -> accumulate -> summarize over all ground-truth images (empty ones included)."""
    evaluator.params.imgIds = sorted(coco_gt.getImgIds())
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    cat_ids = [int(c) for c in evaluator.params.catIds]
    return np.asarray(evaluator.stats), np.asarray(evaluator.eval["precision"]), cat_ids


EVALUATORS: dict[str, Callable[[Any, list[dict[str, Any]]], Evaluation]] = {
    "faster": _evaluate_faster,
    "pycocotools": _evaluate_pycocotools,
}


def _percent(value: float) -> float:
    return float(value) * 100.0 if value >= 0 else NO_GROUND_TRUTH


def _class_ap(precision: np.ndarray) -> float:
    """AP of one class from its (T, R) precision table at area 'all', 100 detections;
    -1 entries mark thresholds without ground truth, exactly as COCOeval.summarize skips them."""
    valid = precision[precision > -1]
    return float(valid.mean()) * 100.0 if valid.size else NO_GROUND_TRUTH


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or value < 0:
        return "-"
    return f"{value:.1f}"


def _metric_columns(table: Table) -> Table:
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    return table


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    """One row: AP, AP50, AP75, APs, APm, APl with one decimal ('-' where there is no GT)."""
    table = _metric_columns(Table(title=title))
    table.add_row(*(_fmt(metrics.get(key)) for key in METRIC_KEYS))
    return table


def comparison_table(rows: dict[str, dict[str, Any]], title: str) -> Table:
    """One row per model name (e.g. teacher, baseline student, CrossKD student)."""
    table = Table(title=title)
    table.add_column("model")
    _metric_columns(table)
    for name, metrics in rows.items():
        table.add_row(name, *(_fmt(metrics.get(key)) for key in METRIC_KEYS))
    return table


def per_class_table(rows: Sequence[dict[str, Any]], title: str = "AP per class") -> Table:
    """One row per class (`per_class_rows`, in the order given): id, class, instances, AP,
    AP50, AP75."""
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("instances", justify="right")
    for key in PER_CLASS_KEYS[3:]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(
            str(row["category_id"]),
            row["name"],
            str(row["instances"]),
            *(_fmt(row[key]) for key in PER_CLASS_KEYS[3:]),
        )
    return table
