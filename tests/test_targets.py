"""Anchors, valid mask, flatten order, ATSS assignment and GFL box coding, on hand-made cases."""

from __future__ import annotations

import torch

from crosskd_cli.detection.box_ops import (
    aligned_box_iou,
    bbox_to_distance,
    distance_to_bbox,
    integral,
)
from crosskd_cli.detection.priors import AnchorGrid, flatten_levels
from crosskd_cli.detection.structures import Target
from crosskd_cli.detection.targets import (
    NEGATIVE,
    OUT_OF_IMAGE,
    atss_assign,
    build_targets,
    pad_targets,
)


def target(boxes: list[list[float]], labels: list[int]) -> Target:
    return Target(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        image_id=0,
        orig_size=(0, 0),
        scale=(1.0, 1.0),
    )


def test_anchors_are_squares_of_side_8_strides_centred_on_multiples_of_the_stride():
    anchors = AnchorGrid((8, 16), octave_base_scale=8)([(2, 3), (1, 2)])
    # level 0 (2 rows x 3 cols, stride 8): row-major, x fastest; side 64, half-side 32
    # level 1 (1 row x 2 cols, stride 16): side 128, half-side 64
    expected_centres = [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0], [16, 0]]
    assert anchors.centers.tolist() == expected_centres
    assert anchors.boxes[1].tolist() == [-24.0, -32.0, 40.0, 32.0]
    assert anchors.boxes[7].tolist() == [-48.0, -64.0, 80.0, 64.0]
    assert anchors.strides.tolist() == [8.0] * 6 + [16.0] * 2
    assert anchors.num_per_level == (6, 2)


def test_anchor_grid_builds_each_size_once_and_returns_the_cached_set():
    grid = AnchorGrid((8, 16))
    assert grid([(4, 4), (2, 2)]) is grid([(4, 4), (2, 2)])
    assert grid([(4, 4), (2, 2)]) is not grid([(4, 5), (2, 3)])


def test_valid_mask_rounds_the_image_extent_up_on_each_level():
    grid = AnchorGrid((32,))
    # A 100 (w) x 70 (h) image in a batch padded to 160 x 128: the stride-32 map is 4 x 5.
    # ceil(100 / 32) = 4 columns and ceil(70 / 32) = 3 rows are valid (floor would give 3 x 2).
    valid = grid.valid_mask([(70, 100), (128, 160)], [(4, 5)])
    expected = [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]
    assert valid[0].view(4, 5).int().tolist() == expected
    assert bool(valid[1].all())


def test_flatten_levels_puts_every_location_in_the_anchors_order():
    strides, sizes = (8, 16), [(2, 3), (1, 2)]
    anchors = AnchorGrid(strides)(sizes)
    # Each map holds its own location's anchor centre, so the flat rows must equal the centres
    maps = []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        maps.append(torch.stack([xs, ys]).float()[None] * stride)  # (1, 2, H, W)
    flat = flatten_levels(maps)
    assert flat.shape == (1, 8, 2)
    assert torch.equal(flat[0], anchors.centers)


# One row of six 10x10 anchors (stride 10, octave_base_scale 1): centres x = 0, 10, ..., 50,
# y = 0; anchor k is [10k - 5, -5, 10k + 5, 5]. With topk = 3 each box's candidates are the
# three anchors nearest its centre.
ROW_GRID = AnchorGrid((10,), octave_base_scale=1)
ROW_SIZES = [(1, 6)]


def test_atss_picks_iou_above_mean_plus_std_with_centre_inside_and_best_iou_wins():
    anchors = ROW_GRID(ROW_SIZES)
    valid = ROW_GRID.valid_mask([(10, 60), (10, 60)], ROW_SIZES)
    boxes = [
        # box 0 = anchor 2. Candidates 1, 2, 3 with IoU 0, 1, 0 (neighbours only touch):
        # mean 1/3, std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = 0.577, threshold 0.911 -> anchor 2.
        [15, -5, 25, 5],
        # box 1 = anchor 4: by the same numbers anchor 4 is positive with IoU 1.
        [35, -5, 45, 5],
        # box 2, 14 wide around x = 40. Candidates 3, 4, 5: IoU 20/220, 100/140, 20/220 =
        # 0.091, 0.714, 0.091; mean 0.299, std 0.360, threshold 0.659 -> anchor 4 (0.714),
        # which box 1 claims with IoU 1 > 0.714: anchor 4 goes to box 1, box 2 gets nothing.
        [33, -5, 47, 5],
        # box 3 sits above the row: centre (50, 5). Candidates 5, 4, 3 (distances 5, 11.2,
        # 20.6) with IoU 32/132 = 0.242, 0, 0: mean 0.081, std 0.140, threshold 0.221. Anchor 5
        # passes the IoU test but its centre (50, 0) is outside the box (y1 = 1): not positive.
        [46, 1, 54, 9],
    ]
    gt_boxes, _, gt_mask = pad_targets([target(boxes, [0, 1, 2, 3]), target([], [])], "cpu")
    matched = atss_assign(anchors, valid, gt_boxes, gt_mask, topk=3)
    assert matched.tolist() == [
        [NEGATIVE, NEGATIVE, 0, NEGATIVE, 1, NEGATIVE],
        [NEGATIVE] * 6,  # the image without boxes: all background
    ]


def test_atss_never_makes_an_anchor_outside_the_image_positive():
    anchors = ROW_GRID(ROW_SIZES)
    # 45 px wide: ceil(45 / 10) = 5 valid columns, anchor 5 is outside. The box equals anchor
    # 5 (IoU 1), but only valid anchors 4, 3, 2 are candidates: all IoU 0, threshold 0, and
    # none has its centre inside the box.
    valid = ROW_GRID.valid_mask([(10, 45)], ROW_SIZES)
    gt_boxes, _, gt_mask = pad_targets([target([[45, -5, 55, 5]], [0])], "cpu")
    matched = atss_assign(anchors, valid, gt_boxes, gt_mask, topk=3)
    assert matched.tolist() == [[NEGATIVE] * 5 + [OUT_OF_IMAGE]]


def test_atss_takes_candidates_from_every_level_and_the_positive_can_be_on_a_coarse_one():
    # Level 0: 2 x 4 anchors of side 10 (stride 10); level 1: 1 x 2 anchors of side 20 (stride
    # 20) centred at (0, 0) and (20, 0). Box [13, -8, 33, 12], centre (23, 2), topk 2 per level:
    # level 0 -> (20, 0) IoU 100/400 = 0.25 and (30, 0) IoU 80/420 = 0.190;
    # level 1 -> (20, 0) IoU 306/494 = 0.619 and (0, 0) IoU 0.
    # mean 0.265, std 0.259, threshold 0.524: only the level-1 anchor at (20, 0), index 8 + 1.
    grid = AnchorGrid((10, 20), octave_base_scale=1)
    sizes = [(2, 4), (1, 2)]
    valid = grid.valid_mask([(20, 40)], sizes)
    gt_boxes, _, gt_mask = pad_targets([target([[13, -8, 33, 12]], [0])], "cpu")
    matched = atss_assign(grid(sizes), valid, gt_boxes, gt_mask, topk=2)
    assert matched.tolist() == [[NEGATIVE] * 9 + [0]]


def test_gfl_targets_copy_box_and_label_and_count_at_least_one_positive_per_image():
    matched = torch.tensor([[NEGATIVE, 1, 0, OUT_OF_IMAGE], [NEGATIVE] * 3 + [OUT_OF_IMAGE]])
    gt_boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 20, 20]], [[0.0] * 4] * 2])
    gt_labels = torch.tensor([[3, 1], [0, 0]])
    targets = build_targets(matched, gt_boxes, gt_labels, num_classes=5)
    assert targets.labels.tolist() == [[5, 1, 3, 5], [5, 5, 5, 5]]
    assert targets.bbox_targets[0].tolist() == [[0] * 4, [5, 5, 20, 20], [0, 0, 10, 10], [0] * 4]
    assert targets.label_weights.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert targets.pos_mask.tolist() == [[False, True, True, False], [False] * 4]
    assert targets.num_pos.item() == 3.0  # 2 positives + at least 1 for the empty image


def test_num_pos_goes_through_the_cross_process_mean_and_stays_at_least_one():
    matched = torch.tensor([[0, NEGATIVE]])
    gt_boxes, gt_labels = torch.tensor([[[0.0, 0, 4, 4]]]), torch.tensor([[2]])
    quartered = build_targets(matched, gt_boxes, gt_labels, 3, reduce_mean=lambda t: t / 4)
    assert quartered.num_pos.item() == 1.0  # 1 / 4 clamped up to 1
    doubled = build_targets(matched, gt_boxes, gt_labels, 3, reduce_mean=lambda t: t * 2)
    assert doubled.num_pos.item() == 2.0


def test_distances_encode_and_decode_back_to_the_same_boxes():
    points = torch.tensor([[4.0, 5.0], [10.0, 2.0]])
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.5], [3.0, -1.0, 12.0, 8.0]])
    distances = bbox_to_distance(points, boxes)
    assert distances.tolist() == [[3.0, 3.0, 5.0, 2.5], [7.0, 3.0, 2.0, 6.0]]
    assert torch.equal(distance_to_bbox(points, distances), boxes)


def test_encoding_clamps_distances_to_zero_and_reg_max_minus_a_tenth():
    # left 20 -> 15.9, top -5 -> 0, right 3 stays, bottom 30 -> 15.9 (MMDetection eps = 0.1)
    clamped = bbox_to_distance(torch.tensor([0.0, 0.0]), torch.tensor([-20.0, 5, 3, 30]), 16)
    assert torch.allclose(clamped, torch.tensor([15.9, 0.0, 3.0, 15.9]))


def test_decoding_with_an_image_shape_clamps_boxes_to_the_image():
    point, distance = torch.tensor([10.0, 10.0]), torch.tensor([20.0, 5.0, 100.0, 100.0])
    box = distance_to_bbox(point, distance, max_shape=torch.tensor([50.0, 40.0]))  # h 50, w 40
    assert box.tolist() == [0.0, 5.0, 40.0, 50.0]


def test_integral_of_a_one_hot_distribution_is_its_bin_and_of_a_uniform_one_the_middle():
    bins = torch.tensor([0, 3, 7, 16])
    one_hot = torch.nn.functional.one_hot(bins, 17).float().reshape(-1) * 1e4  # (68,)
    assert integral(one_hot, reg_max=16).tolist() == [0.0, 3.0, 7.0, 16.0]
    assert torch.allclose(integral(torch.zeros(2, 68), 16), torch.full((2, 4), 8.0))


def test_aligned_iou_compares_boxes_pairwise_by_position():
    first = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    second = torch.tensor([[1.0, 1, 3, 3], [0, 0, 1, 1]])
    # overlap 1, union 4 + 4 - 1 = 7; identical boxes: 1
    assert torch.allclose(aligned_box_iou(first, second), torch.tensor([1 / 7, 1.0]))


def test_pad_targets_stacks_boxes_and_marks_the_padding():
    boxes, labels, mask = pad_targets([target([[0, 0, 1, 1]], [4]), target([], [])], "cpu")
    assert boxes.shape == (2, 1, 4) and labels.tolist() == [[4], [0]]
    assert boxes[0].tolist() == [[0.0, 0.0, 1.0, 1.0]] and boxes[1].tolist() == [[0.0] * 4]
    assert mask.tolist() == [[True], [False]]
