"""The head families: one record each, in the one table every other module asks.

A family is everything that differs between GFL, RetinaNet, ATSS and FCOS once the shared
parts (backbone, FPN, the tower/tap contract of `DenseHead`, the cross-head forward) are
factored out: its predictors' options, its priors and box coder, its criterion (assignment,
GT losses, KD losses), its test-time NMS IoU, its default KD weights, and MMDetection's names
for its predictors. Adding a family is a criterion module plus one record below
(docs/architecture.md); nothing else branches on a family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.criteria import (
    ATSSCriterion,
    DenseCriterion,
    FCOSCriterion,
    GFLCriterion,
    RetinaNetCriterion,
)
from crosskd_cli.detection.box_coders import BoxCoder, DeltaCoder, DistanceCoder, DistributionCoder
from crosskd_cli.detection.priors import AnchorGrid, anchor_grid, point_grid
from crosskd_cli.errors import lookup


@dataclass(frozen=True)
class Family:
    """One head family. Callables take the model spec, so sizes (reg_max, anchors) follow it."""

    name: str
    criterion: type[DenseCriterion]  # assignment, GT losses and the family's KD losses
    box_coder: Callable[[ModelSpec], BoxCoder]  # box predictions -> boxes
    priors: Callable[[ModelSpec], AnchorGrid]  # anchors, or points (FCOS)
    # DenseHead's predictor options; its box channels and anchors per location come from the
    # box coder and the priors
    head_options: Mapping[str, Any]
    nms_iou: float  # test-time NMS IoU (MMDetection's test config)
    # The authors' KD weights: cls, box, centerness (ATSS) and pkd (docs/method.md §3)
    kd_defaults: Mapping[str, float]
    # crosskd predictor name -> MMDetection's (imports, and checkpoints of crosskd 0.1.0)
    mmdet_predictors: Mapping[str, str]

    def build_criterion(self, spec: ModelSpec) -> DenseCriterion:
        return self.criterion(spec, self.box_coder(spec), self.priors(spec))


FAMILIES: dict[str, Family] = {
    "gfl": Family(
        name="gfl",
        criterion=GFLCriterion,
        box_coder=lambda spec: DistributionCoder(spec.reg_max),
        priors=anchor_grid,
        head_options={},
        nms_iou=0.6,
        kd_defaults={"cls": 1.0, "box": 4.0, "centerness": 0.0, "pkd": 6.0},
        mmdet_predictors={"cls_predictor": "gfl_cls", "box_predictor": "gfl_reg"},
    ),
    "retinanet": Family(
        name="retinanet",
        criterion=RetinaNetCriterion,
        box_coder=lambda spec: DeltaCoder((1.0, 1.0, 1.0, 1.0)),
        priors=anchor_grid,
        head_options={"scaled": False},
        nms_iou=0.5,
        kd_defaults={"cls": 1.0, "box": 1.0, "centerness": 0.0, "pkd": 2.0},
        mmdet_predictors={"cls_predictor": "retina_cls", "box_predictor": "retina_reg"},
    ),
    "atss": Family(
        name="atss",
        criterion=ATSSCriterion,
        box_coder=lambda spec: DeltaCoder((0.1, 0.1, 0.2, 0.2)),
        priors=anchor_grid,
        head_options={"centerness_tower": "reg", "box_fp32": True},
        nms_iou=0.6,
        kd_defaults={"cls": 1.0, "box": 1.0, "centerness": 1.0, "pkd": 1.0},
        mmdet_predictors={
            "cls_predictor": "atss_cls",
            "box_predictor": "atss_reg",
            "centerness_predictor": "atss_centerness",
        },
    ),
    "fcos": Family(
        name="fcos",
        criterion=FCOSCriterion,
        box_coder=lambda spec: DistanceCoder(),
        priors=point_grid,
        head_options={"centerness_tower": "cls", "box_exp": True},
        nms_iou=0.5,
        # FCOS's own cls and box weights (the authors' override, docs/method.md §3.6)
        kd_defaults={"cls": 0.4, "box": 0.75, "centerness": 0.0, "pkd": 2.0},
        mmdet_predictors={
            "cls_predictor": "conv_cls",
            "box_predictor": "conv_reg",
            "centerness_predictor": "conv_centerness",
        },
    ),
}


def get_family(name: str) -> Family:
    """FAMILIES[name], or one clear error listing the known families with the closest one."""
    return lookup(FAMILIES, name, "head family")


def build_criterion(spec: ModelSpec) -> DenseCriterion:
    """The ground-truth (and KD) criterion of the spec's head family."""
    return get_family(spec.family).build_criterion(spec)
