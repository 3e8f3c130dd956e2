"""The built-in data set: COCO splits, deterministic, cached, regenerated when damaged."""

from __future__ import annotations

import os

import pytest
from pycocotools.coco import COCO

from crosskd_cli.data import builtin_cache_dir, resolve_data
from crosskd_cli.data.builtin import CATEGORY_IDS, ShapesParams, parse_params
from crosskd_cli.errors import DataError

SMALL = "builtin:shapes:images=12,val=6,size=96"


def test_builtin_shapes_is_a_coco_data_set_with_the_promised_splits_and_classes():
    source = resolve_data(SMALL)
    train, val = COCO(str(source.train_ann)), COCO(str(source.val_ann))
    assert len(train.getImgIds()) == 12 and len(val.getImgIds()) == 6
    assert len(os.listdir(source.train_images)) == 12
    assert sorted(train.getCatIds()) == CATEGORY_IDS and len(CATEGORY_IDS) >= 8
    assert "red_circle" in [c["name"] for c in train.loadCats(train.getCatIds())]
    per_image = [len(train.getAnnIds(imgIds=[i])) for i in train.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) >= 4
    # object side (the square root of the box area) runs from 8 px to half the image
    sides = [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in train.loadAnns(train.getAnnIds())]
    assert 8 - 0.1 <= min(sides) and max(sides) <= 48 + 0.1


def test_the_same_seed_gives_identical_files_and_another_seed_differs():
    first = resolve_data(SMALL).train_ann.read_bytes()
    again = resolve_data(SMALL).train_ann.read_bytes()
    other = resolve_data(SMALL + ",seed=1").train_ann.read_bytes()
    assert first == again and first != other


def test_parameters_parse_from_the_shell_safe_form():
    assert parse_params("seed=3,images=20") == ShapesParams(seed=3, images=20)
    assert parse_params("") == ShapesParams()


def test_unknown_or_bad_parameters_are_named():
    with pytest.raises(DataError) as info:
        resolve_data("builtin:shapes:colour=3")
    assert info.value.message == "builtin:shapes has no parameter 'colour'."
    assert "difficulty, images, seed, size, val" in info.value.hint
    with pytest.raises(DataError, match="seed='x' is not an integer"):
        resolve_data("builtin:shapes:seed=x")
    with pytest.raises(DataError, match="Built-in data set 'cars' does not exist"):
        resolve_data("builtin:cars")


def test_the_cache_is_reused_and_lives_under_crosskd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path))
    source = resolve_data(SMALL)
    assert builtin_cache_dir() == tmp_path / "builtin"
    assert source.val_ann.is_relative_to(tmp_path)
    stamp = source.val_ann.stat().st_mtime_ns
    resolve_data(SMALL)
    assert source.val_ann.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["delete an image", "truncate the json"])
def test_a_damaged_cache_is_detected_and_regenerated(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path))
    source = resolve_data(SMALL)
    original = source.val_ann.read_bytes()
    if damage == "delete an image":
        next(source.val_images.iterdir()).unlink()
    else:
        source.val_ann.write_bytes(original[:100])
    again = resolve_data(SMALL)
    assert again.val_ann.read_bytes() == original
    assert len(os.listdir(again.val_images)) == 6
