"""GFL: ATSS assignment, QFL + DFL + GIoU ground-truth losses, KL box-distribution KD."""

from __future__ import annotations

from torch import Tensor

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.criteria.base import NORM_EPS, DenseCriterion, FlatOutputs, ReduceMean
from crosskd_cli.detection.box_coders import DistributionCoder
from crosskd_cli.detection.box_ops import (
    aligned_box_iou,
    bbox_to_distance,
    distance_to_bbox,
    integral,
)
from crosskd_cli.detection.losses import (
    distribution_focal_loss,
    giou_loss,
    kl_box_kd_loss,
    quality_focal_loss,
)
from crosskd_cli.detection.priors import AnchorGrid
from crosskd_cli.detection.targets import ATSS_TOPK, DenseTargets, atss_assign, build_targets

# The one table of GFL's GT loss weights (MMDetection's GFL config); keys are the logged names.
LOSS_WEIGHTS = {"loss_qfl": 1.0, "loss_dfl": 0.25, "loss_giou": 2.0}
QFL_BETA = 2.0


class GFLCriterion(DenseCriterion):
    """MMDetection's GFLHead losses; boxes are decoded in units of the anchor's stride."""

    LOSS_WEIGHTS = LOSS_WEIGHTS

    def __init__(
        self,
        spec: ModelSpec,
        box_coder: DistributionCoder,
        priors: AnchorGrid,
        loss_weights: dict[str, float] | None = None,
        topk: int = ATSS_TOPK,
    ) -> None:
        super().__init__(spec, box_coder, priors, loss_weights)
        self.reg_max = box_coder.reg_max
        self.topk = topk

    def build_targets(
        self,
        flat: FlatOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        reduce_mean: ReduceMean,
    ) -> DenseTargets:
        matched = atss_assign(flat.anchors, flat.valid, gt_boxes, gt_mask, self.topk)
        return build_targets(matched, gt_boxes, gt_labels, self.num_classes, reduce_mean)

    def gt_losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean
    ) -> dict[str, Tensor]:
        """QFL / num_pos. GIoU and DFL (on stride-normalised boxes) are weighted per positive by
        its highest detached class probability and divided by the sum of those weights
        (averaged across processes, at least 1); DFL also averages its 4 sides.
        """
        cls, box, pos = flat.cls, flat.box, targets.pos_mask
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
        weight_sum = reduce_mean(weight.sum()).clamp(min=1.0)
        w = self.loss_weights
        return {
            "loss_qfl": w["loss_qfl"] * loss_qfl / targets.num_pos,
            "loss_dfl": w["loss_dfl"] * loss_dfl / 4 / weight_sum,
            "loss_giou": w["loss_giou"] * loss_giou / weight_sum,
        }

    def box_kd(
        self,
        pred: FlatOutputs,
        teacher: FlatOutputs,
        region: Tensor,
        norm: Tensor,
        cfg: DistillConfig,
        reduce_mean: ReduceMean,
    ) -> Tensor:
        """KL between the box-side distributions, weighted by `region`, / sum(region)."""
        box_sum = kl_box_kd_loss(
            pred.box, teacher.box, region, T=cfg.temperature, reg_max=self.reg_max
        )
        return box_sum / reduce_mean(region.sum().detach()).clamp(min=NORM_EPS)
