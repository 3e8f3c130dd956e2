"""COCO-format data: layout, label mapping, box hygiene, decoding, batching and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from crosskd_cli.data import CocoDetection, build_loader, collate, resolve_data
from crosskd_cli.data.transforms import build_transforms, keep_ratio_size
from crosskd_cli.detection.structures import Target
from crosskd_cli.errors import DataError
from tests.conftest import make_coco, write_image


def val_split(root, **kwargs) -> CocoDetection:
    source = resolve_data(str(root))
    return CocoDetection(source.val_ann, source.val_images, train=False, **kwargs)


def train_split(root, **kwargs) -> CocoDetection:
    source = resolve_data(str(root))
    return CocoDetection(source.train_ann, source.train_images, train=True, **kwargs)


def edit_val_json(root, edit) -> str:
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return str(ann)


# ----------------------------------------------------------------------------- --data


def test_a_coco_folder_resolves_to_its_four_paths_and_records_its_absolute_path(
    tiny_coco, monkeypatch
):
    monkeypatch.chdir(tiny_coco.parent)
    source = resolve_data("coco")
    assert source.spec == str(tiny_coco)
    assert source.train_ann == tiny_coco / "annotations" / "instances_train2017.json"
    assert source.train_images == tiny_coco / "train2017"
    assert source.val_ann == tiny_coco / "annotations" / "instances_val2017.json"
    assert source.val_images == tiny_coco / "val2017"


def test_a_folder_with_only_the_val_split_serves_evaluation(tiny_coco):
    (tiny_coco / "annotations" / "instances_train2017.json").unlink()
    source = resolve_data(str(tiny_coco))
    assert source.train_ann is None and source.train_images is None
    assert source.val_images == tiny_coco / "val2017"


def test_a_missing_folder_is_named_with_the_expected_layout(tmp_path):
    with pytest.raises(DataError) as info:
        resolve_data(str(tmp_path / "nope"))
    assert info.value.message == f"Data folder {tmp_path / 'nope'} does not exist."
    assert "annotations/instances_{train,val}2017.json, train2017/ and val2017/" in info.value.hint


def test_a_folder_without_the_val_json_names_the_missing_file(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DataError) as info:
        resolve_data(str(tmp_path))
    ann = tmp_path / "annotations" / "instances_val2017.json"
    assert info.value.message == f"{tmp_path} is not a COCO-layout folder: {ann} is missing."


def test_explicit_paths_are_recorded_so_the_spec_resolves_to_them_again(tiny_coco):
    source = resolve_data(
        None,
        val_ann=tiny_coco / "annotations" / "instances_val2017.json",
        val_images=tiny_coco / "val2017",
    )
    assert source.train_ann is None and source.train_images is None
    assert source.spec.startswith("custom:")
    assert resolve_data(source.spec) == source


def test_an_explicit_path_that_does_not_exist_is_named(tiny_coco):
    with pytest.raises(DataError) as info:
        resolve_data(None, val_ann=tiny_coco / "val.json", val_images=tiny_coco / "val2017")
    assert info.value.message == f"{tiny_coco / 'val.json'} does not exist or is not a file."


def test_train_annotations_without_train_images_are_refused(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_val2017.json"
    with pytest.raises(DataError, match="--train-ann and --train-images go together"):
        resolve_data(None, train_ann=ann, val_ann=ann, val_images=tiny_coco / "val2017")


def test_data_and_explicit_paths_together_are_refused(tiny_coco):
    with pytest.raises(DataError, match="were both given"):
        resolve_data(str(tiny_coco), val_ann=tiny_coco / "annotations")


def test_no_data_at_all_says_how_to_give_some():
    with pytest.raises(DataError, match="^No data given") as info:
        resolve_data(None)
    assert "--data builtin:shapes" in info.value.hint


# ----------------------------------------------------------------------------- bad json


def test_a_json_without_categories_names_the_missing_key(tiny_coco):
    ann = edit_val_json(tiny_coco, lambda data: data.pop("categories"))
    with pytest.raises(DataError) as info:
        val_split(tiny_coco)
    assert info.value.message == f"{ann} is not COCO: missing key 'categories'."


def test_an_entry_without_a_required_field_is_named(tiny_coco):
    ann = edit_val_json(tiny_coco, lambda data: data["annotations"][1].pop("bbox"))
    with pytest.raises(DataError) as info:
        val_split(tiny_coco)
    assert info.value.message == f"{ann} is not COCO: annotations[1] has no 'bbox'."


def test_an_ill_formed_bbox_is_named_with_its_value(tiny_coco):
    ann = edit_val_json(tiny_coco, lambda data: data["annotations"][2].update(bbox=[1, 2, 3]))
    with pytest.raises(DataError) as info:
        val_split(tiny_coco)
    assert info.value.message == (
        f"{ann} is not COCO: annotations[2].bbox is [1, 2, 3], expected [x, y, width, height]."
    )


def test_an_annotation_of_an_unlisted_category_is_named(tiny_coco):
    ann = edit_val_json(tiny_coco, lambda data: data["annotations"][0].update(category_id=4))
    with pytest.raises(DataError) as info:
        val_split(tiny_coco)
    assert info.value.message == (
        f"{ann} is not COCO: annotations[0].category_id is 4, which is not in 'categories'."
    )


# ----------------------------------------------------------------------------- image files


def test_an_annotation_pointing_at_a_missing_image_names_the_file(tmp_path):
    images = [{"id": 1, "file_name": "gone.png", "width": 10, "height": 10, "_missing": True}]
    root = make_coco(tmp_path / "c", images, [])
    with pytest.raises(DataError) as info:
        val_split(root)
    assert info.value.message == (
        f"Image {root / 'val2017' / 'gone.png'} named in "
        f"{root / 'annotations' / 'instances_val2017.json'} does not exist."
    )


def test_a_truncated_jpeg_is_named_or_skipped_and_counted(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
    ]
    root = make_coco(tmp_path / "c", images, [])
    bad = root / "val2017" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    with pytest.raises(DataError) as info:
        val_split(root)[0]
    assert info.value.message == f"Image {bad} cannot be read (Image is incomplete or truncated)."
    assert "--skip-bad-images" in info.value.hint
    skipping = val_split(root, skip_bad_images=True)
    assert skipping[0][1].image_id == 2 and skipping[1][1].image_id == 2
    assert skipping.num_skipped == 1


def test_grayscale_and_rgba_images_become_three_channel_rgb(tmp_path):
    images = [
        {"id": 1, "file_name": "g.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "r.png", "width": 20, "height": 10},
    ]
    root = make_coco(tmp_path / "c", images, [])
    write_image(root / "val2017" / "g.png", (20, 10), mode="L")
    write_image(root / "val2017" / "r.png", (20, 10), mode="RGBA")
    dataset = val_split(root, scale=(20, 10))
    gray, rgba = dataset[0][0], dataset[1][0]
    assert gray.shape == rgba.shape == (3, 10, 20)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_exif_orientation_is_applied_so_width_and_height_swap(tmp_path):
    images = [{"id": 1, "file_name": "e.jpg", "width": 30, "height": 20}]
    root = make_coco(tmp_path / "c", images, [])
    stored = Image.new("RGB", (20, 30), (0, 0, 255))  # portrait as stored: top red, bottom blue
    stored.paste((255, 0, 0), (0, 0, 20, 15))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored top ends up on the right
    stored.save(root / "val2017" / "e.jpg", exif=exif.tobytes(), quality=95)
    image, target = val_split(root, scale=(30, 20))[0]
    assert image.shape == (3, 20, 30) and target.orig_size == (20, 30)
    assert image[0, 10, 25] > 200 and image[2, 10, 25] < 50  # right half red
    assert image[2, 10, 5] > 200 and image[0, 10, 5] < 50  # left half blue


def test_formats_torchvision_cannot_decode_are_read_through_pillow(tmp_path):
    images = [{"id": 1, "file_name": "p.bmp", "width": 20, "height": 10}]
    root = make_coco(tmp_path / "c", images, [])
    expected = torch.from_numpy(np.array(Image.open(root / "val2017" / "p.bmp")))
    image, _ = val_split(root, scale=(20, 10))[0]
    assert torch.equal(image, expected.permute(2, 0, 1))


# ----------------------------------------------------------------------------- targets


def test_labels_are_contiguous_and_map_back_to_the_original_category_ids(tiny_coco):
    dataset = val_split(tiny_coco, scale=(40, 30))
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["cat", "dog"]
    _, target = dataset[0]
    assert target.labels.tolist() == [0, 1] and target.labels.dtype == torch.int64
    assert [dataset.category_ids[k] for k in target.labels.tolist()] == [3, 7]


def test_boxes_reaching_past_the_image_are_clipped_to_it(tiny_coco):
    image, target = val_split(tiny_coco, scale=(40, 30))[0]  # 40x30 fits exactly: no resize
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    # [30, 20, 20, 20] xywh reaches x = 50, y = 40 on a 40x30 image: clipped to (40, 30).
    assert target.boxes.tolist()[1] == [30.0, 20.0, 40.0, 30.0]
    assert target.boxes.dtype == torch.float32


def test_zero_area_boxes_are_dropped(tiny_coco):
    _, target = val_split(tiny_coco, scale=(40, 30))[0]
    assert [8.0, 8.0, 8.0, 13.0] not in target.boxes.tolist() and len(target.boxes) == 2


def test_crowd_boxes_never_become_targets(tiny_coco):
    _, target = val_split(tiny_coco, scale=(40, 30))[0]
    assert target.boxes.tolist() == [[2.0, 3.0, 12.0, 11.0], [30.0, 20.0, 40.0, 30.0]]


def test_boxes_under_one_pixel_after_resizing_are_dropped_and_their_image_left_out_of_training(
    tmp_path,
):
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20]},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1.5, 20]},  # 0.75 px at 1/2
    ]
    root = make_coco(tmp_path / "c", images, annotations)
    assert train_split(root, scale=(20, 15)).image_ids == [1]
    _, target = val_split(root, scale=(20, 15))[1]
    assert target.boxes.shape == (0, 4) and target.labels.shape == (0,)


def test_empty_images_are_kept_for_eval_and_skipped_for_training(tiny_coco):
    assert val_split(tiny_coco).image_ids == [1, 2]
    assert train_split(tiny_coco).image_ids == [1]
    _, target = val_split(tiny_coco)[1]
    assert target.image_id == 2 and target.boxes.shape == (0, 4)


def test_keep_ratio_resize_fits_the_scale_mmdetection_style():
    assert keep_ratio_size(480, 640, (1333, 800)) == (800, 1067)
    assert keep_ratio_size(427, 640, (1333, 800)) == (800, 1199)
    assert keep_ratio_size(1000, 200, (1333, 800)) == (1333, 267)  # the long side limits
    assert keep_ratio_size(1000, 200, (800, 1333)) == (1333, 267)


def test_resizing_scales_image_and_boxes_and_records_the_factors(tiny_coco):
    image, target = val_split(tiny_coco, scale=(100, 60))[0]  # 40x30 -> 80x60: factor 2
    assert image.shape == (3, 60, 80)
    assert target.scale == (2.0, 2.0) and target.orig_size == (30, 40)
    assert target.boxes.tolist() == [[4.0, 6.0, 24.0, 22.0], [60.0, 40.0, 80.0, 60.0]]


def test_horizontal_flip_mirrors_image_and_boxes_when_training(tiny_coco):
    image, target = train_split(tiny_coco, scale=(40, 30), flip_prob=1.0)[0]
    plain = val_split(tiny_coco, scale=(40, 30))[0][0]
    assert torch.equal(image, plain.flip(-1))
    assert target.boxes.tolist() == [[28.0, 3.0, 38.0, 11.0], [0.0, 20.0, 10.0, 30.0]]


def test_evaluation_never_flips(tiny_coco):
    dataset = val_split(tiny_coco, scale=(40, 30), flip_prob=1.0)
    assert dataset[0][1].boxes.tolist()[0] == [2.0, 3.0, 12.0, 11.0]


def test_random_flips_depend_on_seed_epoch_and_index_alone(tiny_coco):
    dataset = train_split(tiny_coco, scale=(40, 30), flip_prob=0.5)

    def flips(seed: int) -> list[float]:
        drawn = []
        for epoch in range(12):
            dataset.set_epoch(epoch, seed)
            torch.manual_seed(epoch)  # the global stream plays no part
            drawn.append(dataset[0][1].boxes[0, 0].item())
        return drawn

    assert flips(0) == flips(0) and set(flips(0)) == {2.0, 28.0}
    assert flips(0) != flips(1)
    dataset.set_epoch(3, 0)
    assert dataset[0][1].boxes.tolist() == dataset[0][1].boxes.tolist()  # same epoch, same draw


def test_multi_scale_training_draws_each_short_side_from_the_range(tiny_coco):
    dataset = train_split(tiny_coco, scale=(400, 300), flip_prob=0.0, short_sides=(15, 60))

    def draws(seed: int) -> list[tuple[int, float]]:
        samples = []
        for epoch in range(40):
            dataset.set_epoch(epoch, seed)
            samples.append(dataset[0])
        return [(image.shape[-2], target.boxes[0, 2].item()) for image, target in samples]

    heights = [h for h, _ in draws(0)]  # the 40x30 image: its height is the short side
    assert draws(0) == draws(0) and min(heights) >= 15 and max(heights) <= 60
    assert len(set(heights)) > 10
    for height, x2 in draws(1):  # the box (x2 = 12 px originally) scales with its image
        assert x2 == pytest.approx(12 * int(40 * height / 30 + 0.5) / 40, abs=1e-4)
    evaluation = CocoDetection(
        tiny_coco / "annotations" / "instances_val2017.json",
        tiny_coco / "val2017",
        train=False,
        scale=(400, 300),
        short_sides=(15, 60),
    )
    assert {evaluation[0][0].shape[-2] for _ in range(5)} == {300}  # evaluation: one scale


def test_a_multi_scale_range_upside_down_is_named():
    with pytest.raises(DataError, match=r"data.train_short_sides \[800, 640\] is not a range"):
        build_transforms(True, (1333, 800), 0.5, short_sides=(800, 640))


def test_iterating_a_dataset_stops_at_its_end(tiny_coco):
    assert [target.image_id for _, target in val_split(tiny_coco)] == [1, 2]


# ----------------------------------------------------------------------------- batching


def test_collate_pads_to_a_multiple_of_32_and_records_unpadded_sizes():
    def sample(h: int, w: int, image_id: int):
        image = torch.full((3, h, w), 7, dtype=torch.uint8)
        boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        return image, Target(boxes, labels, image_id, (h, w), (1.0, 1.0))

    batch = collate([sample(30, 40, 1), sample(50, 20, 2)])
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(30, 40), (50, 20)]
    assert batch.images[0, :, :30, :40].eq(7).all() and batch.images[1, :, :50, :20].eq(7).all()
    assert int(batch.images.sum()) == 7 * 3 * (30 * 40 + 50 * 20)  # the rest is zero padding
    assert [t.image_id for t in batch.targets] == [1, 2]


def test_the_loader_order_is_reproducible_per_seed(tmp_path):
    images = [{"id": k, "file_name": f"{k}.png", "width": 8, "height": 8} for k in range(1, 11)]
    dataset = val_split(make_coco(tmp_path / "c", images, []))

    def order(seed: int) -> list[int]:
        loader = build_loader(dataset, batch_size=5, shuffle=True, seed=seed)
        return [t.image_id for batch in loader for t in batch.targets]

    assert order(1) == order(1) and sorted(order(1)) == list(range(1, 11))
    assert order(1) != order(2)
