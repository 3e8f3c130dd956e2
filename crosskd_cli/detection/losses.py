"""Every loss as a pure function: the families' ground-truth losses and the distillation losses.

GT losses take `reduction` "none" (per element, weighted) or "sum" (weighted sum); none of them
divides by anything. The KD losses return weighted sums. Normalisation (by the number of
positives, the sum of weights, ...) is always the caller's, which is where MMDetection and the
CrossKD recipe differ per term (see `crosskd_cli.criteria` and `crosskd_cli.distill.distiller`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from crosskd_cli.detection.box_ops import aligned_box_iou
from crosskd_cli.errors import ModelError

Reduction = Literal["none", "sum"]
STD_EPS = 1e-6  # PKD standardisation: unbiased std + 1e-6
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
IOU_LOSS_EPS = 1e-6  # -ln IoU floors the IoU here, as MMDetection's IoULoss


def _reduce(loss: Tensor, weight: Tensor | None, reduction: Reduction) -> Tensor:
    if weight is not None:
        loss = loss * weight
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")


def quality_focal_loss(
    pred: Tensor,
    target: tuple[Tensor, Tensor],
    weight: Tensor | None = None,
    beta: float = 2.0,
    reduction: Reduction = "sum",
) -> Tensor:
    """Quality Focal Loss, GFL (https://arxiv.org/abs/2006.04388), MMDetection semantics.

    pred: (..., C) logits; target: (labels (...) int64 with background = C, scores (...) the IoU
    quality of each positive); weight: (...) per anchor. Each class of each anchor is a binary
    problem: the labelled class of a positive aims at its score with factor
    |score - sigmoid|^beta, every other entry aims at 0 with factor sigmoid^beta.
    Returns (...) summed over classes, or its sum.
    """
    labels, scores = target
    num_classes = pred.shape[-1]
    is_pos = (labels >= 0) & (labels < num_classes)
    is_target = torch.zeros_like(pred, dtype=torch.bool)
    is_target.scatter_(-1, labels.clamp(0, num_classes - 1)[..., None], is_pos[..., None])
    soft_target = is_target * scores[..., None].to(pred.dtype)
    prob = pred.sigmoid()
    modulator = torch.where(is_target, (soft_target - prob).abs(), prob).pow(beta)
    loss = F.binary_cross_entropy_with_logits(pred, soft_target, reduction="none") * modulator
    return _reduce(loss.sum(-1), weight, reduction)


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: Reduction = "sum",
) -> Tensor:
    """Distribution Focal Loss, GFL (https://arxiv.org/abs/2006.04388).

    pred: (..., n_bins) logits over distances 0..n_bins-1; target: (...) float distance in
    [0, n_bins - 1). Cross-entropy to the two bins around the target, weighted by linear
    interpolation: (right - y) * CE(left) + (y - left) * CE(right). Returns (...) or its sum.
    """
    log_probs = F.log_softmax(pred, dim=-1)
    left = target.floor().long()
    right = (left + 1).clamp(max=pred.shape[-1] - 1)  # a target of exactly n_bins-1 has no right
    weight_left = (left + 1).to(target.dtype) - target
    weight_right = target - left.to(target.dtype)
    nll_left = -log_probs.gather(-1, left[..., None]).squeeze(-1)
    nll_right = -log_probs.gather(-1, right[..., None]).squeeze(-1)
    return _reduce(nll_left * weight_left + nll_right * weight_right, weight, reduction)


def focal_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> Tensor:
    """Sigmoid focal loss (https://arxiv.org/abs/1708.02002), summed. torchvision's op.

    logits: (..., C); labels: (...) int64 with background = C (an all-zero target row);
    weight: (...) per prior. Sum over classes, weighted, summed; the caller divides.
    """
    num_classes = logits.shape[-1]
    one_hot = F.one_hot(labels.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
    loss = sigmoid_focal_loss(logits, one_hot.to(logits.dtype), alpha, gamma, reduction="none")
    return _reduce(loss.sum(-1), weight, "sum")


def iou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: Reduction = "sum",
    eps: float = IOU_LOSS_EPS,
) -> Tensor:
    """-ln IoU (UnitBox, https://arxiv.org/abs/1608.01471), FCOS's box loss. (..., 4) xyxy.

    The IoU is floored at eps, so non-overlapping boxes cost -ln(eps) and stay finite.
    """
    loss = -aligned_box_iou(pred, target).clamp(min=eps).log()
    return _reduce(loss, weight, reduction)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: Reduction = "sum",
    eps: float = 1e-7,
) -> Tensor:
    """1 - GIoU (https://arxiv.org/abs/1902.09630). pred, target: (..., 4) xyxy -> (...) or sum."""
    loss = generalized_box_iou_loss(pred, target, reduction="none", eps=eps)
    return _reduce(loss, weight, reduction)


def qfl_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    """CrossKD classification KD (paper Eq. 7, https://arxiv.org/abs/2306.11369). A sum.

    student_logits, teacher_logits: (..., C); weight: (...) per location (the label weights).
    Sum of BCE_with_logits(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta; the caller divides
    (by the number of positives).
    """
    soft = teacher_logits.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(student_logits, soft, reduction="none")
    loss = bce * (student_logits.sigmoid() - soft).abs().pow(beta)
    return _reduce(loss, None if weight is None else weight[..., None], "sum")


def bce_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Plain BCE to the teacher's probabilities (paper Table 11 ablation). A sum.

    Shapes as `qfl_kd_loss`; the caller divides.
    """
    soft = teacher_logits.detach().sigmoid()
    loss = F.binary_cross_entropy_with_logits(student_logits, soft, reduction="none")
    return _reduce(loss, None if weight is None else weight[..., None], "sum")


def kl_box_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor | None = None,
    T: float = 1.0,
    reg_max: int = 16,
) -> Tensor:
    """GFL box KD: KL(softmax(t / T) || softmax(s / T)) * T^2 per box side. A sum.

    student_logits, teacher_logits: (..., 4 * (reg_max + 1)) distribution logits (Scale
    applied, no integral); weight: (...) per location. KL summed over the bins, averaged over
    the 4 sides, weighted, summed; the caller divides by the sum of weights (docs/method.md §3.3).
    """
    shape = (4, reg_max + 1)
    log_student = F.log_softmax(student_logits.unflatten(-1, shape) / T, dim=-1)
    teacher = F.softmax(teacher_logits.detach().unflatten(-1, shape) / T, dim=-1)
    kl = F.kl_div(log_student, teacher, reduction="none").sum(-1) * (T * T)  # (..., 4)
    return _reduce(kl.mean(-1), weight, "sum")


def pkd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """PKD feature imitation (https://arxiv.org/abs/2207.02039), summed over FPN levels.

    Each level (N, C, H, W): both sides standardised per channel over (N, H, W) (unbiased std
    + 1e-6), then MSE / 2 averaged over elements. The caller applies the loss weight.
    """
    if len(student_feats) != len(teacher_feats):
        raise ModelError(
            f"PKD got {len(student_feats)} student and {len(teacher_feats)} teacher levels.",
            hint="Pair models with the same FPN levels (strides).",
        )
    total = student_feats[0].new_zeros(())
    for student, teacher in zip(student_feats, teacher_feats, strict=True):
        if student.shape != teacher.shape:
            raise ModelError(
                f"PKD needs equal feature shapes, got student {tuple(student.shape)} and "
                f"teacher {tuple(teacher.shape)}.",
                hint="Give both models the same fpn_channels, or pick a method without pkd.",
            )
        diff = _standardize(student) - _standardize(teacher.detach())
        total = total + diff.pow(2).mean() / 2
    return total


def _standardize(feat: Tensor) -> Tensor:
    """Zero mean, unit (unbiased) std per channel over (N, H, W)."""
    dims = (0, 2, 3)
    mean = feat.mean(dim=dims, keepdim=True)
    std = feat.std(dim=dims, keepdim=True)
    return (feat - mean) / (std + STD_EPS)
