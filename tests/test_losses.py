"""GT and KD losses against hand-computed values, and the GFL criterion's normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.criteria.gfl import LOSS_WEIGHTS
from crosskd_cli.detection.box_ops import bbox_to_distance
from crosskd_cli.detection.losses import (
    bce_kd_loss,
    distribution_focal_loss,
    giou_loss,
    kl_box_kd_loss,
    pkd_loss,
    qfl_kd_loss,
    quality_focal_loss,
)
from crosskd_cli.detection.priors import AnchorGrid
from crosskd_cli.detection.structures import HeadOutput, Target
from crosskd_cli.errors import ModelError
from crosskd_cli.families import build_criterion

LN2, LN3 = math.log(2), math.log(3)


def test_quality_focal_loss_matches_the_hand_computed_value():
    pred = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # sigmoid: [0.5, 0.5], [0.75, 0.5]
    labels = torch.tensor([0, 2])  # anchor 0 positive for class 0, anchor 1 background (C = 2)
    scores = torch.tensor([1.0, 0.0])
    # anchor 0: class 0 BCE(0, 1) = ln2 times |1 - 0.5|^2 = 0.25; class 1 BCE(0, 0) = ln2 * 0.5^2
    #   -> 0.5 ln2
    # anchor 1: class 0 BCE(ln3, 0) = ln4 times 0.75^2; class 1 ln2 * 0.5^2
    #   -> 1.125 ln2 + 0.25 ln2 = 1.375 ln2, weighted by 0.5 -> 0.6875 ln2
    loss = quality_focal_loss(pred, (labels, scores), weight=torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(1.1875 * LN2, rel=1e-6)
    per_anchor = quality_focal_loss(pred, (labels, scores), reduction="none")
    assert per_anchor.tolist() == pytest.approx([0.5 * LN2, 1.375 * LN2], rel=1e-6)


def test_quality_focal_loss_is_zero_for_a_positive_predicting_its_exact_quality():
    # sigmoid(0) = 0.5 = the target score: factor |0.5 - 0.5|^2 = 0; no other class
    loss = quality_focal_loss(torch.tensor([[0.0]]), (torch.tensor([0]), torch.tensor([0.5])))
    assert loss.item() == 0.0


def test_distribution_focal_loss_interpolates_between_the_two_nearest_bins():
    pred = torch.tensor([[0.0, LN2, 0.0]] * 3)  # probabilities 1/4, 1/2, 1/4
    # target 0.25: 0.75 * -ln(1/4) + 0.25 * -ln(1/2) = 1.75 ln2
    # target 1.5: 0.5 * ln2 + 0.5 * ln4 = 1.5 ln2
    # target 2.0 (last bin): all weight on bin 2 -> ln4 = 2 ln2, weighted by 0.5 -> ln2
    target = torch.tensor([0.25, 1.5, 2.0])
    loss = distribution_focal_loss(pred, target, weight=torch.tensor([1.0, 1.0, 0.5]))
    assert loss.item() == pytest.approx(4.25 * LN2, rel=1e-6)


def test_giou_loss_matches_the_hand_computed_value():
    pred = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    target = torch.tensor([[1.0, 1, 3, 3], [0, 0, 1, 1], [2, 0, 3, 1]])
    # pair 0: IoU 1/7, enclosing 3x3 = 9, union 7: GIoU 1/7 - 2/9 = -5/63 -> loss 68/63
    # pair 1: identical -> 0; pair 2: disjoint, enclosing 3, union 2: GIoU -1/3 -> loss 4/3
    per_pair = giou_loss(pred, target, reduction="none")
    assert per_pair.tolist() == pytest.approx([68 / 63, 0.0, 4 / 3], abs=1e-6)
    weighted = giou_loss(pred, target, weight=torch.tensor([1.0, 1.0, 0.5]))
    assert weighted.item() == pytest.approx(68 / 63 + 2 / 3, abs=1e-6)


def test_qfl_kd_loss_weights_bce_to_the_teacher_by_the_probability_gap():
    student = torch.tensor([[[0.0, LN3]]])  # (B=1, A=1, C=2), sigmoid 0.5, 0.75
    teacher = torch.tensor([[[LN3, 0.0]]])  # sigmoid 0.75, 0.5
    # class 0: BCE(0, 0.75) = ln2, gap 0.25; class 1: BCE(ln3, 0.5) = 2 ln2 - 0.5 ln3, gap 0.25
    expected = 0.25 * (3 * LN2 - 0.5 * LN3)
    loss = qfl_kd_loss(student, teacher, torch.ones(1, 1), beta=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert bce_kd_loss(student, teacher, torch.ones(1, 1)).item() == pytest.approx(
        3 * LN2 - 0.5 * LN3, rel=1e-6
    )
    assert qfl_kd_loss(student, teacher, torch.zeros(1, 1)).item() == 0.0


def test_qfl_kd_loss_sends_no_gradient_to_the_teacher():
    student = torch.zeros(1, 2, 3, requires_grad=True)
    teacher = torch.ones(1, 2, 3, requires_grad=True)
    qfl_kd_loss(student, teacher, torch.ones(1, 2)).backward()
    assert teacher.grad is None
    assert student.grad is not None and bool((student.grad != 0).all())


def test_kl_box_kd_loss_sums_bins_averages_sides_and_weights_locations():
    # reg_max = 1: two bins per side. Side 0 differs: teacher [0, 0] -> p = (1/2, 1/2),
    # student [0, ln3] -> q = (1/4, 3/4). KL(p || q) = 0.5 ln2 + 0.5 ln(2/3) = ln2 - 0.5 ln3.
    # The other 3 sides agree (KL 0): mean over sides / 4, weight 2.
    student = torch.tensor([[0.0, LN3] + [0.0, 0.0] * 3])
    teacher = torch.zeros(1, 8)
    loss = kl_box_kd_loss(student, teacher, torch.tensor([2.0]), T=1.0, reg_max=1)
    assert loss.item() == pytest.approx(2 * (LN2 - 0.5 * LN3) / 4, rel=1e-5)
    # T = 2: q = softmax(0, ln3 / 2) = (1, sqrt3) / (1 + sqrt3); KL = ln((1 + sqrt3) / 2) - ln3 / 4,
    # times T^2 = 4
    kl_t2 = math.log((1 + math.sqrt(3)) / 2) - LN3 / 4
    loss_t2 = kl_box_kd_loss(student, teacher, torch.tensor([1.0]), T=2.0, reg_max=1)
    assert loss_t2.item() == pytest.approx(4 * kl_t2 / 4, rel=1e-5)


def test_kl_box_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 68, generator=torch.Generator().manual_seed(0))
    loss = kl_box_kd_loss(logits, logits.clone(), torch.ones(2, 5), reg_max=16)
    assert abs(loss.item()) < 1e-6


def test_pkd_loss_is_zero_for_identical_features():
    feats = [torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)]
    assert pkd_loss(feats, [f.clone() for f in feats]).item() == 0.0


def test_pkd_loss_ignores_a_per_channel_scale_and_shift_of_one_side():
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)]
    teacher = [torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)]
    scale = torch.tensor([0.5, 3.0, 10.0]).view(1, 3, 1, 1)
    shift = torch.tensor([-4.0, 0.0, 7.0]).view(1, 3, 1, 1)
    moved = [t * scale + shift for t in teacher]
    assert pkd_loss(student, moved).item() == pytest.approx(pkd_loss(student, teacher).item())


def test_pkd_loss_halves_the_mse_of_standardised_features():
    student = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    teacher = torch.tensor([3.0, 2.0, 1.0]).view(1, 1, 1, 3)
    # standardised (mean 2, unbiased std 1): [-1, 0, 1] vs [1, 0, -1]; MSE 8/3, halved 4/3
    assert pkd_loss([student], [teacher]).item() == pytest.approx(4 / 3, rel=1e-5)


def test_pkd_loss_refuses_features_of_different_widths():
    with pytest.raises(ModelError, match=r"student \(1, 64, 4, 4\) and teacher \(1, 96, 4, 4\)"):
        pkd_loss([torch.zeros(1, 64, 4, 4)], [torch.zeros(1, 96, 4, 4)])


# The criterion on a 64 x 64 image with two levels (strides 8 and 16, maps 8x8 and 4x4)
SPEC = ModelSpec(num_classes=3, strides=(8, 16), reg_max=16)
SIZES = [(8, 8), (4, 4)]


def head_output(box_logits: list[torch.Tensor] | None = None, batch: int = 1) -> HeadOutput:
    gen = torch.Generator().manual_seed(0)
    cls = [torch.randn(batch, 3, h, w, generator=gen, requires_grad=True) for h, w in SIZES]
    if box_logits is None:
        box_logits = [torch.randn(batch, 68, h, w, generator=gen) for h, w in SIZES]
    box = [b.clone().requires_grad_(True) for b in box_logits]
    return HeadOutput(cls, box)


def make_target(boxes: list[list[float]], labels: list[int]) -> Target:
    return Target(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        image_id=1,
        orig_size=(64, 64),
        scale=(1.0, 1.0),
    )


def test_an_image_without_boxes_gives_exactly_zero_box_losses_and_a_finite_qfl():
    head = head_output()
    losses, targets, _ = build_criterion(SPEC)(head, [make_target([], [])], [(64, 64)])
    assert list(losses) == ["loss_qfl", "loss_dfl", "loss_giou"]
    assert losses["loss_dfl"].item() == 0.0
    assert losses["loss_giou"].item() == 0.0
    assert math.isfinite(losses["loss_qfl"].item()) and losses["loss_qfl"].item() > 0
    assert targets.num_pos.item() == 1.0
    sum(losses.values()).backward()
    assert bool(torch.isfinite(head.box_preds[0].grad).all())
    assert bool((head.box_preds[0].grad == 0).all())  # no positive: no box gradient


def test_a_perfect_box_distribution_gives_zero_giou_and_dfl():
    # The box [0, 0, 64, 64] is a whole number of strides from every anchor centre, so each
    # anchor's target distances are whole bins: one-hot logits there decode to the box itself.
    grid = AnchorGrid(SPEC.strides)
    anchors = grid(SIZES)
    centers = anchors.centers / anchors.strides[:, None]
    target_box = torch.tensor([0.0, 0, 64, 64]) / anchors.strides[:, None]
    bins = bbox_to_distance(centers, target_box, max_dis=16).round().long().clamp(max=15)
    logits = torch.nn.functional.one_hot(bins, 17).float().reshape(1, -1, 68) * 1e4
    per_level = [
        level.reshape(1, h, w, 68).permute(0, 3, 1, 2)
        for level, (h, w) in zip(logits.split(anchors.num_per_level, dim=1), SIZES, strict=True)
    ]
    criterion = build_criterion(SPEC)
    losses, targets, _ = criterion(
        head_output(per_level), [make_target([[0, 0, 64, 64]], [1])], [(64, 64)]
    )
    assert int(targets.pos_mask.sum()) == 5
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_dfl"].item() == pytest.approx(0.0, abs=1e-6)


def test_criterion_normalises_qfl_by_positives_and_box_losses_by_their_weights():
    head = head_output(batch=2)
    targets_in = [make_target([[4, 8, 40, 60]], [2]), make_target([], [])]
    criterion = build_criterion(SPEC)
    losses, targets, flat = criterion(head, targets_in, [(64, 64), (48, 64)])
    num_pos = int(targets.pos_mask.sum())
    assert targets.num_pos.item() == num_pos + 1  # the empty image counts as 1
    # With a process mean that doubles the counts, QFL halves and so do the box losses
    doubled, _, _ = criterion(head, targets_in, [(64, 64), (48, 64)], lambda t: t * 2)
    for key in LOSS_WEIGHTS:
        assert doubled[key].item() == pytest.approx(losses[key].item() / 2, rel=1e-6)
    assert flat.cls.shape == (2, 80, 3) and flat.box.shape == (2, 80, 68)
    # 48 rows: ceil(48 / 8) = 6 of 8 rows on level 0, 3 of 4 on level 1
    assert flat.valid[1].sum().item() == 6 * 8 + 3 * 4


def test_loss_weights_live_in_one_table_matching_mmdetection_gfl():
    assert LOSS_WEIGHTS == {"loss_qfl": 1.0, "loss_dfl": 0.25, "loss_giou": 2.0}


def test_build_criterion_refuses_an_unknown_head_family():
    with pytest.raises(ModelError, match="Unknown head family 'yolo'"):
        build_criterion(ModelSpec(family="yolo"))
