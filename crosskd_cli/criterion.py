"""GFL's ground-truth losses (QFL, DFL, GIoU) with MMDetection's normalisation, on flat outputs.

The per-level head outputs are flattened once (`FlatOutputs`); the distiller reuses those
tensors, the label weights and num_pos. Box terms are computed densely over every anchor and
masked by the positives, which keeps the step free of data-dependent shapes and host syncs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crosskd_cli.errors import ModelError
from crosskd_cli.losses import distribution_focal_loss, giou_loss, quality_focal_loss
from crosskd_cli.specs import ModelSpec
from crosskd_cli.structures import HeadOutput, Target
from crosskd_cli.targets import (
    ATSS_TOPK,
    AnchorGrid,
    AnchorSet,
    GFLTargets,
    aligned_box_iou,
    atss_assign,
    bbox_to_distance,
    build_gfl_targets,
    distance_to_bbox,
    flatten_levels,
    integral,
    pad_targets,
)

ReduceMean = Callable[[Tensor], Tensor]

# The one table of GT loss weights (MMDetection's GFL config); keys are the logged names.
LOSS_WEIGHTS = {"loss_qfl": 1.0, "loss_dfl": 0.25, "loss_giou": 2.0}
QFL_BETA = 2.0


@dataclass
class FlatOutputs:
    """Head outputs flattened once, in anchor order.

    cls: (B, A, num_classes) logits; box: (B, A, 4 * (reg_max + 1)) logits; anchors: the
    AnchorSet; valid: (B, A) bool, inside each image's unpadded extent.
    """

    cls: Tensor
    box: Tensor
    anchors: AnchorSet
    valid: Tensor

    @property
    def strides(self) -> Tensor:
        """(A,) each anchor's stride."""
        return self.anchors.strides


class GFLCriterion:
    """ATSS assignment and the GFL losses; no parameters, so it never enters a state dict."""

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int],
        reg_max: int = 16,
        octave_base_scale: float = 8.0,
        topk: int = ATSS_TOPK,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.topk = topk
        self.anchor_grid = AnchorGrid(strides, octave_base_scale)
        self.loss_weights = {**LOSS_WEIGHTS, **(loss_weights or {})}

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GFLCriterion:
        return cls(spec.num_classes, spec.strides, spec.reg_max, spec.octave_base_scale)

    def flatten(self, head_out: HeadOutput, image_sizes: Sequence[tuple[int, int]]) -> FlatOutputs:
        """Flatten every level once and attach anchors and the valid mask."""
        sizes = [tuple(x.shape[-2:]) for x in head_out.cls_logits]
        device = head_out.cls_logits[0].device
        return FlatOutputs(
            cls=flatten_levels(head_out.cls_logits),
            box=flatten_levels(head_out.box_preds),
            anchors=self.anchor_grid(sizes, device),
            valid=self.anchor_grid.valid_mask(image_sizes, sizes, device),
        )

    def assign(
        self, flat: FlatOutputs, targets: Sequence[Target], reduce_mean: ReduceMean | None = None
    ) -> GFLTargets:
        """ATSS on every image at once -> GFLTargets (num_pos averaged by `reduce_mean`)."""
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, flat.valid.device)
        matched = atss_assign(flat.anchors, flat.valid, gt_boxes, gt_mask, self.topk)
        return build_gfl_targets(matched, gt_boxes, gt_labels, self.num_classes, reduce_mean)

    def losses(
        self, flat: FlatOutputs, targets: GFLTargets, reduce_mean: ReduceMean | None = None
    ) -> dict[str, Tensor]:
        """{"loss_qfl", "loss_dfl", "loss_giou"}, weighted, normalised as MMDetection's GFLHead.

        QFL / num_pos. GIoU and DFL (on stride-normalised boxes) are weighted per positive by
        its highest detached class probability and divided by the sum of those weights
        (averaged across processes, at least 1); DFL also averages its 4 sides.
        """
        # Box decoding in half precision would be off by whole pixels: fp32, as MMDetection
        with torch.autocast(flat.cls.device.type, enabled=False):
            return self._losses(flat.cls.float(), flat.box.float(), flat, targets, reduce_mean)

    def _losses(
        self,
        cls: Tensor,
        box: Tensor,
        flat: FlatOutputs,
        targets: GFLTargets,
        reduce_mean: ReduceMean | None,
    ) -> dict[str, Tensor]:
        pos = targets.pos_mask
        stride = flat.strides[:, None]
        centers = flat.anchors.centers / stride  # (A, 2) in units of stride
        pred_boxes = distance_to_bbox(centers, integral(box, self.reg_max))  # (B, A, 4)
        # Off positives the target is a zero box: finite everywhere, and its weight is 0
        target_boxes = targets.bbox_targets / stride
        quality = aligned_box_iou(pred_boxes.detach(), target_boxes) * pos
        loss_qfl = quality_focal_loss(
            cls, (targets.labels, quality), targets.label_weights, QFL_BETA, "sum"
        )
        weight = cls.detach().sigmoid().amax(-1) * pos  # (B, A)
        loss_giou = giou_loss(pred_boxes, target_boxes, weight, "sum")
        target_dist = bbox_to_distance(centers, target_boxes, max_dis=self.reg_max)
        loss_dfl = distribution_focal_loss(
            box.unflatten(-1, (4, self.reg_max + 1)), target_dist, weight[..., None], "sum"
        )
        weight_sum = weight.sum()
        if reduce_mean is not None:
            weight_sum = reduce_mean(weight_sum)
        weight_sum = weight_sum.clamp(min=1.0)
        w = self.loss_weights
        return {
            "loss_qfl": w["loss_qfl"] * loss_qfl / targets.num_pos,
            "loss_dfl": w["loss_dfl"] * loss_dfl / 4 / weight_sum,
            "loss_giou": w["loss_giou"] * loss_giou / weight_sum,
        }

    def __call__(
        self,
        head_out: HeadOutput,
        targets: Sequence[Target],
        image_sizes: Sequence[tuple[int, int]],
        reduce_mean: ReduceMean | None = None,
    ) -> tuple[dict[str, Tensor], GFLTargets, FlatOutputs]:
        """Flatten once, assign, compute the losses; returns (losses, targets, flat outputs)."""
        flat = self.flatten(head_out, image_sizes)
        gfl_targets = self.assign(flat, targets, reduce_mean)
        return self.losses(flat, gfl_targets, reduce_mean), gfl_targets, flat


CRITERIA = {"gfl": GFLCriterion.from_spec}


def build_criterion(spec: ModelSpec) -> GFLCriterion:
    """The ground-truth criterion of the spec's head family."""
    if spec.family not in CRITERIA:
        raise ModelError(
            f"No training losses for head family '{spec.family}'.",
            hint=f"Use one of: {', '.join(sorted(CRITERIA))}.",
        )
    return CRITERIA[spec.family](spec)
