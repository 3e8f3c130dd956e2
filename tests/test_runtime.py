"""The fast training step computes what the plain one does, to float rounding, and changes
no weight that is saved: the teacher's folded copy, channels-last batches, PKD without the
teacher's head, and the speed benchmark that measures them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks import speed
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.detection.structures import Batch, Target
from crosskd_cli.distill.distiller import Distiller
from crosskd_cli.families import build_criterion
from crosskd_cli.models import build_detector
from crosskd_cli.models.fast_step import (
    fold_frozen_batchnorm,
    runtime_teacher,
    step_layout,
    with_conv_weights_in,
)

STUDENT = ModelSpec(
    backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32, norm_groups=8
)
TEACHER = replace(STUDENT, backbone="resnet34")
# Folding and NHWC kernels add in another order: fp32 rounding, relative to the values' scale
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def make_batch() -> Batch:
    torch.manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    targets = [
        Target(torch.tensor([[10.0, 12.0, 60.0, 70.0]]), torch.tensor([0]), 1, (96, 128), (1, 1)),
        Target(torch.tensor([[30.0, 30.0, 90.0, 80.0]]), torch.tensor([2]), 2, (80, 100), (1, 1)),
    ]
    return Batch(images, [(96, 128), (80, 100)], targets)


def trained_looking_teacher() -> nn.Module:
    """A frozen teacher whose BatchNorms hold non-trivial statistics, as a trained one does
    (a fresh BN's mean 0 / var 1 would make folding almost the identity)."""
    torch.manual_seed(0)
    teacher = build_detector(TEACHER)
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return teacher.eval().requires_grad_(False)


def test_the_folded_teacher_predicts_what_the_teacher_does_and_the_teacher_is_untouched():
    teacher = trained_looking_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fast = runtime_teacher(teacher)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == 36  # ResNet-34's
    batch = make_batch()
    with torch.no_grad():
        plain = teacher(batch.images, batch.image_sizes, tap_index=2)
        folded = fast(step_layout(batch.images), batch.image_sizes, tap_index=2)
    for mine, theirs in zip(
        folded.head.cls_logits + folded.head.box_preds + folded.head.taps["cls"],
        plain.head.cls_logits + plain.head.box_preds + plain.head.taps["cls"],
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_under_bf16_autocast_the_teacher_with_bf16_conv_weights_computes_the_same_numbers():
    fast = runtime_teacher(trained_looking_teacher())
    cast = with_conv_weights_in(fast, torch.bfloat16)
    assert cast.head.towers["cls"][0].conv.weight.dtype == torch.bfloat16
    assert cast.head.towers["cls"][0].norm.weight is fast.head.towers["cls"][0].norm.weight
    assert fast.head.towers["cls"][0].conv.weight.dtype == torch.float32  # the copy's own
    batch = make_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = fast(step_layout(batch.images), batch.image_sizes)
        got = cast(step_layout(batch.images), batch.image_sizes)
    for mine, theirs in zip(got.head.cls_logits, want.head.cls_logits, strict=True):
        assert torch.equal(mine, theirs)


def test_only_frozen_norms_fold_never_one_that_trains():
    student = build_detector(STUDENT, pretrained=True)  # stem and layer1 frozen, BN in eval
    assert fold_frozen_batchnorm(student) == 5  # the stem and layer1's four convs
    assert isinstance(student.backbone.layer1[0].bn1, nn.Identity)
    assert isinstance(student.backbone.layer2[0].bn1, nn.BatchNorm2d)  # affine still trains
    frozen = build_detector(STUDENT, pretrained=True).eval().requires_grad_(False)
    assert fold_frozen_batchnorm(frozen) == 20  # ResNet-18: stem, 16 block convs, 3 shortcuts


@pytest.mark.parametrize("method", ["crosskd", "crosskd+pkd", "mimic"])
def test_a_fast_step_gives_the_plain_steps_losses_and_gradients(method):
    teacher = trained_looking_teacher()
    results = []
    for fast in (False, True):
        torch.manual_seed(1)
        student = build_detector(STUDENT, pretrained=True).train()
        distiller = Distiller(teacher, build_criterion(STUDENT), DistillConfig(method), fast=fast)
        losses = distiller.step(student, make_batch())
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        results.append((losses, grads, student.state_dict().keys()))
    (plain, plain_grads, plain_keys), (fast, fast_grads, fast_keys) = results
    assert plain.keys() == fast.keys() and plain_grads.keys() == fast_grads.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], **TOLERANCE)
    # Gradients are sums over many locations, some cancelling to ~1e-8: each parameter's
    # gradient is held to 0.1% of the largest gradient entry, the whole to 0.1% in norm
    scale = max(g.abs().max().item() for g in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=0, atol=1e-3 * scale)
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (fast_grads, plain_grads)]
    assert (flat[0] - flat[1]).norm() <= 1e-3 * flat[1].norm()
    assert list(fast_keys) == list(plain_keys)  # the student saves the same keys


def same_boxes_batch(images: torch.Tensor, first_id: int) -> Batch:
    """Images that all hold the same two boxes: every forward of RetinaNet then counts the
    same positives per image, so a loss normalised per forward is the same function of any
    split of the batch (docs/method.md §4.1)."""
    boxes, labels = (
        torch.tensor([[8.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]),
        torch.tensor([0, 2]),
    )
    size = tuple(images.shape[-2:])
    targets = [Target(boxes, labels, first_id + k, size, (1, 1)) for k in range(len(images))]
    return Batch(images, [size] * len(images), targets)


def accumulation_gap(fast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The relative norm of (gradients of 2 accumulated halves - gradients of the batch of
    4), each half's loss halved as the trainer does, and the accumulated gradients."""
    spec = replace(STUDENT, family="retinanet", norm_groups=None, anchor_ratios=(0.5, 1.0, 2.0))
    torch.manual_seed(0)
    teacher = build_detector(replace(spec, backbone="resnet34")).eval().requires_grad_(False)
    images = torch.randint(0, 256, (4, 3, 96, 128), dtype=torch.uint8)
    grads = []
    for halves in ((slice(0, 4),), (slice(0, 2), slice(2, 4))):
        torch.manual_seed(1)
        student = build_detector(spec, pretrained=True).train()
        distiller = Distiller(teacher, build_criterion(spec), DistillConfig("crosskd"), fast=fast)
        for part in halves:
            losses = distiller.step(student, same_boxes_batch(images[part], part.start))
            (sum(losses.values()) / len(halves)).backward()
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    whole, accumulated = (torch.cat([g.flatten() for g in d.values()]) for d in grads)
    return ((accumulated - whole).norm() / whole.norm()).item(), grads[1]


def test_with_the_fast_step_two_accumulated_halves_give_the_whole_batchs_gradients():
    """What gradient accumulation relies on, with the fast step's channels-last kernels and
    folded teacher: 2 x 2 images accumulated give the gradients of one batch of 4 as closely
    as the plain step's do (both ~0.1% in norm: near-cancelling P6/P7 gradients, rounding).
    Over training runs they drift further apart: after 3 SGD steps of a random student
    (tests/test_scale.py) by 4.5% of the update against 1e-6 after 2 steps, where a change of
    thread count alone moves the plain step by a third: rounding amplified by the random
    student, not an accumulation error, which would differ by the update itself."""
    plain_gap, plain = accumulation_gap(fast=False)
    fast_gap, fast = accumulation_gap(fast=True)
    assert plain_gap < 1e-2 and fast_gap <= 1.1 * plain_gap
    scale = max(g.abs().max().item() for g in plain.values())
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=0, atol=1e-3 * scale)


def test_pkd_alone_never_runs_the_teachers_head_and_gives_the_same_loss():
    teacher = trained_looking_teacher()
    calls = []
    teacher.head.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(1)
    student = build_detector(STUDENT).train()
    losses = Distiller(teacher, build_criterion(STUDENT), DistillConfig("pkd")).step(
        student, make_batch()
    )
    assert calls == []
    features = teacher.features(make_batch().images, make_batch().image_sizes)
    with_head = teacher(make_batch().images, make_batch().image_sizes).features
    assert all(torch.equal(a, b) for a, b in zip(features, with_head, strict=True))
    assert losses["kd_pkd"] > 0


def test_the_speed_benchmark_runs_and_writes_every_figure_in_yardsticks(tmp_path):
    out = tmp_path / "speed.json"
    report = speed.main(
        ["--teacher", "shapes-gfl-r34", "--student", "shapes-gfl-r18", "--size", "64",
         "--batch", "2", "--warmup", "0", "--repeats", "1", "--slow-repeats", "1",
         "--yardstick-size", "32", "--sections", "distill,floor,metric", "--precisions", "fp32",
         "--methods", "crosskd@3,none,teacher-forward", "--no-memory",
         "--metric-images", "5", "--json", str(out)]
    )  # fmt: skip
    written = json.loads(out.read_text())
    names = [(f["section"], f["name"]) for f in written["figures"]]
    assert names == [
        ("distill", "crosskd@3"),
        ("distill", "none"),
        ("distill", "teacher-forward"),
        ("floor", speed.BEST_CONV),
        ("metric", "5 images x 100 detections, faster"),
        ("metric", "5 images x 100 detections, pycocotools"),
    ]
    assert all(f["yardsticks"] > 0 and f["seconds"] > 0 for f in written["figures"])
    # the compute floor: the CrossKD step does the student's work, the teacher's forward and
    # the cross branch's forward and backward; each step's floor is its MACs at the best rate
    gmac = written["GMAC per step (and the best convolution's GMAC/s)"]
    assert gmac["crosskd@3 fp32"] > gmac["none fp32"] + gmac["teacher-forward fp32"] > 0
    floors = written["compute floor, yardsticks (MACs at the best convolution's rate)"]
    over = written["measured step / its compute floor"]
    for name, floor in floors.items():
        assert floor == pytest.approx(floors["none fp32"] * gmac[name] / gmac["none fp32"])
        assert over[name] == pytest.approx(
            next(f["yardsticks"] for f in written["figures"] if f"{f['name']} fp32" == name) / floor
        )
    ratio = written["KD step / (student step + teacher forward)"]["crosskd@3 fp32"]
    assert ratio == pytest.approx(
        report["figures"][0]["yardsticks"]
        / (report["figures"][1]["yardsticks"] + report["figures"][2]["yardsticks"])
    )
