"""FCOS: point assignment by regress range, focal + -ln IoU + centerness losses, FCOS's KD."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.criteria.base import NORM_EPS, DenseCriterion, FlatOutputs, ReduceMean
from crosskd_cli.detection.box_ops import bbox_to_distance
from crosskd_cli.detection.losses import focal_loss, iou_loss
from crosskd_cli.detection.targets import (
    FCOS_RANGES,
    DenseTargets,
    build_targets,
    centerness_target,
    fcos_assign,
)
from crosskd_cli.errors import ModelError


class FCOSCriterion(DenseCriterion):
    """MMDetection's FCOSHead losses (no centre sampling, distances in pixels).

    Focal over every point / num_pos; -ln IoU on decoded positives weighted by their centerness
    targets / the sum of those targets; centerness BCE / num_pos; both counts averaged across
    processes. KD (docs/method.md §3.6, the authors' FCOS override): cls KD and -ln IoU box KD, both
    divided by the centerness-target sum (floored at 1), nothing masked.
    """

    LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_centerness": 1.0}
    box_kd_loss = staticmethod(iou_loss)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        if len(spec.strides) > len(FCOS_RANGES):
            raise ModelError(
                f"FCOS has regress ranges for {len(FCOS_RANGES)} levels, the spec lists "
                f"{len(spec.strides)} strides.",
                hint="Use strides (8, 16, 32, 64, 128) or fewer for FCOS.",
            )

    def build_targets(
        self,
        flat: FlatOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        reduce_mean: ReduceMean,
    ) -> DenseTargets:
        matched = fcos_assign(flat.anchors, gt_boxes, gt_mask)
        targets = build_targets(
            matched, gt_boxes, gt_labels, self.num_classes, reduce_mean, min_one_per_image=False
        )
        points = flat.anchors.centers
        distances = bbox_to_distance(points, targets.bbox_targets).clamp(min=NORM_EPS)
        targets.centerness = centerness_target(distances) * targets.pos_mask
        targets.centerness_sum = reduce_mean(targets.centerness.sum())
        return targets

    def gt_losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean
    ) -> dict[str, Tensor]:
        pos, centerness = targets.pos_mask, targets.centerness
        loss_cls = focal_loss(flat.cls, targets.labels, targets.label_weights)
        # Off positives the target is a zero box: IoU 0, -ln clamps it, and the weight is 0
        iou = iou_loss(self.decode(flat), targets.bbox_targets, centerness, "sum")
        # targets come in float32 (the priors'); the loss takes the outputs' dtype
        target = centerness.to(flat.centerness.dtype)
        bce = F.binary_cross_entropy_with_logits(flat.centerness, target, reduction="none")
        w = self.loss_weights
        return {
            "loss_cls": w["loss_cls"] * loss_cls / targets.num_pos,
            "loss_bbox": w["loss_bbox"] * iou / targets.centerness_sum.clamp(min=NORM_EPS),
            "loss_centerness": w["loss_centerness"] * (bce * pos).sum() / targets.num_pos,
        }

    def kd_normalizer(self, targets: DenseTargets) -> Tensor:
        """The centerness-target sum, floored at 1 (not 1e-6 as for the GT box loss): the KD
        sums are not centerness-weighted, so a batch without positives would multiply them
        by a million."""
        return targets.centerness_sum.clamp(min=1.0)
