"""COCO bbox metrics: exact values on hand-made cases, and parity of the two evaluators."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

import pytest
from pycocotools.coco import COCO
from rich.console import Console

from crosskd_cli.errors import CrossKDError, DataError
from crosskd_cli.inference.metrics import (
    BACKENDS,
    METRIC_KEYS,
    NO_GROUND_TRUTH,
    coco_metrics,
    comparison_table,
    metrics_table,
    per_class_table,
)

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]  # non-contiguous ids
IMAGES = [  # image 9 has no annotation at all: it still counts for false positives
    {"id": 1, "width": 320, "height": 240, "file_name": "1.png"},
    {"id": 4, "width": 320, "height": 240, "file_name": "4.png"},
    {"id": 9, "width": 320, "height": 240, "file_name": "9.png"},
]
BOXES = [  # (image_id, category_id, xywh): small, the small/medium boundary, medium, large
    (1, 3, [10, 10, 20, 20]),
    (1, 7, [100, 40, 32, 32]),
    (1, 3, [40, 120, 60, 50]),
    (4, 7, [20, 20, 150, 120]),
    (4, 3, [200, 30, 40, 40]),
]


def make_coco(tmp_path, boxes=BOXES) -> COCO:
    annotations = [
        {"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3]}
        | {"iscrowd": 0}
        for i, (img, cat, box) in enumerate(boxes)
    ]
    path = tmp_path / "instances_val.json"
    data = {"images": IMAGES, "categories": CATEGORIES, "annotations": annotations}
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture
def coco(tmp_path) -> COCO:
    return make_coco(tmp_path)


def det(image_id: int, category_id: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def perfect() -> list[dict]:
    return [det(img, cat, box, 0.9 - 0.1 * i) for i, (img, cat, box) in enumerate(BOXES)]


def shifted() -> list[dict]:
    return [det(img, cat, [x + 3, y - 2, w, h], 0.8) for img, cat, (x, y, w, h) in BOXES]


def with_false_positives() -> list[dict]:
    # Confident misses on the empty image and the wrong class rank above the true positives.
    return perfect() + [
        det(9, 3, [50, 50, 30, 30], 0.99),
        det(9, 7, [0, 0, 200, 150], 0.97),
        det(1, 7, [10, 10, 20, 20], 0.95),
        det(4, 7, [20, 20, 150, 120], 0.3),  # a duplicate of a matched box
    ]


def random_detections() -> list[dict]:
    rng = random.Random(0)
    out = [
        det(img, cat, [x + rng.uniform(-6, 6), y, w * rng.uniform(0.7, 1.3), h], rng.random())
        for img, cat, (x, y, w, h) in BOXES
        for _ in range(3)
    ]
    for _ in range(40):
        x, y = rng.uniform(0, 250), rng.uniform(0, 180)
        box = [x, y, rng.uniform(4, 120), rng.uniform(4, 100)]
        out.append(det(rng.choice([1, 4, 9]), rng.choice([3, 7]), box, rng.random()))
    return out


PREDICTION_SETS = {
    "perfect": perfect,
    "shifted": shifted,
    "false_positives": with_false_positives,
    "random": random_detections,
    "empty": list,
}


def test_perfect_predictions_score_100_in_every_size_range(coco):
    metrics = coco_metrics(coco, perfect())
    assert list(metrics) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(100.0, abs=1e-9), key


@pytest.mark.parametrize("name", PREDICTION_SETS)
def test_faster_and_pycocotools_backends_give_the_same_numbers(coco, name):
    results = PREDICTION_SETS[name]()
    faster = coco_metrics(coco, results, backend="faster", per_class=True)
    official = coco_metrics(coco, results, backend="pycocotools", per_class=True)
    for key in METRIC_KEYS:
        assert faster[key] == pytest.approx(official[key], abs=1e-6), key
    for mine, theirs in zip(faster["per_class"], official["per_class"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)


def test_parity_sets_are_not_trivial(coco):
    # The parity test above only means something if the sets span different scores.
    aps = {name: coco_metrics(coco, make())["AP"] for name, make in PREDICTION_SETS.items()}
    assert aps["perfect"] == pytest.approx(100.0)
    assert aps["empty"] == 0.0
    assert 0.0 < aps["random"] < aps["shifted"] < aps["false_positives"] < 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_box_with_iou_062_matches_3_of_the_10_iou_thresholds(tmp_path, backend):
    coco = make_coco(tmp_path, [(1, 3, [0, 0, 100, 100])])
    metrics = coco_metrics(coco, [det(1, 3, [0, 0, 100, 62], 0.9)], backend=backend)
    assert metrics["AP"] == pytest.approx(30.0, abs=1e-9)
    assert metrics["AP50"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["AP75"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_higher_scored_false_positive_on_an_empty_image_halves_ap(tmp_path, backend):
    coco = make_coco(tmp_path, [(1, 3, [0, 0, 100, 100])])
    results = [det(9, 3, [0, 0, 100, 100], 0.9), det(1, 3, [0, 0, 100, 100], 0.8)]
    assert coco_metrics(coco, results, backend=backend)["AP"] == pytest.approx(50.0, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_size_ranges_without_ground_truth_are_reported_as_minus_one(tmp_path, backend):
    coco = make_coco(tmp_path, [(1, 3, [0, 0, 100, 100])])  # one large box only
    metrics = coco_metrics(coco, [det(1, 3, [0, 0, 100, 100], 0.9)], backend=backend)
    assert metrics["APs"] == NO_GROUND_TRUTH
    assert metrics["APm"] == NO_GROUND_TRUTH
    assert metrics["APl"] == pytest.approx(100.0, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_predictions_give_zero_everywhere_instead_of_crashing(coco, backend):
    metrics = coco_metrics(coco, [], backend=backend, per_class=True)
    assert {key: metrics[key] for key in METRIC_KEYS} == dict.fromkeys(METRIC_KEYS, 0.0)
    assert [(row["name"], row["AP"], row["AP50"]) for row in metrics["per_class"]] == [
        ("circle", 0.0, 0.0),
        ("square", 0.0, 0.0),
    ]


def test_per_class_rows_give_id_name_instances_and_ap_in_category_id_order(tmp_path):
    # Every circle found (one at IoU 0.62: AP50 100, AP75 0), no square; a crowd circle does
    # not count as an instance.
    coco = make_coco(tmp_path, [*BOXES, (4, 3, [0, 0, 300, 200])])
    coco.dataset["annotations"][-1]["iscrowd"] = 1
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    circles = [det(img, cat, box, 0.9) for img, cat, box in BOXES[:3:2] if cat == 3]
    circles.append(det(4, 3, [200, 30, 40, 40 * 0.62], 0.8))
    metrics = coco_metrics(coco, circles, per_class=True)
    assert [{k: row[k] for k in ("category_id", "name", "instances")} for row in
            metrics["per_class"]] == [
        {"category_id": 3, "name": "circle", "instances": 3},
        {"category_id": 7, "name": "square", "instances": 2},
    ]  # fmt: skip
    circle, square = metrics["per_class"]
    assert circle["AP50"] == pytest.approx(100.0, abs=1e-9)
    # at IoU 0.75, 2 of 3 found at precision 1: recall 0.00..0.66, 67 of COCO's 101 points
    assert circle["AP75"] == pytest.approx(100 * 67 / 101, abs=1e-9)
    assert 66.0 < circle["AP"] < 100.0
    assert (square["AP"], square["AP50"], square["AP75"]) == (0.0, 0.0, 0.0)
    assert metrics["AP"] == pytest.approx((circle["AP"] + square["AP"]) / 2, abs=1e-9)


def test_per_class_is_only_computed_when_asked(coco):
    assert "per_class" not in coco_metrics(coco, perfect())


def test_unknown_backend_lists_the_valid_ones(coco):
    with pytest.raises(CrossKDError, match="'fastest'") as info:
        coco_metrics(coco, perfect(), backend="fastest")
    assert info.value.hint == "Did you mean 'faster'? Use one of: faster, pycocotools."


def test_a_contiguous_label_in_place_of_a_category_id_is_refused(coco):
    with pytest.raises(DataError, match="category_id 0, not one of the ground truth's ids"):
        coco_metrics(coco, [det(1, 0, [10, 10, 20, 20], 0.9)])


def test_a_result_for_an_image_outside_the_ground_truth_is_refused(coco):
    with pytest.raises(DataError, match="image_id 123, which is not in the ground truth"):
        coco_metrics(coco, [det(123, 3, [10, 10, 20, 20], 0.9)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_prints_nothing_and_leaves_the_results_untouched(coco, backend, capsys):
    results = perfect()
    before = json.dumps(results)
    coco_metrics(coco, results, backend=backend)
    assert capsys.readouterr().out == ""
    assert json.dumps(results) == before


def render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def test_metrics_table_shows_one_decimal_and_a_dash_without_ground_truth():
    metrics = {"AP": 41.26, "AP50": 60.04, "AP75": 44.95, "APs": -1.0, "APm": 45.0, "APl": 55.55}
    text = render(metrics_table(metrics, "student on builtin:shapes"))
    assert "student on builtin:shapes" in text
    row = [line for line in text.splitlines() if "41.3" in line][0]
    assert row.split() == ["│", "41.3", "│", "60.0", "│", "45.0", "│", "-", "│", "45.0", "│",
                           "55.5", "│"]  # fmt: skip


def test_comparison_table_has_one_row_per_model():
    rows = {
        "teacher": dict.fromkeys(METRIC_KEYS, 50.0),
        "student": dict.fromkeys(METRIC_KEYS, 40.0),
    }
    text = render(comparison_table(rows, "CrossKD"))
    lines = text.splitlines()
    assert [line.split()[1] for line in lines if "teacher" in line or "student" in line] == [
        "teacher",
        "student",
    ]
    assert sum("40.0" in line for line in lines) == 1


def test_per_class_table_lists_every_class():
    rows = [
        {"category_id": 3, "name": "circle", "instances": 12, "AP": 72.26, "AP50": 90.0,
         "AP75": 80.04},
        {"category_id": 7, "name": "square", "instances": 0, "AP": -1.0, "AP50": -1.0,
         "AP75": -1.0},
    ]  # fmt: skip
    lines = [re.split("[│┃]", line)[1:-1] for line in render(per_class_table(rows)).splitlines()]
    cells = [[cell.strip() for cell in line] for line in lines if line]
    assert ["id", "class", "instances", "AP", "AP50", "AP75"] in cells
    assert ["3", "circle", "12", "72.3", "90.0", "80.0"] in cells
    assert ["7", "square", "0", "-", "-", "-"] in cells
