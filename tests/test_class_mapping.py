"""One class list for every split: the training split's, or for `crosskd eval` the checkpoint's.

A validation json lacking a class is accepted with a warning (teacher, distill, the pair check
and eval); a category training never saw is an error naming it. Through the real CLI.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import read_meta
from crosskd_cli.cli import app
from crosskd_cli.data import load_splits, resolve_data
from crosskd_cli.distill.preset_checks import load_preset
from tests.conftest import make_coco

runner = CliRunner()
SMALL = [
    "--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.max_iters=2",
    "--set", "train.batch_size=2", "--set", "train.warmup_iters=1",
]  # fmt: skip
CATS = {3: "cat", 7: "dog", 11: "cow", 15: "bird"}


def categories(*ids: int) -> list[dict]:
    return [{"id": c, "name": CATS[c]} for c in ids]


def write_coco(root, train_cats: tuple[int, ...], val_cats: tuple[int, ...], val_names=None):
    """Six 64x48 images, one box each, cycling over the split's categories; the val json
    lists `val_cats` (named `val_names` when given) and labels its boxes with them."""
    images = [{"id": k, "file_name": f"{k}.png", "width": 64, "height": 48} for k in range(1, 7)]

    def boxes(cats):
        return [
            {"id": k, "image_id": k, "category_id": cats[k % len(cats)], "bbox": [4, 4, 30, 24]}
            for k in range(1, 7)
        ]

    make_coco(root, images, boxes(train_cats), categories(*train_cats))
    val = categories(*val_cats)
    for entry, name in zip(val, val_names or [], strict=False):
        entry["name"] = name
    payload = {"images": images, "annotations": boxes(val_cats), "categories": val}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    return root


def run(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, " ".join(result.output.split())  # unwrapped


@pytest.fixture(scope="module")
def val_lacks_dog(tmp_path_factory):
    """Training lists cat, dog, cow (3, 7, 11); validation only cat and cow."""
    return write_coco(tmp_path_factory.mktemp("lacks") / "coco", (3, 7, 11), (3, 11))


@pytest.fixture(scope="module")
def teacher(val_lacks_dog, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    code, output = run(
        "teacher", "--preset", "shapes-gfl-r18", "--data", str(val_lacks_dog), *SMALL,
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    return out / "best.safetensors", output


def test_the_validation_split_is_labelled_with_the_training_splits_classes(val_lacks_dog):
    splits = load_splits(load_preset("shapes-gfl-r18", []).data, resolve_data(str(val_lacks_dog)))
    assert splits.category_ids == [3, 7, 11] and splits.class_names == ["cat", "dog", "cow"]
    assert splits.val.category_ids == [3, 7, 11]
    _, target = splits.val[2]  # image 2's box is a cow (11): label 2 in both splits
    assert target.labels.tolist() == [2]
    assert splits.val.missing_classes == [7]


def test_teacher_trains_every_training_class_and_warns_of_the_one_val_lacks(teacher):
    checkpoint, output = teacher
    assert "Warning:" in output and "has no category 7 'dog' of the 3 classes of the " in output
    assert "detections of it are not scored" in output
    meta = read_meta(checkpoint)
    assert meta.category_ids == [3, 7, 11] and meta.class_names == ["cat", "dog", "cow"]
    assert meta.model.num_classes == 3


def test_eval_accepts_data_lacking_a_class_with_the_same_warning(teacher, tmp_path):
    checkpoint, _ = teacher
    code, output = run("eval", str(checkpoint), "--out", str(tmp_path / "e"))
    assert code == 0, output
    assert "has no category 7 'dog' of the 3 classes of checkpoint best.safetensors" in output
    predictions = json.loads((tmp_path / "e" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {3, 11}  # only what can be scored
    measured = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert measured["AP"] == read_meta(checkpoint).metrics["AP"]


def test_distill_and_its_pair_check_accept_the_same_data(teacher, val_lacks_dog, tmp_path):
    checkpoint, _ = teacher
    code, output = run(
        "distill", "--preset", "shapes-gfl-r50-to-r18", "--data", str(val_lacks_dog), *SMALL,
        "--set", "model.backbone=resnet18", "--other-teacher", "--teacher", str(checkpoint),
        "--out", str(tmp_path / "student"),
    )  # fmt: skip
    assert code == 0, output
    assert "has no category 7 'dog'" in output
    assert read_meta(tmp_path / "student" / "best.safetensors").category_ids == [3, 7, 11]


def test_a_validation_category_training_never_saw_is_an_error_naming_it(tmp_path):
    data = write_coco(tmp_path / "coco", (3, 7), (3, 7, 15))
    code, output = run("teacher", "--preset", "shapes-gfl-r18", "--data", str(data), *SMALL,
                       "--out", str(tmp_path / "t"))  # fmt: skip
    assert code == 2
    assert "Category 15 'bird' of " in output
    assert "instances_val2017.json is not among the 2 " in output
    assert "classes of the training split " in output and "(3 'cat', 7 'dog')" in output
    assert "list every validation category in the training json too" in output
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").glob("*.safetensors"))


def test_eval_refuses_data_with_a_class_the_checkpoint_does_not_predict(teacher, tmp_path):
    checkpoint, _ = teacher
    data = write_coco(tmp_path / "coco", (3, 11, 15), (3, 11, 15))
    code, output = run("eval", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "e"))
    assert code == 2
    assert "Category 15 'bird' of " in output
    assert "is not among the 3 classes of checkpoint best.safetensors" in output
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_eval_refuses_a_category_id_that_names_another_class(teacher, tmp_path):
    checkpoint, _ = teacher
    data = write_coco(tmp_path / "coco", (3, 11), (3, 11), val_names=["cat", "horse"])
    code, output = run("eval", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "e"))
    assert code == 2
    assert "Category 11 is 'horse' in " in output and "but 'cow' in checkpoint" in output
