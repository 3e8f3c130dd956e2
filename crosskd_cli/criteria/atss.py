"""ATSS: ATSS assignment, focal + GIoU + centerness GT losses, GIoU box and centerness KD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.criteria.base import FlatOutputs, ReduceMean
from crosskd_cli.criteria.retinanet import RetinaNetCriterion, positive_boxes
from crosskd_cli.detection.box_ops import bbox_to_distance
from crosskd_cli.detection.losses import focal_loss, giou_loss
from crosskd_cli.detection.targets import (
    ATSS_TOPK,
    DenseTargets,
    atss_assign,
    build_targets,
    centerness_target,
)


class ATSSCriterion(RetinaNetCriterion):
    """MMDetection's ATSSHead losses (deltas with stds 0.1, 0.1, 0.2, 0.2, decoded for GIoU).

    Focal / num_pos; GIoU on decoded positives weighted by their centerness targets / the sum
    of those targets; centerness BCE / num_pos. num_pos and the centerness sum are averaged
    across processes. The box KD is RetinaNet's (on ATSS deltas), plus centerness KD.
    """

    LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0}

    def build_targets(
        self,
        flat: FlatOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        reduce_mean: ReduceMean,
    ) -> DenseTargets:
        matched = atss_assign(flat.anchors, flat.valid, gt_boxes, gt_mask, ATSS_TOPK)
        targets = build_targets(matched, gt_boxes, gt_labels, self.num_classes, reduce_mean)
        distances = bbox_to_distance(flat.anchors.centers, positive_boxes(flat, targets))
        targets.centerness = centerness_target(distances.clamp(min=0)) * targets.pos_mask
        targets.centerness_sum = reduce_mean(targets.centerness.sum())
        return targets

    def gt_losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean
    ) -> dict[str, Tensor]:
        pos, centerness = targets.pos_mask, targets.centerness
        loss_cls = focal_loss(flat.cls, targets.labels, targets.label_weights)
        giou = giou_loss(self.decode(flat), positive_boxes(flat, targets), centerness, "sum")
        centerness_sum = targets.centerness_sum.clamp(min=1.0)
        # targets come in float32 (the priors'); the loss takes the outputs' dtype
        target = centerness.to(flat.centerness.dtype)
        bce = F.binary_cross_entropy_with_logits(flat.centerness, target, reduction="none")
        w = self.loss_weights
        return {
            "loss_cls": w["loss_cls"] * loss_cls / targets.num_pos,
            "loss_bbox": w["loss_bbox"] * giou / centerness_sum,
            "loss_centerness": w["loss_centerness"] * (bce * pos).sum() / targets.num_pos,
        }

    def extra_kd(
        self,
        pred: FlatOutputs,
        teacher: FlatOutputs,
        targets: DenseTargets,
        weights: dict[str, float],
        prefix: str,
    ) -> dict[str, Tensor]:
        """Centerness KD: BCE(pred logit, sigmoid(teacher logit)) on positives / num_pos."""
        soft = torch.sigmoid(teacher.centerness.detach())
        bce = F.binary_cross_entropy_with_logits(pred.centerness, soft, reduction="none")
        total = (bce * targets.pos_mask).sum() / targets.num_pos
        return {f"{prefix}_centerness": weights["centerness"] * total}

    def kd_names(self, cfg: DistillConfig, prefix: str) -> tuple[str, ...]:
        return (*super().kd_names(cfg, prefix), f"{prefix}_centerness")
