"""Extending crosskd: a new head family and a new KD term are each one registration.

Both are registered here, in the test, exactly as docs/architecture.md tells a newcomer to do
in the package: a `Family` record in `families.FAMILIES`, a `KDTerm` in `kd_terms.KD_TERMS`.
Nothing else is edited, and the real commands train, distill and evaluate with them.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import read_meta
from crosskd_cli.cli import app
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.criteria import GFLCriterion
from crosskd_cli.detection.box_coders import DistributionCoder
from crosskd_cli.detection.structures import HeadOutput
from crosskd_cli.distill.kd_terms import KD_TERMS, KDTerm, parse_method
from crosskd_cli.families import FAMILIES, Family
from crosskd_cli.inference.postprocess import postprocess

runner = CliRunner()
TINY = [
    "--data", "builtin:shapes:images=24,val=8,size=96",
    "--set", "train.max_iters=3", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
    "--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
    "--set", "model.backbone=resnet18",
]  # fmt: skip

# A fifth family: GFL's head and losses under another name, with its own NMS IoU and KD weights
TOY_FAMILY = Family(
    name="toy",
    criterion=GFLCriterion,
    box_coder=lambda spec: DistributionCoder(spec.reg_max),
    priors=FAMILIES["gfl"].priors,
    head_options={},
    nms_iou=0.95,
    kd_defaults={"cls": 2.0, "box": 1.0, "centerness": 0.0, "pkd": 1.0},
    mmdet_predictors={"cls_predictor": "toy_cls", "box_predictor": "toy_reg"},
)


class LogitL2(KDTerm):
    """A toy KD term: squared difference of the student's and the teacher's class logits."""

    token = "logitl2"
    weight_keys = ("logitl2",)
    defaults = {"logitl2": 0.5}  # no family defines it: the term's own default applies

    def loss_names(self, criterion, cfg) -> tuple[str, ...]:
        return ("kd_logitl2",)

    def __call__(self, distiller, out) -> dict[str, Tensor]:
        diff = out.student_flat.cls.float() - out.teacher_flat.cls.float()
        return {"kd_logitl2": distiller.weights["logitl2"] * diff.pow(2).mean()}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", TOY_FAMILY)
    monkeypatch.setitem(KD_TERMS, "logitl2", LogitL2())


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_a_registered_family_trains_distills_and_evaluates_through_the_cli(registered, tmp_path):
    toy = ["--set", "model.family=toy"]
    teacher = tmp_path / "teacher"
    result = invoke("teacher", "--preset", "shapes-gfl-r34", *TINY, *toy, "--out", str(teacher))
    assert result.exit_code == 0, result.output
    assert read_meta(teacher / "best.safetensors").model.family == "toy"
    student = tmp_path / "student"
    result = invoke(
        "distill", "--preset", "shapes-gfl-r34-to-r18", *TINY, *toy, "--method", "crosskd+logitl2",
        "--other-teacher", "--teacher", str(teacher / "best.safetensors"), "--out", str(student),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = read_meta(student / "best.safetensors")
    assert meta.model.family == "toy" and meta.training["method"] == "crosskd+logitl2"
    assert "cls_weight: 2.0" in (student / "preset.yaml").read_text()  # the family's default
    header = (student / "results.csv").read_text().splitlines()[0].split(",")
    assert {"kd_cross_cls", "kd_cross_box", "kd_logitl2"} <= set(header)
    result = invoke("eval", str(student / "best.safetensors"), "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"] == meta.metrics["AP"]


def test_the_registered_familys_nms_iou_is_the_one_applied(registered):
    """Two boxes of IoU 0.8 on one class: GFL's NMS (IoU 0.6) keeps one, the toy family's
    (0.95) keeps both; everything else about the two families is the same."""
    cls = torch.full((1, 1, 1, 2), 5.0)  # one 1x2 level of stride 8: anchors at x = 0 and 8
    box = torch.zeros(1, 4 * 5, 1, 2)  # reg_max 4: 5 bins per side
    box[:, 4::5] = 10.0  # every side in bin 4: 32 px -> [0, 0, 32, 32] and [0, 0, 40, 32]
    kept = {}
    for family in ("gfl", "toy"):
        spec = ModelSpec(family=family, num_classes=1, reg_max=4, strides=(8,))
        kept[family] = len(postprocess(HeadOutput([cls], [box]), [(64, 64)], spec)[0].scores)
    assert kept == {"gfl": 1, "toy": 2}


def test_a_registered_kd_term_is_a_method_token(registered):
    assert parse_method("logitl2+crosskd") == ("crosskd", "logitl2")
