"""RetinaNet, ATSS and FCOS: priors, assignment, box coding, losses, cross-head forward."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.detection.box_ops import decode_deltas, encode_deltas
from crosskd_cli.detection.priors import AnchorGrid, point_grid
from crosskd_cli.detection.structures import Batch, HeadOutput, Target
from crosskd_cli.detection.targets import (
    IGNORED,
    NEGATIVE,
    OUT_OF_IMAGE,
    centerness_target,
    fcos_assign,
    max_iou_assign,
)
from crosskd_cli.distill.distiller import Distiller, cross_head_forward
from crosskd_cli.families import build_criterion, get_family
from crosskd_cli.inference.postprocess import postprocess
from crosskd_cli.models import build_detector

SMALL = dict(backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32, norm_groups=8)
SPECS = {
    "gfl": ModelSpec(family="gfl", **SMALL),
    "retinanet": ModelSpec(
        family="retinanet",
        **{**SMALL, "norm_groups": None},
        octave_base_scale=4,
        scales_per_octave=3,
        anchor_ratios=(0.5, 1.0, 2.0),
        extra_convs_source="c5",
    ),
    "atss": ModelSpec(family="atss", **SMALL),
    "fcos": ModelSpec(family="fcos", **SMALL, relu_before_extra_convs=True),
}


def make_batch(seed: int = 0) -> Batch:
    """Two 128x128-padded images (the second 96 high) with three boxes."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8, generator=gen)
    targets = [
        Target(
            torch.tensor([[10.0, 20, 60, 90], [70, 70, 120, 110]]),
            torch.tensor([0, 2]),
            1,
            (128, 128),
            (1.0, 1.0),
        ),
        Target(torch.tensor([[5.0, 5, 40, 30]]), torch.tensor([1]), 2, (96, 128), (1.0, 1.0)),
    ]
    return Batch(images, [(128, 128), (96, 128)], targets)


# ------------------------------------------------------------------------------- priors


def test_retinanet_base_anchors_are_mmdetections():
    """Stride 8, octave base scale 4, 3 scales per octave, ratios 0.5/1/2: MMDetection's values
    (its anchor-generator unit test), ratio-major order."""
    grid = AnchorGrid((8,), 4, 3, (0.5, 1.0, 2.0))
    expected = torch.tensor(
        [
            [-22.6274, -11.3137, 22.6274, 11.3137],
            [-28.5088, -14.2544, 28.5088, 14.2544],
            [-35.9188, -17.9594, 35.9188, 17.9594],
            [-16.0000, -16.0000, 16.0000, 16.0000],
            [-20.1587, -20.1587, 20.1587, 20.1587],
            [-25.3984, -25.3984, 25.3984, 25.3984],
            [-11.3137, -22.6274, 11.3137, 22.6274],
            [-14.2544, -28.5088, 14.2544, 28.5088],
            [-17.9594, -35.9188, 17.9594, 35.9188],
        ]
    )
    torch.testing.assert_close(grid.base_anchors(8), expected, atol=1e-4, rtol=0)


def test_anchors_of_a_location_are_adjacent_and_shifted_by_the_stride():
    grid = AnchorGrid((8, 16), 4, 3, (0.5, 1.0, 2.0))
    anchors = grid([(2, 3), (1, 2)])
    assert anchors.num_per_level == (2 * 3 * 9, 1 * 2 * 9)
    # location (x=1, y=0) of level 0 holds anchors 9..17: the base anchors moved by (8, 0)
    torch.testing.assert_close(
        anchors.boxes[9:18], grid.base_anchors(8) + torch.tensor([8.0, 0, 8, 0])
    )
    assert anchors.grid_xy[9:18].tolist() == [[1, 0]] * 9
    assert anchors.strides[-1].item() == 16


def test_fcos_points_sit_at_cell_centres():
    points = point_grid(SPECS["fcos"])([(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)])
    assert points.centers[:4].tolist() == [[4, 4], [12, 4], [4, 12], [12, 12]]
    assert points.centers[4].tolist() == [8, 8]  # stride 16, cell (0, 0)


# --------------------------------------------------------------------------- assignment


def _assign_on_three_anchors(boxes: list[list[float]]) -> list[int]:
    """One image's max_iou_assign on 8x8 anchors A0 [-4,-4,4,4], A1 [4,-4,12,4], A2 [12,-4,20,4]."""
    anchors = AnchorGrid((8,), 1, 1, (1.0,))([(1, 3)])
    gt = torch.tensor([boxes])
    everything = torch.ones(1, 3, dtype=torch.bool)
    return max_iou_assign(anchors, everything, gt, torch.ones(1, len(boxes), dtype=torch.bool))[
        0
    ].tolist()


def test_max_iou_assign_positive_negative_and_out_of_image():
    anchors = AnchorGrid((8,), 1, 1, (1.0,))([(1, 4)])
    valid = torch.tensor([[True, True, True, False]])
    gt = torch.tensor([[[-4.0, -4, 4, 4]]])  # exactly anchor 0
    matched = max_iou_assign(anchors, valid, gt, torch.tensor([[True]]))
    assert matched.tolist() == [[0, NEGATIVE, NEGATIVE, OUT_OF_IMAGE]]


def test_max_iou_assign_low_quality_matches_take_every_tied_best_anchor():
    # [0,-4,8,4] has IoU 32/96 = 0.33 < 0.4 with A0 and A1: negatives, but they are its best
    assert _assign_on_three_anchors([[0.0, -4, 8, 4]]) == [0, 0, NEGATIVE]


def test_max_iou_assign_ignores_the_band_between_the_thresholds():
    # box 1 [5,-4,20,4]: IoU with A1 56/128 = 0.4375 (band), with A2 64/120 = 0.53 (its best)
    assert _assign_on_three_anchors([[-4.0, -4, 4, 4], [5.0, -4, 20, 4]]) == [0, IGNORED, 1]


def test_max_iou_assign_later_boxes_win_low_quality_ties():
    assert _assign_on_three_anchors([[-4.0, -4, 4, 4], [-4.0, -4, 4, 4]]) == [1, NEGATIVE, NEGATIVE]


def test_max_iou_assign_gives_a_box_no_anchor_touches_no_match():
    """MMDetection's min_pos_iou=0 would make every non-overlapping anchor positive here."""
    assert _assign_on_three_anchors([[100.0, 100, 110, 110]]) == [NEGATIVE] * 3


def test_max_iou_assign_without_boxes_is_all_negative():
    anchors = AnchorGrid((8,), 1, 1, (1.0,))([(1, 2)])
    matched = max_iou_assign(
        anchors,
        torch.tensor([[True, False]]),
        torch.zeros(1, 0, 4),
        torch.zeros(1, 0, dtype=torch.bool),
    )
    assert matched.tolist() == [[NEGATIVE, OUT_OF_IMAGE]]


def test_fcos_assign_uses_regress_ranges_and_the_smallest_box():
    points = AnchorGrid((8, 16), 0.0, center_offset=0.5)([(4, 4), (2, 2)])
    # point (12, 12) of level 0 (index 5): inside both boxes; the big box reaches 60 > 64? no:
    big = [0.0, 0.0, 100.0, 100.0]  # from (12, 12): max distance 88 -> level 1 range only
    small = [8.0, 8.0, 20.0, 20.0]  # from (12, 12): max 8 -> level 0
    matched = fcos_assign(points, torch.tensor([[big, small]]), torch.tensor([[True, True]]))
    assert matched[0, 5].item() == 1  # small box, in range
    # level-1 point (24, 24) (index 16 + 3 = 19): inside big only, max distance 76 in (64, 128]
    assert matched[0, 16 + 3].item() == 0
    # level-0 point (4, 4): outside the small box, big box out of range (96 > 64)
    assert matched[0, 0].item() == NEGATIVE
    # overlapping candidates: the smaller area wins
    overlap = torch.tensor([[[0.0, 0, 30, 30], [0.0, 0, 20, 20]]])
    matched = fcos_assign(points, overlap, torch.tensor([[True, True]]))
    assert matched[0, 5].item() == 1


def test_centerness_target_is_one_at_the_centre_and_falls_off():
    distances = torch.tensor([[5.0, 5, 5, 5], [2.0, 8, 8, 2]])
    torch.testing.assert_close(centerness_target(distances), torch.tensor([1.0, 0.25]))


# ---------------------------------------------------------------------------- box coding


def test_delta_coding_round_trips_and_clamps_the_size_ratio():
    anchors = torch.tensor([[0.0, 0, 10, 20], [5.0, 5, 15, 15]])
    boxes = torch.tensor([[1.0, 2, 13, 18], [4.0, 6, 20, 30]])
    stds = (0.1, 0.1, 0.2, 0.2)
    deltas = encode_deltas(anchors, boxes, stds)
    torch.testing.assert_close(decode_deltas(anchors, deltas, stds), boxes)
    # dx = (7 - 5) / 10 / 0.1 = 2; dw = ln(12 / 10) / 0.2
    assert deltas[0, 0].item() == pytest.approx(2.0)
    assert deltas[0, 2].item() == pytest.approx(math.log(1.2) / 0.2)
    huge = decode_deltas(anchors[:1], torch.tensor([[0.0, 0, 100, 0]]), (1, 1, 1, 1))
    assert (huge[0, 2] - huge[0, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-5)
    clamped = decode_deltas(anchors[:1], torch.tensor([[0.0, 0, 100, 0]]), (1, 1, 1, 1),
                            torch.tensor([30.0, 40.0]))  # fmt: skip
    assert clamped.tolist() == [[0.0, 0.0, 40.0, 20.0]]


# ------------------------------------------------------------------------ heads and losses


@pytest.mark.parametrize("family", ["retinanet", "atss", "fcos"])
def test_head_output_shapes(family):
    spec = SPECS[family]
    out = build_detector(spec)(make_batch().images)
    anchors = get_family(family).priors(spec).per_location
    assert [tuple(x.shape) for x in out.head.cls_logits][:2] == [
        (2, anchors * 3, 16, 16),
        (2, anchors * 3, 8, 8),
    ]
    assert out.head.box_preds[0].shape == (2, anchors * 4, 16, 16)
    assert len(out.head.centerness) == (0 if family == "retinanet" else 5)
    if family == "fcos":
        assert (torch.cat([b.flatten() for b in out.head.box_preds]) > 0).all()


@pytest.mark.parametrize("family", ["retinanet", "atss", "fcos"])
def test_gt_losses_are_finite_and_train_every_head_output(family):
    spec = SPECS[family]
    model = build_detector(spec)
    batch = make_batch()
    out = model(batch.images, batch.image_sizes)
    losses, targets, _ = build_criterion(spec)(out.head, batch.targets, batch.image_sizes)
    expected = {"loss_cls", "loss_bbox"} | ({"loss_centerness"} if family != "retinanet" else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert targets.pos_mask.sum() > 0
    sum(losses.values()).backward()
    trained = {n for n, p in model.head.named_parameters() if p.grad is not None and p.grad.any()}
    scales = {n for n, _ in model.head.named_parameters() if n.startswith("scales")}
    assert set(dict(model.head.named_parameters())) - scales <= trained
    # a level's Scale learns only from its positives' boxes; these boxes sit on P3-P4
    assert family == "retinanet" or "scales.0.scale" in trained


def test_retinanet_ignored_and_out_of_image_anchors_get_no_classification_weight():
    spec = SPECS["retinanet"]
    batch = make_batch()
    out = build_detector(spec)(batch.images, batch.image_sizes)
    criterion = build_criterion(spec)
    flat = criterion.flatten(out.head, batch.image_sizes)
    targets = criterion.assign(flat, batch.targets)
    zero = targets.label_weights == 0
    expected = (targets.matched_idxs == IGNORED) | (targets.matched_idxs == OUT_OF_IMAGE)
    assert torch.equal(zero, expected)
    assert (targets.matched_idxs[1] == OUT_OF_IMAGE).any()  # the 96-high image's bottom rows


def test_fcos_masks_no_location():
    spec = SPECS["fcos"]
    batch = make_batch()
    out = build_detector(spec)(batch.images, batch.image_sizes)
    criterion = build_criterion(spec)
    targets = criterion.assign(criterion.flatten(out.head, batch.image_sizes), batch.targets)
    assert (targets.label_weights == 1).all()
    assert targets.centerness[~targets.pos_mask].abs().sum() == 0
    assert (targets.centerness[targets.pos_mask] > 0).all()


# ------------------------------------------------------------------ the cross-head forward


@pytest.mark.parametrize("family", ["retinanet", "atss", "fcos"])
@pytest.mark.parametrize("index", [0, 2, 4])
def test_a_student_identical_to_its_teacher_reproduces_the_teachers_predictions(family, index):
    """With the teacher's own taps (aligned to themselves), the rest of its head must give back
    exactly its own outputs: the cross-head forward is the identity on the teacher."""
    torch.manual_seed(0)
    teacher = build_detector(SPECS[family]).eval()
    out = teacher(make_batch().images, tap_index=index).head
    cross = cross_head_forward(teacher.head, index, out.taps, out.taps)
    for mine, theirs in zip(
        cross.cls_logits + cross.box_preds + cross.centerness,
        out.cls_logits + out.box_preds + out.centerness,
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["retinanet", "atss", "fcos"])
def test_distill_step_logs_the_familys_kd_terms_and_reaches_the_student_only(family):
    spec = SPECS[family]
    torch.manual_seed(0)
    teacher = build_detector(spec).eval().requires_grad_(False)
    student = build_detector(spec)
    distiller = Distiller(teacher, build_criterion(spec), DistillConfig(method="crosskd+pkd"))
    losses = distiller.step(student, make_batch())
    kd = {k for k in losses if k.startswith("kd")}
    expected = {"kd_cross_cls", "kd_cross_box", "kd_pkd"}
    assert kd == expected | ({"kd_cross_centerness"} if family == "atss" else set())
    assert set(distiller.loss_names()) == kd
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    # blocks after the cross index get no KD gradient; the tower up to it does
    student.zero_grad()
    cross_terms = sum(v for k, v in distiller.step(student, make_batch()).items() if "cross" in k)
    cross_terms.backward()
    assert student.head.towers["cls"][0].conv.weight.grad.abs().sum() > 0
    assert student.head.towers["cls"][3].conv.weight.grad is None


def test_family_kd_weights_are_the_authors_unless_set():
    spec = SPECS["fcos"]
    torch.manual_seed(0)
    teacher = build_detector(spec).eval().requires_grad_(False)
    student = build_detector(spec)
    batch = make_batch()
    default = Distiller(teacher, build_criterion(spec), DistillConfig()).step(student, batch)
    doubled = Distiller(
        teacher, build_criterion(spec), DistillConfig(cls_weight=0.8, box_weight=1.5)
    ).step(student, batch)
    torch.testing.assert_close(doubled["kd_cross_cls"], 2 * default["kd_cross_cls"])
    torch.testing.assert_close(doubled["kd_cross_box"], 2 * default["kd_cross_box"])


# ------------------------------------------------------------------------- post-processing


def _one_location_output(spec: ModelSpec, cls_logit: float, centerness: float | None):
    """Head outputs on a 1x1 P3 (other levels empty of scores) with one confident class."""
    levels = []
    for k in range(5):
        cls = torch.full((1, spec.num_classes, 1, 1), -20.0)
        if k == 0:
            cls[0, 1] = cls_logit
        levels.append(cls)
    box = [torch.full((1, 4, 1, 1), 3.0 if spec.family == "fcos" else 0.0) for _ in range(5)]
    ctr = [] if centerness is None else [torch.full((1, 1, 1, 1), centerness) for _ in range(5)]
    return HeadOutput(levels, box, ctr)


def test_fcos_scores_are_thresholded_before_the_centerness_multiplies_them():
    spec = SPECS["fcos"]
    # class score sigmoid(-2) = 0.119 > 0.05; x sigmoid(-3) = 0.047 -> still kept
    (dets,) = postprocess(_one_location_output(spec, -2.0, -3.0), [(64, 64)], spec)
    assert len(dets.scores) == 1
    expected = torch.sigmoid(torch.tensor(-2.0)) * torch.sigmoid(torch.tensor(-3.0))
    assert dets.scores.item() == pytest.approx(expected.item(), rel=1e-6)
    # point (4, 4), distances 3 -> box (1, 1, 7, 7)
    assert dets.boxes.tolist() == [[1.0, 1.0, 7.0, 7.0]]


def test_atss_zero_deltas_decode_to_the_anchor_clamped_to_the_image():
    spec = replace(SPECS["atss"], num_classes=3)
    (dets,) = postprocess(_one_location_output(spec, 3.0, 0.0), [(64, 64)], spec)
    # anchor at (0, 0), side 8 * 8 = 64 -> (-32, -32, 32, 32) clamped to (0, 0, 32, 32)
    assert dets.boxes.tolist() == [[0.0, 0.0, 32.0, 32.0]]
    assert dets.scores.item() == pytest.approx(
        (torch.sigmoid(torch.tensor(3.0)) * 0.5).item(), rel=1e-6
    )


def test_retinanet_uses_its_nine_anchors_and_nms_iou_one_half():
    spec = SPECS["retinanet"]
    cls = [torch.full((1, 9 * 3, 1, 1), -20.0) for _ in range(5)]
    cls[0][0, 3 * 3 + 2] = 2.0  # anchor 3 (ratio 1, scale 1), class 2
    cls[0][0, 4 * 3 + 2] = 1.0  # anchor 4 (ratio 1, scale 2^(1/3)): IoU 0.63 with anchor 3
    box = [torch.zeros(1, 9 * 4, 1, 1) for _ in range(5)]
    (dets,) = postprocess(HeadOutput(cls, box), [(100, 100)], spec)
    # both clamp to the image corner: (0, 0, 16, 16) and (0, 0, 20.16, 20.16): IoU 0.63 > 0.5
    assert dets.labels.tolist() == [2]
    assert dets.boxes[0].tolist() == pytest.approx([0.0, 0.0, 16.0, 16.0])
