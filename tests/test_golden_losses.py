"""Golden numbers: every loss term of one distillation step, and the student's gradients.

`tests/fixtures/golden_losses.json` was written ONCE, by `tests/fixtures/make_golden_losses.py`
running crosskd 0.1.0 (torch 2.14 on CPU), from the setup in this module. For each head family
(gfl, retinanet, atss, fcos) and each case in `CASES` (the methods, cross indices 0/2/4 and the
ablations), it holds every loss term `Distiller.step` returns, by name, at full precision, the
names `Distiller.loss_names()` watches, and the sum of squared gradients of the student (per
top-level module) after `sum(losses).backward()`. This test recomputes them and asserts the
loss terms equal to rel 1e-5 (abs 1e-7), the gradient sums to rel 2e-3 (see GRAD_REL).

A refactor may rename things, never change the numbers:
- a loss term renamed: add `old name -> new name` to `RENAMED`;
- a state-dict key renamed (predictors, towers, adapter): make `v010_key` return the 0.1.0 name
  of a current key (a key of a Detector, or of a TapAdapter: `cls.weight`, ...). Every weight
  is a function of its 0.1.0 key name (`golden_tensor`), never of construction order, so the
  models are bit-identical whatever the modules are called or in which order they are built.
  The 0.1.0 key names are in the checkpoints under `tests/fixtures/v0_1_0/`.
Never regenerate the JSON to make this test pass: a changed number is a changed method.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from crosskd_cli.checkpoints.format import load_state_into
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.detection.structures import Batch, Target
from crosskd_cli.distill.distiller import AdaptedStudent, Distiller, TapAdapter
from crosskd_cli.families import build_criterion
from crosskd_cli.models import Detector, build_detector
from tests.conftest import one_thread

GOLDEN_PATH = Path(__file__).parent / "fixtures" / "golden_losses.json"

# 0.1.0 loss-term name -> its current name (filled in by a refactor that renames terms).
RENAMED: dict[str, str] = {}

LOSS_REL, LOSS_ABS = 1e-5, 1e-7
# Gradients amplify rounding: the same step on 1 and on 2 threads gave squared gradient norms
# up to 6e-4 apart (FCOS's focal-loss backward, RetinaNet at index 4), the losses <= 2e-7 apart.
# Steps run on one thread (`one_thread`), which is bit-reproducible; the margin is for another
# CPU or a reordered reduction. A wrong gradient path moves these sums by far more.
GRAD_REL = 2e-3

FAMILIES = ("gfl", "retinanet", "atss", "fcos")
DEFAULT_INDEX = {"gfl": 3, "retinanet": 3, "atss": 3, "fcos": 2}  # the pair presets' index
STUDENT_SEED, TEACHER_SEED, WIDE_TEACHER_SEED, ADAPTER_SEED = 1, 2, 3, 4

SMALL = dict(backbone="resnet18", num_classes=3, fpn_channels=16, head_channels=16, norm_groups=8)
STUDENT_SPECS = {
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
TEACHER_BACKBONE = "resnet34"
WIDE_HEAD = 32  # the adapter case: a resnet18 teacher whose head is twice the student's width

# case -> DistillConfig fields; without a cross_index, the family's DEFAULT_INDEX
CASES: dict[str, dict] = {
    "crosskd@0": {"method": "crosskd", "cross_index": 0},
    "crosskd@2": {"method": "crosskd", "cross_index": 2},
    "crosskd@4": {"method": "crosskd", "cross_index": 4},
    "mimic": {"method": "mimic"},
    "pkd": {"method": "pkd"},
    "crosskd+pkd": {"method": "crosskd+pkd"},
    "crosskd+mimic": {"method": "crosskd+mimic"},
    "none": {"method": "none"},
    "align=false": {"method": "crosskd", "align": False},
    "cls_kd=bce": {"method": "crosskd", "cls_kd": "bce"},
    "region_weight=hard": {"method": "crosskd", "region_weight": "hard"},
    "box_kd=false": {"method": "crosskd", "box_kd": False},
    "adapter": {"method": "crosskd", "adapter": True},  # student head 16 wide, teacher's 32
}
CASE_IDS = [f"{family}/{case}" for family in FAMILIES for case in CASES]


# crosskd 0.2 renamed the head's modules; 0.1.0 used MMDetection's predictor names per family
V010_PREDICTORS = {
    "cls_predictor": {"gfl": "gfl_cls", "retinanet": "retina_cls", "atss": "atss_cls",
                      "fcos": "conv_cls"},
    "box_predictor": {"gfl": "gfl_reg", "retinanet": "retina_reg", "atss": "atss_reg",
                      "fcos": "conv_reg"},
    "centerness_predictor": {"atss": "atss_centerness", "fcos": "conv_centerness"},
}  # fmt: skip


def v010_key(key: str, family: str = "gfl") -> str:
    """The crosskd 0.1.0 name of a current state-dict key: `head.towers.cls.*` was
    `head.cls_tower.*`, `head.cls_predictor.*` was `head.gfl_cls.*` (GFL) and so on."""
    parts = key.split(".")
    if parts[:2] == ["head", "towers"]:
        return ".".join(["head", f"{parts[2]}_tower", *parts[3:]])
    if len(parts) == 3 and parts[0] == "head" and parts[1] in V010_PREDICTORS:
        return ".".join(["head", V010_PREDICTORS[parts[1]][family], parts[2]])
    return key


def golden_tensor(v010_name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> Tensor:
    """The value of the weight named `v010_name` (its 0.1.0 key) in the model seeded `seed`.

    Drawn from a generator seeded by (seed, name) alone. Sizes keep every output O(1-10), also
    in the eval-mode teachers: conv weights N(0, 1 / fan_in) (far from the heads' near-constant
    N(0, 0.01) init, so every loss term is sizeable), norm affines near (1, 0), BN statistics
    near (0, 1), the per-level Scales (0-d) in [0.75, 1.25].
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{v010_name}".encode()))
    leaf = v010_name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 4:  # conv weight
        fan_in = shape[1] * shape[2] * shape[3]
        value = torch.randn(shape, generator=gen) * math.sqrt(1.0 / fan_in)
    elif len(shape) == 0:  # a level's Scale
        value = 0.75 + 0.5 * torch.rand(shape, generator=gen)
    elif leaf == "running_var":
        value = 0.5 + torch.rand(shape, generator=gen)
    elif leaf == "weight":  # BatchNorm / GroupNorm scale
        value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif leaf in ("bias", "running_mean"):
        value = 0.1 * torch.randn(shape, generator=gen)
    else:
        raise ValueError(f"No golden rule for the weight '{v010_name}' of shape {tuple(shape)}.")
    return value.to(dtype)


def fill_golden(model: nn.Module, seed: int, family: str = "gfl") -> nn.Module:
    """Overwrite every state-dict entry of `model` with `golden_tensor` of its 0.1.0 name."""
    state = {
        key: golden_tensor(v010_key(key, family), value.shape, value.dtype, seed)
        for key, value in model.state_dict().items()
    }
    load_state_into(model, state, source=f"golden weights (seed {seed})")
    return model


def make_batch() -> Batch:
    """Two images padded to 64x96, the second 56x80 inside its padding; four boxes, 3 classes."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=gen)
    targets = [
        Target(
            torch.tensor([[4.0, 6.0, 40.0, 50.0], [44.0, 8.0, 92.0, 60.0]]),
            torch.tensor([0, 2]),
            1,
            (64, 96),
            (1.0, 1.0),
        ),
        Target(
            torch.tensor([[10.0, 8.0, 45.0, 40.0], [58.0, 30.0, 76.0, 52.0]]),
            torch.tensor([1, 0]),
            2,
            (56, 80),
            (1.0, 1.0),
        ),
    ]
    return Batch(images, [(64, 96), (56, 80)], targets)


def batch_checksum(batch: Batch) -> int:
    """Guards the input itself: a changed random stream would show here first."""
    weights = torch.arange(1, batch.images.numel() + 1, dtype=torch.int64) % 9973
    return int((batch.images.flatten().to(torch.int64) * weights).sum())


@functools.cache
def models(family: str) -> tuple[Detector, Detector, Detector, TapAdapter]:
    """(student in train mode, teacher, wide teacher, adapter 16 -> 32), built once.

    Every case reuses them: the student's BN running statistics move with each forward but a
    training-mode forward never reads them, and gradients are cleared before each case.
    """
    spec = STUDENT_SPECS[family]
    student = fill_golden(build_detector(spec), STUDENT_SEED, family).train()
    teacher_spec = replace(spec, backbone=TEACHER_BACKBONE)
    wide_spec = replace(spec, head_channels=WIDE_HEAD)
    teachers = [
        fill_golden(build_detector(s), seed, family).eval().requires_grad_(False)
        for s, seed in ((teacher_spec, TEACHER_SEED), (wide_spec, WIDE_TEACHER_SEED))
    ]
    adapter = fill_golden(TapAdapter(spec.head_channels, WIDE_HEAD), ADAPTER_SEED)
    return student, teachers[0], teachers[1], adapter


def grad_sum_of_squares(module: nn.Module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is not None:
            total += p.grad.double().pow(2).sum()
    return total.item()


def compute_case(case_id: str) -> dict:
    """One distillation step of case `family/case`: its loss terms (floats, by name), the
    distiller's watched KD names, and the student's squared gradient norms after backward."""
    with one_thread():
        return _compute_case(case_id)


def _compute_case(case_id: str) -> dict:
    family, case = case_id.split("/", 1)
    fields = dict(CASES[case])
    fields.setdefault("cross_index", DEFAULT_INDEX[family])
    cfg = DistillConfig(**fields)
    student, teacher, wide_teacher, adapter = models(family)
    model: nn.Module = student
    if cfg.adapter:
        teacher, model = wide_teacher, AdaptedStudent(student, adapter)
    for p in model.parameters():
        p.grad = None
    distiller = Distiller(teacher, build_criterion(STUDENT_SPECS[family]), cfg)
    torch.manual_seed(0)  # nothing in a step draws random numbers; pinned in case one does
    losses = distiller.step(model, make_batch())
    sum(losses.values()).backward()
    parts = ("backbone", "neck", "head")
    grads = {name: grad_sum_of_squares(getattr(student, name)) for name in parts}
    if cfg.adapter:
        grads["adapter"] = grad_sum_of_squares(adapter)
    assert all(p.grad is None for p in teacher.parameters())
    return {
        "losses": {name: value.item() for name, value in losses.items()},
        "kd_names": list(distiller.loss_names()),
        "grad_sq": grads,
    }


# ----------------------------------------------------------------------------------- tests


@functools.cache
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def renamed(name: str) -> str:
    return RENAMED.get(name, name)


def test_the_golden_file_covers_every_case_on_the_same_input():
    data = golden()
    assert data["crosskd_version"] == "0.1.0"
    assert sorted(data["cases"]) == sorted(CASE_IDS)
    assert data["batch_checksum"] == batch_checksum(make_batch())
    assert set(CASES) == {case_id.split("/", 1)[1] for case_id in CASE_IDS}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_loss_terms_and_gradients_equal_the_v010_golden_numbers(case_id):
    expected = golden()["cases"][case_id]
    got = compute_case(case_id)
    assert sorted(got["losses"]) == sorted(renamed(k) for k in expected["losses"])
    for name, value in expected["losses"].items():
        assert got["losses"][renamed(name)] == pytest.approx(value, rel=LOSS_REL, abs=LOSS_ABS), (
            name
        )
    assert got["kd_names"] == [renamed(k) for k in expected["kd_names"]]
    assert sorted(got["grad_sq"]) == sorted(expected["grad_sq"])
    for part, value in expected["grad_sq"].items():
        assert got["grad_sq"][part] == pytest.approx(value, rel=GRAD_REL), part
