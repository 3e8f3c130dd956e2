"""Assignment: which prior learns which ground-truth box (ATSS, max-IoU, FCOS's ranges), and the
dense targets built from it, all under `no_grad`. The priors are `priors`; the box encodings
the losses decode through are `box_ops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from crosskd_cli.detection.box_ops import bbox_to_distance
from crosskd_cli.detection.priors import AnchorSet
from crosskd_cli.detection.structures import Target

# matched_idxs sentinels (a value >= 0 is the index of the matched ground-truth box)
NEGATIVE = -1  # a valid anchor assigned to background
OUT_OF_IMAGE = -2  # an anchor outside its image's unpadded extent: never positive, weight 0
IGNORED = -3  # RetinaNet's IoU band between negative and positive: weight 0

ATSS_TOPK = 9  # candidates per level and per ground-truth box
INSIDE_MARGIN = 0.01  # an anchor centre must lie more than this (px) inside the box
POS_IOU, NEG_IOU = 0.5, 0.4  # RetinaNet's max-IoU thresholds
FCOS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))

ReduceMean = Callable[[Tensor], Tensor]


def pad_targets(targets: Sequence[Target], device: torch.device | str) -> tuple[Tensor, ...]:
    """Stack per-image ground truth: boxes (B, G, 4), labels (B, G), mask (B, G) bool.

    G is the largest box count in the batch; padded entries are zero boxes with mask False.
    """
    boxes = pad_sequence([t.boxes.reshape(-1, 4) for t in targets], batch_first=True)
    labels = pad_sequence([t.labels.reshape(-1) for t in targets], batch_first=True)
    counts = torch.tensor([len(t.labels) for t in targets], device=device)
    mask = torch.arange(boxes.shape[1], device=device) < counts[:, None]
    return boxes.to(device, torch.float32), labels.to(device, torch.int64), mask


def batched_iou(anchors: AnchorSet, gt_boxes: Tensor) -> Tensor:
    """(B, A, G) IoU of every prior with every image's (padded) ground-truth boxes (B, G, 4)."""
    batch, num_gt = gt_boxes.shape[:2]
    iou = box_iou(anchors.boxes, gt_boxes.reshape(-1, 4)).view(-1, batch, num_gt)
    return iou.permute(1, 0, 2)


@torch.no_grad()
def atss_assign(
    anchors: AnchorSet,
    valid: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    topk: int = ATSS_TOPK,
) -> Tensor:
    """ATSS (https://arxiv.org/abs/1912.02424), MMDetection's ATSSAssigner, batched.

    For each ground-truth box: the `topk` valid anchors per level nearest to its centre are
    candidates; those whose IoU >= mean + std (unbiased) of the candidates' IoUs and whose centre
    lies inside the box are positive; an anchor positive for several boxes takes the one of
    highest IoU (the first on ties).

    anchors: A anchors; valid: (B, A) bool; gt_boxes: (B, G, 4) xyxy; gt_mask: (B, G) bool.
    Returns matched_idxs (B, A) int64: box index, NEGATIVE or OUT_OF_IMAGE.
    """
    batch, num_anchors = valid.shape
    matched = torch.full((batch, num_anchors), NEGATIVE, dtype=torch.int64, device=valid.device)
    num_gt = gt_boxes.shape[1]
    if num_gt > 0:
        matched = _atss_match(anchors, valid, gt_boxes, gt_mask, topk)
    return matched.masked_fill(~valid, OUT_OF_IMAGE)


def _atss_match(
    anchors: AnchorSet, valid: Tensor, gt_boxes: Tensor, gt_mask: Tensor, topk: int
) -> Tensor:
    num_gt = gt_boxes.shape[1]
    iou = batched_iou(anchors, gt_boxes)
    anchor_xy = anchors.centers
    gt_xy = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
    distance = (anchor_xy[None, :, None, :] - gt_xy[:, None, :, :]).pow(2).sum(-1).sqrt()
    distance = distance.masked_fill(~valid[..., None], float("inf"))  # (B, A, G)

    candidates = []  # the nearest `topk` per level; invalid anchors only fill short levels
    start = 0
    for count in anchors.num_per_level:
        level = distance[:, start : start + count]
        candidates.append(level.topk(min(topk, count), dim=1, largest=False).indices + start)
        start += count
    cand = torch.cat(candidates, dim=1)  # (B, K, G)
    cand_valid = valid[..., None].expand(-1, -1, num_gt).gather(1, cand)
    cand_iou = iou.gather(1, cand)

    threshold = _masked_mean_plus_std(cand_iou, cand_valid)  # (B, G)
    cx, cy = anchor_xy[:, 0][cand], anchor_xy[:, 1][cand]  # (B, K, G)
    x1, y1, x2, y2 = (gt_boxes[..., i][:, None, :] for i in range(4))
    inside = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy]).amin(0) > INSIDE_MARGIN
    is_pos = (cand_iou >= threshold[:, None]) & inside & cand_valid & gt_mask[:, None, :]

    # Candidate indices are distinct within a (image, box) column, so the scatter is exact
    pos_iou = torch.full_like(iou, float("-inf"))
    pos_iou.scatter_(1, cand, cand_iou.masked_fill(~is_pos, float("-inf")))
    best_iou, best_gt = pos_iou.max(dim=2)
    return torch.where(best_iou > float("-inf"), best_gt, NEGATIVE)


def _masked_mean_plus_std(values: Tensor, mask: Tensor) -> Tensor:
    """(B, K, G) -> (B, G): mean + unbiased std over K of the entries where mask is True."""
    mask = mask.to(values.dtype)
    count = mask.sum(1)
    mean = (values * mask).sum(1) / count.clamp(min=1)
    var = ((values - mean[:, None]) * mask).pow(2).sum(1) / (count - 1).clamp(min=1)
    return mean + var.sqrt()


@dataclass
class DenseTargets:
    """Training targets of a batch, aligned with the flattened priors (every family).

    labels: (B, A) int64, background = num_classes; label_weights: (B, A) float, 1 on valid
    priors (0 outside the image and in RetinaNet's ignore band; FCOS: 1 everywhere);
    bbox_targets: (B, A, 4) xyxy pixels (zero off positives); pos_mask: (B, A) bool;
    matched_idxs: (B, A) int64 (see the sentinels above); num_pos: scalar float, the
    positives (see `build_targets`), >= 1.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    pos_mask: Tensor
    matched_idxs: Tensor
    num_pos: Tensor
    centerness: Tensor | None = None  # (B, A) ATSS/FCOS centerness targets, 0 off positives
    centerness_sum: Tensor | None = None  # their sum, averaged across processes (one reduce)


@torch.no_grad()
def build_targets(
    matched_idxs: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    reduce_mean: ReduceMean | None = None,
    min_one_per_image: bool = True,
) -> DenseTargets:
    """Gather each positive prior's box and label (MMDetection's `get_targets`).

    matched_idxs: (B, A) from an assigner; gt_boxes (B, G, 4); gt_labels (B, G).
    num_pos counts at least 1 per image when `min_one_per_image` (GFL, ATSS), else the plain
    total (RetinaNet, FCOS), then is averaged across processes by `reduce_mean` (identity when
    None) and floored at 1. Weight 0 only where matched_idxs is OUT_OF_IMAGE or IGNORED.
    """
    pos = matched_idxs >= 0
    index = matched_idxs.clamp(min=0)
    if gt_boxes.shape[1] == 0:  # nothing to gather from; no anchor is positive
        gt_boxes = gt_boxes.new_zeros(gt_boxes.shape[0], 1, 4)
        gt_labels = gt_labels.new_zeros(gt_labels.shape[0], 1)
    labels = torch.where(pos, gt_labels.gather(1, index), num_classes)
    boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    boxes = boxes.masked_fill(~pos[..., None], 0.0)
    per_image = pos.sum(1)
    num_pos = (per_image.clamp(min=1) if min_one_per_image else per_image).sum().float()
    if reduce_mean is not None:
        num_pos = reduce_mean(num_pos)
    return DenseTargets(
        labels=labels,
        label_weights=(matched_idxs >= NEGATIVE).to(torch.float32),
        bbox_targets=boxes,
        pos_mask=pos,
        matched_idxs=matched_idxs,
        num_pos=num_pos.clamp(min=1.0),
    )


@torch.no_grad()
def max_iou_assign(
    anchors: AnchorSet,
    valid: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    pos_iou: float = POS_IOU,
    neg_iou: float = NEG_IOU,
) -> Tensor:
    """MMDetection's MaxIoUAssigner as RetinaNet configures it, batched over images.

    A valid anchor whose best IoU is >= pos_iou takes that box; below neg_iou it is NEGATIVE;
    in between IGNORED. Low-quality matches (min_pos_iou=0, gt_max_assign_all): every anchor
    sharing a box's highest IoU becomes positive for it, later boxes winning, as MMDetection
    loops over boxes in order. One deliberate difference: a box no anchor overlaps at all
    (best IoU 0) gets no low-quality match, where MMDetection would make every non-overlapping
    anchor positive for it.

    anchors: A anchors; valid: (B, A) bool; gt_boxes: (B, G, 4); gt_mask: (B, G) bool.
    Returns matched_idxs (B, A) int64: box index, NEGATIVE, IGNORED or OUT_OF_IMAGE.
    """
    num_gt = gt_boxes.shape[1]
    if num_gt == 0:
        matched = torch.full_like(valid, NEGATIVE, dtype=torch.int64)
        return matched.masked_fill(~valid, OUT_OF_IMAGE)
    iou = batched_iou(anchors, gt_boxes).masked_fill(~gt_mask[:, None, :], -1.0)  # (B, A, G)
    best_iou, best_gt = iou.max(dim=2)
    matched = torch.full_like(best_gt, IGNORED)
    matched = torch.where(best_iou < neg_iou, NEGATIVE, matched)
    matched = torch.where(best_iou >= pos_iou, best_gt, matched)

    gt_best = iou.masked_fill(~valid[..., None], -1.0).amax(dim=1)  # (B, G) over valid anchors
    is_best = (iou == gt_best[:, None, :]) & (gt_best > 0)[:, None, :] & valid[..., None]
    box_index = torch.arange(num_gt, device=iou.device)
    last_best = torch.where(is_best, box_index, -1).amax(dim=2)  # (B, A): later boxes win
    matched = torch.where(last_best >= 0, last_best, matched)
    return matched.masked_fill(~valid, OUT_OF_IMAGE)


@torch.no_grad()
def fcos_assign(points: AnchorSet, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """FCOS without centre sampling (MMDetection FCOSHead._get_targets_single), batched.

    A point is a candidate of a box when it lies strictly inside it and its largest distance
    to the box's sides falls in its level's regress range (FCOS_RANGES); among candidates the
    box of smallest area wins (the first on ties). Every point counts (no valid mask: FCOS
    trains its padding as background, as MMDetection does).

    Returns matched_idxs (B, A) int64: box index or NEGATIVE.
    """
    batch, num_gt = gt_boxes.shape[:2]
    num_points = points.boxes.shape[0]
    if num_gt == 0:
        return torch.full((batch, num_points), NEGATIVE, dtype=torch.int64, device=gt_boxes.device)
    ranges = torch.tensor(FCOS_RANGES[: len(points.num_per_level)], device=gt_boxes.device)
    ranges = ranges.repeat_interleave(torch.tensor(points.num_per_level, device=ranges.device), 0)
    distances = bbox_to_distance(points.centers[None, :, None, :], gt_boxes[:, None, :, :])
    inside = distances.amin(-1) > 0  # (B, A, G)
    reach = distances.amax(-1)
    in_range = (reach >= ranges[None, :, None, 0]) & (reach <= ranges[None, :, None, 1])
    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
    ok = inside & in_range & gt_mask[:, None, :]
    areas = torch.where(ok, areas[:, None, :], float("inf"))
    min_area, best_gt = areas.min(dim=2)
    return torch.where(torch.isfinite(min_area), best_gt, NEGATIVE)


def centerness_target(distances: Tensor) -> Tensor:
    """FCOS/ATSS centerness of (l, t, r, b) distances (..., 4) -> (...) in [0, 1].

    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); callers only use it on positives.
    """
    left_right = distances[..., [0, 2]]
    top_bottom = distances[..., [1, 3]]
    ratio = (left_right.amin(-1) / left_right.amax(-1)) * (
        top_bottom.amin(-1) / top_bottom.amax(-1)
    )
    return ratio.clamp(min=0).sqrt()
