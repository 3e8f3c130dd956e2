"""The built-in data set: COCO splits, deterministic, cached, regenerated when damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from crosskd_cli.data import CocoDetection, builtin_cache_dir, resolve_data
from crosskd_cli.data.builtin import CATEGORY_IDS, ShapesParams, cache_root, parse_params
from crosskd_cli.errors import DataError

SMALL = "builtin:shapes:images=16,val=8,size=96"


def test_builtin_shapes_is_a_coco_data_set_with_the_promised_splits_and_classes():
    source = resolve_data(SMALL)
    train, val = COCO(str(source.train_ann)), COCO(str(source.val_ann))
    assert len(train.getImgIds()) == 16 and len(val.getImgIds()) == 8
    assert len(os.listdir(source.train_images)) == 16 and len(os.listdir(source.val_images)) == 8
    assert sorted(train.getCatIds()) == [1, 2, 3, 5, 7, 8, 11, 13, 17, 19]  # not contiguous
    names = [c["name"] for c in train.loadCats(train.getCatIds())]
    assert names[:4] == ["red_circle", "blue_circle", "green_square", "red_square"]
    per_image = [len(train.getAnnIds(imgIds=[i])) for i in train.getImgIds()]
    assert min(per_image) >= 2 and max(per_image) >= 5


def test_builtin_boxes_are_coco_xywh_inside_images_of_the_recorded_size():
    source = resolve_data(SMALL)
    data = json.loads(source.train_ann.read_text())
    sizes = {}
    for info in data["images"]:
        with Image.open(source.train_images / info["file_name"]) as picture:
            assert picture.size == (info["width"], info["height"])
        assert sorted((info["width"], info["height"])) in ([72, 96], [96, 96])
        sizes[info["id"]] = (info["width"], info["height"])
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        assert ann["area"] == pytest.approx(w * h, abs=0.01) and ann["iscrowd"] == 0
        assert 8 - 0.01 <= (w * h) ** 0.5 <= min(width, height) / 2 + 0.01  # 8 px .. half


def test_builtin_data_loads_through_the_dataset_with_contiguous_labels():
    source = resolve_data(SMALL)
    dataset = CocoDetection(source.val_ann, source.val_images, train=False, scale=(96, 96))
    assert dataset.category_ids == CATEGORY_IDS and len(dataset.class_names) == 10
    labels = {int(label) for k in range(len(dataset)) for label in dataset[k][1].labels}
    assert labels <= set(range(10)) and len(labels) >= 5


def test_the_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    first = resolve_data(SMALL, cache_dir=tmp_path / "a")
    again = resolve_data(SMALL, cache_dir=tmp_path / "b")
    other = resolve_data(SMALL + ",seed=1", cache_dir=tmp_path / "a")
    assert first.train_ann != again.train_ann
    assert first.train_ann.read_bytes() == again.train_ann.read_bytes()
    assert first.val_ann.read_bytes() == again.val_ann.read_bytes()
    image = "000001.jpg"
    assert (first.val_images / image).read_bytes() == (again.val_images / image).read_bytes()
    assert first.train_ann.read_bytes() != other.train_ann.read_bytes()


def test_an_image_does_not_depend_on_how_many_images_are_asked_for(tmp_path):
    few = resolve_data("builtin:shapes:images=2,val=1,size=96", cache_dir=tmp_path)
    many = resolve_data(SMALL, cache_dir=tmp_path)
    for split in ("train_images", "val_images"):
        image = getattr(few, split) / "000001.jpg"
        assert image.read_bytes() == (getattr(many, split) / "000001.jpg").read_bytes()


def test_parameters_parse_from_the_shell_safe_form():
    source = resolve_data("builtin:shapes:seed=3,images=20,val=4,size=64")
    assert source.spec == "builtin:shapes:seed=3,images=20,val=4,size=64"
    assert len(os.listdir(source.train_images)) == 20
    assert parse_params("seed=3,images=20") == ShapesParams(seed=3, images=20)
    assert parse_params("difficulty=hard") == ShapesParams(difficulty=2)
    assert parse_params("") == ShapesParams(seed=0, images=800, val=200, size=160, difficulty=1)


def test_an_unknown_parameter_is_named_and_the_valid_ones_listed():
    with pytest.raises(DataError) as info:
        resolve_data("builtin:shapes:seed=3,colour=3")
    assert info.value.message == "builtin:shapes has no parameter 'colour'."
    assert "seed=0, images=800, val=200, size=160, difficulty=1" in info.value.hint


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ("seed=x", "builtin:shapes parameter seed='x' is not an integer."),
        ("difficulty=brutal", "builtin:shapes parameter difficulty='brutal' is not an integer "),
        ("size=16", "builtin:shapes parameter size=16 is out of range 64..2048."),
        # a checkpoint's recorded spec must not start hours of generation
        ("size=4096", "builtin:shapes parameter size=4096 is out of range 64..2048."),
        ("images=1000000", "builtin:shapes parameter images=1000000 is out of range 1..200000."),
        ("images", "builtin:shapes parameter 'images' has no value."),
        ("seed=1,seed=2", "builtin:shapes parameter 'seed' is given twice."),
    ],
)
def test_an_ill_typed_parameter_is_named_with_its_value(knobs, message):
    with pytest.raises(DataError) as info:
        resolve_data(f"builtin:shapes:{knobs}")
    assert info.value.message.startswith(message)


def test_an_unknown_builtin_data_set_lists_the_existing_ones():
    with pytest.raises(DataError) as info:
        resolve_data("builtin:cars")
    assert info.value.message == "Built-in data set 'cars' does not exist."
    assert info.value.hint.startswith("Built-in data sets: builtin:shapes ")


def test_generation_reports_progress_and_a_second_call_reuses_the_cache(tmp_path):
    calls = []
    source = resolve_data(SMALL, cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    assert calls[0] == (1, 24) and calls[-1] == (24, 24) and len(calls) == 24
    stamp = source.val_ann.stat().st_mtime_ns
    calls.clear()
    assert resolve_data(SMALL, cache_dir=tmp_path, progress=lambda *a: calls.append(a)) == source
    assert calls == [] and source.val_ann.stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == ["shapes-v2-seed0-images16-val8-size96-difficulty1"]


def damage(source, how: str) -> None:
    if how == "delete an image":
        (source.val_images / "000003.jpg").unlink()
    elif how == "truncate an image":
        image = source.train_images / "000003.jpg"
        image.write_bytes(image.read_bytes()[:100])
    elif how == "truncate the json":
        source.val_ann.write_bytes(source.val_ann.read_bytes()[:100])
    else:  # interrupted before the manifest, which is written last
        (source.val_ann.parent.parent / "manifest.json").unlink()


@pytest.mark.parametrize(
    "how", ["delete an image", "truncate an image", "truncate the json", "lose the manifest"]
)
def test_a_damaged_cache_is_detected_and_regenerated(tmp_path, how):
    source = resolve_data(SMALL, cache_dir=tmp_path)
    originals = {p: p.read_bytes() for p in source.val_ann.parent.parent.rglob("*") if p.is_file()}
    damage(source, how)
    assert resolve_data(SMALL, cache_dir=tmp_path) == source
    now = {p: p.read_bytes() for p in source.val_ann.parent.parent.rglob("*") if p.is_file()}
    assert now == originals
    assert len(os.listdir(tmp_path)) == 1  # no temporary or stale folder left behind


def test_the_cache_lives_under_crosskd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path))
    source = resolve_data(SMALL)
    assert builtin_cache_dir() == tmp_path / "builtin"
    assert source.val_ann.is_relative_to(tmp_path / "builtin")


def test_without_crosskd_cache_the_xdg_cache_and_then_home_are_used(monkeypatch):
    monkeypatch.delenv("CROSSKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_root() == Path("/xdg/crosskd")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert cache_root() == Path("/home/someone/.cache/crosskd")


def test_an_unwritable_cache_is_named_with_a_way_out(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError) as info:
        resolve_data(SMALL, cache_dir=tmp_path / "file" / "cache")
    assert info.value.message == (
        f"Cannot write the built-in data set to {tmp_path / 'file' / 'cache'} (Not a directory)."
    )
    assert "CROSSKD_CACHE" in info.value.hint
