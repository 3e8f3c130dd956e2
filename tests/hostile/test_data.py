"""Hostile COCO data: deep JSON, splits without usable boxes, json sizes that lie, unreadable
images read by worker processes, and the counts of everything the data layer leaves out."""

from __future__ import annotations

import json

import pytest

from crosskd_cli.data import CocoDetection, build_loader
from crosskd_cli.errors import DataError
from crosskd_cli.inference.metrics import coco_metrics
from tests.conftest import make_coco
from tests.hostile.contract import QUICK, digests, invoke, refused

SMALL = ["--preset", "shapes-gfl-r18", *QUICK, "--set", "train.batch_size=2"]


def images(count: int, width: int = 40, height: int = 30) -> list[dict]:
    return [
        {"id": k, "file_name": f"{k}.jpg", "width": width, "height": height}
        for k in range(1, count + 1)
    ]


def box(k: int, image_id: int, bbox: list, **extra) -> dict:
    return {"id": k, "image_id": image_id, "category_id": 3, "bbox": bbox, **extra}


def teacher(root, out, *args: str):
    return invoke("teacher", "--data", root, *SMALL, "--out", out, *args)


def split(root, name: str = "train", **kwargs) -> CocoDetection:
    ann = root / "annotations" / f"instances_{name}2017.json"
    return CocoDetection(ann, root / f"{name}2017", train=name == "train", **kwargs)


@pytest.mark.parametrize("where", ["top", "categories"])
def test_annotation_json_nested_too_deep_is_refused_without_a_recursion_error(tmp_path, where):
    root = make_coco(tmp_path / "coco", images(2), [box(1, 1, [2, 3, 10, 8])])
    ann = root / "annotations" / "instances_train2017.json"
    if where == "top":
        ann.write_text("[" * 200_000 + "]" * 200_000)
        expected = "its JSON is nested too deeply to read"
    else:  # parses, but pycocotools would deep-copy it for every evaluation
        data = json.loads(ann.read_text())
        data["categories"][0]["extra"] = json.loads("[" * 50 + "]" * 50)
        ann.write_text(json.dumps(data))
        expected = "its 'categories' are nested deeper than 32 levels"
    before = digests(root)
    refused(teacher(root, tmp_path / "run"), f"{ann} is not COCO: {expected}")
    assert digests(root) == before and not (tmp_path / "run").exists()


def test_a_training_split_without_one_usable_box_is_refused_before_training(tmp_path):
    annotations = [
        box(1, 1, [2, 3, 10, 8], iscrowd=1),
        box(2, 2, [5, 5, 0.2, 0.2]),  # under 1 px at any scale
        box(3, 2, [5, 5, 10, 10], iscrowd=1),
        box(4, 1, [float("nan"), 1, 2, 2]),
    ]
    root = make_coco(tmp_path / "coco", images(3), annotations)
    ann = root / "annotations" / "instances_train2017.json"
    result = teacher(root, tmp_path / "run")
    refused(
        result,
        f"No training images with boxes in {ann}: none of its 3 images has a usable box; of its "
        "4 boxes: 2 crowd, 1 empty or under 1 px at scale [96, 96], 1 invalid (nan, inf or "
        "negative size).",
        "check the annotations' iscrowd and bbox",
    )
    assert not (tmp_path / "run").exists()


def test_boxes_are_clipped_to_the_decoded_pixels_not_the_jsons_width_and_height(tmp_path):
    # the json claims 20x20, the files are 40x30: the box reaches x = 32, y = 22
    root = make_coco(tmp_path / "coco", images(1), [box(1, 1, [12, 12, 20, 10])])
    for name in ("train", "val"):
        ann = root / "annotations" / f"instances_{name}2017.json"
        ann.write_text(
            ann.read_text().replace('"width": 40, "height": 30', '"width": 20, "height": 20')
        )
    val = split(root, "val", scale=(40, 30))
    image, target = val[0]
    assert image.shape == (3, 30, 40)
    assert target.boxes.tolist() == [[12.0, 12.0, 32.0, 22.0]]  # not cut at the json's 20
    report = val.drop_report()
    assert report["clipped_boxes"] == 1  # by the json's sizes, counted up front
    assert report["images_size_mismatch"] == 1  # found when the image was decoded


def test_drop_report_counts_every_box_and_image_left_out(tmp_path):
    annotations = [
        box(1, 1, [2, 3, 10, 8]),  # kept
        box(2, 1, [30, 20, 20, 20]),  # kept, clipped to 40x30
        box(3, 1, [5, 5, 10, 10], iscrowd=1),
        box(4, 1, [8, 8, 0, 5]),  # zero width
        box(5, 1, [1, 1, -4, 5]),  # negative width
        box(6, 1, [1, 1, float("inf"), 5]),  # would have become a full-image box
        box(7, 1, [float("nan"), 1, 2, 2]),
        box(8, 1, [60, 60, 5, 5]),  # wholly outside the image
        box(9, 2, [1, 1, 0.5, 0.5]),  # under 1 px: image 2 is left without boxes
    ]
    root = make_coco(tmp_path / "coco", images(3), annotations)  # image 3 has none
    train = split(root, scale=(40, 30), flip_prob=0.0)
    assert train.image_ids == [1]
    assert train[0][1].boxes.tolist() == [[2.0, 3.0, 12.0, 11.0], [30.0, 20.0, 40.0, 30.0]]
    assert train.drop_report() == {
        "images": 3,
        "annotations": 9,
        "crowd_boxes": 1,
        "invalid_boxes": 3,
        "degenerate_boxes": 3,
        "clipped_boxes": 2,
        "images_without_boxes": 2,
        "images_used": 1,
        "unreadable_images_skipped": 0,
        "images_size_mismatch": 0,
    }


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def test_unreadable_images_skipped_by_worker_processes_are_counted(tmp_path):
    root = make_coco(tmp_path / "coco", images(4), [box(k, k, [2, 3, 10, 8]) for k in (1, 2, 3, 4)])
    truncate(root / "train2017" / "2.jpg")
    truncate(root / "train2017" / "3.jpg")
    train = split(root, scale=(64, 64), skip_bad_images=True)
    for _ in build_loader(train, batch_size=2, shuffle=False, num_workers=2):
        pass
    assert train.num_skipped == 2
    assert train.drop_report()["unreadable_images_skipped"] == 2


def test_under_several_processes_an_unreadable_image_met_by_two_counts_once(tmp_path):
    root = make_coco(tmp_path / "coco", images(4), [box(k, k, [2, 3, 10, 8]) for k in (1, 2, 3, 4)])
    truncate(root / "train2017" / "2.jpg")
    truncate(root / "train2017" / "3.jpg")
    first, second = (split(root, scale=(64, 64), skip_bad_images=True) for _ in range(2))
    first[1]  # image 2: skipped
    second[1], second[2]  # images 2 and 3
    marks = []
    second.drop_report(lambda own: marks.append(own) or own)
    report = first.drop_report(lambda own: own + marks[0])  # the sum over both "processes"
    assert report["unreadable_images_skipped"] == 2  # 2 and 3, image 2 once


def test_a_run_prints_what_its_data_dropped_and_records_it_in_metrics_json(tmp_path):
    annotations = [box(k, k, [2, 3, 10, 8]) for k in (1, 2, 3, 4)]
    annotations += [box(5, 1, [5, 5, 10, 10], iscrowd=1), box(6, 2, [30, 20, 20, 20])]
    root = make_coco(tmp_path / "coco", images(4), annotations)
    truncate(root / "train2017" / "3.jpg")
    result = teacher(root, tmp_path / "run", "--skip-bad-images")
    assert result.exit_code == 0, result.output
    line = "Data dropped or fixed: train: crowd boxes 1, clipped boxes 1, unreadable images "
    line += "skipped 1; val: crowd boxes 1, clipped boxes 1."
    assert line in " ".join(result.output.split())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "AP" in metrics  # beside the evaluation
    train, val = metrics["data"]["train"], metrics["data"]["val"]
    assert (train["unreadable_images_skipped"], train["images_used"]) == (1, 4)
    assert val["crowd_boxes"] == 1


def test_an_unreadable_image_reads_as_the_same_one_line_with_or_without_workers(tmp_path):
    root = make_coco(tmp_path / "coco", images(4), [box(k, k, [2, 3, 10, 8]) for k in (1, 2, 3, 4)])
    bad = root / "train2017" / "2.jpg"
    truncate(bad)
    lines = []
    for workers in (0, 1):
        result = teacher(root, tmp_path / f"run{workers}", "--set", f"data.num_workers={workers}")
        flat = refused(result, f"Image {bad} cannot be read (Image is incomplete or truncated).")
        lines.append(flat[flat.index("Error:") :])
    assert lines[0] == lines[1]
    assert "--skip-bad-images" in lines[1]


def test_annotations_without_area_or_iscrowd_evaluate_with_either_backend(tmp_path):
    root = make_coco(tmp_path / "coco", images(1), [{"id": 1, "image_id": 1, "category_id": 3,
                                                     "bbox": [2, 3, 10, 8]}])  # fmt: skip
    val = split(root, "val")
    assert val.coco.anns[1]["area"] == 80 and val.coco.anns[1]["iscrowd"] == 0
    found = [{"image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "score": 0.9}]
    for backend in ("faster", "pycocotools"):
        assert coco_metrics(val.coco, found, backend=backend)["AP50"] == pytest.approx(100.0)


def test_an_iscrowd_that_is_not_0_or_1_is_named(tmp_path):
    root = make_coco(tmp_path / "coco", images(1), [box(1, 1, [2, 3, 10, 8], iscrowd="yes")])
    with pytest.raises(DataError) as info:
        split(root, "val")
    assert info.value.message.endswith("annotations[0].iscrowd is 'yes', expected 0 or 1.")
