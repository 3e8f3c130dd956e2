"""The distiller pins the method down: where KD gradient goes, what the teacher does, alignment."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from crosskd_cli.checkpoints.format import CheckpointMeta
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.criteria import FlatOutputs
from crosskd_cli.detection.structures import Batch, Target
from crosskd_cli.detection.targets import DenseTargets
from crosskd_cli.distill.distiller import (
    AdaptedStudent,
    Distiller,
    TapAdapter,
    align_tap,
    cross_head_forward,
    tap_stats,
)
from crosskd_cli.distill.kd_terms import parse_method
from crosskd_cli.distill.pairing import check_cross_index, check_pair, pair_problems
from crosskd_cli.errors import ModelError, PresetError
from crosskd_cli.families import build_criterion
from crosskd_cli.models import build_detector

STUDENT = ModelSpec(
    backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32, norm_groups=8
)
TEACHER = replace(STUDENT, backbone="resnet34")


def make_batch() -> Batch:
    torch.manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    targets = [
        Target(
            torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
            torch.tensor([0, 2]),
            1,
            (96, 128),
            (1.0, 1.0),
        ),
        Target(
            torch.tensor([[30.0, 30.0, 90.0, 80.0]]), torch.tensor([1]), 2, (80, 100), (1.0, 1.0)
        ),
    ]
    return Batch(images, [(96, 128), (80, 100)], targets)


def make_pair(method: str = "crosskd", index: int = 3, **kwargs):
    torch.manual_seed(0)
    teacher = build_detector(TEACHER).eval().requires_grad_(False)
    student = build_detector(STUDENT).train()
    cfg = DistillConfig(method=method, cross_index=index, **kwargs)
    return teacher, student, Distiller(teacher, build_criterion(STUDENT), cfg)


def kd_only(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.startswith("kd_"))


def grads(module: torch.nn.Module) -> float:
    total = 0.0
    for p in module.parameters():
        if p.grad is not None:
            total += p.grad.abs().sum().item()
    return total


def test_a_distill_step_leaves_the_teacher_bit_identical_and_without_grad():
    teacher, student, distiller = make_pair("crosskd+pkd")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    losses = distiller.step(student, make_batch())
    sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


@pytest.mark.parametrize("index", [1, 2, 3])
def test_crosskd_gradient_reaches_blocks_up_to_i_but_never_the_later_blocks_or_predictors(index):
    _, student, distiller = make_pair("crosskd", index)
    kd_only(distiller.step(student, make_batch())).backward()
    head = student.head
    for tower in (head.towers["cls"], head.towers["reg"]):
        for k, block in enumerate(tower, start=1):
            if k <= index:
                assert grads(block) > 0, f"block {k} should learn from the KD loss"
            else:
                assert grads(block) == 0, f"block {k} must answer to the ground truth only"
    for predictor in (head.cls_predictor, head.box_predictor, head.scales):
        assert grads(predictor) == 0
    assert grads(student.neck) > 0 and grads(student.backbone) > 0


def test_crosskd_at_index_4_teaches_every_block_and_still_spares_the_predictors():
    _, student, distiller = make_pair("crosskd", 4)
    kd_only(distiller.step(student, make_batch())).backward()
    assert all(grads(block) > 0 for block in student.head.towers["cls"])
    assert grads(student.head.cls_predictor) == 0 and grads(student.head.box_predictor) == 0


def test_a_narrower_student_learns_through_its_tap_adapter_up_to_block_i_only():
    torch.manual_seed(0)
    teacher = build_detector(replace(TEACHER, head_channels=64)).eval().requires_grad_(False)
    student = build_detector(STUDENT).train()  # head 32 wide against the teacher's 64
    adapted = AdaptedStudent(student, TapAdapter(32, 64))
    distiller = Distiller(teacher, build_criterion(STUDENT), DistillConfig(cross_index=2))
    kd_only(distiller.step(adapted, make_batch())).backward()
    assert grads(adapted.adapter["cls"]) > 0 and grads(adapted.adapter["reg"]) > 0
    assert grads(student.head.towers["cls"][1]) > 0 and grads(student.head.towers["cls"][2]) == 0
    assert grads(student.head.cls_predictor) == 0
    assert AdaptedStudent.exported(adapted) is student
    assert not any("adapter" in key for key in student.state_dict())


def test_mimic_sends_kd_gradient_into_the_students_own_predictors():
    _, student, distiller = make_pair("mimic")
    losses = distiller.step(student, make_batch())
    assert set(k for k in losses if k.startswith("kd_")) == {"kd_mimic_cls", "kd_mimic_box"}
    kd_only(losses).backward()
    assert grads(student.head.cls_predictor) > 0 and grads(student.head.box_predictor) > 0


def test_index_0_feeds_the_fpn_features_to_the_whole_teacher_head():
    teacher, student, _ = make_pair()
    batch = make_batch()
    out = student(batch.images, batch.image_sizes, tap_index=0)
    assert all(tap is feat for tap, feat in zip(out.head.taps["cls"], out.features, strict=True))
    assert all(tap is feat for tap, feat in zip(out.head.taps["reg"], out.features, strict=True))


def test_the_aligned_tap_has_the_teachers_per_channel_mean_and_std():
    torch.manual_seed(0)
    student_tap = torch.randn(2, 4, 5, 6) * 3 + 7
    teacher_tap = torch.randn(2, 4, 5, 6) * torch.tensor([0.5, 1, 2, 4]).view(1, 4, 1, 1) - 1
    aligned = align_tap(student_tap, teacher_tap)
    dims = (0, 2, 3)
    torch.testing.assert_close(aligned.mean(dims), teacher_tap.mean(dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(aligned.std(dims), teacher_tap.std(dims), atol=1e-4, rtol=1e-4)


def textbook_align(student_tap, teacher_tap):
    """docs/method.md §2.4 as written: (s - mean_s) / std_s * std_t + mean_t."""
    dims = (0, 2, 3)
    t_mean = teacher_tap.mean(dims, keepdim=True)
    t_std = teacher_tap.std(dims, keepdim=True) + 1e-6
    s_mean = student_tap.mean(dims, keepdim=True)
    s_std = student_tap.std(dims, keepdim=True) + 1e-6
    return (student_tap - s_mean) / s_std * t_std + t_mean


def test_alignment_is_the_textbook_formula_in_value_and_gradient_from_taps_or_their_stats():
    torch.manual_seed(0)
    teacher_tap = torch.randn(2, 4, 5, 6) * 2 + 1
    weights = torch.randn(2, 4, 5, 6)
    results = []
    for align in (textbook_align, align_tap, lambda s, t: align_tap(s, tap_stats(t))):
        student_tap = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 3 + 7
        student_tap.requires_grad_(True)
        aligned = align(student_tap, teacher_tap)
        (aligned * weights).sum().backward()
        results.append((aligned.detach(), student_tap.grad))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, results[0][1], atol=1e-5, rtol=1e-5)


def test_alignment_saves_no_activation_map_but_the_tap_for_the_backward():
    """Memory: autograd may keep the student's tap (the cross pass holds it anyway) and
    per-channel statistics, never a second map of the tap's size."""
    torch.manual_seed(0)
    student_tap = torch.randn(2, 8, 16, 16, requires_grad=True)
    tap = student_tap * 1.0  # a non-leaf, as the student's block output is
    stats = tap_stats(torch.randn(2, 8, 16, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        align_tap(tap, stats).relu_()
    maps = [t for t in saved if t.numel() == tap.numel()]
    assert maps, "the hooks saw the tap saved"
    extra = [t for t in maps if t.data_ptr() != tap.data_ptr()]
    # relu_ keeps its output (the cross pass's input, kept by the next conv anyway)
    assert len(extra) <= 1


def test_the_teacher_step_output_keeps_only_what_the_terms_read():
    teacher, _, distiller = make_pair("crosskd")
    batch = make_batch()
    out, stats = distiller.teacher_forward(batch.images, batch.image_sizes)
    assert out.head.taps == {} and out.features == []  # freed before the student runs
    with torch.no_grad():
        full = teacher(batch.images, batch.image_sizes, tap_index=3)
    for tower, taps in full.head.taps.items():
        for (mean, std), tap in zip(stats[tower], taps, strict=True):
            torch.testing.assert_close(mean, tap.mean((0, 2, 3), keepdim=True))
            torch.testing.assert_close(std, tap.std((0, 2, 3), keepdim=True) + 1e-6)
    _, _, distiller = make_pair("crosskd+pkd")
    out, _ = distiller.teacher_forward(batch.images, batch.image_sizes)
    assert len(out.features) == len(full.features)  # PKD reads them


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_cross_head_identity_same_model_without_alignment_gives_the_teachers_predictions(index):
    torch.manual_seed(0)
    teacher = build_detector(TEACHER).eval()
    batch = make_batch()
    with torch.no_grad():
        out = teacher(batch.images, batch.image_sizes, tap_index=index)
        cross = cross_head_forward(teacher.head, index, out.head.taps, out.head.taps, align=False)
    for mine, theirs in zip(
        cross.cls_logits + cross.box_preds, out.head.cls_logits + out.head.box_preds, strict=True
    ):
        assert torch.equal(mine, theirs)


def test_method_none_has_only_ground_truth_losses_and_crosskd_names_its_terms():
    _, student, distiller = make_pair("none")
    assert set(distiller.step(student, make_batch())) == {"loss_qfl", "loss_dfl", "loss_giou"}
    _, student, distiller = make_pair("crosskd+mimic")
    names = set(distiller.step(student, make_batch()))
    assert names == {
        "loss_qfl",
        "loss_dfl",
        "loss_giou",
        "kd_cross_cls",
        "kd_cross_box",
        "kd_mimic_cls",
        "kd_mimic_box",
    }
    assert distiller.loss_names() == (
        "kd_cross_cls",
        "kd_cross_box",
        "kd_mimic_cls",
        "kd_mimic_box",
    )


def test_ablation_switches_drop_the_terms_they_name():
    _, student, distiller = make_pair("crosskd", cls_kd="none")
    assert {k for k in distiller.step(student, make_batch()) if k.startswith("kd")} == {
        "kd_cross_box"
    }
    _, student, distiller = make_pair("crosskd", box_kd=False)
    assert {k for k in distiller.step(student, make_batch()) if k.startswith("kd")} == {
        "kd_cross_cls"
    }


def test_a_method_is_parsed_into_kd_terms_and_an_unknown_term_is_named():
    assert parse_method("pkd+crosskd") == ("crosskd", "pkd")  # the order losses are summed in
    assert parse_method("none") == ()
    with pytest.raises(PresetError) as info:
        parse_method("crosskd+ld")
    assert info.value.message == "Method 'crosskd+ld': 'ld' is not a KD term."
    assert "Combine crosskd, mimic, pkd with '+'" in info.value.hint


def test_gfl_kd_loss_normalises_cls_by_positives_and_box_by_the_soft_region_weights():
    cfg = DistillConfig()  # GFL's default weights: cls 1, box 4
    criterion = build_criterion(ModelSpec(num_classes=1, reg_max=1))
    # one image, two locations, one class; reg_max 1 -> 2 bins x 4 sides = 8 logits
    teacher_box = torch.zeros(1, 2, 8)
    teacher_box[0, 1, 0] = 1.0  # side 0 of location 1 prefers bin 0
    pred = FlatOutputs(torch.tensor([[[0.0], [0.0]]]), torch.zeros(1, 2, 8), None, None, None)
    teacher = FlatOutputs(torch.tensor([[[0.0], [2.0]]]), teacher_box, None, None, None)
    pos = torch.tensor([[False, True]])
    targets = DenseTargets(
        labels=torch.tensor([[1, 0]]),
        label_weights=torch.tensor([[1.0, 1.0]]),
        bbox_targets=torch.zeros(1, 2, 4),
        pos_mask=pos,
        matched_idxs=torch.tensor([[-1, 0]]),
        num_pos=torch.tensor(2.0),
    )
    weights = {"cls": 1.0, "box": 4.0, "centerness": 0.0}
    losses = criterion.kd_losses(pred, teacher, targets, cfg, weights, prefix="kd")
    # cls: location 0 teacher p=0.5, student p=0.5 -> |diff| = 0 -> 0.
    # location 1: teacher q = sigmoid(2) = 0.880797; student p = 0.5
    # BCE(0 logit, q) = ln 2 = 0.693147; x |0.5 - q| = 0.380797 -> 0.263948; / num_pos 2
    assert losses["kd_cls"].item() == pytest.approx(0.693147 * 0.380797 / 2, rel=1e-5)
    # box: region weights w = sigmoid(max teacher logit) = [0.5, 0.880797]
    # location 0: identical uniform distributions -> KL 0.
    # location 1 side 0: t = softmax([1, 0]) = [0.731059, 0.268941] vs s = [0.5, 0.5]:
    # KL = 0.731059 ln(1.462117) + 0.268941 ln(0.537883) = 0.277719 - 0.166774 = 0.110944;
    # averaged over 4 sides -> 0.027736; x w 0.880797 -> 0.024430; / sum(w) 1.380797; x 4.
    expected = 4 * 0.110944 / 4 * 0.880797 / 1.380797
    assert losses["kd_box"].item() == pytest.approx(expected, rel=1e-4)


def test_cross_index_out_of_range_names_the_valid_range():
    with pytest.raises(ModelError) as info:
        check_cross_index(5, TEACHER, STUDENT)
    assert info.value.message == (
        "--cross-index 5 is out of range: these heads have 4 tower blocks."
    )
    assert info.value.hint.startswith("Choose 0..4")


def test_a_teacher_of_another_class_list_is_refused_naming_both_lists():
    teacher = CheckpointMeta(
        model=TEACHER,
        class_names=["circle", "square", "star"],
        category_ids=[1, 2, 3],
        preset="shapes-gfl-r34",
        val_data="builtin:shapes",
        image_scale=(96, 96),
        eval_batch_size=4,
        crosskd_version="0.2.0",
        kind="teacher",
    )
    val = SimpleNamespace(class_names=["circle", "square", "ring"], category_ids=[1, 2, 4])
    with pytest.raises(ModelError) as info:
        check_pair(teacher, "t.safetensors", STUDENT, val, "/data", DistillConfig(cross_index=3))
    assert info.value.message == (
        "Teacher t.safetensors does not fit the data: The checkpoint predicts 3 classes "
        "(circle, square, star...) but data '/data' has 3 (circle, square, ring...)."
    )
    assert info.value.hint.startswith("Train or import a teacher on this data set's classes")


def test_incompatible_pairs_say_what_differs():
    assert pair_problems(TEACHER, STUDENT, 3) == []
    problems = pair_problems(replace(TEACHER, num_classes=80, reg_max=8), STUDENT, 3)
    assert problems == [
        "class counts differ: teacher 80, student 3",
        "reg_max differ: teacher 8, student 16",
    ]
    wide_teacher = replace(TEACHER, head_channels=64, norm_groups=8)
    assert pair_problems(wide_teacher, STUDENT, 2) == [
        "tap widths at index 2 differ: teacher 64, student 32 "
        "(--set distill.adapter=true adds a learnable 1x1 adapter)"
    ]
    assert pair_problems(wide_teacher, STUDENT, 2, adapter=True) == []
    assert pair_problems(wide_teacher, STUDENT, 0) == []  # index 0 taps the equal FPN widths


@pytest.mark.parametrize("family", ["gfl", "retinanet", "atss", "fcos"])
def test_a_pair_built_in_float64_distills_in_float64_as_its_float32_twin(family):
    """Every loss and gradient stays in float64 when the models are built in it (what the
    equivalence tests across processes rely on to take rounding out), and is the float32
    step's to float32 precision; under bf16 autocast the losses are float32 as before."""
    spec = replace(STUDENT, family=family)
    torch.manual_seed(0)
    teacher = build_detector(replace(spec, backbone="resnet34")).eval().requires_grad_(False)
    student = build_detector(spec).train()
    cfg = DistillConfig(method="crosskd+mimic", cross_index=2)
    wide = {}
    for dtype in (torch.float32, torch.float64):
        pair = (teacher.to(dtype), student.to(dtype))
        losses = Distiller(pair[0], build_criterion(spec), cfg).step(pair[1], make_batch())
        assert {v.dtype for v in losses.values()} == {dtype}
        wide[dtype] = {k: v.item() for k, v in losses.items()}
    for name, value in wide[torch.float64].items():
        assert wide[torch.float32][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    teacher, student = teacher.float(), student.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = Distiller(teacher, build_criterion(spec), cfg).step(student, make_batch())
    assert {v.dtype for v in losses.values()} == {torch.float32}
