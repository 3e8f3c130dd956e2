"""RetinaNet: max-IoU assignment, focal + L1-on-deltas GT losses, GIoU box KD."""

from __future__ import annotations

import torch
from torch import Tensor

from crosskd_cli.criteria.base import DenseCriterion, FlatOutputs, ReduceMean
from crosskd_cli.detection.losses import focal_loss
from crosskd_cli.detection.targets import DenseTargets, build_targets, max_iou_assign


def positive_boxes(flat: FlatOutputs, targets: DenseTargets) -> Tensor:
    """(B, A, 4) target boxes with each non-positive's own anchor standing in for the zero box,
    so encoding and decoding stay finite where the weight is 0 anyway."""
    anchors = flat.anchors.boxes.expand_as(targets.bbox_targets)
    return torch.where(targets.pos_mask[..., None], targets.bbox_targets, anchors)


class RetinaNetCriterion(DenseCriterion):
    """MMDetection's RetinaHead losses: focal loss over valid, non-ignored anchors and L1 on the
    positives' deltas (means 0, stds 1), both / num_pos (this process's, no cross-process
    average, as MMDetection's AnchorHead). Box KD: the base's GIoU on decoded boxes / num_pos."""

    LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 1.0}

    def build_targets(
        self,
        flat: FlatOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        reduce_mean: ReduceMean,
    ) -> DenseTargets:
        matched = max_iou_assign(flat.anchors, flat.valid, gt_boxes, gt_mask)
        return build_targets(
            matched, gt_boxes, gt_labels, self.num_classes, min_one_per_image=False
        )

    def gt_losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean
    ) -> dict[str, Tensor]:
        loss_cls = focal_loss(flat.cls, targets.labels, targets.label_weights)
        target_deltas = self.box_coder.encode(flat.anchors.boxes, positive_boxes(flat, targets))
        l1 = (flat.box - target_deltas).abs().sum(-1) * targets.pos_mask
        w = self.loss_weights
        return {
            "loss_cls": w["loss_cls"] * loss_cls / targets.num_pos,
            "loss_bbox": w["loss_bbox"] * l1.sum() / targets.num_pos,
        }
