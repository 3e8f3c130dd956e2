"""What every family's criterion shares: flat outputs, assignment plumbing and the KD recipe.

A criterion turns one detector's raw head outputs into (a) its ground-truth losses and (b),
for the distiller, the family's prediction-mimicking losses between two sets of predictions
on the same priors (docs/method.md §3). The per-level outputs are flattened once (`FlatOutputs`)
and shared by both. Dense terms are computed over every prior and masked, which keeps the
step free of data-dependent shapes and host syncs. Losses run in fp32 even under autocast:
box decoding (exp, integral) in half precision would be off by whole pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.detection.box_coders import BoxCoder
from crosskd_cli.detection.losses import bce_kd_loss, giou_loss, qfl_kd_loss
from crosskd_cli.detection.priors import AnchorGrid, AnchorSet, flatten_levels
from crosskd_cli.detection.structures import HeadOutput, Target, upcast
from crosskd_cli.detection.targets import DenseTargets, pad_targets

ReduceMean = Callable[[Tensor], Tensor]
NORM_EPS = 1e-6


@dataclass
class FlatOutputs:
    """Head outputs flattened once, in prior order.

    cls: (B, A, num_classes) logits; box: (B, A, K) box predictions (K = 4, or 4 * (reg_max+1)
    for GFL); centerness: (B, A) logits or None; anchors: the priors; valid: (B, A) bool,
    inside each image's unpadded extent.
    """

    cls: Tensor
    box: Tensor
    centerness: Tensor | None
    anchors: AnchorSet
    valid: Tensor

    @property
    def strides(self) -> Tensor:
        """(A,) each prior's stride."""
        return self.anchors.strides

    def float(self) -> FlatOutputs:
        """The same outputs in fp32 (the losses' precision), or float64 if built so."""
        centerness = None if self.centerness is None else upcast(self.centerness)
        return FlatOutputs(upcast(self.cls), upcast(self.box), centerness, self.anchors, self.valid)


def identity(t: Tensor) -> Tensor:
    return t


class DenseCriterion(ABC):
    """Flatten, assign, GT losses and KD losses of one head family; holds no parameters.

    Built by the family table (`crosskd_cli.families`) with the family's box coder and priors.
    """

    def __init__(
        self,
        spec: ModelSpec,
        box_coder: BoxCoder,
        priors: AnchorGrid,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        self.spec = spec
        self.num_classes = spec.num_classes
        self.box_coder = box_coder
        self.priors = priors
        self.loss_weights = {**self.LOSS_WEIGHTS, **(loss_weights or {})}

    LOSS_WEIGHTS: dict[str, float] = {}  # the family's GT loss weights, keyed by logged name

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Refuse a model spec this family's targets cannot serve (called before building)."""
        return  # most families serve any spec that builds

    def flatten(self, head_out: HeadOutput, image_sizes: Sequence[tuple[int, int]]) -> FlatOutputs:
        """Flatten every level once and attach the priors and the valid mask."""
        sizes = [tuple(x.shape[-2:]) for x in head_out.cls_logits]
        device = head_out.cls_logits[0].device
        per_prior = self.priors.per_location
        centerness = None
        if head_out.centerness:
            centerness = flatten_levels(head_out.centerness, per_prior).squeeze(-1)
        return FlatOutputs(
            cls=flatten_levels(head_out.cls_logits, per_prior),
            box=flatten_levels(head_out.box_preds, per_prior),
            centerness=centerness,
            anchors=self.priors(sizes, device),
            valid=self.priors.valid_mask(image_sizes, sizes, device),
        )

    def assign(
        self, flat: FlatOutputs, targets: Sequence[Target], reduce_mean: ReduceMean | None = None
    ) -> DenseTargets:
        """Assign every image at once -> DenseTargets (counts averaged by `reduce_mean`)."""
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, flat.valid.device)
        return self.build_targets(flat, gt_boxes, gt_labels, gt_mask, reduce_mean or identity)

    @abstractmethod
    def build_targets(
        self,
        flat: FlatOutputs,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        reduce_mean: ReduceMean,
    ) -> DenseTargets:
        """The family's assigner and target gathering (no_grad)."""

    def losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean | None = None
    ) -> dict[str, Tensor]:
        """The family's GT losses, weighted and normalised as MMDetection's head does."""
        with torch.autocast(flat.cls.device.type, enabled=False):
            return self.gt_losses(flat.float(), targets, reduce_mean or identity)

    @abstractmethod
    def gt_losses(
        self, flat: FlatOutputs, targets: DenseTargets, reduce_mean: ReduceMean
    ) -> dict[str, Tensor]:
        """GT losses on fp32 outputs."""

    def __call__(
        self,
        head_out: HeadOutput,
        targets: Sequence[Target],
        image_sizes: Sequence[tuple[int, int]],
        reduce_mean: ReduceMean | None = None,
    ) -> tuple[dict[str, Tensor], DenseTargets, FlatOutputs]:
        """Flatten once, assign, compute the losses; returns (losses, targets, flat outputs)."""
        flat = self.flatten(head_out, image_sizes)
        dense_targets = self.assign(flat, targets, reduce_mean)
        return self.losses(flat, dense_targets, reduce_mean), dense_targets, flat

    # ------------------------------------------------------------------ distillation

    def kd_losses(
        self,
        pred: FlatOutputs,
        teacher: FlatOutputs,
        targets: DenseTargets,
        cfg: DistillConfig,
        weights: dict[str, float],
        prefix: str,
        reduce_mean: ReduceMean | None = None,
    ) -> dict[str, Tensor]:
        """docs/method.md §3 between predictions `pred` (cross-head or the student's own) and
        the teacher's, on the same priors: `{prefix}_cls`, `{prefix}_box` and family extras,
        each times its weight in `weights` ({"cls", "box", "centerness"})."""
        reduce_mean = reduce_mean or identity
        with torch.autocast(pred.cls.device.type, enabled=False):
            pred, teacher = pred.float(), teacher.float()
            norm = self.kd_normalizer(targets)
            losses = {}
            if cfg.cls_kd != "none":
                cls_sum = cls_kd(pred.cls, teacher.cls, targets.label_weights, cfg)
                losses[f"{prefix}_cls"] = weights["cls"] * cls_sum / norm
            if cfg.box_kd:
                region = region_weight(teacher.cls, targets, cfg.region_weight)
                box = self.box_kd(pred, teacher, region, norm, cfg, reduce_mean)
                losses[f"{prefix}_box"] = weights["box"] * box
            losses.update(self.extra_kd(pred, teacher, targets, weights, prefix))
        return losses

    def kd_normalizer(self, targets: DenseTargets) -> Tensor:
        """What the KD sums are divided by: the number of positives (FCOS overrides)."""
        return targets.num_pos

    def decode(self, flat: FlatOutputs) -> Tensor:
        """(B, A, 4) boxes in pixels from the box predictions, unclamped (training decode)."""
        return self.box_coder.decode(flat.anchors.boxes, flat.strides, flat.box)

    # The box KD loss on decoded boxes: GIoU (RetinaNet, ATSS); FCOS uses -ln IoU
    box_kd_loss = staticmethod(giou_loss)

    def box_kd(
        self,
        pred: FlatOutputs,
        teacher: FlatOutputs,
        region: Tensor,
        norm: Tensor,
        cfg: DistillConfig,
        reduce_mean: ReduceMean,
    ) -> Tensor:
        """The family's box KD, normalised, not yet weighted: `box_kd_loss` between boxes
        decoded from both predictions, weighted by `region`, / `norm` (the KD normaliser).
        GFL overrides it with KL on the box distributions."""
        teacher_boxes = self.decode(teacher).detach()
        return self.box_kd_loss(self.decode(pred), teacher_boxes, region, "sum") / norm

    def extra_kd(
        self,
        pred: FlatOutputs,
        teacher: FlatOutputs,
        targets: DenseTargets,
        weights: dict[str, float],
        prefix: str,
    ) -> dict[str, Tensor]:
        """Family-specific KD terms beyond cls and box (ATSS: centerness)."""
        return {}

    def kd_names(self, cfg: DistillConfig, prefix: str) -> tuple[str, ...]:
        """The names `kd_losses` returns under `cfg`."""
        names = [f"{prefix}_cls"] * (cfg.cls_kd != "none") + [f"{prefix}_box"] * cfg.box_kd
        return tuple(names)


def cls_kd(student: Tensor, teacher: Tensor, label_weights: Tensor, cfg: DistillConfig) -> Tensor:
    """The classification KD sum: paper Eq. 7 (qfl) or plain BCE (Table 11)."""
    if cfg.cls_kd == "qfl":
        return qfl_kd_loss(student, teacher, label_weights, beta=cfg.beta)
    return bce_kd_loss(student, teacher, label_weights)


def region_weight(teacher_cls: Tensor, targets: DenseTargets, kind: str) -> Tensor:
    """(B, A) box-KD weights: soft = sigmoid(teacher's max class logit), hard = GT positives;
    both masked by the label weights (docs/method.md §3.2)."""
    if kind == "soft":
        region = torch.sigmoid(teacher_cls.detach().amax(dim=-1))
    else:
        region = targets.pos_mask.to(teacher_cls.dtype)
    return region * targets.label_weights
