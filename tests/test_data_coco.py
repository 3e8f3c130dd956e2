"""COCO-format data: layout, label mapping, box hygiene, image decoding and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from crosskd_cli.data import CocoDetection, collate, resolve_data
from crosskd_cli.data.transforms import keep_ratio_size
from crosskd_cli.errors import DataError
from tests.conftest import make_coco, write_image


def val_split(root, **kwargs):
    source = resolve_data(str(root))
    return CocoDetection(source.val_ann, source.val_images, train=False, **kwargs)


def test_a_coco_folder_resolves_to_its_four_paths(tiny_coco):
    source = resolve_data(str(tiny_coco))
    assert source.train_ann == tiny_coco / "annotations" / "instances_train2017.json"
    assert source.val_images == tiny_coco / "val2017"
    assert source.spec == str(tiny_coco)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError) as info:
        resolve_data(str(tmp_path / "nope"))
    assert info.value.message == f"Data folder {tmp_path / 'nope'} does not exist."


def test_folder_without_the_val_json_names_the_missing_file(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DataError) as info:
        resolve_data(str(tmp_path))
    assert "instances_val2017.json is missing" in info.value.message
    assert "annotations/instances_{train,val}2017.json" in info.value.hint


def test_json_that_is_not_coco_names_the_missing_key(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    del data["categories"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        val_split(tiny_coco)
    assert info.value.message == f"{ann} is not COCO: missing key 'categories'."


def test_an_entry_without_a_required_field_is_named(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    del data["annotations"][1]["bbox"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[1\] has no 'bbox'"):
        val_split(tiny_coco)


def test_annotation_pointing_at_a_missing_image_names_the_file(tmp_path):
    images = [{"id": 1, "file_name": "gone.png", "width": 10, "height": 10, "_missing": True}]
    root = make_coco(tmp_path / "c", images, [])
    with pytest.raises(DataError) as info:
        val_split(root)
    assert info.value.message == (
        f"Image {root / 'val2017' / 'gone.png'} named in "
        f"{root / 'annotations' / 'instances_val2017.json'} does not exist."
    )


def test_truncated_image_names_the_file_or_is_skipped_and_counted(tiny_coco):
    for split in ("val2017",):
        path = tiny_coco / split / "a.png"
        path.write_bytes(path.read_bytes()[:60])
    dataset = val_split(tiny_coco)
    with pytest.raises(DataError) as info:
        dataset[0]
    assert f"Image {tiny_coco / 'val2017' / 'a.png'} cannot be read" in info.value.message
    assert "--skip-bad-images" in info.value.hint
    skipping = val_split(tiny_coco, skip_bad_images=True)
    _, target = skipping[0]
    assert target.image_id == 2 and skipping.num_skipped == 1


def test_labels_are_contiguous_and_map_back_to_the_original_category_ids(tiny_coco):
    dataset = val_split(tiny_coco)
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["cat", "dog"]
    _, target = dataset[0]
    assert target.labels.tolist() == [0, 1]
    assert [dataset.category_ids[k] for k in target.labels.tolist()] == [3, 7]


def test_boxes_are_clipped_crowd_and_zero_area_boxes_dropped(tiny_coco):
    dataset = val_split(tiny_coco, scale=(40, 30))  # 40x30 fits exactly: no resize
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    # [30, 20, 20, 20] reaches past the 40x30 image: clipped to x1 = 40, y1 = 30;
    # the crowd box and the zero-width box are gone.
    assert target.boxes.tolist() == [[2.0, 3.0, 12.0, 11.0], [30.0, 20.0, 40.0, 30.0]]


def test_empty_images_are_kept_for_eval_and_skipped_for_training(tiny_coco):
    source = resolve_data(str(tiny_coco))
    assert len(CocoDetection(source.val_ann, source.val_images, train=False)) == 2
    train = CocoDetection(source.train_ann, source.train_images, train=True)
    assert train.image_ids == [1]


def test_grayscale_and_rgba_images_become_three_channel_rgb(tmp_path):
    images = [
        {"id": 1, "file_name": "g.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "r.png", "width": 20, "height": 10},
    ]
    root = make_coco(tmp_path / "c", images, [])
    write_image(root / "val2017" / "g.png", (20, 10), mode="L")
    write_image(root / "val2017" / "r.png", (20, 10), mode="RGBA")
    dataset = val_split(root, scale=(20, 10))
    assert [tuple(dataset[k][0].shape) for k in range(2)] == [(3, 10, 20), (3, 10, 20)]


def test_exif_orientation_is_respected(tmp_path):
    images = [{"id": 1, "file_name": "e.jpg", "width": 30, "height": 20}]
    root = make_coco(tmp_path / "c", images, [])
    picture = Image.new("RGB", (20, 30), (200, 10, 10))  # stored portrait, shown landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    picture.save(root / "val2017" / "e.jpg", exif=exif.tobytes())
    image, _ = val_split(root, scale=(30, 20))[0]
    assert tuple(image.shape) == (3, 20, 30)


def test_keep_ratio_resize_fits_the_scale_and_scales_the_boxes(tiny_coco):
    assert keep_ratio_size(480, 640, (1333, 800)) == (800, 1067)
    assert keep_ratio_size(30, 40, (1333, 800)) == (800, 1067)
    image, target = val_split(tiny_coco, scale=(80, 60))[0]
    assert tuple(image.shape) == (3, 60, 80)
    assert target.scale == (2.0, 2.0) and target.orig_size == (30, 40)
    assert target.boxes.tolist()[0] == [4.0, 6.0, 24.0, 22.0]


def test_horizontal_flip_mirrors_the_boxes(tiny_coco):
    source = resolve_data(str(tiny_coco))
    dataset = CocoDetection(
        source.train_ann, source.train_images, train=True, scale=(40, 30), flip_prob=1.0
    )
    image, target = dataset[0]
    plain = val_split(tiny_coco, scale=(40, 30))[0][0]
    assert torch.equal(image, plain.flip(-1))
    assert target.boxes.tolist() == [[28.0, 3.0, 38.0, 11.0], [0.0, 20.0, 10.0, 30.0]]


def test_collate_pads_to_a_multiple_of_32_and_records_unpadded_sizes(tiny_coco):
    dataset = val_split(tiny_coco, scale=(40, 30))
    batch = collate([dataset[0], dataset[1]])
    assert tuple(batch.images.shape) == (2, 3, 32, 64)
    assert batch.image_sizes == [(30, 40), (30, 40)]
    assert batch.images[:, :, 30:, :].eq(0).all() and batch.images[:, :, :, 40:].eq(0).all()


def test_custom_paths_are_recorded_so_they_resolve_again(tiny_coco):
    source = resolve_data(
        None,
        val_ann=tiny_coco / "annotations" / "instances_val2017.json",
        val_images=tiny_coco / "val2017",
    )
    assert source.train_ann is None
    assert resolve_data(source.spec) == source


def test_no_data_at_all_says_how_to_give_some():
    with pytest.raises(DataError, match="No data given") as info:
        resolve_data(None)
    assert "builtin:shapes" in info.value.hint
